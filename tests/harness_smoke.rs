//! Proves the integration-test harness works WITHOUT pullgate: a real registry and a real
//! containerd, talking to containerd's own CRI socket directly. Loopback only.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    auth_config, image_client, prewarm_request, pull_request, push_image, raw_unary, tempdir,
    Containerd, Registry,
};
use prost::Message;
use pullgate::proto::runtime::v1::{
    ImageFsInfoRequest, ImageSpec, ImageStatusRequest, ImageStatusResponse, ListImagesRequest,
    RemoveImageRequest,
};

#[test]
fn reads_the_version_containerd_prints() {
    use common::containerd::parse_version;
    let v = parse_version(
        "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3\n",
    )
    .unwrap();
    assert_eq!((v.major, v.minor, v.text.as_str()), (1, 6, "1.6.20~ds1"));
    let v = parse_version("containerd github.com/containerd/containerd/v2 2.1.9+unknown abc\n")
        .unwrap();
    assert_eq!((v.major, v.minor), (2, 1));
    assert_eq!(parse_version("garbage"), None);
}

fn status_request(image: &str) -> ImageStatusRequest {
    ImageStatusRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        verbose: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_containerd_cri_directly() {
    let t0 = Instant::now();
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let mut containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    eprintln!(
        "registry {} + containerd up in {:?}",
        registry.addr(),
        t0.elapsed()
    );

    let img = push_image(&registry, "smoke/app", "v1", &[1 << 20, 300 << 10], None).await;
    assert_eq!(img.layer_digests.len(), 2);
    assert_eq!(
        registry.blob_gets("smoke/app"),
        0,
        "push must not GET blobs"
    );
    assert_eq!(img.reference(), format!("{}/smoke/app:v1", registry.addr()));
    assert_eq!(
        img.digest_reference(),
        format!("{}/smoke/app@{}", registry.addr(), img.manifest_digest)
    );

    let mut client = image_client(&containerd.socket());

    // ImageStatus of an image not pulled yet: OK with no image.
    let st = client
        .image_status(status_request(&img.reference()))
        .await
        .expect("ImageStatus before pull")
        .into_inner();
    assert!(st.image.is_none(), "image present before pull: {st:?}");

    // Pull by tag, kubelet-like (with sandbox config).
    let t = Instant::now();
    let resp = client
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_or_else(|s| {
            panic!(
                "PullImage failed: {s}\ncontainerd log:\n{}",
                common::tail(&containerd.log(), 30)
            )
        })
        .into_inner();
    eprintln!(
        "pull by tag took {:?}; image_ref = {}",
        t.elapsed(),
        resp.image_ref
    );
    // containerd 1.6 CRI returns the image ID, i.e. the digest of the image CONFIG blob,
    // not the manifest digest.
    assert_eq!(resp.image_ref, img.config_digest);
    assert_ne!(resp.image_ref, img.manifest_digest);

    // Exactly one GET per blob (2 layers + config); the manifest is fetched by digest after a
    // HEAD by tag.
    assert_eq!(
        registry.blob_gets("smoke/app"),
        img.blob_count(),
        "log:\n{}",
        registry.log()
    );
    assert_eq!(registry.blob_gets_ok("smoke/app"), 3);
    let manifest_gets_after_tag_pull = registry.manifest_gets("smoke/app");
    assert!(manifest_gets_after_tag_pull >= 1);
    eprintln!(
        "after tag pull: blob GETs {}, manifest GETs {}, manifest HEADs {}",
        registry.blob_gets("smoke/app"),
        manifest_gets_after_tag_pull,
        registry.manifest_heads("smoke/app")
    );
    let example = registry
        .log()
        .lines()
        .find(|l| l.contains("\"GET /v2/smoke/app/blobs/"))
        .map(str::to_string)
        .expect("an access-log line for a blob GET");
    eprintln!("example access-log line: {example}");
    for layer in &img.layer_digests {
        assert_eq!(
            registry.count_requests("GET", &format!("/v2/smoke/app/blobs/{layer}")),
            1
        );
    }

    // ImageStatus finds it by tag, by digest reference and by ID.
    for name in [
        img.reference(),
        img.digest_reference(),
        img.config_digest.clone(),
    ] {
        let st = client
            .image_status(status_request(&name))
            .await
            .expect("ImageStatus")
            .into_inner();
        let image = st
            .image
            .unwrap_or_else(|| panic!("ImageStatus({name}) found nothing"));
        assert_eq!(image.id, img.config_digest);
        assert!(image.repo_tags.contains(&img.reference()), "{image:?}");
        assert!(
            image.repo_digests.contains(&img.digest_reference()),
            "{image:?}"
        );
        assert_eq!(
            image.size, img.total_size,
            "size = manifest + config + layers"
        );
    }

    // Pull by digest reference: same image ID, no new blob GETs (content already local).
    let resp = client
        .pull_image(prewarm_request(&img.digest_reference()))
        .await
        .expect("PullImage by digest")
        .into_inner();
    assert_eq!(resp.image_ref, img.config_digest);
    assert_eq!(registry.blob_gets("smoke/app"), img.blob_count());

    // ListImages shows it.
    let list = client
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner();
    assert!(
        list.images.iter().any(|i| i.id == img.config_digest),
        "{list:?}"
    );

    // raw_unary gives the same bytes as the typed client's answer re-encoded.
    let req = status_request(&img.reference());
    let raw = raw_unary(
        &containerd.socket(),
        "/runtime.v1.ImageService/ImageStatus",
        Bytes::from(req.encode_to_vec()),
    )
    .await
    .expect("raw ImageStatus");
    let decoded = ImageStatusResponse::decode(raw.clone()).expect("decode raw ImageStatus");
    assert_eq!(
        decoded.image.as_ref().map(|i| i.id.as_str()),
        Some(img.config_digest.as_str())
    );
    let raw2 = raw_unary(
        &containerd.socket(),
        "/runtime.v1.ImageService/ImageStatus",
        Bytes::from(req.encode_to_vec()),
    )
    .await
    .expect("raw ImageStatus again");
    assert_eq!(raw, raw2, "same request, same bytes");
    // Empty messages work too.
    let fs = raw_unary(
        &containerd.socket(),
        "/runtime.v1.ImageService/ImageFsInfo",
        Bytes::new(),
    )
    .await
    .expect("raw ImageFsInfo");
    assert!(!fs.is_empty());
    // Unknown method -> Unimplemented.
    let err = raw_unary(
        &containerd.socket(),
        "/runtime.v1.ImageService/Nope",
        Bytes::new(),
    )
    .await
    .expect_err("unknown method");
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    // Restart containerd: the old lazy client reconnects on the same socket path and the image
    // is still there (persisted in root).
    containerd.stop().await;
    let err = client
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect_err("containerd is stopped");
    eprintln!("while stopped: {err}");
    containerd.start_again().await;
    common::wait_for("old client reconnects", Duration::from_secs(10), || {
        let mut c = client.clone();
        async move { c.image_fs_info(ImageFsInfoRequest {}).await.is_ok() }
    })
    .await;
    let st = client
        .image_status(status_request(&img.reference()))
        .await
        .expect("ImageStatus after restart")
        .into_inner();
    assert_eq!(
        st.image.expect("image survives restart").id,
        img.config_digest
    );

    // After restart: remove and pull again -> blobs fetched again? RemoveImage deletes the image
    // record; content is garbage-collected, so the re-pull downloads all blobs again.
    client
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: img.reference(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    let st = client
        .image_status(status_request(&img.reference()))
        .await
        .expect("ImageStatus after remove")
        .into_inner();
    assert!(
        st.image.is_none(),
        "image still there after RemoveImage: {st:?}"
    );
    let resp = client
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("PullImage after restart")
        .into_inner();
    assert_eq!(resp.image_ref, img.config_digest);
    eprintln!(
        "blob GETs after remove + re-pull: {}",
        registry.blob_gets("smoke/app")
    );
    assert_eq!(registry.blob_gets("smoke/app"), 2 * img.blob_count());

    // Pulling an unknown tag fails with a gRPC error.
    let err = client
        .pull_image(pull_request(&format!(
            "{}/smoke/app:missing",
            registry.addr()
        )))
        .await
        .expect_err("pull of a missing tag");
    eprintln!("missing tag: {:?}: {}", err.code(), err.message());

    eprintln!(
        "pull_through_containerd_cri_directly took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_with_registry_auth() {
    let t0 = Instant::now();
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), Some(("alice", "s3cret"))).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let img = push_image(
        &registry,
        "private/app",
        "v1",
        &[200 << 10],
        Some(("alice", "s3cret")),
    )
    .await;

    let mut client = image_client(&containerd.socket());

    // No credentials: fails.
    let err = client
        .pull_image(pull_request(&img.reference()))
        .await
        .expect_err("pull without credentials must fail");
    eprintln!("no credentials: {:?}: {}", err.code(), err.message());

    // Wrong password: fails.
    let mut req = pull_request(&img.reference());
    req.auth = Some(auth_config("alice", "wrong"));
    let err = client
        .pull_image(req)
        .await
        .expect_err("pull with a wrong password must fail");
    eprintln!("wrong password: {:?}: {}", err.code(), err.message());
    assert_eq!(registry.blob_gets_ok("private/app"), 0);

    // Right password: works.
    let mut req = pull_request(&img.reference());
    req.auth = Some(auth_config("alice", "s3cret"));
    let resp = client
        .pull_image(req)
        .await
        .unwrap_or_else(|s| {
            panic!(
                "pull with credentials failed: {s}\n{}",
                common::tail(&containerd.log(), 20)
            )
        })
        .into_inner();
    assert_eq!(resp.image_ref, img.config_digest);
    assert_eq!(registry.blob_gets_ok("private/app"), img.blob_count());
    eprintln!(
        "auth registry: blob GETs {} (ok {}), requests:\n{}",
        registry.blob_gets("private/app"),
        registry.blob_gets_ok("private/app"),
        registry
            .requests()
            .iter()
            .map(|r| format!("  {} {} {}", r.method, r.path, r.status))
            .collect::<Vec<_>>()
            .join("\n")
    );
    eprintln!("pull_with_registry_auth took {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containerds_side_by_side() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let regs = [&registry];
    let (a, b) = tokio::join!(
        Containerd::start(&dir_a, &regs),
        Containerd::start(&dir_b, &regs),
    );
    assert_ne!(a.socket(), b.socket());
    let img = push_image(&registry, "shared/app", "v1", &[64 << 10], None).await;

    let ra = image_client(&a.socket())
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull on a")
        .into_inner();
    assert_eq!(ra.image_ref, img.config_digest);
    // b has its own content store: it has not got the image and downloads everything again.
    let st = image_client(&b.socket())
        .image_status(status_request(&img.reference()))
        .await
        .expect("status on b")
        .into_inner();
    assert!(st.image.is_none());
    let rb = image_client(&b.socket())
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull on b")
        .into_inner();
    assert_eq!(rb.image_ref, img.config_digest);
    assert_eq!(registry.blob_gets("shared/app"), 2 * img.blob_count());

    // Registry stop: a pull of a new image now fails (connection refused), quickly.
    let mut registry = registry;
    registry.stop();
    let t = Instant::now();
    let err = image_client(&a.socket())
        .pull_image(pull_request(&format!(
            "{}/shared/other:v1",
            registry.addr()
        )))
        .await
        .expect_err("pull from a stopped registry");
    eprintln!(
        "stopped registry: {:?}: {} ({:?})",
        err.code(),
        err.message(),
        t.elapsed()
    );
}
