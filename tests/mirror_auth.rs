//! End-to-end bearer-token auth through a real containerd and pullgate's mirror: a distribution
//! registry with `auth: token` and a token server (`common::tokenauth`) on 127.0.0.1. With the
//! right credentials pullgate gets a token and containerd fetches every blob through the mirror;
//! with wrong ones the mirror serves nothing and containerd gives the same answer as without
//! pullgate; no secret reaches pullgate's log.

mod common;

use base64::Engine;
use common::daemon::{metric_value, Pullgate};
use common::tokenauth::TokenServer;
use common::*;
use pullgate::proto::runtime::v1::*;

const USER: &str = "tok-user";
/// Distinctive, so that finding it in a log cannot be a coincidence.
const PASSWORD: &str = "Pa55-tok-7f3a9c1e";
const WRONG_PASSWORD: &str = "Wr0ng-tok-b81e4d06";
const PULLGATE_UA: &str = "pullgate/";
const CONTAINERD_UA: &str = "containerd/";

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

fn pull_with(reference: &str, user: &str, password: &str) -> PullImageRequest {
    let mut req = pull_request(reference);
    req.auth = Some(auth_config(user, password));
    req
}

fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// No unfinished download is left in containerd.
async fn assert_no_leftovers(containerd: &Containerd) {
    let ingests = store::Store::new(&containerd.socket()).ingests().await;
    assert!(ingests.is_empty(), "ingests left: {ingests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_pull_goes_through_the_mirror_and_wrong_credentials_get_containerds_answer() {
    // Declared first, dropped last: every process below stops before the dir goes.
    let dir = tempdir();
    let reg_dir = dir.path().join("registry");
    // Push through an open registry, then serve the same storage with token auth.
    let mut open = Registry::start(&reg_dir, None).await;
    let img = push_image(&open, "auth/app", "v1", &[768 << 10, 96 << 10], None).await;
    let other = push_image(&open, "auth/app", "v2", &[128 << 10], None).await;
    open.stop();
    let tokens = TokenServer::start(USER, PASSWORD).await;
    let registry = tokens.start_registry(&reg_dir).await;
    assert_eq!(registry.addr().split(':').next(), Some("127.0.0.1"));
    let containerd = Containerd::start(&dir.path().join("ctd"), &[&registry]).await;
    let pullgate = Pullgate::start(&dir.path().join("pg"), &containerd, "").await;
    // The access log is shared with the open registry (same dir): only what comes after counts.
    let seen_before = registry.requests().len();

    // 1. The right credentials: pullgate gets a token, containerd fetches every blob through the
    // mirror (after a Basic challenge, with the same credentials).
    let reference = img.reference_via(&registry.addr());
    let reply = image_client(&pullgate.socket())
        .pull_image(pull_with(&reference, USER, PASSWORD))
        .await
        .unwrap_or_else(|e| panic!("pull {reference}: {e:?}\n{}", tail(&pullgate.log(), 40)))
        .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);

    let requests = registry.requests().split_off(seen_before);
    let blob_gets: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/sha256:"))
        .collect();
    assert!(
        blob_gets
            .iter()
            .all(|r| r.user_agent.starts_with(PULLGATE_UA)),
        "blob GETs not made by pullgate: {blob_gets:?}"
    );
    assert!(
        !requests
            .iter()
            .any(|r| r.path.contains("/blobs/sha256:") && r.user_agent.starts_with(CONTAINERD_UA)),
        "containerd asked for blobs itself: {requests:?}"
    );
    let all_blobs = std::iter::once(&img.config_digest).chain(&img.layer_digests);
    for digest in all_blobs {
        assert!(
            blob_gets
                .iter()
                .any(|r| r.path.ends_with(digest.as_str()) && r.status == 200),
            "blob {digest} never served to pullgate: {blob_gets:?}"
        );
    }
    let good_basic = basic_header(USER, PASSWORD);
    let from_pullgate = |authorization: &str| {
        tokens
            .requests()
            .into_iter()
            .filter(|r| {
                r.headers
                    .get("user-agent")
                    .is_some_and(|ua| ua.starts_with(PULLGATE_UA))
                    && r.headers.get("authorization").map(String::as_str) == Some(authorization)
            })
            .count()
    };
    assert!(
        from_pullgate(&good_basic) >= 1,
        "no token request from pullgate: {:?}",
        tokens.requests()
    );

    let m = pullgate.metrics().await;
    let served = metric_value(
        &m,
        "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}",
    );
    assert_eq!(served, img.blob_count() as f64, "{m}");
    assert!(
        metric_value(
            &m,
            "pullgate_mirror_requests_total{kind=\"manifest\",status=\"401\"}"
        ) >= 1.0,
        "the mirror challenged containerd for the pull's credentials: {m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "pullgate_fetch_fallbacks_total{reason=\"unauthorized\"}"
        ),
        0.0,
        "{m}"
    );
    assert_no_leftovers(&containerd).await;

    // 2. Wrong credentials for another tag: the token server refuses pullgate, the mirror knows
    // nothing for the pull, and containerd answers exactly as it does without pullgate.
    let other_ref = other.reference_via(&registry.addr());
    let direct = image_client(&containerd.socket())
        .pull_image(pull_with(&other_ref, USER, WRONG_PASSWORD))
        .await
        .expect_err("containerd pull with a wrong password");
    let via = image_client(&pullgate.socket())
        .pull_image(pull_with(&other_ref, USER, WRONG_PASSWORD))
        .await
        .expect_err("pull through pullgate with a wrong password");
    assert_eq!(
        direct.code(),
        via.code(),
        "direct: {direct:?}\nvia: {via:?}"
    );
    assert!(
        from_pullgate(&basic_header(USER, WRONG_PASSWORD)) >= 1,
        "pullgate never tried the wrong password: {:?}",
        tokens.requests()
    );
    let m = pullgate.metrics().await;
    assert_eq!(
        metric_value(
            &m,
            "pullgate_fetch_fallbacks_total{reason=\"unauthorized\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "pullgate_mirror_requests_total{kind=\"blob\",status=\"2xx\"}"
        ),
        served,
        "nothing served for the refused pull: {m}"
    );
    let status = image_client(&containerd.socket())
        .image_status(ImageStatusRequest {
            image: spec(&other_ref),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none(), "{status:?}");
    assert_no_leftovers(&containerd).await;

    // 3. No secret in pullgate's log: neither password (plain or in a Basic header) nor any
    // token the server issued (whole, or its signature).
    let log = pullgate.log();
    assert!(
        log.contains(&reference),
        "the log is not about the pull:\n{log}"
    );
    for secret in [
        PASSWORD.to_string(),
        WRONG_PASSWORD.to_string(),
        good_basic.trim_start_matches("Basic ").to_string(),
        basic_header(USER, WRONG_PASSWORD)
            .trim_start_matches("Basic ")
            .to_string(),
    ] {
        assert!(!log.contains(&secret), "{secret} in pullgate's log:\n{log}");
    }
    let issued = tokens.issued();
    assert!(!issued.is_empty());
    for token in &issued {
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(token.as_str()) && !log.contains(signature),
            "an issued token is in pullgate's log:\n{log}"
        );
    }
}
