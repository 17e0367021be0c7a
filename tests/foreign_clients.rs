//! Real non-Rust CRI clients through pullgate: a Go client on Debian's grpc-go, dialled the way
//! crictl dials (the bare socket path, which grpc-go sends as `:authority`, raw or
//! percent-encoded), and a Python client on grpcio (`unix:` + path). Each call is made straight to
//! containerd and through pullgate, and both answers must be the same: replies, and failed pulls'
//! codes and messages (trailers-only responses included), for merged requesters too.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::clients::{self, call, error_code, status_json, Client, ALL, EVERY_DIAL};
use common::faultproxy::Fault;
use common::node::Node;
use common::*;
use pullgate::proto::runtime::v1::ImageFsInfoRequest;
use serde_json::{json, Value};

/// What legitimately differs between two answers to the same call, taken out before comparing:
/// ImageFsInfo's `timestamp` is the time of the measurement (each call measures anew), and
/// ListImages has no stable order in containerd.
fn normalise(command: &str, mut v: Value) -> Value {
    match command {
        "imagefsinfo" => {
            for key in ["image_filesystems", "container_filesystems"] {
                let list = v.get_mut(key).and_then(Value::as_array_mut);
                for fs in list.into_iter().flatten() {
                    fs.as_object_mut().unwrap().remove("timestamp");
                }
            }
        }
        "list" => {
            if let Some(images) = v.get_mut("images").and_then(Value::as_array_mut) {
                images.sort_by_key(|i| i["id"].as_str().unwrap_or_default().to_string());
            }
        }
        _ => {}
    }
    v
}

async fn ask(client: Client, socket: &Path, args: &[&str]) -> Value {
    normalise(args[0], call(client, socket, args).await)
}

/// `args` straight to containerd and through pullgate with `client`: the same answer. Returns it.
async fn same(node: &Node, client: Client, args: &[&str]) -> Value {
    let direct = ask(client, &node.containerd.socket(), args).await;
    let via = ask(client, &node.pullgate.socket(), args).await;
    assert_eq!(
        via, direct,
        "{client:?} {args:?}: through pullgate vs direct"
    );
    via
}

/// `args` with each of `clients`, straight and through pullgate: one answer for all of them.
async fn same_for(clients: &[Client], node: &Node, args: &[&str]) -> Value {
    let first = same(node, clients[0], args).await;
    for client in &clients[1..] {
        assert_eq!(
            same(node, *client, args).await,
            first,
            "{client:?} vs {:?}: {args:?}",
            clients[0]
        );
    }
    first
}

async fn same_for_all(node: &Node, args: &[&str]) -> Value {
    same_for(&ALL, node, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_python_clients_get_containerd_s_answers_through_pullgate() {
    tokio::task::block_in_place(clients::prepare);
    let started = Instant::now();
    let node = Node::start(None).await;
    let (direct, via) = (node.containerd.socket(), node.pullgate.socket());

    let fs = same_for(&EVERY_DIAL, &node, &["imagefsinfo"]).await;
    assert!(
        fs["image_filesystems"][0]["fs_id"]["mountpoint"].is_string(),
        "{fs}"
    );
    for client in ALL {
        for sandbox in [true, false] {
            let repo = format!("foreign/{client:?}-{sandbox}").to_lowercase();
            let img = push_image(&node.registry, &repo, "v1", &[96 << 10, 32 << 10], None).await;
            let image = img.reference();
            let mut pull = vec!["pull", image.as_str()];
            if sandbox {
                pull.push("--sandbox");
            }
            let status = ["status", image.as_str()];
            let remove = ["remove", image.as_str()];

            // Pulled straight from containerd: its answers, then removed again.
            let pulled = ask(client, &direct, &pull).await;
            assert_eq!(
                pulled,
                json!({"image_ref": img.config_digest}),
                "{client:?}"
            );
            let present = ask(client, &direct, &status).await;
            assert_eq!(
                present["image"]["id"],
                json!(img.config_digest),
                "{present}"
            );
            let listed = same(&node, client, &["list"]).await;
            assert!(listed.to_string().contains(&img.config_digest), "{listed}");
            assert_eq!(ask(client, &direct, &remove).await, json!({}));
            let absent = same(&node, client, &status).await;
            assert_eq!(absent, json!({}), "{client:?}: removed image still there");

            // The same image pulled through pullgate: the same answers, straight or through it.
            assert_eq!(
                ask(client, &via, &pull).await,
                pulled,
                "{client:?} {pull:?}"
            );
            assert_eq!(same(&node, client, &status).await, present, "{client:?}");
            assert_eq!(same(&node, client, &["list"]).await, listed, "{client:?}");
            assert_eq!(ask(client, &via, &remove).await, json!({}));
            assert_eq!(same(&node, client, &status).await, absent, "{client:?}");
            // Removing what is gone is no error, either way.
            assert_eq!(same(&node, client, &remove).await, json!({}));
        }
    }
    eprintln!("answers compared in {:?}", started.elapsed());
}

/// A failed pull with every client: straight to containerd and through pullgate the same code
/// and message, which the tonic client gets through pullgate too.
async fn fails_alike(node: &Node, pull: &[&str]) -> Value {
    let answer = same_for_all(node, pull).await;
    assert!(
        error_code(&answer).is_some(),
        "{pull:?} did not fail: {answer}"
    );
    let mut request = pull_request(pull[1]);
    if !pull.contains(&"--sandbox") {
        request.sandbox_config = None;
    }
    if let Some(i) = pull.iter().position(|a| *a == "--auth") {
        let (user, password) = pull[i + 1].split_once(':').unwrap();
        request.auth = Some(auth_config(user, password));
    }
    let tonic = node.via().pull_image(request).await.unwrap_err();
    assert_eq!(status_json(&tonic), answer, "tonic through pullgate");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_pulls_reach_every_client_with_containerd_s_code_and_message() {
    const USER: &str = "bob";
    const PASS: &str = "pw-4411";
    tokio::task::block_in_place(clients::prepare);
    let started = Instant::now();
    let node = Node::start(None).await;
    let private = Registry::start(&node.dir.path().join("private"), Some((USER, PASS))).await;
    node.containerd.add_registry(&private);

    // Missing image: containerd's NOT_FOUND.
    let missing = format!("{}/none/such:v1", node.registry.addr());
    let answer = same_for(&EVERY_DIAL, &node, &["pull", &missing, "--sandbox"]).await;
    assert_eq!(error_code(&answer), Some("NOT_FOUND"), "{answer}");
    for pull in [vec!["pull", &missing, "--sandbox"], vec!["pull", &missing]] {
        let answer = fails_alike(&node, &pull).await;
        assert_eq!(error_code(&answer), Some("NOT_FOUND"), "{answer}");
    }

    // A registry whose port is closed.
    let closed_host = format!("127.0.0.1:{}", free_port());
    node.containerd.add_host(&closed_host);
    let closed = format!("{closed_host}/gone/app:v1");
    // A pull through pullgate first puts its mirror entry into the new hosts.toml, so both arms
    // below see the same file.
    let _ = node.via().pull_image(pull_request(&closed)).await;
    let answer = fails_alike(&node, &["pull", &closed, "--sandbox"]).await;
    // containerd resolves tags at the registry itself, so the answer is the registry's.
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("connection refused"), "{answer}");

    // A private registry: no credentials, then wrong ones.
    let img = push_image(
        &private,
        "private/app",
        "v1",
        &[64 << 10],
        Some((USER, PASS)),
    )
    .await;
    let image = img.reference();
    let wrong = format!("{USER}:not-{PASS}");
    for pull in [
        vec!["pull", image.as_str(), "--sandbox"],
        vec![
            "pull",
            image.as_str(),
            "--sandbox",
            "--auth",
            wrong.as_str(),
        ],
    ] {
        let answer = fails_alike(&node, &pull).await;
        // containerd 1.6 names the registry's 401; 1.7 and 2.1 say "authorization failed: no
        // basic auth credentials" when the login is missing. Either way an auth failure.
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("401") || message.contains("authorization failed"),
            "{answer}"
        );
    }
    eprintln!("containerd's failures compared in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pullgate_s_own_failures_reach_every_client_intact() {
    tokio::task::block_in_place(clients::prepare);
    let started = Instant::now();
    // A stalled blob stream fails after 2 × 2 s: the merged requesters' window.
    let node = Node::start_with(None, "retries = 1\nrequest_timeout = \"2s\"").await;
    let (direct, via) = (node.containerd.socket(), node.pullgate.socket());
    let proxy = node.fault_proxy().await;

    // A corrupt blob. The mirror cuts it before its last byte, every time containerd resumes
    // it, so containerd never commits it and gives its own answer (UNKNOWN, "unexpected EOF"),
    // the same as for its own pulls through the mirror; pullgate hands that answer to every
    // client unchanged.
    let img = push_image(&node.registry, "fault/flip", "v1", &[64 << 10], None).await;
    let layer = img.layer_digests[0].clone();
    proxy.inject(&layer, Fault::Flip, 1000);
    let image = img.reference_via(&proxy.addr);
    let pull = ["pull", image.as_str(), "--sandbox"];
    let mut first: Option<Value> = None;
    for client in ALL {
        let via_answer = call(client, &via, &pull).await;
        let direct_answer = call(client, &direct, &pull).await;
        eprintln!(
            "corrupt blob, {client:?}: direct {direct_answer}, through pullgate {via_answer}"
        );
        assert!(error_code(&direct_answer).is_some(), "{direct_answer}");
        assert_eq!(
            error_code(&via_answer),
            error_code(&direct_answer),
            "{client:?}"
        );
        let message = via_answer["message"].as_str().unwrap();
        assert!(message.contains(&image), "{image} not in {message}");
        assert!(!message.contains("commit digest"), "committed: {message}");
        if let Some(first) = &first {
            assert_eq!(&via_answer, first, "{client:?}");
        }
        first = Some(via_answer);
    }
    let tonic = node
        .via()
        .pull_image(pull_request(&image))
        .await
        .unwrap_err();
    assert_eq!(Some(status_json(&tonic)), first);

    // Merged requesters of one failing pull: Go, Python and tonic at once, one upstream job, one
    // answer for all (containerd's, once the mirror gives up on a stalled registry and cuts the
    // stream).
    let img = push_image(&node.registry, "fault/stall", "v1", &[256 << 10], None).await;
    proxy.inject(&img.layer_digests[0], Fault::Stall, 1000);
    let image = img.reference_via(&proxy.addr);
    let pull = ["pull", image.as_str(), "--sandbox"];
    let merged_before = node
        .pullgate
        .metric("pullgate_pull_requests_merged_total")
        .await;
    let mut tonic_client = node.via();
    // The others ask once the Go client's pull is in flight, so they join it.
    let in_flight = || {
        wait_for(
            "the first pull in flight",
            Duration::from_secs(30),
            || async { node.pullgate.metric("pullgate_pulls_in_flight").await >= 1.0 },
        )
    };
    let (go, py, tonic) = tokio::join!(
        call(Client::Go, &via, &pull),
        async {
            in_flight().await;
            call(Client::Python, &via, &pull).await
        },
        async {
            in_flight().await;
            tonic_client.pull_image(pull_request(&image)).await
        }
    );
    assert!(error_code(&go).is_some(), "{go}");
    assert_eq!(py, go);
    assert_eq!(status_json(&tonic.unwrap_err()), go);
    let merged = node
        .pullgate
        .metric("pullgate_pull_requests_merged_total")
        .await
        - merged_before;
    assert_eq!(merged, 2.0, "all three requesters on one job");

    // Garbage instead of a PullImageRequest: INVALID_ARGUMENT from pullgate, to every client.
    // containerd itself answers differently (printed below).
    let garbage = ["raw", "/runtime.v1.ImageService/PullImage", "ffffffffff0f"];
    let mut first: Option<Value> = None;
    for client in ALL {
        let via_answer = call(client, &via, &garbage).await;
        assert_eq!(
            error_code(&via_answer),
            Some("INVALID_ARGUMENT"),
            "{via_answer}"
        );
        eprintln!(
            "garbage, {client:?}: direct {}, through pullgate {via_answer}",
            call(client, &direct, &garbage).await
        );
        if let Some(first) = &first {
            assert_eq!(&via_answer, first, "{client:?}");
        }
        first = Some(via_answer);
    }

    // Garbage on pullgate's own API socket: INVALID_ARGUMENT too, not INTERNAL.
    let api = node.pullgate.api_socket();
    let tonic = raw_unary(
        &api,
        "/pullgate.v1.Pullgate/Submit",
        bytes::Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]),
    )
    .await
    .unwrap_err();
    assert_eq!(tonic.code(), tonic::Code::InvalidArgument, "{tonic:?}");
    assert!(
        tonic
            .message()
            .starts_with("SubmitRequest is not a valid protobuf message"),
        "{tonic:?}"
    );
    for client in ALL {
        let answer = call(
            client,
            &api,
            &["raw", "/pullgate.v1.Pullgate/Submit", "ffffffffff0f"],
        )
        .await;
        assert_eq!(
            error_code(&answer),
            Some("INVALID_ARGUMENT"),
            "{client:?}: {answer}"
        );
    }
    eprintln!("pullgate's failures compared in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_down_reaches_every_client_as_unavailable() {
    tokio::task::block_in_place(clients::prepare);
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "down/app", "v1", &[32 << 10], None).await;
    let image = img.reference();
    node.containerd.stop().await;
    let socket = node.containerd.socket();

    for args in [
        vec!["imagefsinfo"],
        vec!["pull", image.as_str(), "--sandbox"],
        vec!["pull", image.as_str()],
    ] {
        // Straight to containerd the client cannot even connect: UNAVAILABLE from the client
        // library itself, with its own wording. Through pullgate: UNAVAILABLE naming the socket.
        let mut first: Option<Value> = None;
        for client in ALL {
            let direct = call(client, &socket, &args).await;
            assert_eq!(
                error_code(&direct),
                Some("UNAVAILABLE"),
                "{client:?}: {direct}"
            );
            let via = call(client, &node.pullgate.socket(), &args).await;
            assert_eq!(error_code(&via), Some("UNAVAILABLE"), "{client:?}: {via}");
            let message = via["message"].as_str().unwrap();
            assert!(
                message.contains(&socket.display().to_string()),
                "{client:?}: {message}"
            );
            if let Some(first) = &first {
                assert_eq!(&via, first, "{client:?} {args:?}");
            }
            first = Some(via);
        }
        if args[0] == "imagefsinfo" {
            let tonic = node
                .via()
                .image_fs_info(ImageFsInfoRequest {})
                .await
                .unwrap_err();
            assert_eq!(Some(status_json(&tonic)), first);
        }
    }
}
