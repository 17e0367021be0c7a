//! A real distribution registry (`/usr/bin/docker-registry`, 2.8.x) on 127.0.0.1, and pushing
//! synthetic OCI images to it over its HTTP API.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, read_log, sha256_digest, tail};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One request from the registry's access log (Apache combined format written by gorilla's
/// CombinedLoggingHandler on stdout), e.g.
/// `127.0.0.1 - - [22/Nov/2026:07:40:34 +0000] "GET /v2/foo/blobs/sha256:aa.. HTTP/1.1" 200 1048576 "" "containerd/1.6.20~ds1"`.
/// The registry also writes a logrus "response completed" line per request on stderr; those are
/// NOT access-log entries and are ignored, so each request counts once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    pub status: u16,
    /// Response body bytes written.
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses one access-log line; None for any other line.
    pub fn parse(line: &str) -> Option<AccessLogEntry> {
        if line.starts_with("time=") {
            return None;
        }
        let start = line.find("] \"")? + 3;
        let rest = &line[start..];
        let end = rest.find('"')?;
        let mut request = rest[..end].split(' ');
        let method = request.next()?.to_string();
        let path = request.next()?.to_string();
        if !path.starts_with('/') {
            return None;
        }
        let after = rest[end + 1..].trim_start();
        let mut fields = after.split(' ');
        let status: u16 = fields.next()?.parse().ok()?;
        let bytes: u64 = fields.next().and_then(|b| b.parse().ok()).unwrap_or(0);
        // user agent = last quoted field
        let user_agent = {
            let t = after.trim_end();
            let t = t.strip_suffix('"').unwrap_or(t);
            match t.rfind('"') {
                Some(i) => t[i + 1..].to_string(),
                None => String::new(),
            }
        };
        Some(AccessLogEntry {
            method,
            path,
            status,
            bytes,
            user_agent,
        })
    }
}

/// A running `docker-registry serve` on 127.0.0.1:PORT with filesystem storage under its dir.
/// Killed on drop.
pub struct Registry {
    port: u16,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    auth: Option<(String, String)>,
    /// What `GET /v2/` answers once the registry is up (200, or 401 with auth).
    ready_status: u16,
    /// Serves HTTPS (see [`Registry::start_tls`]).
    tls: bool,
    child: Option<Child>,
}

impl Registry {
    /// Writes a config under `dir` (created if missing), starts the registry and waits until
    /// `GET /v2/` answers (200, or 401 when `auth` = Some((user, password)) enables htpasswd).
    pub async fn start(dir: &Path, auth: Option<(&str, &str)>) -> Registry {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("Registry: cannot create {}: {e}", dir.display()));
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        if let Some((user, password)) = &auth {
            // Low cost: the registry checks the hash on every request.
            let hash = bcrypt::hash(password, 4)
                .unwrap_or_else(|e| panic!("Registry: bcrypt failed: {e}"));
            std::fs::write(dir.join("htpasswd"), format!("{user}:{hash}\n"))
                .unwrap_or_else(|e| panic!("Registry: cannot write htpasswd: {e}"));
        }
        let status = if auth.is_some() { 401 } else { 200 };
        Registry::start_inner(dir, auth, "", "", status).await
    }

    /// An HTTPS registry (anonymous) with the given PEM certificate chain and key (the
    /// certificate must be valid for 127.0.0.1). `url()` still says http: use `https_url()`.
    pub async fn start_tls(dir: &Path, cert_pem: &str, key_pem: &str) -> Registry {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("Registry: cannot create {}: {e}", dir.display()));
        let (cert, key) = (dir.join("tls-cert.pem"), dir.join("tls-key.pem"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        let tls = format!(
            "  tls:\n    certificate: \"{}\"\n    key: \"{}\"\n",
            cert.display(),
            key.display()
        );
        Registry::start_inner(dir, None, "", &tls, 200).await
    }

    /// "https://127.0.0.1:PORT".
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr())
    }

    /// A pull-through cache (distribution's proxy mode) in front of `upstream`, which must
    /// allow anonymous pulls. It answers for every repository of `upstream` and stores what it
    /// served under its own dir.
    pub async fn start_mirror(dir: &Path, upstream: &Registry) -> Registry {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("Registry: cannot create {}: {e}", dir.display()));
        let extra = format!("proxy:\n  remoteurl: {}\n", upstream.url());
        Registry::start_inner(dir, None, &extra, "", 200).await
    }

    /// A registry that wants bearer tokens (distribution's `auth: token`): `realm` is the token
    /// endpoint, `service` / `issuer` must match the tokens' `aud` / `iss`, and `root_cert_pem`
    /// is the certificate bundle the tokens' signing chain (`x5c`) must verify against.
    pub async fn start_token_auth(
        dir: &Path,
        realm: &str,
        service: &str,
        issuer: &str,
        root_cert_pem: &str,
    ) -> Registry {
        std::fs::create_dir_all(dir)
            .unwrap_or_else(|e| panic!("Registry: cannot create {}: {e}", dir.display()));
        let bundle = dir.join("token-root.pem");
        std::fs::write(&bundle, root_cert_pem)
            .unwrap_or_else(|e| panic!("Registry: cannot write {}: {e}", bundle.display()));
        let extra = format!(
            "auth:\n  token:\n    realm: \"{realm}\"\n    service: \"{service}\"\n    issuer: \"{issuer}\"\n    rootcertbundle: \"{}\"\n",
            bundle.display()
        );
        Registry::start_inner(dir, None, &extra, "", 401).await
    }

    /// Writes the config (`extra` YAML appended to the base config, `http_extra` added to its
    /// `http:` section), starts the registry and waits until `GET /v2/` answers `ready_status`.
    async fn start_inner(
        dir: &Path,
        auth: Option<(String, String)>,
        extra: &str,
        http_extra: &str,
        ready_status: u16,
    ) -> Registry {
        let log_path = dir.join("registry.log");
        let config_path = dir.join("config.yml");
        let mut last_log = String::new();
        // Retry with a new port if another process grabbed ours between free_port() and bind.
        for _attempt in 0..3 {
            let port = free_port();
            let mut config = registry_config(dir, port, auth.is_some());
            let tls = http_extra.contains("tls:");
            if !http_extra.is_empty() {
                let anchor = "    X-Content-Type-Options: [nosniff]\n";
                config = config.replacen(anchor, &format!("{anchor}{http_extra}"), 1);
            }
            config.push_str(extra);
            std::fs::write(&config_path, config)
                .unwrap_or_else(|e| panic!("Registry: cannot write config: {e}"));
            let mut registry = Registry {
                port,
                dir: dir.to_path_buf(),
                config_path: config_path.clone(),
                log_path: log_path.clone(),
                auth: auth.clone(),
                ready_status,
                tls,
                child: None,
            };
            registry.spawn();
            if registry.wait_ready(Duration::from_secs(20)).await {
                return registry;
            }
            last_log = registry.log();
            registry.stop();
            if !last_log.contains("address already in use") {
                break;
            }
        }
        panic!(
            "Registry: {REGISTRY_BIN} in {} did not become ready; log tail:\n{}",
            dir.display(),
            tail(&last_log, 30)
        );
    }

    fn spawn(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("Registry: cannot open log: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("Registry: cannot clone log fd: {e}"));
        let mut cmd = Command::new(REGISTRY_BIN);
        super::kill_with_parent(&mut cmd);
        let child = cmd
            .arg("serve")
            .arg(&self.config_path)
            .current_dir(&self.dir)
            .env_remove("REGISTRY_HTTP_ADDR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("Registry: cannot spawn {REGISTRY_BIN}: {e}"));
        self.child = Some(child);
    }

    /// True once GET /v2/ answers as expected; false if the process exits or time runs out.
    async fn wait_ready(&mut self, timeout: Duration) -> bool {
        let client = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let scheme = if self.tls { "https" } else { "http" };
        let url = format!("{scheme}://{}/v2/", self.addr());
        let want = self.ready_status;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if let Ok(resp) = client.get(&url).send().await {
                let status = resp.status().as_u16();
                if status == want {
                    return true;
                }
                panic!(
                    "Registry: GET {url} answered {status}, expected {want}; log tail:\n{}",
                    tail(&self.log(), 20)
                );
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The credentials the registry was started with, if any.
    pub fn auth(&self) -> Option<(&str, &str)> {
        self.auth.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Whole log so far (access log on stdout + application log on stderr).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// All requests in the access log so far, in order.
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        self.log()
            .lines()
            .filter_map(AccessLogEntry::parse)
            .collect()
    }

    /// Number of requests with `method` whose path starts with `path_prefix`.
    pub fn count_requests(&self, method: &str, path_prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(path_prefix))
            .count()
    }

    /// Number of `GET /v2/{repo}/blobs/...` requests (any status; uploads excluded).
    pub fn blob_gets(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/blobs/");
        let uploads = format!("/v2/{repo}/blobs/uploads");
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET" && r.path.starts_with(&prefix) && !r.path.starts_with(&uploads)
            })
            .count()
    }

    /// Number of `GET /v2/{repo}/blobs/...` requests answered 200/206.
    pub fn blob_gets_ok(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/blobs/");
        let uploads = format!("/v2/{repo}/blobs/uploads");
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET"
                    && r.path.starts_with(&prefix)
                    && !r.path.starts_with(&uploads)
                    && (r.status == 200 || r.status == 206)
            })
            .count()
    }

    /// Number of `GET /v2/{repo}/blobs/...` requests answered 200: each a read from the blob's
    /// start (a resumed read is a 206).
    pub fn blob_gets_from_start(&self, repo: &str) -> usize {
        let prefix = format!("/v2/{repo}/blobs/");
        let uploads = format!("/v2/{repo}/blobs/uploads");
        self.requests()
            .iter()
            .filter(|r| {
                r.method == "GET"
                    && r.path.starts_with(&prefix)
                    && !r.path.starts_with(&uploads)
                    && r.status == 200
            })
            .count()
    }

    /// Number of `GET /v2/{repo}/manifests/...` requests (any status).
    pub fn manifest_gets(&self, repo: &str) -> usize {
        self.count_requests("GET", &format!("/v2/{repo}/manifests/"))
    }

    /// Number of `HEAD /v2/{repo}/manifests/...` requests (containerd resolves with HEAD).
    pub fn manifest_heads(&self, repo: &str) -> usize {
        self.count_requests("HEAD", &format!("/v2/{repo}/manifests/"))
    }

    /// Kills the registry (SIGKILL) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn registry_config(dir: &Path, port: u16, htpasswd: bool) -> String {
    let mut cfg = format!(
        r#"version: 0.1
log:
  level: info
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: "{data}"
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: pullgate-harness-secret
  headers:
    X-Content-Type-Options: [nosniff]
"#,
        data = dir.join("data").display(),
    );
    if htpasswd {
        cfg.push_str(&format!(
            r#"auth:
  htpasswd:
    realm: pullgate-harness
    path: "{}"
"#,
            dir.join("htpasswd").display()
        ));
    }
    cfg
}

/// A plain-HTTP client that never uses a proxy.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap_or_else(|e| panic!("cannot build reqwest client: {e}"))
}

/// An image pushed by [`push_image`].
#[derive(Debug, Clone)]
pub struct TestImage {
    /// "127.0.0.1:PORT" of the registry it was pushed to.
    pub registry: String,
    pub repo: String,
    pub tag: String,
    /// "sha256:..." of the manifest.
    pub manifest_digest: String,
    /// "sha256:..." of each layer blob (= diff_id, layers are uncompressed tars), in order.
    pub layer_digests: Vec<String>,
    /// Size in bytes of each layer blob, in order.
    pub layer_blob_sizes: Vec<u64>,
    /// "sha256:..." of the image config (this is what containerd calls the image ID).
    pub config_digest: String,
    pub config_size: u64,
    pub manifest_size: u64,
    /// manifest + config + all layer blobs: what CRI ImageStatus reports as `size` in
    /// containerd 1.6, and the number of bytes a full pull downloads.
    pub total_size: u64,
    /// The raw manifest bytes as pushed.
    pub manifest: Vec<u8>,
}

impl TestImage {
    /// "127.0.0.1:PORT/repo:tag".
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }

    /// "127.0.0.1:PORT/repo@sha256:...".
    /// The tag reference through another host (a proxy in front of the registry).
    pub fn reference_via(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repo, self.tag)
    }

    pub fn digest_reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repo, self.manifest_digest)
    }

    /// Number of blobs a full pull fetches (layers + config).
    pub fn blob_count(&self) -> usize {
        self.layer_digests.len() + 1
    }
}

/// An uncompressed tar holding one regular file of `size` random bytes.
pub fn random_layer_tar(index: usize, size: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut data = vec![0u8; size];
    ring::rand::SystemRandom::new()
        .fill(&mut data)
        .expect("the OS's random source");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    let mut builder = tar::Builder::new(Vec::with_capacity(size + 4096));
    builder
        .append_data(&mut header, format!("layer-{index}.bin"), &data[..])
        .unwrap_or_else(|e| panic!("tar append failed: {e}"));
    builder
        .into_inner()
        .unwrap_or_else(|e| panic!("tar finish failed: {e}"))
}

/// Builds an image with one uncompressed random-content layer per entry of `layer_sizes` (so
/// every image is unique), an OCI config (amd64/linux) and an OCI manifest, and pushes it to
/// `registry` as `repo:tag` (with basic auth if `auth` is given).
pub async fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    layer_sizes: &[usize],
    auth: Option<(&str, &str)>,
) -> TestImage {
    push_image_on(registry, repo, tag, None, layer_sizes, auth).await
}

/// Like [`push_image`], with `base` (a layer tar, e.g. from [`random_layer_tar`]) as the first
/// layer, so images can share it.
pub async fn push_image_on(
    registry: &Registry,
    repo: &str,
    tag: &str,
    base: Option<&[u8]>,
    layer_sizes: &[usize],
    auth: Option<(&str, &str)>,
) -> TestImage {
    let client = http_client();
    let base_url = registry.url();
    let offset = usize::from(base.is_some());
    let tars = base.map(<[u8]>::to_vec).into_iter().chain(
        layer_sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| random_layer_tar(i + offset, size)),
    );
    let base = base_url;

    let mut layer_digests = Vec::new();
    let mut layer_blob_sizes = Vec::new();
    let mut layer_descriptors = Vec::new();
    for tar in tars {
        let digest = sha256_digest(&tar);
        let len = tar.len() as u64;
        upload_blob(&client, &base, repo, tar, &digest, auth).await;
        layer_descriptors.push(serde_json::json!({
            "mediaType": MEDIA_TYPE_OCI_LAYER_TAR,
            "digest": digest,
            "size": len,
        }));
        layer_digests.push(digest);
        layer_blob_sizes.push(len);
    }

    let config = serde_json::json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/layer-0.bin"],
            "Labels": { "pullgate.test/repo": repo, "pullgate.test/tag": tag },
        },
        "rootfs": { "type": "layers", "diff_ids": layer_digests },
        "history": layer_digests.iter().map(|_| serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "created_by": "pullgate test harness",
        })).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256_digest(&config_bytes);
    let config_size = config_bytes.len() as u64;
    upload_blob(&client, &base, repo, config_bytes, &config_digest, auth).await;

    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layer_descriptors,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = sha256_digest(&manifest_bytes);
    let manifest_size = manifest_bytes.len() as u64;
    let url = format!("{base}/v2/{repo}/manifests/{tag}");
    let resp = with_auth(client.put(&url), auth)
        .header("Content-Type", MEDIA_TYPE_OCI_MANIFEST)
        .body(manifest_bytes.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("push_image: PUT {url} failed: {e}"));
    let status = resp.status();
    let returned_digest = resp
        .headers()
        .get("Docker-Content-Digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if status.as_u16() != 201 {
        let body = resp.text().await.unwrap_or_default();
        panic!(
            "push_image: PUT {url} answered {status}: {body}\nregistry log tail:\n{}",
            tail(&registry.log(), 10)
        );
    }
    if let Some(d) = returned_digest {
        assert_eq!(
            d, manifest_digest,
            "push_image: registry computed another manifest digest"
        );
    }

    let total_size = manifest_size + config_size + layer_blob_sizes.iter().sum::<u64>();
    TestImage {
        registry: registry.addr(),
        repo: repo.to_string(),
        tag: tag.to_string(),
        manifest_digest,
        layer_digests,
        layer_blob_sizes,
        config_digest,
        config_size,
        manifest_size,
        total_size,
        manifest: manifest_bytes,
    }
}

fn with_auth(rb: reqwest::RequestBuilder, auth: Option<(&str, &str)>) -> reqwest::RequestBuilder {
    match auth {
        Some((user, password)) => rb.basic_auth(user, Some(password)),
        None => rb,
    }
}

/// Monolithic upload: POST /v2/<repo>/blobs/uploads/ then PUT <location>&digest=<digest>.
async fn upload_blob(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    data: Vec<u8>,
    digest: &str,
    auth: Option<(&str, &str)>,
) {
    let url = format!("{base}/v2/{repo}/blobs/uploads/");
    let resp = with_auth(client.post(&url), auth)
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap_or_else(|e| panic!("push_image: POST {url} failed: {e}"));
    if resp.status().as_u16() != 202 {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        panic!("push_image: POST {url} answered {status}: {body}");
    }
    let location = resp
        .headers()
        .get("Location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("push_image: POST {url} gave no Location header"))
        .to_string();
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put_url = format!("{location}{sep}digest={digest}");
    let len = data.len();
    let resp = with_auth(client.put(&put_url), auth)
        .header("Content-Type", "application/octet-stream")
        .header("Content-Length", len.to_string())
        .body(data)
        .send()
        .await
        .unwrap_or_else(|e| panic!("push_image: PUT blob {digest} failed: {e}"));
    if resp.status().as_u16() != 201 {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        panic!("push_image: PUT blob {digest} answered {status}: {body}");
    }
}

/// An image index pushed by [`push_index`].
#[derive(Debug, Clone)]
pub struct TestIndex {
    /// "127.0.0.1:PORT" of the registry it was pushed to.
    pub registry: String,
    pub repo: String,
    pub tag: String,
    /// "sha256:..." of the index.
    pub digest: String,
    pub size: u64,
    /// The raw index bytes as pushed.
    pub bytes: Vec<u8>,
}

impl TestIndex {
    /// "127.0.0.1:PORT/repo:tag".
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }
}

pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Pushes an OCI image index as `repo:tag` referencing already-pushed manifests of the same
/// repository, one entry per `(architecture, variant, image)` (os linux; variant "" = none), in
/// that order.
pub async fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    entries: &[(&str, &str, &TestImage)],
) -> TestIndex {
    let entries: Vec<(&str, &str, &str, &TestImage)> = entries
        .iter()
        .map(|(arch, variant, image)| ("linux", *arch, *variant, *image))
        .collect();
    push_index_platforms(registry, repo, tag, &entries).await
}

/// Like [`push_index`] with the os given per entry: `(os, architecture, variant, image)` (e.g.
/// `("unknown", "unknown", "", &img)` for an attestation-like entry).
pub async fn push_index_platforms(
    registry: &Registry,
    repo: &str,
    tag: &str,
    entries: &[(&str, &str, &str, &TestImage)],
) -> TestIndex {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(os, arch, variant, image)| {
            assert_eq!(
                image.repo,
                repo,
                "push_index: {} was pushed to another repository",
                image.reference()
            );
            let mut platform = serde_json::json!({ "architecture": arch, "os": os });
            if !variant.is_empty() {
                platform["variant"] = serde_json::json!(variant);
            }
            serde_json::json!({
                "mediaType": MEDIA_TYPE_OCI_MANIFEST,
                "digest": image.manifest_digest,
                "size": image.manifest_size,
                "platform": platform,
            })
        })
        .collect();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = sha256_digest(&bytes);
    let url = format!("{}/v2/{repo}/manifests/{tag}", registry.url());
    let resp = with_auth(http_client().put(&url), registry.auth())
        .header("Content-Type", MEDIA_TYPE_OCI_INDEX)
        .body(bytes.clone())
        .send()
        .await
        .unwrap_or_else(|e| panic!("push_index: PUT {url} failed: {e}"));
    let status = resp.status();
    if status.as_u16() != 201 {
        let body = resp.text().await.unwrap_or_default();
        panic!(
            "push_index: PUT {url} answered {status}: {body}\nregistry log tail:\n{}",
            tail(&registry.log(), 10)
        );
    }
    TestIndex {
        registry: registry.addr(),
        repo: repo.to_string(),
        tag: tag.to_string(),
        size: bytes.len() as u64,
        digest,
        bytes,
    }
}
