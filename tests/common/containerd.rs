//! A real containerd with its CRI plugin, confined to one dir: root, state, sockets, CNI dirs,
//! registry hosts config and log all live under it, so several instances can run at once.
//!
//! The binary is `$PULLGATE_TEST_CONTAINERD` (default `/usr/bin/containerd`, Debian bookworm's
//! 1.6); `tests/containerd-versions.sh` fetches trixie's 1.7 and sid's 2.1 and `tests/run.sh`
//! runs the suite against each. The config is written for the binary's major version: `version =
//! 2` for 1.x, `version = 3` (the split CRI plugins) for 2.x.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pullgate::proto::runtime::v1::ImageFsInfoRequest;

use super::registry::Registry;
use super::{image_client, read_log, send_signal, tail, terminate_blocking, wait_child};

/// The containerd binary when `$PULLGATE_TEST_CONTAINERD` is not set.
pub const DEFAULT_CONTAINERD_BIN: &str = "/usr/bin/containerd";

/// The containerd binary the tests run: `$PULLGATE_TEST_CONTAINERD`, else
/// [`DEFAULT_CONTAINERD_BIN`].
pub fn containerd_bin() -> PathBuf {
    match std::env::var_os("PULLGATE_TEST_CONTAINERD") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONTAINERD_BIN),
    }
}

/// The version of [`containerd_bin`], from `containerd --version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    /// As printed, e.g. "1.6.20~ds1", "2.1.9+unknown".
    pub text: String,
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `containerd --version` of the binary under test (asked once per test process).
pub fn containerd_version() -> &'static ContainerdVersion {
    static VERSION: OnceLock<ContainerdVersion> = OnceLock::new();
    VERSION.get_or_init(|| version_of(&containerd_bin()))
}

/// The version `bin --version` prints.
pub fn version_of(bin: &Path) -> ContainerdVersion {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("Containerd: cannot run {} --version: {e}", bin.display()));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    parse_version(&printed).unwrap_or_else(|| {
        panic!(
            "Containerd: cannot read a version from `{} --version`: {printed:?}",
            bin.display()
        )
    })
}

/// "containerd github.com/containerd/containerd/v2 2.1.9+unknown <revision>" → 2.1.
pub fn parse_version(printed: &str) -> Option<ContainerdVersion> {
    let text = printed.split_whitespace().nth(2)?.trim_start_matches('v');
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some(ContainerdVersion {
        major,
        minor,
        text: text.to_string(),
    })
}

/// Whether this kernel lets us mount overlayfs (containerd's `overlayfs` snapshotter needs it;
/// inside some containers it is refused). Tried once.
pub fn overlayfs_mountable() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(dir) = tempfile::tempdir() else {
            return false;
        };
        let p = |s: &str| dir.path().join(s);
        for s in ["lower", "upper", "work", "merged"] {
            let _ = std::fs::create_dir(p(s));
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            p("lower").display(),
            p("upper").display(),
            p("work").display()
        );
        let mounted = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(p("merged"))
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            let _ = Command::new("umount").arg(p("merged")).status();
        }
        mounted
    })
}

/// Skips the calling test on containerd versions where it cannot work: prints why and returns
/// true when `!works(version)`. Use only for real limitations of a version, named in the README.
pub fn skip_unless(works: impl Fn(&ContainerdVersion) -> bool, why: &str) -> bool {
    let v = containerd_version();
    if works(v) {
        return false;
    }
    eprintln!("SKIPPED on containerd {v}: {why}");
    true
}

/// How long `start`/`start_again` wait for the CRI ImageService to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running containerd. SIGTERM (then SIGKILL after a grace period) on drop.
pub struct Containerd {
    /// The binary (and `ctr` beside it).
    bin: PathBuf,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
}

impl Containerd {
    /// Writes `dir/config.toml` and `dir/certs.d/<registry addr>/hosts.toml` for each registry
    /// (plain http, pull+resolve), starts containerd and waits until CRI `ImageFsInfo` answers on
    /// `dir/containerd.sock`.
    pub async fn start(dir: &Path, registries: &[&Registry]) -> Containerd {
        let addrs: Vec<String> = registries.iter().map(|r| r.addr()).collect();
        Self::start_with(dir, &addrs, "").await
    }

    /// Like `start`, with registry addresses ("127.0.0.1:PORT") given as strings (e.g. for a
    /// registry that is not started yet) and `extra_toml` appended to the generated config.
    pub async fn start_with(dir: &Path, registry_addrs: &[String], extra_toml: &str) -> Containerd {
        Self::start_on(dir, registry_addrs, extra_toml, "native").await
    }

    /// Like `start_with`, with CRI unpacking into `snapshotter` ("native" or "overlayfs").
    pub async fn start_on(
        dir: &Path,
        registry_addrs: &[String],
        extra_toml: &str,
        snapshotter: &str,
    ) -> Containerd {
        Self::start_tuned(dir, registry_addrs, extra_toml, snapshotter, "").await
    }

    /// Like `start_on`, with `cri_images` (e.g. `image_pull_progress_timeout = "4s"`) added to
    /// the CRI plugin's image settings of the config version in use.
    pub async fn start_tuned(
        dir: &Path,
        registry_addrs: &[String],
        extra_toml: &str,
        snapshotter: &str,
        cri_images: &str,
    ) -> Containerd {
        Self::start_binary(
            &containerd_bin(),
            dir,
            registry_addrs,
            extra_toml,
            snapshotter,
            cri_images,
            "",
        )
        .await
    }

    /// Like `start_tuned` with another containerd binary `bin` (its own config version), and
    /// `transfer` lines added to the transfer service's settings (containerd 2.x).
    pub async fn start_binary(
        bin: &Path,
        dir: &Path,
        registry_addrs: &[String],
        extra_toml: &str,
        snapshotter: &str,
        cri_images: &str,
        transfer: &str,
    ) -> Containerd {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("Containerd: cannot create {}: {e}", dir.display()));
        let dir = dir
            .canonicalize()
            .unwrap_or_else(|e| panic!("Containerd: cannot canonicalize {}: {e}", dir.display()));
        let socket = dir.join("containerd.sock");
        // sun_path is 108 bytes; ".ttrpc" is appended for the ttrpc socket.
        assert!(
            socket.as_os_str().len() + ".ttrpc".len() < 100,
            "Containerd: socket path {} is too long for a unix socket; use a shorter dir",
            socket.display()
        );
        for sub in ["root", "state", "certs.d", "cni/bin", "cni/net.d", "opt"] {
            std::fs::create_dir_all(dir.join(sub))
                .unwrap_or_else(|e| panic!("Containerd: cannot create {sub}: {e}"));
        }
        for addr in registry_addrs {
            write_hosts_toml(&dir, addr);
        }
        let config_path = dir.join("config.toml");
        let major = if bin == containerd_bin() {
            containerd_version().major
        } else {
            version_of(bin).major
        };
        let mut config = containerd_config(major, &dir, &socket, snapshotter)
            .replacen("    # cri images\n", &format!("    {cri_images}\n"), 1)
            .replacen("    # transfer\n", &format!("    {transfer}\n"), 1);
        config.push_str(extra_toml);
        std::fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("Containerd: cannot write config: {e}"));
        let mut containerd = Containerd {
            bin: bin.to_path_buf(),
            log_path: dir.join("containerd.log"),
            dir,
            config_path,
            socket,
            child: None,
        };
        containerd.spawn_and_wait().await;
        containerd
    }

    /// Adds (or rewrites) `certs.d/<addr>/hosts.toml` for a registry; containerd reads these on
    /// every pull, so no restart is needed.
    pub fn add_registry(&self, registry: &Registry) {
        write_hosts_toml(&self.dir, &registry.addr());
    }

    /// Like `add_registry` for any plain-HTTP host ("127.0.0.1:PORT"), e.g. a proxy.
    pub fn add_host(&self, addr: &str) {
        write_hosts_toml(&self.dir, addr);
    }

    /// Writes `certs.d/<registry>/hosts.toml` with `mirrors` (plain-HTTP "127.0.0.1:PORT") as
    /// hosts tried first, in order, and the registry itself as `server`, the last resort.
    pub fn set_mirrors(&self, registry: &str, mirrors: &[&str]) {
        let host_dir = self.dir.join("certs.d").join(registry);
        std::fs::create_dir_all(&host_dir).unwrap();
        let mut hosts = format!("server = {}\n", toml_str(&format!("http://{registry}")));
        for m in mirrors {
            hosts.push_str(&format!(
                "\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
                toml_str(&format!("http://{m}"))
            ));
        }
        std::fs::write(host_dir.join("hosts.toml"), hosts).unwrap();
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("Containerd: cannot open log: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("Containerd: cannot clone log fd: {e}"));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--config")
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "ALL_PROXY",
            "all_proxy",
            "CONTAINERD_ADDRESS",
            "CONTAINERD_NAMESPACE",
        ] {
            cmd.env_remove(var);
        }
        super::kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("Containerd: cannot spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    async fn spawn_and_wait(&mut self) {
        self.spawn();
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = String::from("socket not there yet");
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "Containerd in {} exited during start ({status}); log tail:\n{}",
                        self.dir.display(),
                        tail(&self.log(), 40)
                    );
                }
            }
            if self.socket.exists() {
                let mut client = image_client(&self.socket);
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    client.image_fs_info(ImageFsInfoRequest {}),
                )
                .await
                {
                    Ok(Ok(_)) => return,
                    Ok(Err(status)) => last_err = format!("ImageFsInfo: {status}"),
                    Err(_) => last_err = "ImageFsInfo timed out".to_string(),
                }
            }
            if Instant::now() >= deadline {
                let log = self.log();
                self.kill_now();
                panic!(
                    "Containerd in {} not ready after {READY_TIMEOUT:?} ({last_err}); log tail:\n{}",
                    self.dir.display(),
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Path of containerd's gRPC socket (`dir/containerd.sock`; same across restarts).
    /// Runs containerd's `ctr` (beside the containerd binary) in the CRI namespace; its stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = std::process::Command::new(self.bin.with_file_name("ctr"))
            .arg("-a")
            .arg(self.socket())
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Whole log so far (all runs, appended).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// Process id of the running containerd, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM and wait for exit (SIGKILL after 10 s). The socket path stays the same for
    /// `start_again`. Idempotent.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                send_signal(child.id(), libc::SIGTERM);
                if !wait_child(&mut child, Duration::from_secs(10)).await {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
        }
    }

    /// SIGKILL now (a crash, no graceful shutdown) and reap. Idempotent.
    pub fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts containerd again with the same config and dirs (stopping it first if running), and
    /// waits until CRI answers.
    pub async fn start_again(&mut self) {
        self.stop().await;
        self.spawn_and_wait().await;
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate_blocking(&mut child, Duration::from_secs(5));
        }
    }
}

fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn write_hosts_toml(dir: &Path, addr: &str) {
    let host_dir = dir.join("certs.d").join(addr);
    std::fs::create_dir_all(&host_dir)
        .unwrap_or_else(|e| panic!("Containerd: cannot create {}: {e}", host_dir.display()));
    let server = format!("http://{addr}");
    let hosts = format!(
        "server = {server}\n\n[host.{server}]\n  capabilities = [\"pull\", \"resolve\"]\n  skip_verify = true\n",
        server = toml_str(&server)
    );
    std::fs::write(host_dir.join("hosts.toml"), hosts)
        .unwrap_or_else(|e| panic!("Containerd: cannot write hosts.toml: {e}"));
}

/// containerd's config for `major` (1 or 2): the parts both share, and the plugin sections of
/// its config version.
fn containerd_config(major: u32, dir: &Path, socket: &Path, snapshotter: &str) -> String {
    let p = |sub: &str| toml_str(&dir.join(sub).to_string_lossy());
    let sock = socket.to_string_lossy().into_owned();
    let (version, only_here, plugins) = if major >= 2 {
        (3, V3_DISABLED, plugins_v3(dir, snapshotter))
    } else {
        (2, V2_DISABLED, plugins_v2(dir, snapshotter))
    };
    // overlayfs needs a filesystem that supports it; the harness falls back to native.
    let overlayfs = if snapshotter == "overlayfs" {
        ""
    } else {
        "\n  \"io.containerd.snapshotter.v1.overlayfs\","
    };
    format!(
        r#"version = {version}
root = {root}
state = {state}
oom_score = 0
# Plugins that cannot work here (or are not needed): CRI uses {snapshotter:?}.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",{only_here}{overlayfs}
]

[grpc]
  address = {grpc}
  max_recv_message_size = 16777216
  max_send_message_size = 16777216

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""
  level = {level}

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {opt}
{plugins}"#,
        root = p("root"),
        state = p("state"),
        grpc = toml_str(&sock),
        ttrpc = toml_str(&format!("{sock}.ttrpc")),
        opt = p("opt"),
        // `$PULLGATE_TEST_CONTAINERD_LOG` (e.g. "debug") to see containerd's own spans.
        level = toml_str(
            &std::env::var("PULLGATE_TEST_CONTAINERD_LOG").unwrap_or_else(|_| "info".into())
        ),
    )
}

/// Disabled only on 1.x: aufs (gone from 2.x, where naming it is an error).
const V2_DISABLED: &str = r#"
  "io.containerd.snapshotter.v1.aufs","#;
/// Disabled only on 2.x: erofs (new there), and NRI, which listens on a fixed socket in /var/run
/// that parallel instances would share.
const V3_DISABLED: &str = r#"
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.nri.v1.nri","#;

/// Config `version = 2` (containerd 1.6 and 1.7): one CRI plugin.
fn plugins_v2(dir: &Path, snapshotter: &str) -> String {
    let p = |sub: &str| toml_str(&dir.join(sub).to_string_lossy());
    format!(
        r#"  [plugins."io.containerd.grpc.v1.cri"]
    # cri images
    sandbox_image = "registry.k8s.io/pause:3.6"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_tcp_service = true
    enable_selinux = false
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {cni_bin}
      conf_dir = {cni_conf}
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = {snapshotter:?}
      disable_snapshot_annotations = true
      discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = {certs}
"#,
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/net.d"),
        certs = p("certs.d"),
    )
}

/// Config `version = 3` (containerd 2.x): the CRI plugin is split into
/// `io.containerd.cri.v1.images` (snapshotter, registry), `io.containerd.cri.v1.runtime` (CNI,
/// runtimes) and `io.containerd.grpc.v1.cri` (the gRPC service, streaming). CRI pulls go through
/// the transfer service, which unpacks only for the platforms and snapshotters in its
/// `unpack_config` (its default names overlayfs alone: with `native`, every pull would fail with
/// "no unpack platforms defined").
fn plugins_v3(dir: &Path, snapshotter: &str) -> String {
    let p = |sub: &str| toml_str(&dir.join(sub).to_string_lossy());
    // The platform the transfer service unpacks for: this machine's.
    let platform = match std::env::consts::ARCH {
        "x86_64" => "linux/amd64",
        "aarch64" => "linux/arm64",
        other => panic!("Containerd: no OCI platform known for {other}"),
    };
    format!(
        r#"  [plugins."io.containerd.cri.v1.images"]
    # cri images
    snapshotter = {snapshotter:?}
    disable_snapshot_annotations = true
    discard_unpacked_layers = false
    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = "registry.k8s.io/pause:3.10"
    [plugins."io.containerd.cri.v1.images".registry]
      config_path = {certs}
  [plugins."io.containerd.cri.v1.runtime"]
    enable_selinux = false
    disable_apparmor = true
    enable_cdi = false
    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = [{cni_bin}]
      conf_dir = {cni_conf}
  [plugins."io.containerd.grpc.v1.cri"]
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_tcp_service = true
  [plugins."io.containerd.transfer.v1.local"]
    # transfer
    config_path = {certs}
    [[plugins."io.containerd.transfer.v1.local".unpack_config]]
      platform = {platform:?}
      snapshotter = {snapshotter:?}
      differ = "walking"
"#,
        cni_bin = p("cni/bin"),
        cni_conf = p("cni/net.d"),
        certs = p("certs.d"),
    )
}
