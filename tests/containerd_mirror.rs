//! What containerd itself does with a registry mirror listed in `hosts.toml`, on every version of
//! the matrix: the facts pullgate's mirror is built on (README, "The mirror"). No pullgate here:
//! a recording proxy or a fixed-answer server stands where pullgate's mirror will.

mod common;

use std::sync::Arc;

use common::fakeserver::{FakeResponse, FakeServer};
use common::faultproxy::FaultProxy;
use common::*;
use pullgate::proto::runtime::v1::*;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// The `ns` query parameter of a request target, percent-decoded.
fn ns_of(target: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    let value = query.split('&').find_map(|kv| kv.strip_prefix("ns="))?;
    Some(value.replace("%3A", ":").replace("%3a", ":"))
}

async fn pull(containerd: &Containerd, image: &str) -> Result<(), tonic::Status> {
    image_client(&containerd.socket())
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_asks_the_mirror_first_and_names_the_registry_in_ns() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let img = push_image(&registry, "mirror/app", "v1", &[256 << 10, 64 << 10], None).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let mirror = FaultProxy::start(&registry.addr()).await;
    containerd.set_mirrors(&registry.addr(), &[&mirror.addr]);

    pull(&containerd, &img.reference()).await.unwrap();

    let requests = mirror.requests();
    let prefix = format!("/v2/{}/", img.repo);
    let manifests: Vec<_> = requests
        .iter()
        .filter(|r| r.path.starts_with(&format!("{prefix}manifests/")))
        .collect();
    assert!(
        !manifests.is_empty(),
        "no manifest request at the mirror: {requests:?}"
    );
    for digest in std::iter::once(&img.config_digest).chain(&img.layer_digests) {
        assert!(
            mirror
                .blob_gets(digest)
                .iter()
                .any(|r| r.user_agent.starts_with("containerd/")),
            "blob {digest} not fetched through the mirror: {requests:?}"
        );
    }
    // Every request names the registry the image belongs to: the mirror needs no other way to
    // know where to go upstream.
    for r in &requests {
        assert!(r.path.starts_with(&prefix), "{r:?}");
        assert_eq!(
            ns_of(&r.path).as_deref(),
            Some(registry.addr().as_str()),
            "{r:?}"
        );
    }
}

/// How containerd treats a mirror that fails: which failures make it try the next host (the
/// registry), and which fail the pull. pullgate's mirror answers 404 for what it does not serve
/// and relies on containerd moving on when it is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_falls_back_past_a_failing_mirror() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let mut observed = Vec::new();
    for (i, answer) in [Some(404u16), Some(500), Some(503), None]
        .into_iter()
        .enumerate()
    {
        let img = push_image(
            &registry,
            &format!("fallback/app{i}"),
            "v1",
            &[64 << 10],
            None,
        )
        .await;
        let before = registry.blob_gets_ok(&img.repo);
        let (_server, addr) = match answer {
            Some(status) => {
                let server =
                    FakeServer::start(Arc::new(move |_| Some(FakeResponse::new(status)))).await;
                let addr = server.addr.clone();
                (Some(server), addr)
            }
            // A closed port: pullgate's mirror down.
            None => (None, format!("127.0.0.1:{}", free_port())),
        };
        containerd.set_mirrors(&registry.addr(), &[&addr]);
        let result = pull(&containerd, &img.reference()).await;
        let from_registry = registry.blob_gets_ok(&img.repo) - before;
        eprintln!(
            "mirror answering {answer:?}: {result:?}, {from_registry} blobs from the registry"
        );
        observed.push((answer, result.is_ok(), from_registry));
    }
    for (answer, ok, from_registry) in &observed {
        assert!(
            *ok,
            "mirror answering {answer:?}: pull failed ({observed:?})"
        );
        assert_eq!(
            *from_registry, 2,
            "mirror answering {answer:?}: {observed:?}"
        );
    }
}

/// pullgate's hosts.toml edit, as containerd reads it: with the block, containerd asks
/// pullgate's address first; without it, the administrator's file is back and so is the old path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_managed_block_puts_the_mirror_first_and_comes_out_cleanly() {
    use pullgate::mirror::hosts_file;
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let mirror = FaultProxy::start(&registry.addr()).await;
    let file = containerd
        .dir()
        .join("certs.d")
        .join(registry.addr())
        .join("hosts.toml");
    let admin = std::fs::read_to_string(&file).unwrap();
    let url = format!("http://{}", mirror.addr);
    std::fs::write(&file, hosts_file::with_mirror(&admin, &url).unwrap()).unwrap();

    let first = push_image(&registry, "managed/one", "v1", &[64 << 10], None).await;
    pull(&containerd, &first.reference()).await.unwrap();
    for digest in std::iter::once(&first.config_digest).chain(&first.layer_digests) {
        assert_eq!(
            mirror.blob_gets(digest).len(),
            1,
            "{digest}: {:?}",
            mirror.requests()
        );
    }

    std::fs::write(
        &file,
        hosts_file::without_mirror(&std::fs::read_to_string(&file).unwrap()),
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), admin);
    let second = push_image(&registry, "managed/two", "v1", &[64 << 10], None).await;
    let seen = mirror.requests().len();
    pull(&containerd, &second.reference()).await.unwrap();
    assert_eq!(mirror.requests().len(), seen, "{:?}", mirror.requests());
}
