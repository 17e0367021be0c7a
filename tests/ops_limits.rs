//! Operational limits seen from outside: `pullgate check-config` refuses values that would fail
//! at use, and the metrics endpoint does not let idle or half-open connections pile up.
//!
//! Needs no containerd: pullgate serves /metrics while containerd is unreachable.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pullgate"))
}

fn check_config(path: &Path) -> (i32, String) {
    let out = Command::new(binary())
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn check_config_accepts_the_shipped_file_and_refuses_what_would_fail_at_use() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pullgate.toml");
    let (code, text) = check_config(&shipped);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains(": ok"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[mirror]\nrequest_timeout = \"10000y\"\n",
            "line 2: mirror.request_timeout: 10000y is out of range: expected a duration between 1s and 10m, like \"30s\"",
        ),
        (
            "[mirror]\nrequest_timeout = 1979-05-27T07:32:00Z\n",
            "expected a duration like \"30s\"",
        ),
        (
            "[fetch]\nlease_expiry = \"1h\"\n",
            "line 2: fetch.lease_expiry: no longer exists since pullgate serves containerd as its registry mirror",
        ),
        (
            "[mirror]\naddr = \"0.0.0.0:9783\"\n",
            "mirror.addr: 0.0.0.0:9783 is not a loopback address",
        ),
        (
            "[schedule]\nbandwidth = \"300%\"\n",
            "a percentage is accepted only by schedule.prewarm_bandwidth",
        ),
        (
            "[schedule]\nmax_blob_streams = 99999999999999999999\n",
            "expected a whole number from 0 to 4096",
        ),
        (
            "[mirror]\nhosts_dir = \"certs.d\"\n",
            "mirror.hosts_dir: \"certs.d\" is a relative path: expected an absolute path",
        ),
        (
            "[metrics]\nheader_read_timeout = \"1h\"\n",
            "metrics.header_read_timeout: 1h is out of range",
        ),
    ];
    for (i, (toml, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, toml).unwrap();
        let (code, text) = check_config(&path);
        assert_eq!(code, 2, "{toml:?}: {text}");
        assert!(
            text.contains(want),
            "{toml:?}\n  got: {text}\n  wanted: {want}"
        );
        assert!(
            !text.contains("i128") && !text.contains("panicked"),
            "{text}"
        );
    }
}

/// `pullgate serve` with a metrics endpoint on a free loopback port and the given [metrics]
/// lines; containerd's socket does not exist.
struct Daemon {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(metrics_toml: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let d = dir.path();
        let config = d.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nsocket = {:?}\n[containerd]\nsocket = {:?}\n[api]\nsocket = {:?}\n\
                 [mirror]\nenabled = false\nhosts_dir = {:?}\n[metrics]\naddr = {addr:?}\n{metrics_toml}\n",
                d.join("pullgate.sock"),
                d.join("no-containerd.sock"),
                d.join("api.sock"),
                d.join("certs.d"),
            ),
        )
        .unwrap();
        let child = Command::new(binary())
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("pullgate.log")).unwrap())
            .spawn()
            .unwrap();
        let daemon = Daemon {
            child,
            addr,
            _dir: dir,
        };
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(&daemon.addr).is_err() {
            assert!(Instant::now() < until, "metrics endpoint not up after 20s");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    /// GET /metrics on a fresh connection; the status line.
    fn scrape(&self) -> std::io::Result<String> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.lines().next().unwrap_or_default().to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once the server closed `s` (EOF or reset), within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // hyper may answer a timed-out partial request with an error status, then close.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn half_open_connections_are_closed_after_the_header_timeout_and_capped() {
    let daemon = Daemon::start("header_read_timeout = \"1s\"\nmax_connections = 8");
    let opened = Instant::now();
    // Half-open: four send nothing, three a partial request line. One slot stays free.
    let mut hanging: Vec<TcpStream> = (0..7)
        .map(|i| {
            let mut s = TcpStream::connect(&daemon.addr).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /metr").unwrap();
            }
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    // While they hang, the free slot still answers a scrape.
    assert_eq!(daemon.scrape().unwrap(), "HTTP/1.1 200 OK");

    // Over the cap: with the eighth slot held too, a ninth connection is closed at once.
    let mut eighth = TcpStream::connect(&daemon.addr).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut ninth = TcpStream::connect(&daemon.addr).unwrap();
    assert!(
        closed_by_server(&mut ninth, Duration::from_millis(500)),
        "a connection over the cap was kept open"
    );

    // Every hanging one is closed by the server after the header-read timeout (not before).
    for s in hanging.iter_mut().chain([&mut eighth]) {
        assert!(
            closed_by_server(s, Duration::from_secs(5)),
            "a half-open connection stayed open"
        );
    }
    let took = opened.elapsed();
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");

    // Slots are free again.
    assert_eq!(daemon.scrape().unwrap(), "HTTP/1.1 200 OK");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let daemon = Daemon::start("header_read_timeout = \"500ms\"");
    let mut s = TcpStream::connect(&daemon.addr).unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 503"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle = Instant::now();
    assert!(
        closed_by_server(&mut s, Duration::from_secs(5)),
        "idle keep-alive stayed open"
    );
    assert!(
        idle.elapsed() >= Duration::from_millis(400),
        "{:?}",
        idle.elapsed()
    );
}
