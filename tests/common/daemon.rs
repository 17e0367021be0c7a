//! Runs the real `pullgate` daemon binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{read_log, send_signal, tail, terminate_blocking, wait_child};

pub struct Pullgate {
    child: Option<Child>,
    socket: PathBuf,
    metrics_addr: String,
    log: PathBuf,
    config: PathBuf,
    containerd_socket: PathBuf,
    /// Extra environment of the process (e.g. NOTIFY_SOCKET), kept across restarts.
    env: Vec<(String, String)>,
}

/// The `pullgate` binary: cargo tells integration tests where it is; examples (the sandbox) find it
/// beside their own directory, `target/<profile>/`.
pub fn binary() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_pullgate") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("example binary lives in target/<profile>/examples");
    profile_dir.join("pullgate")
}

impl Pullgate {
    /// Starts `pullgate serve` on `dir/pullgate.sock` in front of `containerd`, reading
    /// its mirror on a free loopback port written first into containerd's own `certs.d`, with
    /// `mirror_toml` added to its `[mirror]` table and debug logs in `dir/pullgate.log`; waits
    /// until `/readyz` answers 200.
    pub async fn start(dir: &Path, containerd: &super::Containerd, mirror_toml: &str) -> Pullgate {
        Self::start_with_env(dir, containerd, mirror_toml, &[]).await
    }

    /// [`Pullgate::start`] with extra environment variables for the process.
    pub async fn start_with_env(
        dir: &Path,
        containerd: &super::Containerd,
        mirror_toml: &str,
        env: &[(&str, &str)],
    ) -> Pullgate {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("config.toml");
        // The tests' containerd root shares the build machine's disk: its free space must not
        // decide whether a test's partial downloads are kept (tests/disk_full.rs sets its own).
        let min_free = if mirror_toml.contains("keep_partial_min_free") {
            ""
        } else {
            "keep_partial_min_free = \"1MB\"\n"
        };
        // A `[containerd]` table in `mirror_toml` joins the harness's own (TOML has one per name).
        let (mirror_toml, containerd_toml) = split_table(mirror_toml, "[containerd]");
        std::fs::write(
            &config,
            format!(
                "[api]\nsocket = {:?}\n[containerd]\nconfig_file = {:?}\n{containerd_toml}\
                 [mirror]\naddr = \"127.0.0.1:{}\"\nhosts_dir = {:?}\n{min_free}{mirror_toml}\n",
                dir.join("api.sock"),
                containerd.config_path(),
                super::free_port(),
                containerd.dir().join("certs.d")
            ),
        )
        .unwrap();
        let mut pg = Pullgate {
            child: None,
            socket: dir.join("pullgate.sock"),
            metrics_addr: format!("127.0.0.1:{}", super::free_port()),
            log: dir.join("pullgate.log"),
            config,
            containerd_socket: containerd.socket(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        pg.spawn_and_wait().await;
        pg
    }

    async fn spawn_and_wait(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--containerd-socket")
            .arg(&self.containerd_socket)
            .arg("--metrics-addr")
            .arg(&self.metrics_addr)
            .env("RUST_LOG", "pullgate=debug,info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        super::kill_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("spawn pullgate"));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "pullgate exited at start ({status}):\n{}",
                    tail(&self.log(), 30)
                );
            }
            if self.http_get("/readyz").await.map(|(c, _)| c) == Some(200) {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!("pullgate not ready after 20s:\n{}", tail(&self.log(), 30));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash or an OOM kill would: no cleanup at all.
    pub fn kill_now(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the same daemon again (same socket, config and metrics address).
    pub async fn restart(&mut self) {
        self.kill_now();
        self.spawn_and_wait().await;
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// pullgate's own API socket.
    pub fn api_socket(&self) -> PathBuf {
        self.socket.with_file_name("api.sock")
    }

    /// The config file it was started with (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> PathBuf {
        self.config.clone()
    }

    /// Runs `pullgate ARGS --api-socket <this daemon's>`: (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self
            .cli_command(args)
            .output()
            .await
            .expect("run pullgate CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The CLI command, to spawn and watch.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(binary());
        cmd.args(args)
            .arg("--api-socket")
            .arg(self.api_socket())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    pub fn metrics_addr(&self) -> &str {
        &self.metrics_addr
    }

    /// The mirror's "127.0.0.1:PORT", as written in its config.
    pub fn mirror_addr(&self) -> String {
        let text = std::fs::read_to_string(&self.config).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("addr = \"127.0.0.1:"))
            .expect("mirror addr in the config");
        line.trim_start_matches("addr = ")
            .trim_matches('"')
            .to_string()
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// GET on the metrics endpoint: (status, body), or None if it does not answer.
    pub async fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .ok()?;
        let resp = client
            .get(format!("http://{}{}", self.metrics_addr, path))
            .send()
            .await
            .ok()?;
        let code = resp.status().as_u16();
        Some((code, resp.text().await.unwrap_or_default()))
    }

    pub async fn metrics(&self) -> String {
        let (code, body) = self
            .http_get("/metrics")
            .await
            .expect("metrics endpoint answers");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// The value of one sample line (`name{labels}` exactly as printed), 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }

    pub fn signal(&self, sig: libc::c_int) {
        send_signal(self.pid(), sig);
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        if !wait_child(child, timeout).await {
            return None;
        }
        child.try_wait().ok().flatten().and_then(|s| s.code())
    }
}

/// The value of `sample` in Prometheus text `text`, 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

impl Drop for Pullgate {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate_blocking(&mut c, Duration::from_secs(5));
        }
    }
}

/// `toml` without table `header`, and that table's lines.
fn split_table(toml: &str, header: &str) -> (String, String) {
    let (mut rest, mut table) = (String::new(), String::new());
    let mut inside = false;
    for line in toml.lines() {
        if line.trim_start().starts_with('[') {
            inside = line.trim() == header;
            if inside {
                continue;
            }
        }
        let out = if inside { &mut table } else { &mut rest };
        out.push_str(line);
        out.push('\n');
    }
    (rest, table)
}
