//! Socket activation on a real containerd and registry: pullgate takes the sockets it is handed
//! (`LISTEN_FDS`), as from `pullgate.socket`; calls made while it restarts wait in the socket's
//! backlog and succeed; it leaves the socket files to their owner; and Debian's
//! `systemd-socket-activate` starts it on the first call.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::binary;
use common::node::Node;
use common::*;
use pullgate::proto::runtime::v1::*;

/// Kills the child when the test ends, however it ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_args(node: &Node) -> Vec<String> {
    let pg = &node.pullgate;
    vec![
        "serve".into(),
        "--config".into(),
        pg.config_path().display().to_string(),
        "--socket".into(),
        pg.socket().display().to_string(),
        "--containerd-socket".into(),
        node.containerd.socket().display().to_string(),
        "--metrics-addr".into(),
        pg.metrics_addr().to_string(),
    ]
}

fn log_file(node: &Node) -> std::fs::File {
    std::fs::OpenOptions::new()
        .append(true)
        .open(node.pullgate.config_path().with_file_name("pullgate.log"))
        .unwrap()
}

/// pullgate with `listeners` as fds 3.. and `LISTEN_PID`/`LISTEN_FDS` for itself, as systemd
/// starts a socket-activated service.
fn spawn_activated(node: &Node, listeners: &[&UnixListener]) -> Daemon {
    // Out of the way first, so moving them to 3.. cannot overwrite one another.
    let high: Vec<i32> = listeners
        .iter()
        .map(|l| unsafe { libc::fcntl(l.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) })
        .collect();
    assert!(high.iter().all(|fd| *fd >= 100));
    let n = listeners.len();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("LISTEN_PID=$$ LISTEN_FDS={n} exec \"$0\" \"$@\""))
        .arg(binary())
        .args(serve_args(node))
        .env("RUST_LOG", "pullgate=debug,info")
        .stdin(Stdio::null())
        .stdout(log_file(node))
        .stderr(log_file(node));
    let fds = high.clone();
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (i, fd) in fds.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn pullgate");
    for fd in high {
        unsafe { libc::close(fd) };
    }
    Daemon(child)
}

async fn ready(node: &Node) {
    wait_for("pullgate ready", Duration::from_secs(20), || async {
        node.pullgate.http_get("/readyz").await.map(|(c, _)| c) == Some(200)
    })
    .await;
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
async fn calls_made_while_pullgate_restarts_wait_on_the_handed_over_socket() {
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "activate/app", "v1", &[256 << 10], None).await;
    node.pullgate.kill_now();
    // As pullgate.socket does: this process owns both sockets.
    let (cri_path, api_path) = (node.pullgate.socket(), node.pullgate.api_socket());
    let _ = std::fs::remove_file(&cri_path);
    let _ = std::fs::remove_file(&api_path);
    let cri = UnixListener::bind(&cri_path).unwrap();
    let api = UnixListener::bind(&api_path).unwrap();

    let mut pg = spawn_activated(&node, &[&cri, &api]);
    ready(&node).await;
    node.via()
        .pull_image(pull_request(&img.reference()))
        .await
        .expect("pull through the handed-over socket");
    let (code, out, err) = node.pullgate.cli(&["jobs", "--all"]).await;
    assert_eq!(code, 0, "API on its handed-over socket: {out}{err}");
    assert!(node
        .pullgate
        .log()
        .contains("socket handed over by systemd"));

    // A restart: SIGTERM, drain, exit. The socket files stay (their owner removes them).
    unsafe { libc::kill(pg.0.id() as i32, libc::SIGTERM) };
    let status = pg.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(cri_path.exists() && api_path.exists());

    // kubelet calls while pullgate is down: the connection waits in the backlog.
    let reference = img.reference();
    let call = tokio::spawn({
        let path = cri_path.clone();
        async move {
            let t = Instant::now();
            let r = image_client(&path)
                .image_status(status_request(&reference))
                .await;
            (r, t.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!call.is_finished(), "the call waits for pullgate");
    let _pg2 = spawn_activated(&node, &[&cri, &api]);
    let (reply, took) = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the queued call is answered")
        .unwrap();
    let image = reply
        .expect("the call made during the restart succeeds")
        .into_inner()
        .image;
    assert_eq!(image.expect("the image").id, img.config_digest);
    assert!(took >= Duration::from_secs(1), "{took:?}");
    eprintln!("call made during the restart answered after {took:?}");
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activate_starts_pullgate_on_the_first_call() {
    let mut node = Node::start(None).await;
    let img = push_image(&node.registry, "activate/first", "v1", &[256 << 10], None).await;
    node.pullgate.kill_now();
    let (cri_path, api_path) = (node.pullgate.socket(), node.pullgate.api_socket());
    let _ = std::fs::remove_file(&cri_path);
    let _ = std::fs::remove_file(&api_path);
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.arg("-l")
        .arg(&cri_path)
        .arg("-l")
        .arg(&api_path)
        .args(["--fdname=cri:api", "-E", "RUST_LOG"])
        .arg(binary())
        .args(serve_args(&node))
        .env("RUST_LOG", "pullgate=debug,info")
        .stdin(Stdio::null())
        .stdout(log_file(&node))
        .stderr(log_file(&node));
    let _launcher = Daemon(
        cmd.spawn()
            .expect("systemd-socket-activate (Debian's systemd)"),
    );
    wait_for("the sockets listen", Duration::from_secs(10), || async {
        cri_path.exists() && api_path.exists()
    })
    .await;
    // The first call starts pullgate, which answers it on the socket it was handed.
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        node.via().pull_image(pull_request(&img.reference())),
    )
    .await
    .expect("answered")
    .expect("pull through a socket systemd-socket-activate handed over")
    .into_inner();
    assert_eq!(reply.image_ref, img.config_digest);
    let log = node.pullgate.log();
    assert!(
        log.contains("socket handed over by systemd"),
        "{}",
        tail(&log, 20)
    );
    assert!(!log.contains("does not serve"), "{}", tail(&log, 20));
}
