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
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let d = dir.display();
        let conf = format!(
            r#"daemon off;
master_process off;
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
  server {{
    listen {addr};
    location / {{
      proxy_pass http://{upstream};
      proxy_http_version 1.1;
      proxy_set_header Host $http_host;
      limit_rate {rate};
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
