//! Real non-Rust CRI clients: `tests/clients/cri_client.py` on grpcio and
//! `tests/clients/go/cri-client` on Debian's grpc-go. Both take a socket path and one command and
//! print one line of JSON: the reply (proto field names, proto3 JSON mapping) or
//! `{"code": "NOT_FOUND", "message": "..."}`.
//!
//! The Go client is built on first use in GOPATH mode (`GO111MODULE=off`, Debian's
//! `/usr/share/gocode`; no module proxy is needed) with stubs that Debian's `protoc` and
//! `protoc-gen-go` generate from `proto/cri/api.proto`; the Python one runs in the venv
//! `tests/deps.sh` makes, with stubs from its pinned `grpcio-tools`. Both land under cargo's
//! target tmp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

/// Which client, and how it dials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// grpc-go, dialled as crictl 1.29 does: target = the bare path, `:authority` = the path.
    Go,
    /// grpc-go with the percent-encoded path as `:authority` (what newer grpc-go sends).
    GoEscaped,
    /// grpcio, `grpc.insecure_channel("unix:" + path)`.
    Python,
    /// grpcio, `grpc.insecure_channel("unix://" + path)`.
    PythonUri,
}

/// The clients every case runs with.
pub const ALL: [Client; 3] = [Client::Go, Client::GoEscaped, Client::Python];
/// Every way of dialling (a few calls run with each).
pub const EVERY_DIAL: [Client; 4] = [
    Client::Go,
    Client::GoEscaped,
    Client::Python,
    Client::PythonUri,
];

struct Built {
    go_binary: PathBuf,
    python: PathBuf,
    script: PathBuf,
    stubs: PathBuf,
}

static BUILT: OnceLock<Built> = OnceLock::new();

/// Where the Python venv lives (made by `tests/deps.sh`).
pub fn venv_dir() -> PathBuf {
    std::env::var_os("PULLGATE_TEST_PY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pullgate-tests/py"))
}

fn work_dir() -> PathBuf {
    option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join("foreign-clients")
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e} (run tests/deps.sh)"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {cmd:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn build() -> Built {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = work_dir();
    // A fresh tree per test binary run: generated code never outlives the proto it came from.
    // One per containerd under test, as tests/run.sh runs the versions side by side (Go's build
    // cache, shared, is safe for that).
    let under_test = std::env::var("PULLGATE_TEST_CONTAINERD").unwrap_or_default();
    let tree = work.join(format!(
        "tree{}",
        under_test.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    ));
    let _ = std::fs::remove_dir_all(&tree);
    let gopath = tree.join("go");
    let pkg = gopath.join("src/pullgate.test");
    std::fs::create_dir_all(pkg.join("criapi")).unwrap();
    std::fs::create_dir_all(pkg.join("cri-client")).unwrap();
    std::fs::copy(
        repo.join("tests/clients/go/cri-client/main.go"),
        pkg.join("cri-client/main.go"),
    )
    .unwrap();
    run(
        "protoc-gen-go",
        Command::new("protoc")
            .arg("-I")
            .arg(repo.join("proto/cri"))
            .arg(format!(
                "--go_out=plugins=grpc:{}",
                pkg.join("criapi").display()
            ))
            .arg("api.proto"),
    );
    let go_binary = tree.join("cri-client");
    run(
        "go build",
        Command::new("go")
            .args(["build", "-o"])
            .arg(&go_binary)
            .arg("pullgate.test/cri-client")
            .env("GO111MODULE", "off")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", work.join("go-cache"))
            .env("GOFLAGS", "")
            .env("CGO_ENABLED", "0"),
    );

    let python = venv_dir().join("bin/python3");
    let stubs = tree.join("py");
    std::fs::create_dir_all(&stubs).unwrap();
    run(
        "grpc_tools.protoc",
        Command::new(&python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(repo.join("proto"))
            .arg(format!("--python_out={}", stubs.display()))
            .arg(format!("--grpc_python_out={}", stubs.display()))
            .arg("cri/api.proto"),
    );
    Built {
        go_binary,
        python,
        script: repo.join("tests/clients/cri_client.py"),
        stubs,
    }
}

fn built() -> &'static Built {
    BUILT.get_or_init(build)
}

/// Builds both clients now (blocking), so the first timed call does not pay for it.
pub fn prepare() {
    built();
}

/// Runs `client` on `socket` with `args` (e.g. `["pull", IMAGE, "--sandbox"]`) and returns the
/// JSON it printed.
pub async fn call(client: Client, socket: &Path, args: &[&str]) -> Value {
    let b = tokio::task::block_in_place(built);
    let mut cmd = match client {
        Client::Go | Client::GoEscaped => {
            let mut c = tokio::process::Command::new(&b.go_binary);
            if client == Client::GoEscaped {
                c.arg("-escaped-authority");
            }
            c.arg(socket);
            c.args(args.iter().map(|a| match *a {
                "--sandbox" => "-sandbox",
                "--auth" => "-auth",
                a => a,
            }));
            c
        }
        Client::Python | Client::PythonUri => {
            let mut c = tokio::process::Command::new(&b.python);
            c.arg(&b.script).arg("--stubs").arg(&b.stubs);
            if client == Client::PythonUri {
                c.arg("--uri");
            }
            c.arg(socket);
            c.args(args);
            c
        }
    };
    cmd.env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("grpc_proxy")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{client:?} {args:?} on {}: no answer in 180 s",
                socket.display()
            )
        })
        .unwrap_or_else(|e| panic!("{client:?}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{client:?} {args:?} exited {}:\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{client:?} {args:?}: not JSON ({e}):\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// One PullImage by the Go client (as kubelet makes it with `sandbox`, else as crictl does), with
/// a deadline long enough for any bench pull; the error's gRPC code and message if it failed.
pub async fn go_pull(socket: &Path, image: &str, sandbox: bool) -> Result<(), String> {
    let b = tokio::task::block_in_place(built);
    let mut cmd = tokio::process::Command::new(&b.go_binary);
    cmd.args(["-timeout", "60m"])
        .arg(socket)
        .args(["pull", image]);
    if sandbox {
        cmd.arg("-sandbox");
    }
    let out = cmd
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("Go client: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).map_err(|e| {
        format!(
            "Go client exited {}: not JSON ({e}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    match error_code(&v) {
        None => Ok(()),
        Some(code) => Err(format!("{code}: {}", v["message"].as_str().unwrap_or(""))),
    }
}

/// The gRPC spec's name of a tonic code (what the clients print).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A tonic status as the clients print one.
pub fn status_json(status: &tonic::Status) -> Value {
    serde_json::json!({"code": code_name(status.code()), "message": status.message()})
}

/// The error code a client printed, if it printed an error.
pub fn error_code(v: &Value) -> Option<&str> {
    v.get("code")?.as_str()
}
