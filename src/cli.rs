//! The `pullgate` command line.

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

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(_) => {
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
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pullgate: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(crate::daemon::run(cfg)) {
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
