//! gRPC helpers over unix sockets: lazy channels, typed CRI clients, a raw-bytes unary call and
//! kubelet-like request builders.

use std::path::{Path, PathBuf};

use bytes::{Buf, BufMut, Bytes};
use hyper_util::rt::TokioIo;
use pullgate::proto::runtime::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
    AuthConfig, ImageSpec, PodSandboxConfig, PodSandboxMetadata, PullImageRequest,
};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Status;

/// 16 MiB, the message size limit used by the typed clients.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// A LAZY tonic channel over the unix socket at `path`: nothing connects until the first call,
/// and every (re)connect dials the socket path again (so it survives a server restart).
/// Must be called inside a tokio runtime.
pub fn uds_channel_now(path: &Path) -> Channel {
    let path: PathBuf = path.to_path_buf();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        },
    ))
}

/// Async form of [`uds_channel_now`] (the channel is lazy either way).
pub async fn uds_channel(path: &Path) -> Channel {
    uds_channel_now(path)
}

/// CRI ImageService client on the unix socket at `path` (lazy; 16 MiB message limits).
pub fn image_client(path: &Path) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(uds_channel_now(path))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// CRI RuntimeService client on the unix socket at `path` (lazy; 16 MiB message limits).
pub fn runtime_client(path: &Path) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(uds_channel_now(path))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// A codec that passes already-encoded protobuf message bytes through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

/// Sends `message` (an already-encoded protobuf message) as a unary gRPC call on `grpc_path`
/// (e.g. "/runtime.v1.ImageService/ImageStatus") over the unix socket at `path`, and returns the
/// raw bytes of the response message. Use to compare answers byte for byte.
pub async fn raw_unary(path: &Path, grpc_path: &str, message: Bytes) -> Result<Bytes, Status> {
    let channel = uds_channel_now(path);
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("raw_unary: channel not ready: {e}")))?;
    let pq = http::uri::PathAndQuery::try_from(grpc_path.to_string())
        .unwrap_or_else(|e| panic!("raw_unary: bad gRPC path {grpc_path:?}: {e}"));
    let response = grpc
        .unary(tonic::Request::new(message), pq, RawCodec)
        .await?;
    Ok(response.into_inner())
}

/// An `AuthConfig` with username and password (what kubelet sends from an image pull secret).
pub fn auth_config(username: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: username.to_string(),
        password: password.to_string(),
        ..Default::default()
    }
}

/// A kubelet-like PullImage request: image spec plus a PodSandboxConfig with metadata.
pub fn pull_request(image: &str) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "harness-pod".to_string(),
                uid: "6b1d3c3e-0000-4000-8000-000000000001".to_string(),
                namespace: "default".to_string(),
                attempt: 0,
            }),
            hostname: "harness-pod".to_string(),
            log_directory: "/var/log/pods/default_harness-pod_6b1d3c3e-0000-4000-8000-000000000001"
                .to_string(),
            ..Default::default()
        }),
    }
}

/// A pre-warm PullImage request: image spec only, no sandbox config (like `crictl pull`).
pub fn prewarm_request(image: &str) -> PullImageRequest {
    PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        auth: None,
        sandbox_config: None,
    }
}
