//! End-to-end tests of the CRI shim on a real containerd and a real registry: pass-through,
//! PullImage interception and merging, credentials, cancellation, containerd restarts, bad input.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::node::Node;
use common::*;
use prost::Message;
use pullgate::proto::containerd::events::v1::{events_client::EventsClient, SubscribeRequest};
use pullgate::proto::runtime::v1::*;
use tonic::Code;

type ImageServiceClient = image_service_client::ImageServiceClient<tonic::transport::Channel>;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn image_present(client: &mut ImageServiceClient, image: &str) -> bool {
    client
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .is_some()
}

/// Calls `path` with `msg` on both sockets and asserts identical answers: the same bytes, or the
/// same status code and message.
async fn assert_same_answer(node: &Node, path: &str, msg: Bytes) -> Result<Bytes, tonic::Status> {
    let direct = raw_unary(&node.containerd.socket(), path, msg.clone()).await;
    let via = raw_unary(&node.pullgate.socket(), path, msg).await;
    match (&direct, &via) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{path}: different reply bytes"),
        (Err(a), Err(b)) => {
            assert_eq!(a.code(), b.code(), "{path}: {a:?} vs {b:?}");
            assert_eq!(a.message(), b.message(), "{path}");
        }
        _ => panic!("{path}: direct {direct:?} but through pullgate {via:?}"),
    }
    via
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_service_call_answers_as_containerd_does() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "pass/app",
        "v1",
        &[256 * 1024, 32 * 1024],
        None,
    )
    .await;
    node.direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();

    // ImageStatus: present, by digest, verbose (containerd adds an info map), absent.
    for (image, verbose) in [
        (img.reference(), false),
        (img.digest_reference(), false),
        (img.reference(), true),
        ("127.0.0.1:1/none/such:v0".to_string(), false),
    ] {
        let msg = ImageStatusRequest {
            image: spec(&image),
            verbose,
        }
        .encode_to_vec();
        assert_same_answer(&node, "/runtime.v1.ImageService/ImageStatus", msg.into())
            .await
            .unwrap();
    }

    // A field this build does not know (number 99) reaches containerd and does not change the
    // answer: nothing was decoded and re-encoded on the way.
    let mut with_unknown = ImageStatusRequest {
        image: spec(&img.reference()),
        verbose: false,
    }
    .encode_to_vec();
    with_unknown.extend_from_slice(&[0x9a, 0x06, 0x03, b'n', b'e', b'w']); // field 99, "new"
    let reply = assert_same_answer(
        &node,
        "/runtime.v1.ImageService/ImageStatus",
        with_unknown.into(),
    )
    .await
    .unwrap();
    let status = ImageStatusResponse::decode(reply).unwrap();
    assert_eq!(status.image.unwrap().id, img.config_digest);

    // ListImages: the same images (containerd's order is not stable between calls).
    let list = |client: ImageServiceClient| async move {
        let mut client = client;
        let mut images = client
            .list_images(ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images;
        images.sort_by(|a, b| a.id.cmp(&b.id));
        images
    };
    let direct_list = list(node.direct()).await;
    assert!(direct_list.iter().any(|i| i.id == img.config_digest));
    assert_eq!(direct_list, list(node.via()).await);

    // ImageFsInfo: the same, but for the timestamp of the measurement.
    let fs_info = |client: ImageServiceClient| async move {
        let mut client = client;
        let mut r = client
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        for fs in r
            .image_filesystems
            .iter_mut()
            .chain(&mut r.container_filesystems)
        {
            fs.timestamp = 0;
        }
        r
    };
    let direct_fs = fs_info(node.direct()).await;
    assert!(!direct_fs.image_filesystems.is_empty());
    assert_eq!(direct_fs, fs_info(node.via()).await);

    // A method this build has never heard of, and RuntimeService calls.
    let unknown = assert_same_answer(&node, "/runtime.v1.ImageService/FutureCall", Bytes::new())
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);
    let version = assert_same_answer(
        &node,
        "/runtime.v1.RuntimeService/Version",
        VersionRequest {
            version: "v1".into(),
        }
        .encode_to_vec()
        .into(),
    )
    .await
    .unwrap();
    assert_eq!(
        VersionResponse::decode(version).unwrap().runtime_name,
        "containerd"
    );

    // RemoveImage through pullgate removes it from containerd.
    node.via()
        .remove_image(RemoveImageRequest {
            image: spec(&img.reference()),
        })
        .await
        .unwrap();
    assert!(!image_present(&mut node.direct(), &img.reference()).await);

    // Every call was counted by method and code.
    let metrics = node.pullgate.metrics().await;
    assert!(
        metrics.contains(
            "pullgate_cri_requests_total{method=\"/runtime.v1.ImageService/ImageStatus\",code=\"ok\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("pullgate_cri_requests_total{method=\"other\",code=\"unimplemented\"} 1"),
        "{metrics}"
    );

    // The calls were relayed by the front door's own thread, at `server.nice` (-10 by default;
    // the tests run as root, which may lower it).
    let pid = node.pullgate.pid();
    let nice = thread_nice(pid, "pullgate-cri").expect("a thread named pullgate-cri");
    assert_eq!(nice, -10, "{}", node.pullgate.log());
    let main = nice_in(&format!("/proc/{pid}/stat"));
    assert_eq!(main, Some(0), "the rest stays as it is");
}

/// The nice value of the first thread of `pid` named `name`.
fn thread_nice(pid: u32, name: &str) -> Option<i32> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return nice_in(&task.path().join("stat").to_string_lossy());
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_calls_pass_through() {
    let node = Node::start(None).await;
    // containerd's event stream, subscribed through pullgate's socket. containerd sends the
    // stream's headers with the first event, so the subscription runs in its own task.
    let channel = uds_channel(&node.pullgate.socket()).await;
    let subscriber = tokio::spawn(async move {
        let mut events = EventsClient::new(channel)
            .subscribe(SubscribeRequest { filters: vec![] })
            .await
            .expect("subscribe through pullgate")
            .into_inner();
        while let Some(env) = events.message().await.expect("event stream") {
            if env.topic == "/images/create" {
                return env;
            }
        }
        panic!("event stream ended");
    });
    let img = push_image(&node.registry, "stream/app", "v1", &[64 * 1024], None).await;
    // Give the subscription a moment to reach containerd before the event happens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), subscriber)
        .await
        .expect("image create event within 30s")
        .unwrap();
    assert_eq!(got.namespace, "k8s.io");

    // CRI's own streaming call answers the same through pullgate (containerd 1.6 lacks it:
    // UNIMPLEMENTED; 1.7 and 2.x hold the stream open and may send no headers before the first
    // event, so "still open after 3 s" is an answer too).
    let open = |socket: std::path::PathBuf| async move {
        let call = async {
            runtime_client(&socket)
                .get_container_events(GetEventsRequest {})
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        };
        tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .ok()
    };
    let direct = open(node.containerd.socket()).await;
    let via = open(node.pullgate.socket()).await;
    assert_eq!(direct, via);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_tag_and_by_digest_through_pullgate() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "team/app",
        "v1",
        &[1024 * 1024, 300 * 1024, 10 * 1024],
        None,
    )
    .await;

    let by_tag = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap()
        .into_inner();
    // containerd's CRI answers with the image id (the config digest).
    assert_eq!(by_tag.image_ref, img.config_digest);
    assert!(image_present(&mut node.direct(), &img.reference()).await);
    assert_eq!(node.registry.blob_gets(&img.repo), img.blob_count());

    let by_digest = node
        .via()
        .pull_image(prewarm_request(&img.digest_reference()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_digest.image_ref, img.config_digest);
    let status = node
        .direct()
        .image_status(ImageStatusRequest {
            image: spec(&img.reference()),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert!(
        status.repo_digests.contains(&format!(
            "{}/{}@{}",
            img.registry, img.repo, img.manifest_digest
        )),
        "{status:?}"
    );

    let m = node.pullgate.metrics().await;
    assert_eq!(
        pullgate_metric(
            &m,
            "pullgate_pull_requests_total{class=\"urgent\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        pullgate_metric(
            &m,
            "pullgate_pull_requests_total{class=\"prewarm\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(pullgate_metric(&m, "pullgate_pulls_in_flight"), 0.0);
    let log = node.pullgate.log();
    assert!(log.contains("pull finished"), "{log}");
}

fn pullgate_metric(text: &str, sample: &str) -> f64 {
    common::daemon::metric_value(text, sample)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_registry_with_kubelet_credentials() {
    const USER: &str = "alice";
    const PASS: &str = "s3cret-Pw-7731";
    let node = Node::start(Some((USER, PASS))).await;
    let img = push_image(
        &node.registry,
        "private/app",
        "v1",
        &[200 * 1024],
        Some((USER, PASS)),
    )
    .await;

    // Anonymous: refused, the same way containerd refuses it.
    let anon_direct = node
        .direct()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_err();
    let anon_via = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_err();
    assert_eq!(anon_direct.code(), anon_via.code());

    // Wrong password: a clean error, not a hang or a panic.
    let mut wrong = pull_request(&img.reference());
    wrong.auth = Some(auth_config(USER, "wrong-password"));
    let err = node.via().pull_image(wrong).await.unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert!(
        err.message().contains("401") || err.message().to_lowercase().contains("unauthorized"),
        "{err:?}"
    );

    // kubelet-style AuthConfig: pulled.
    let mut right = pull_request(&img.reference());
    right.auth = Some(auth_config(USER, PASS));
    let reply = node.via().pull_image(right).await.unwrap().into_inner();
    assert_eq!(reply.image_ref, img.config_digest);

    // The password never reaches pullgate's logs (debug level) or metrics.
    let log = node.pullgate.log();
    assert!(!log.contains(PASS), "password in log:\n{log}");
    assert!(!log.contains("wrong-password"), "password in log:\n{log}");
    assert!(log.contains("authenticated=true"), "{log}");
    assert!(!node.pullgate.metrics().await.contains(PASS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_make_one_upstream_pull() {
    let node = Node::start(None).await;
    let img = push_image(
        &node.registry,
        "merge/app",
        "v1",
        &[1536 * 1024, 512 * 1024],
        None,
    )
    .await;
    // Paced to ~2 MiB/s per connection so every request arrives while the first pull runs.
    let proxy = node.slow_proxy(2 * 1024 * 1024).await;
    let reference = img.reference_via(&proxy.addr);

    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut client = node.via();
        let req = if i % 2 == 0 {
            pull_request(&reference)
        } else {
            prewarm_request(&reference)
        };
        tasks.push(tokio::spawn(async move { client.pull_image(req).await }));
    }
    for t in tasks {
        let reply = t.await.unwrap().expect("every requester answered");
        assert_eq!(reply.into_inner().image_ref, img.config_digest);
    }

    let m = node.pullgate.metrics().await;
    assert_eq!(
        pullgate_metric(&m, "pullgate_upstream_pulls_total{result=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        pullgate_metric(&m, "pullgate_pull_requests_merged_total"),
        9.0,
        "{m}"
    );
    // The registry saw one pull: each blob fetched once.
    assert_eq!(node.registry.blob_gets(&img.repo), img.blob_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_with_different_credentials_are_not_merged() {
    const USER: &str = "bob";
    const PASS: &str = "hunter2-but-longer";
    let node = Node::start(Some((USER, PASS))).await;
    let img = push_image(
        &node.registry,
        "creds/app",
        "v1",
        &[1024 * 1024],
        Some((USER, PASS)),
    )
    .await;
    let proxy = node.slow_proxy(1024 * 1024).await;
    let reference = img.reference_via(&proxy.addr);

    let mut good = pull_request(&reference);
    good.auth = Some(auth_config(USER, PASS));
    let mut bad = pull_request(&reference);
    bad.auth = Some(auth_config(USER, "not-the-password"));
    let anonymous = pull_request(&reference);

    let (mut c1, mut c2, mut c3) = (node.via(), node.via(), node.via());
    let good_task = tokio::spawn(async move { c1.pull_image(good).await });
    // Let the authenticated pull get going before the others ask for the same image.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let bad_task = tokio::spawn(async move { c2.pull_image(bad).await });
    let anon_task = tokio::spawn(async move { c3.pull_image(anonymous).await });

    assert!(
        bad_task.await.unwrap().is_err(),
        "wrong credentials rode on a good pull"
    );
    assert!(
        anon_task.await.unwrap().is_err(),
        "anonymous rode on a good pull"
    );
    good_task.await.unwrap().expect("authenticated pull");
    let m = node.pullgate.metrics().await;
    assert_eq!(
        pullgate_metric(&m, "pullgate_pull_requests_merged_total"),
        0.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requesters_detach_and_the_last_one_cancels_the_pull() {
    let node = Node::start(None).await;
    let img = push_image(&node.registry, "cancel/app", "v1", &[8 * 1024 * 1024], None).await;
    let proxy = node.slow_proxy(512 * 1024).await;
    let reference = img.reference_via(&proxy.addr);

    let mut a = node.via();
    let mut b = node.via();
    let ra = pull_request(&reference);
    let rb = pull_request(&reference);
    let task_a = tokio::spawn(async move { a.pull_image(ra).await });
    let task_b = tokio::spawn(async move { b.pull_image(rb).await });
    wait_for(
        "both requesters attached",
        Duration::from_secs(20),
        || async {
            node.pullgate
                .metric("pullgate_pull_requests_merged_total")
                .await
                == 1.0
        },
    )
    .await;
    wait_for("blob bytes flowing", Duration::from_secs(20), || async {
        proxy.bytes() > 0
    })
    .await;

    // The first requester gives up: the pull goes on for the second.
    task_a.abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.pullgate.metric("pullgate_pulls_in_flight").await, 1.0);
    let before = proxy.bytes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        proxy.bytes() > before,
        "pull stalled after one requester left"
    );

    // The last one gives up: pullgate cancels the upstream pull and containerd stops fetching.
    task_b.abort();
    wait_for(
        "upstream pull cancelled",
        Duration::from_secs(10),
        || async {
            node.pullgate
                .metric("pullgate_upstream_pulls_total{result=\"cancelled\"}")
                .await
                == 1.0
        },
    )
    .await;
    assert_eq!(node.pullgate.metric("pullgate_pulls_in_flight").await, 0.0);
    // containerd stops fetching: the byte count settles well short of the image.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = proxy.bytes();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        proxy.bytes(),
        settled,
        "containerd still fetching after cancellation"
    );
    assert!(
        proxy.bytes() < img.total_size,
        "the whole image went through anyway"
    );
    assert!(!image_present(&mut node.direct(), &img.reference()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restart_under_a_running_pullgate() {
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "restart/app", "v1", &[64 * 1024], None).await;
    node.via()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect("works while containerd is up");

    node.containerd.stop().await;
    let err = node
        .via()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("containerd"), "{err:?}");
    let err = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let (code, body) = node.pullgate.http_get("/healthz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(node.pullgate.metric("pullgate_upstream_up").await, 0.0);

    node.containerd.start_again().await;
    // No pullgate restart: the next calls reach the new containerd.
    node.via()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo after containerd came back");
    let reply = node
        .via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull after containerd came back");
    assert_eq!(reply.into_inner().image_ref, img.config_digest);
    let (code, _) = node.pullgate.http_get("/healthz").await.unwrap();
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pull_requests_get_invalid_argument() {
    let node = Node::start(None).await;
    let path = "/runtime.v1.ImageService/PullImage";
    let cases: Vec<(&str, Bytes)> = vec![
        (
            "garbage protobuf",
            Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x0f]),
        ),
        ("truncated message", {
            let mut m = pull_request("busybox").encode_to_vec();
            m.truncate(m.len() / 2);
            m.into()
        }),
        ("empty message", Bytes::new()),
        ("empty reference", pull_request("").encode_to_vec().into()),
        (
            "malformed reference",
            pull_request("Not A/Ref::x").encode_to_vec().into(),
        ),
        (
            "uppercase repository",
            pull_request("127.0.0.1:5000/UPPER:v1")
                .encode_to_vec()
                .into(),
        ),
    ];
    for (what, msg) in cases {
        let err = raw_unary(&node.pullgate.socket(), path, msg)
            .await
            .expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}");
    }
    // Still serving, nothing reached containerd.
    node.via()
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap();
    let reached_registry: Vec<_> = node
        .registry
        .requests()
        .into_iter()
        .filter(|r| r.path != "/v2/")
        .collect();
    assert!(reached_registry.is_empty(), "{reached_registry:?}");
    let m = node.pullgate.metrics().await;
    assert_eq!(
        pullgate_metric(
            &m,
            "pullgate_cri_requests_total{method=\"/runtime.v1.ImageService/PullImage\",code=\"invalid_argument\"}"
        ),
        6.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_in_flight_and_removes_the_socket() {
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "drain/app", "v1", &[1024 * 1024], None).await;
    let proxy = node.slow_proxy(1024 * 1024).await;
    let reference = img.reference_via(&proxy.addr);
    let mut client = node.via();
    let pull = tokio::spawn(async move { client.pull_image(pull_request(&reference)).await });
    wait_for("pull under way", Duration::from_secs(20), || async {
        proxy.bytes() > 0
    })
    .await;

    node.pullgate.signal(libc::SIGTERM);
    wait_for("readyz turns 503", Duration::from_secs(5), || async {
        matches!(
            node.pullgate.http_get("/readyz").await,
            Some((503, _)) | None
        )
    })
    .await;
    let reply = pull
        .await
        .unwrap()
        .expect("the pull in flight completes during the drain");
    assert_eq!(reply.into_inner().image_ref, img.config_digest);
    assert_eq!(
        node.pullgate.wait_exit(Duration::from_secs(20)).await,
        Some(0)
    );
    assert!(!node.pullgate.socket().exists(), "socket left behind");
}

#[test]
fn check_config_names_the_bad_key_and_line() {
    let dir = tempdir();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nsocket = \"/run/pg.sock\"\nsokcet_mode = \"0660\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sokcet_mode") && err.contains("line 3"),
        "{err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/config/pullgate.toml"),
        &good,
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["check-config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // serve refuses to start on the broken file, before touching any socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// The nice value in a `/proc/.../stat` file: field 19, after the parenthesized command (which
/// may hold spaces).
fn nice_in(stat: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(stat).ok()?;
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(16)?
        .parse()
        .ok()
}
