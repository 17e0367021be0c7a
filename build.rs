//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/cri/api.proto",
        "proto/containerd/version.proto",
        "proto/containerd/events.proto",
        "proto/containerd/content.proto",
        "proto/containerd/leases.proto",
        "proto/containerd/types.proto",
    ];
    let api = "proto/pullgate/v1/api.proto";
    for f in files.iter().chain([&api]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        // Blob bytes written into containerd's store pass through without a copy.
        .bytes(".containerd.services.content.v1.WriteContentRequest.data")
        .compile_fds(fds)?;
    // pullgate's own API: a request that does not parse is INVALID_ARGUMENT (src/api/codec.rs).
    tonic_prost_build::configure()
        .build_server(true)
        .codec_path("crate::api::codec::ApiCodec")
        .compile_fds(protox::compile([api], ["proto"])?)?;
    Ok(())
}
