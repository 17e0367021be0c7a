//! The `pullgate` command line.
//!
//! The top of the crate with `daemon`: may import any module.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "pullgate",
    version,
    about = "CRI image-service shim that schedules image pulls on a Kubernetes node"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CRI image service on a unix socket, in front of containerd.
    Serve(ServeArgs),
    /// Validate a config file and exit (0 when valid).
    CheckConfig {
        /// The config file to check.
        file: PathBuf,
    },
    /// Pre-pull an image through pullgate's scheduler (prewarm class).
    Prewarm {
        /// Image reference, e.g. registry.example/ml/model:v3
        image: String,
        /// Priority among prewarm jobs, higher first
        #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
        priority: i32,
        /// Show progress and wait until the image is pulled (exit 1 if it fails)
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List pull jobs: class, priority, state, progress, queue wait.
    Jobs {
        /// Include recently ended jobs
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a prewarm job (urgent jobs, which a pod waits for, are refused).
    Cancel {
        /// Job number, as `pullgate jobs` shows it
        job: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// One screen on this node's image path: pullgate, containerd, kubelet's image endpoint,
    /// containerd's hosts.toml, the P2P gate, jobs and the last errors (exit 1 when something is
    /// wrong).
    Status {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
        /// Config file [default: /etc/pullgate/config.toml if it exists, else built-in defaults]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// kubelet's config file, read when no running kubelet names one with --config
        #[arg(
            long,
            value_name = "FILE",
            default_value = "/var/lib/kubelet/config.yaml"
        )]
        kubelet_config: PathBuf,
    },
    /// Show, write or remove pullgate's mirror entries in containerd's hosts.toml files
    /// (`pullgate serve` keeps them itself while `mirror.manage_hosts` is on).
    MirrorHosts {
        /// Take pullgate's entries out of every file (the administrator's hosts stay as written)
        #[arg(long, conflicts_with = "write")]
        remove: bool,
        /// Write the entries now, as `pullgate serve` does at start
        #[arg(long)]
        write: bool,
        /// Config file (for mirror.hosts_dir and mirror.addr) [default: /etc/pullgate/config.toml
        /// if it exists, else built-in defaults]
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Wait for pullgate state; exits 0 when reached, 1 on failure or timeout.
    Wait {
        /// Wait until every [[prewarm]] image of the config is present (e.g. in a systemd
        /// ExecStartPre of kubelet, to hold pods until prewarm is done)
        #[arg(long, required = true)]
        prewarmed: bool,
        /// Give up after this long, e.g. 10m
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct ApiArgs {
    /// pullgate's API socket
    #[arg(long, value_name = "PATH", default_value = crate::config::DEFAULT_API_SOCKET, env = "PULLGATE_API_SOCKET")]
    pub api_socket: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Config file [default: /etc/pullgate/config.toml if it exists, else built-in defaults]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// CRI socket to serve (kubelet's imageServiceEndpoint) [default: /run/pullgate/pullgate.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// containerd's socket [default: /run/containerd/containerd.sock]
    #[arg(long, value_name = "PATH")]
    pub containerd_socket: Option<PathBuf>,
    /// Listen address of /metrics, /healthz and /readyz [default: 127.0.0.1:9782]
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log format
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

impl ServeArgs {
    /// The effective config: file (or defaults), then flags on top, validated once more.
    pub fn config(&self) -> Result<Config, String> {
        let (mut cfg, _) =
            Config::load_default_or(self.config.as_deref()).map_err(|e| e.to_string())?;
        if let Some(s) = &self.socket {
            cfg.server.socket = s.clone();
        }
        if let Some(s) = &self.containerd_socket {
            cfg.containerd.socket = s.clone();
        }
        if let Some(a) = self.metrics_addr {
            cfg.metrics.addr = a;
        }
        if let Some(f) = self.log_format {
            cfg.log.format = f;
        }
        // Flags get the same checks as the file.
        cfg.validate("")
            .map_err(|e| format!("invalid flags: {e}"))?;
        Ok(cfg)
    }
}

/// `pullgate mirror-hosts`: lists the files that do not send containerd through pullgate first
/// (exit 1 if any), or writes or removes the entries.
fn mirror_hosts(config: Option<PathBuf>, remove: bool, write: bool) -> ExitCode {
    use crate::mirror::hosts_dir::{self, HostsKeeper, Outcome};
    let cfg = match Config::load_default_or(config.as_deref()) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = &cfg.mirror.hosts_dir;
    if let Err(e) = hosts_dir::check_tree(dir) {
        eprintln!("pullgate: mirror.hosts_dir: {e}");
        return ExitCode::from(2);
    }
    if remove {
        return match hosts_dir::remove_all(dir) {
            Ok(changed) => {
                for f in &changed {
                    println!("removed pullgate's entry from {}", f.display());
                }
                if changed.is_empty() {
                    println!("no pullgate entry under {}", dir.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "pullgate: cannot edit hosts.toml under {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let keeper = HostsKeeper::new(dir.clone(), cfg.mirror.url());
    if write {
        let mut failed = false;
        for (file, outcome) in keeper.ensure_all() {
            match outcome {
                Outcome::Written => println!("wrote {}", file.display()),
                Outcome::Unchanged => println!("ok    {}", file.display()),
                Outcome::Refused(why) | Outcome::Deferred(why) => {
                    failed = true;
                    println!("LEFT  {}: {why}", file.display());
                }
            }
        }
        return if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let missing = keeper.missing();
    for f in &missing {
        println!("{} does not list {} first", f.display(), cfg.mirror.url());
    }
    if missing.is_empty() {
        println!(
            "every hosts.toml under {} lists {} first",
            dir.display(),
            cfg.mirror.url()
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `pullgate status`: exit 0 when nothing is wrong, 1 otherwise, 2 for a broken config.
fn status(config: Option<PathBuf>, kubelet_config: &std::path::Path, json: bool) -> ExitCode {
    let cfg = match Config::load_default_or(config.as_deref()) {
        Ok((c, _)) => c,
        Err(e) => {
            eprintln!("pullgate: {e}");
            return ExitCode::from(2);
        }
    };
    client(async move {
        let report = crate::status::gather(&cfg, kubelet_config).await;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("the report serializes")
            );
        } else {
            print!("{}", crate::status::render(&report));
        }
        if report.ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// Runs an API client command on a small runtime.
fn client(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("pullgate: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn main() -> ExitCode {
    use crate::api::client as api;
    let cli = Cli::parse();
    match cli.command {
        Command::Prewarm {
            image,
            priority,
            wait,
            api: a,
        } => client(api::prewarm(a.api_socket, image, priority, wait)),
        Command::Jobs { all, api: a } => client(api::jobs(a.api_socket, all)),
        Command::Status {
            json,
            config,
            kubelet_config,
        } => status(config, &kubelet_config, json),
        Command::Cancel { job, api: a } => client(api::cancel(a.api_socket, job)),
        Command::Wait {
            prewarmed: _,
            timeout,
            api: a,
        } => client(api::wait_prewarmed(a.api_socket, timeout)),
        Command::MirrorHosts {
            remove,
            write,
            config,
        } => mirror_hosts(config, remove, write),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                let found = crate::preflight::check(&cfg);
                for w in &found.warnings {
                    eprintln!("pullgate: warning: {w}");
                }
                for e in &found.errors {
                    eprintln!("pullgate: {}: {e}", file.display());
                }
                if !found.errors.is_empty() {
                    return ExitCode::from(2);
                }
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("pullgate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => {
            let cfg = match args.config() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("pullgate: {e}");
                    return ExitCode::from(2);
                }
            };
            crate::logging::init(&cfg.log);
            let found = crate::preflight::check(&cfg);
            for w in &found.warnings {
                tracing::warn!("{w}");
            }
            if !found.errors.is_empty() {
                for e in &found.errors {
                    tracing::error!("{e}");
                    eprintln!("pullgate: {e}");
                }
                return ExitCode::from(2);
            }
            // Before the runtime: fds 3.. are systemd's, and the environment is changed.
            crate::frontdoor::activation::receive();
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pullgate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let reload = move || args.config();
            match rt.block_on(crate::daemon::run(cfg, Box::new(reload))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("pullgate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
