//! nginx (Debian package) in front of a registry, capping each connection's rate with
//! `limit_rate`, as many CDNs and registry front ends do.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, read_log, tail, terminate_blocking};

pub const NGINX_BIN: &str = "/usr/sbin/nginx";

pub struct Nginx {
    child: Option<Child>,
    addr: String,
    dir: PathBuf,
}

impl Nginx {
    /// Proxies `127.0.0.1:PORT` to `upstream`, each client connection capped at `rate`
    /// (nginx syntax: "16m" = 16 MiB/s).
    pub async fn start_rate_limited(dir: &Path, upstream: &str, rate: &str) -> Nginx {
        let location = format!(
            "proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n      \
             proxy_set_header Host $http_host;\n      limit_rate {rate};"
        );
        Nginx::start(dir, "", &location, false).await
    }

    /// A shared, bounded cache in front of `upstream`, as a P2P or pull-through cache would be:
    /// `max_size` below what the nodes pull, `proxy_cache_lock` so concurrent misses of one blob
    /// make one upstream request. Blobs are content-addressed, so the URI is the key.
    pub async fn start_cache(dir: &Path, upstream: &str, max_size: &str) -> Nginx {
        let d = dir.display();
        let http = format!(
            "proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:10m max_size={max_size} \
             inactive=1h use_temp_path=off;"
        );
        let location = format!(
            "proxy_pass http://{upstream};\n      proxy_http_version 1.1;\n      \
             proxy_set_header Host $http_host;\n      proxy_cache blobs;\n      \
             proxy_cache_key $uri;\n      proxy_cache_valid 200 1h;\n      \
             proxy_cache_lock on;\n      proxy_cache_lock_timeout 300s;\n      \
             proxy_cache_lock_age 300s;\n      proxy_buffering on;"
        );
        Nginx::start(dir, &http, &location, true).await
    }

    async fn start(dir: &Path, http_extra: &str, location: &str, master: bool) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let d = dir.display();
        let master = if master { "on" } else { "off" };
        let conf = format!(
            r#"daemon off;
master_process {master};
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  {http_extra}
  server {{
    listen {addr};
    location / {{
      {location}
    }}
  }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(NGINX_BIN);
        cmd.arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        super::kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {NGINX_BIN} (apt-get install nginx): {e}"));
        let mut n = Nginx {
            child: Some(child),
            addr,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(&n.addr).await.is_err() {
            if let Some(Ok(Some(st))) = n.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "nginx exited ({st}): {}",
                    tail(&read_log(&n.dir.join("error.log")), 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not listen on {}",
                n.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        n
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate_blocking(&mut c, Duration::from_secs(5));
        }
    }
}
