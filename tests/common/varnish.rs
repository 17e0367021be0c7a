//! Varnish (Debian package) as a P2P seed or pull-through cache with a strict capacity: malloc
//! storage of a fixed size that evicts the least recently used blobs as soon as it is full, and
//! coalesces concurrent misses of one blob into one upstream fetch (streamed to every waiter).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, read_log, tail, terminate_blocking};

pub const VARNISHD_BIN: &str = "/usr/sbin/varnishd";

pub struct Varnish {
    child: Option<Child>,
    addr: String,
    dir: PathBuf,
}

impl Varnish {
    /// Caches the blobs of registry `upstream` ("127.0.0.1:PORT") in `capacity` bytes of memory;
    /// anything else (manifests, the API root) passes through uncached.
    pub async fn start_cache(dir: &Path, upstream: &str, capacity: u64) -> Varnish {
        std::fs::create_dir_all(dir).unwrap();
        let (host, port) = upstream.rsplit_once(':').expect("host:port");
        let vcl = format!(
            r#"vcl 4.1;
backend registry {{ .host = "{host}"; .port = "{port}"; .first_byte_timeout = 60s; .between_bytes_timeout = 60s; }}
sub vcl_recv {{
  if (req.method != "GET" && req.method != "HEAD") {{ return (pass); }}
  if (req.url !~ "/blobs/sha256:") {{ return (pass); }}
  unset req.http.Authorization;
  return (hash);
}}
sub vcl_backend_response {{
  if (bereq.url ~ "/blobs/sha256:" && beresp.status == 200) {{
    set beresp.ttl = 1h;
    set beresp.grace = 0s;
    set beresp.do_stream = true;
  }}
}}
"#
        );
        let vcl_path = dir.join("cache.vcl");
        std::fs::write(&vcl_path, vcl).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.join("varnishd.log")).unwrap();
        let mut cmd = Command::new(VARNISHD_BIN);
        cmd.args(["-F", "-j", "none", "-T", "none"])
            .arg("-n")
            .arg(dir.join("work"))
            .arg("-a")
            .arg(&addr)
            .arg("-f")
            .arg(&vcl_path)
            .arg("-s")
            .arg(format!("malloc,{capacity}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        super::kill_with_parent(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {VARNISHD_BIN} (apt-get install varnish): {e}")
        });
        let mut v = Varnish {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(&v.addr).await.is_err() {
            if let Some(Ok(Some(st))) = v.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "varnishd exited ({st}): {}",
                    tail(&read_log(&v.dir.join("varnishd.log")), 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "varnishd did not listen on {}",
                v.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        v
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Body bytes varnish has received from its upstream (the backend's `beresp_bodybytes`),
    /// cut-short fetches included.
    pub fn upstream_body_bytes(&self) -> u64 {
        let out = Command::new("/usr/bin/varnishstat")
            .arg("-n")
            .arg(self.dir.join("work"))
            .args(["-1", "-f", "VBE.*.beresp_bodybytes"])
            .output()
            .expect("varnishstat");
        let text = String::from_utf8_lossy(&out.stdout);
        let counts: Vec<u64> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                w.next()?
                    .ends_with(".beresp_bodybytes")
                    .then(|| w.next()?.parse().ok())?
            })
            .collect();
        assert!(
            !counts.is_empty(),
            "varnishstat: no beresp_bodybytes: {text}"
        );
        counts.iter().sum()
    }
}

impl Drop for Varnish {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate_blocking(&mut c, Duration::from_secs(5));
        }
    }
}
