//! The registry client (`pullgate::registry`) against REAL distribution registries on 127.0.0.1
//! (plain, htpasswd, pull-through cache as a hosts.toml mirror, bearer tokens) and small fake
//! HTTP servers for failures a real registry does not produce.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::fakeserver::{FakeResponse, FakeServer};
use common::registry::{push_index, push_index_platforms};
use common::tokenauth::TokenServer;
use common::*;
use futures_util::StreamExt;
use pullgate::registry::{
    Credentials, Descriptor, ImageRef, Platform, RegistryClient, RegistryConfig, RegistryError,
    Resolved, Source,
};

fn client(config_path: &Path) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        config_path: config_path.to_path_buf(),
        request_timeout: Duration::from_secs(10),
        user_agent: "pullgate-test".to_string(),
        mirror_credentials: false,
        skip_hosts: Vec::new(),
    })
}

fn anon() -> Credentials {
    Credentials::Anonymous
}

fn basic(user: &str, password: &str) -> Credentials {
    Credentials::Basic {
        username: user.to_string(),
        password: password.to_string(),
    }
}

/// Writes `<certs.d>/<registry>/hosts.toml`.
fn write_hosts(certs_d: &Path, registry: &str, text: &str) {
    let dir = certs_d.join(registry);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hosts.toml"), text).unwrap();
}

/// Streams a whole blob range into memory.
async fn fetch(
    c: &RegistryClient,
    image: &ImageRef,
    creds: &Credentials,
    desc: &Descriptor,
    range: std::ops::Range<u64>,
) -> Result<(Source, Vec<u8>), RegistryError> {
    let body = c.fetch_blob(image, creds, desc, range.clone()).await?;
    assert_eq!(body.len, range.end - range.start);
    let source = body.source.clone();
    let mut stream = body.stream;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok((source, out))
}

fn all_blobs(r: &Resolved) -> Vec<Descriptor> {
    std::iter::once(r.config.clone())
        .chain(r.layers.iter().cloned())
        .collect()
}

/// Fetches every blob of `r` whole and checks its sha256 and size; returns the sources seen.
async fn fetch_all_and_verify(
    c: &RegistryClient,
    image: &ImageRef,
    creds: &Credentials,
    r: &Resolved,
) -> Vec<Source> {
    let mut sources = Vec::new();
    for desc in all_blobs(r) {
        let (source, bytes) = fetch(c, image, creds, &desc, 0..desc.size())
            .await
            .unwrap_or_else(|e| panic!("fetch {}: {e}", desc.digest()));
        assert_eq!(bytes.len() as u64, desc.size());
        assert_eq!(sha256_digest(&bytes), desc.digest().to_string());
        sources.push(source);
    }
    sources
}

fn assert_matches_image(r: &Resolved, img: &TestImage) {
    assert_eq!(
        r.manifest.descriptor.digest().to_string(),
        img.manifest_digest
    );
    assert_eq!(r.manifest.descriptor.size(), img.manifest_size);
    assert_eq!(
        r.manifest.descriptor.media_type().to_string(),
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(&r.manifest.bytes[..], &img.manifest[..]);
    assert_eq!(r.config.digest().to_string(), img.config_digest);
    let layers: Vec<String> = r.layers.iter().map(|l| l.digest().to_string()).collect();
    assert_eq!(layers, img.layer_digests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_and_fetch_every_blob() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let img = push_image(&registry, "rc/app", "v1", &[150_000, 1_300_000, 10], None).await;
    let c = client(&dir.path().join("certs.d"));

    let image = ImageRef::parse(&img.reference()).unwrap();
    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    assert!(r.index.is_none());
    assert_eq!(r.source, Source::Registry);
    assert_matches_image(&r, &img);
    let sources = fetch_all_and_verify(&c, &image, &anon(), &r).await;
    assert!(sources.iter().all(|s| *s == Source::Registry));

    // By digest too.
    let by_digest = ImageRef::parse(&img.digest_reference()).unwrap();
    let r = c
        .resolve(&by_digest, &anon(), &Platform::node())
        .await
        .unwrap();
    assert_matches_image(&r, &img);

    // Unknown tag / repository: NotFound naming the host and repository, not a fallback.
    let missing = ImageRef::parse(&format!("{}/rc/app:nope", registry.addr())).unwrap();
    let e = c
        .resolve(&missing, &anon(), &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
    assert!(!e.is_fallback());
    let msg = e.to_string();
    assert!(
        msg.contains("rc/app") && msg.contains(&registry.addr()),
        "{msg}"
    );
    // A blob that is not there.
    let mut ghost = r.layers[0].clone();
    ghost.set_digest(sha256_digest(b"ghost").parse().unwrap());
    let e = fetch(&c, &image, &anon(), &ghost, 0..ghost.size())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranged_fetches_return_exactly_the_slice() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let img = push_image(&registry, "rc/ranges", "v1", &[1_000_000], None).await;
    let c = client(&dir.path().join("certs.d"));
    let image = ImageRef::parse(&img.reference()).unwrap();
    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    let layer = &r.layers[0];
    let size = layer.size();
    let (_, whole) = fetch(&c, &image, &anon(), layer, 0..size).await.unwrap();
    assert_eq!(sha256_digest(&whole), img.layer_digests[0]);

    let half = size / 2;
    let (_, second_half) = fetch(&c, &image, &anon(), layer, half..size).await.unwrap();
    assert_eq!(second_half, whole[half as usize..]);
    let (_, middle) = fetch(&c, &image, &anon(), layer, 1000..250_001)
        .await
        .unwrap();
    assert_eq!(middle, whole[1000..250_001]);
    let (_, last) = fetch(&c, &image, &anon(), layer, size - 1..size)
        .await
        .unwrap();
    assert_eq!(last, whole[size as usize - 1..]);
    let (_, empty) = fetch(&c, &image, &anon(), layer, size..size).await.unwrap();
    assert!(empty.is_empty());
    let e = fetch(&c, &image, &anon(), layer, 0..size + 1)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Protocol(_)), "{e}");

    // The registry saw Range requests (206) for the partial fetches.
    let partial = registry
        .requests()
        .iter()
        .filter(|r| r.path.contains("/blobs/") && r.status == 206)
        .count();
    assert_eq!(partial, 3, "{:?}", registry.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_mirror_is_used_and_skipped_when_down() {
    let dir = tempdir();
    let upstream = Registry::start(&dir.path().join("upstream"), None).await;
    let mut mirror = Registry::start_mirror(&dir.path().join("mirror"), &upstream).await;
    let img = push_image(&upstream, "rc/mirrored", "v1", &[400_000, 700_000], None).await;
    let certs_d = dir.path().join("certs.d");
    write_hosts(
        &certs_d,
        &upstream.addr(),
        &format!(
            "server = \"{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.url(),
            mirror.url()
        ),
    );
    let c = client(&certs_d);
    let image = ImageRef::parse(&img.reference()).unwrap();

    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    assert_eq!(r.source, Source::Mirror(mirror.addr()));
    assert_matches_image(&r, &img);
    // A ranged read through the pull-through cache before it holds the blob (it answers 200
    // with the whole blob: the prefix is dropped), then everything whole.
    let layer = &r.layers[1];
    let (source, tail_bytes) = fetch(&c, &image, &anon(), layer, 300_000..layer.size())
        .await
        .unwrap();
    assert_eq!(source, Source::Mirror(mirror.addr()));
    let sources = fetch_all_and_verify(&c, &image, &anon(), &r).await;
    assert!(
        sources.iter().all(|s| *s == Source::Mirror(mirror.addr())),
        "{sources:?}"
    );
    let (_, whole) = fetch(&c, &image, &anon(), layer, 0..layer.size())
        .await
        .unwrap();
    assert_eq!(tail_bytes, whole[300_000..]);
    assert!(mirror.blob_gets_ok("rc/mirrored") >= 4);
    // Mirror requests carry containerd's `ns` parameter.
    assert!(
        mirror
            .requests()
            .iter()
            .any(|r| r.path.contains(&format!("ns={}", upstream.addr()))),
        "{:?}",
        mirror.requests()
    );
    // The client itself asked the upstream nothing (the mirror did, with its own user agent).
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.user_agent != "pullgate-test" || r.method != "GET"),
        "{:?}",
        upstream.requests()
    );

    mirror.stop();
    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    assert_eq!(r.source, Source::Registry);
    assert_matches_image(&r, &img);
    let sources = fetch_all_and_verify(&c, &image, &anon(), &r).await;
    assert!(
        sources.iter().all(|s| *s == Source::Registry),
        "{sources:?}"
    );
    assert!(upstream
        .requests()
        .iter()
        .any(|r| r.user_agent == "pullgate-test" && r.path.contains("/blobs/")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_right_and_wrong_credentials() {
    let dir = tempdir();
    let registry =
        Registry::start(&dir.path().join("registry"), Some(("alice", "s3cret-pw"))).await;
    let img = push_image(
        &registry,
        "rc/private",
        "v1",
        &[300_000],
        Some(("alice", "s3cret-pw")),
    )
    .await;
    let c = client(&dir.path().join("certs.d"));
    let image = ImageRef::parse(&img.reference()).unwrap();

    let good = basic("alice", "s3cret-pw");
    let r = c.resolve(&image, &good, &Platform::node()).await.unwrap();
    assert_matches_image(&r, &img);
    fetch_all_and_verify(&c, &image, &good, &r).await;
    let (_, part) = fetch(&c, &image, &good, &r.layers[0], 10..20)
        .await
        .unwrap();
    assert_eq!(part.len(), 10);

    for creds in [
        basic("alice", "wrong-pw"),
        basic("mallory", "s3cret-pw"),
        anon(),
    ] {
        let e = c
            .resolve(&image, &creds, &Platform::node())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
        assert!(e.is_fallback());
        let msg = e.to_string();
        assert!(
            msg.contains(&registry.addr()) && msg.contains("rc/private"),
            "{msg}"
        );
        assert!(
            !msg.contains("s3cret") && !msg.contains("wrong-pw"),
            "{msg}"
        );
        let e = fetch(&c, &image, &creds, &r.layers[0], 0..r.layers[0].size())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
    }
    // Right credentials still work after wrong ones (nothing poisoned).
    c.resolve(&image, &good, &Platform::node()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_resolves_to_the_requested_platform() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), None).await;
    let amd = push_image(&registry, "rc/multi", "amd64", &[1000], None).await;
    let arm = push_image(&registry, "rc/multi", "arm64", &[2000], None).await;
    let index = push_index_platforms(
        &registry,
        "rc/multi",
        "v1",
        &[
            ("unknown", "unknown", "", &arm),
            ("linux", "amd64", "", &amd),
            ("linux", "arm64", "v8", &arm),
        ],
    )
    .await;
    let simple = push_index(&registry, "rc/multi", "v2", &[("arm64", "", &arm)]).await;
    let c = client(&dir.path().join("certs.d"));
    let image = ImageRef::parse(&index.reference()).unwrap();

    let r = c
        .resolve(&image, &anon(), &Platform::new("linux", "arm64", ""))
        .await
        .unwrap();
    assert_matches_image(&r, &arm);
    let idx = r.index.as_ref().expect("an index");
    assert_eq!(idx.descriptor.digest().to_string(), index.digest);
    assert_eq!(&idx.bytes[..], &index.bytes[..]);
    assert_eq!(
        idx.descriptor.media_type().to_string(),
        "application/vnd.oci.image.index.v1+json"
    );
    // The manifest's descriptor is the index entry (with its platform).
    let p = r.manifest.descriptor.platform().as_ref().expect("platform");
    assert_eq!(p.architecture().to_string(), "arm64");
    fetch_all_and_verify(&c, &image, &anon(), &r).await;

    let r = c
        .resolve(&image, &anon(), &Platform::new("linux", "amd64", ""))
        .await
        .unwrap();
    assert_matches_image(&r, &amd);

    let e = c
        .resolve(&image, &anon(), &Platform::new("linux", "s390x", ""))
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
    assert!(e.to_string().contains("linux/s390x"), "{e}");

    let r = c
        .resolve(
            &ImageRef::parse(&simple.reference()).unwrap(),
            &anon(),
            &Platform::new("linux", "arm64", "v8"),
        )
        .await
        .unwrap();
    assert_matches_image(&r, &arm);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_mirrors_are_skipped_and_never_get_credentials() {
    let dir = tempdir();
    let registry = Registry::start(&dir.path().join("registry"), Some(("bob", "pw-of-bob"))).await;
    let img = push_image(
        &registry,
        "rc/skip",
        "v1",
        &[5000],
        Some(("bob", "pw-of-bob")),
    )
    .await;
    let not_found = FakeServer::start(Arc::new(|_| Some(FakeResponse::new(404)))).await;
    let broken = FakeServer::start(Arc::new(|_| Some(FakeResponse::new(503)))).await;
    let wants_auth = FakeServer::start(Arc::new(|_| {
        Some(FakeResponse::new(401).header("WWW-Authenticate", "Basic realm=\"mirror\""))
    }))
    .await;
    let silent = FakeServer::start(Arc::new(|_| None)).await;
    let certs_d = dir.path().join("certs.d");
    let mut hosts = format!("server = \"{}\"\n", registry.url());
    for m in [&not_found, &broken, &wants_auth, &silent] {
        hosts.push_str(&format!("[host.\"{}\"]\n", m.url()));
    }
    // A dead port too.
    hosts.push_str(&format!("[host.\"http://127.0.0.1:{}\"]\n", free_port()));
    write_hosts(&certs_d, &registry.addr(), &hosts);

    let mut config = RegistryConfig {
        config_path: certs_d.clone(),
        request_timeout: Duration::from_millis(1500),
        user_agent: "pullgate-test".to_string(),
        mirror_credentials: false,
        skip_hosts: Vec::new(),
    };
    let c = RegistryClient::new(config.clone());
    let image = ImageRef::parse(&img.reference()).unwrap();
    let creds = basic("bob", "pw-of-bob");
    let r = c.resolve(&image, &creds, &Platform::node()).await.unwrap();
    assert_eq!(r.source, Source::Registry);
    assert_matches_image(&r, &img);
    let sources = fetch_all_and_verify(&c, &image, &creds, &r).await;
    assert!(sources.iter().all(|s| *s == Source::Registry));
    for m in [&not_found, &broken, &wants_auth, &silent] {
        let reqs = m.requests();
        assert!(!reqs.is_empty(), "mirror {} was not tried", m.addr);
        for req in &reqs {
            assert!(
                !req.headers.contains_key("authorization"),
                "credentials sent to mirror {}: {req:?}",
                m.addr
            );
            assert!(
                req.target.contains(&format!("?ns={}", registry.addr())),
                "{req:?}"
            );
            assert_eq!(req.method, "GET");
        }
    }
    assert!(not_found.requests()[0]
        .target
        .starts_with("/v2/rc/skip/manifests/v1"));

    // With mirror_credentials the mirror that asks for them gets them.
    config.mirror_credentials = true;
    let c = RegistryClient::new(config);
    let before = wants_auth.requests().len();
    let r = c.resolve(&image, &creds, &Platform::node()).await.unwrap();
    assert_eq!(r.source, Source::Registry);
    let after = wants_auth.requests();
    assert!(after[before..]
        .iter()
        .any(|r| r.headers.get("authorization").map(String::as_str)
            == Some("Basic Ym9iOnB3LW9mLWJvYg==")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_answers_are_clean_errors() {
    let dir = tempdir();
    let wrong_digest = format!("sha256:{}", "0".repeat(64));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": sha256_digest(b"{}"), "size": 2 },
        "layers": [],
    }))
    .unwrap();
    let schema1 =
        br#"{"schemaVersion": 1, "name": "x", "tag": "s1", "fsLayers": [], "history": []}"#;
    let m = manifest.clone();
    let wd = wrong_digest.clone();
    let server = FakeServer::start(Arc::new(move |req| {
        let t = req.target.as_str();
        Some(if t.ends_with("/manifests/announced-wrong") {
            FakeResponse::new(200)
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                .header("Docker-Content-Digest", &wd)
                .body(m.clone())
        } else if t.contains("/manifests/sha256:") {
            FakeResponse::new(200)
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                .body(m.clone())
        } else if t.ends_with("/manifests/schema1") {
            FakeResponse::new(200)
                .header(
                    "Content-Type",
                    "application/vnd.docker.distribution.manifest.v1+prettyjws",
                )
                .body(schema1.to_vec())
        } else if t.ends_with("/manifests/negotiate") {
            FakeResponse::new(401).header("WWW-Authenticate", "Negotiate")
        } else if t.ends_with("/manifests/ok") {
            FakeResponse::new(200)
                .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
                .body(m.clone())
        } else if t.contains("/blobs/") {
            // Ignores Range.
            FakeResponse::new(200).body(vec![7u8; 100])
        } else {
            FakeResponse::new(404)
        })
    }))
    .await;
    let c = client(&dir.path().join("certs.d"));
    let p = Platform::node();
    let img = |r: &str| ImageRef::parse(&format!("{}/x/y{r}", server.addr)).unwrap();

    let e = c
        .resolve(&img(&format!("@{wrong_digest}")), &anon(), &p)
        .await
        .unwrap_err();
    match &e {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &wrong_digest);
            assert_eq!(actual, &sha256_digest(&manifest));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(e.to_string().contains(&server.addr), "{e}");
    let e = c
        .resolve(&img(":announced-wrong"), &anon(), &p)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::DigestMismatch { .. }), "{e}");
    let e = c.resolve(&img(":schema1"), &anon(), &p).await.unwrap_err();
    assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");
    assert!(e.is_fallback());
    let e = c
        .resolve(&img(":negotiate"), &anon(), &p)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unsupported(_)), "{e}");

    // A server that ignores Range (200, whole blob): the prefix is dropped, the rest cut off.
    let r = c.resolve(&img(":ok"), &anon(), &p).await.unwrap();
    let mut desc = r.config.clone();
    desc.set_size(100);
    let (_, part) = fetch(&c, &img(":ok"), &anon(), &desc, 10..20)
        .await
        .unwrap();
    assert_eq!(part, vec![7u8; 10]);
    let (_, all) = fetch(&c, &img(":ok"), &anon(), &desc, 0..100)
        .await
        .unwrap();
    assert_eq!(all, vec![7u8; 100]);
    // A body whose length is not the descriptor's size is refused up front.
    desc.set_size(101);
    let e = c
        .fetch_blob(&img(":ok"), &anon(), &desc, 0..101)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Protocol(_)), "{e}");
    assert!(e.to_string().contains("101"), "{e}");

    // Nobody listening.
    let dead = ImageRef::parse(&format!("127.0.0.1:{}/x/y:z", free_port())).unwrap();
    let e = c.resolve(&dead, &anon(), &p).await.unwrap_err();
    assert!(matches!(e, RegistryError::Transport(_)), "{e}");
    assert!(!e.is_fallback());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_registry_times_out() {
    let dir = tempdir();
    let silent = FakeServer::start(Arc::new(|_| None)).await;
    let c = RegistryClient::new(RegistryConfig {
        config_path: dir.path().join("certs.d"),
        request_timeout: Duration::from_millis(500),
        user_agent: "pullgate-test".to_string(),
        mirror_credentials: false,
        skip_hosts: Vec::new(),
    });
    let image = ImageRef::parse(&format!("{}/x/y:z", silent.addr)).unwrap();
    let started = std::time::Instant::now();
    let e = c
        .resolve(&image, &anon(), &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Timeout(_)), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(e.to_string().contains(&silent.addr), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Bearer tokens end to end: a token server (common::tokenauth) issuing ES256 JWTs whose `x5c`
// carries a self-signed certificate, and a distribution registry with `auth: token` trusting it.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_auth_end_to_end() {
    let dir = tempdir();
    let reg_dir = dir.path().join("registry");
    // Push through an open registry, then serve the same storage with token auth.
    let mut open = Registry::start(&reg_dir, None).await;
    let img = push_image(&open, "rc/tokens", "v1", &[250_000, 30_000], None).await;
    open.stop();

    let token_server = TokenServer::start_with("tok-user", "tok-pass", Some("good-refresh")).await;
    let registry = token_server.start_registry(&reg_dir).await;
    assert_eq!(registry.addr().split(':').next(), Some("127.0.0.1"));
    let c = client(&dir.path().join("certs.d"));
    // The same storage on the token registry's port.
    let image = ImageRef::parse(&format!("{}/{}:{}", registry.addr(), img.repo, img.tag)).unwrap();
    let gets = || {
        token_server
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count()
    };
    let posts = || {
        token_server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    };

    // Username and password: one token for the manifest and every blob.
    let creds = basic("tok-user", "tok-pass");
    let r = c.resolve(&image, &creds, &Platform::node()).await.unwrap();
    assert_matches_image(&r, &img);
    fetch_all_and_verify(&c, &image, &creds, &r).await;
    assert_eq!(gets(), 1, "{:?}", token_server.requests());
    let scope = &token_server.requests()[0].target;
    assert!(
        scope.contains("scope=repository%3Arc%2Ftokens%3Apull"),
        "{scope}"
    );

    // A token the registry stops accepting (expired while cached) is replaced on the 401.
    // distribution allows 60 s of clock skew, so exp = now - 57 s is accepted for ~3 s.
    let c2 = client(&dir.path().join("certs.d"));
    token_server.set_next_exp(-57);
    let r2 = c2.resolve(&image, &creds, &Platform::node()).await.unwrap();
    assert_eq!(gets(), 2);
    tokio::time::sleep(Duration::from_secs(4)).await;
    fetch_all_and_verify(&c2, &image, &creds, &r2).await;
    assert_eq!(gets(), 3, "one new token after the 401");

    // Wrong password: the token server refuses; Unauthorized, no secret in the message.
    let e = c
        .resolve(&image, &basic("tok-user", "nope-pass"), &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
    assert!(e.is_fallback());
    assert!(!e.to_string().contains("nope-pass"), "{e}");
    assert!(e.to_string().contains("rc/tokens"), "{e}");

    // Anonymous: a token without access, the registry still says 401.
    let e = c
        .resolve(&image, &anon(), &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
    assert!(e.to_string().contains(&registry.addr()), "{e}");

    // An identity (refresh) token: OAuth2 POST.
    let refresh = Credentials::IdentityToken {
        username: None,
        token: "good-refresh".to_string(),
    };
    let r = c
        .resolve(&image, &refresh, &Platform::node())
        .await
        .unwrap();
    assert_matches_image(&r, &img);
    fetch_all_and_verify(&c, &image, &refresh, &r).await;
    assert_eq!(posts(), 1);
    let bad_refresh = Credentials::IdentityToken {
        username: None,
        token: "bad-refresh".to_string(),
    };
    let e = c
        .resolve(&image, &bad_refresh, &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Unauthorized(_)), "{e}");
    assert!(!e.to_string().contains("bad-refresh"), "{e}");

    // A registry token is used as is: no token server round trip.
    let before = token_server.requests().len();
    let direct = Credentials::RegistryToken(token_server.signer().token(
        "direct",
        &["repository:rc/tokens:pull".to_string()],
        300,
    ));
    let r = c.resolve(&image, &direct, &Platform::node()).await.unwrap();
    fetch_all_and_verify(&c, &image, &direct, &r).await;
    assert_eq!(token_server.requests().len(), before);
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (ca_pem, server_cert_pem, key_pem).
fn test_pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "pullgate test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registry_with_ca_from_hosts_toml() {
    let dir = tempdir();
    let reg_dir = dir.path().join("registry");
    let mut open = Registry::start(&reg_dir, None).await;
    let img = push_image(&open, "rc/tls", "v1", &[64_000], None).await;
    open.stop();
    let (ca_pem, cert_pem, key_pem) = test_pki();
    let registry = Registry::start_tls(&reg_dir, &cert_pem, &key_pem).await;
    let image = ImageRef::parse(&format!("{}/{}:{}", registry.addr(), img.repo, img.tag)).unwrap();
    let certs_d = dir.path().join("certs.d");
    std::fs::create_dir_all(certs_d.join(registry.addr())).unwrap();
    std::fs::write(certs_d.join(registry.addr()).join("ca.pem"), &ca_pem).unwrap();

    // Trusted through `ca` (relative to the host dir).
    write_hosts(
        &certs_d,
        &registry.addr(),
        &format!("server = \"{}\"\nca = \"ca.pem\"\n", registry.https_url()),
    );
    let c = client(&certs_d);
    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    assert_matches_image(&r, &img);
    fetch_all_and_verify(&c, &image, &anon(), &r).await;

    // Without the CA: a TLS failure, not a fallback.
    write_hosts(
        &certs_d,
        &registry.addr(),
        &format!("server = \"{}\"\n", registry.https_url()),
    );
    let e = c
        .resolve(&image, &anon(), &Platform::node())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Transport(_)), "{e}");
    assert!(!e.is_fallback());
    assert!(e.to_string().contains(&registry.addr()), "{e}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");

    // skip_verify accepts it.
    write_hosts(
        &certs_d,
        &registry.addr(),
        &format!(
            "server = \"{}\"\nskip_verify = true\n",
            registry.https_url()
        ),
    );
    let r = c.resolve(&image, &anon(), &Platform::node()).await.unwrap();
    assert_matches_image(&r, &img);
}
