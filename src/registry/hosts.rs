//! containerd's registry host configuration: `<config_path>/<host>/hosts.toml`.
//!
//! Follows containerd's `remotes/docker/config` loader:
//! - the directory for registry host H is `<config_path>/H`, else `<config_path>/_default`; the
//!   first of the two that exists is used;
//! - in it, `hosts.toml`: `[host."URL"]` tables (mirrors) in file order, then the top-level
//!   `server` (the upstream itself) with the top-level `capabilities`, `skip_verify`, `ca`,
//!   `client`, `header`, `override_path`;
//! - without `hosts.toml`, Docker's certificate layout in that directory: `*.crt` are CAs,
//!   `*.cert` + `*.key` client pairs, for the default server;
//! - default server: `https://registry-1.docker.io` for `docker.io`, plain `http://H` (TLS
//!   verification off) for localhost / 127.0.0.0/8 / ::1, `https://H` otherwise.
//!
//! URLs without a scheme get `https://`; the path is `/v2` (appended to a configured path unless
//! `override_path = true`). Relative `ca` / `client` paths are relative to the host directory.

use std::fmt;
use std::path::{Path, PathBuf};

use toml::Value;

use super::RegistryError;

/// containerd's default `config_path` for registry host directories.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/containerd/certs.d";

/// One endpoint to try for a registry: a mirror or the registry's own server.
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryHost {
    /// `scheme://authority`, e.g. `https://registry-1.docker.io`, `http://127.0.0.1:5000`.
    pub base: String,
    /// The API path prefix, `/v2` unless `override_path` (then the configured path, may be "").
    pub path_prefix: String,
    /// May serve blobs.
    pub pull: bool,
    /// May resolve manifests (tags and digests).
    pub resolve: bool,
    /// May be pushed to (unused by pullgate, kept for completeness).
    pub push: bool,
    /// Accept any TLS certificate.
    pub skip_verify: bool,
    /// Extra CA certificate files (PEM).
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files (PEM); the key may be in the certificate file (None).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers (name, value), in file order; a name may repeat.
    pub headers: Vec<(String, String)>,
    /// True for `[host]` entries that are not the server itself.
    pub is_mirror: bool,
}

impl RegistryHost {
    /// `host[:port]` of this endpoint.
    pub fn authority(&self) -> &str {
        self.base
            .split_once("://")
            .map(|(_, a)| a)
            .unwrap_or(&self.base)
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &str {
        self.base
            .split_once("://")
            .map(|(s, _)| s)
            .unwrap_or("https")
    }

    /// `base + path_prefix + "/" + rest` (rest without a leading slash).
    pub fn url(&self, rest: &str) -> String {
        format!("{}{}/{}", self.base, self.path_prefix, rest)
    }

    fn default_for(registry: &str) -> RegistryHost {
        let (base, skip_verify) = if registry == "docker.io" {
            ("https://registry-1.docker.io".to_string(), false)
        } else if is_localhost(registry) {
            (format!("http://{registry}"), true)
        } else {
            (format!("https://{registry}"), false)
        };
        RegistryHost {
            base,
            path_prefix: "/v2".to_string(),
            pull: true,
            resolve: true,
            push: true,
            skip_verify,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            is_mirror: false,
        }
    }
}

/// Header values are redacted: a hosts.toml may carry an `Authorization` header.
impl fmt::Debug for RegistryHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let headers: Vec<String> = self
            .headers
            .iter()
            .map(|(k, _)| format!("{k}: <redacted>"))
            .collect();
        f.debug_struct("RegistryHost")
            .field("base", &self.base)
            .field("path_prefix", &self.path_prefix)
            .field("pull", &self.pull)
            .field("resolve", &self.resolve)
            .field("push", &self.push)
            .field("skip_verify", &self.skip_verify)
            .field("ca", &self.ca)
            .field("client", &self.client)
            .field("headers", &headers)
            .field("is_mirror", &self.is_mirror)
            .finish()
    }
}

/// True for `localhost`, 127.0.0.0/8 and ::1, with or without a port (containerd's
/// `docker.IsLocalhost`).
pub fn is_localhost(authority: &str) -> bool {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if authority.matches(':').count() > 1 {
        authority // bare IPv6 without port
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => false,
    }
}

/// The endpoints to try for `registry` (`host[:port]`, `docker.io` for Docker Hub): mirrors in
/// file order, then the server. A missing directory or file gives just the default server.
pub fn load_hosts(config_path: &Path, registry: &str) -> Result<Vec<RegistryHost>, RegistryError> {
    let Some(dir) = host_dir(config_path, registry)? else {
        return Ok(vec![RegistryHost::default_for(registry)]);
    };
    let file = dir.join("hosts.toml");
    match crate::small_file::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => parse_hosts_toml(&text, &dir, &file, registry),
        Ok(_) => load_cert_files(&dir, registry),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => load_cert_files(&dir, registry),
        Err(e) => Err(RegistryError::Config(format!(
            "cannot read {}: {e}",
            file.display()
        ))),
    }
}

/// `<config_path>/<registry>` or `<config_path>/_default`, whichever exists first.
fn host_dir(config_path: &Path, registry: &str) -> Result<Option<PathBuf>, RegistryError> {
    if registry.is_empty() || registry.contains('/') || registry.starts_with('.') {
        return Err(RegistryError::InvalidReference(format!(
            "invalid registry host {registry:?}"
        )));
    }
    for candidate in [config_path.join(registry), config_path.join("_default")] {
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_dir() => return Ok(Some(candidate)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RegistryError::Config(format!(
                    "cannot read {}: {e}",
                    candidate.display()
                )))
            }
        }
    }
    Ok(None)
}

/// Docker's certificate layout: `*.crt` CAs, `*.cert` + `*.key` client pairs.
fn load_cert_files(dir: &Path, registry: &str) -> Result<Vec<RegistryHost>, RegistryError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| RegistryError::Config(format!("cannot read {}: {e}", dir.display())))?;
    let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    let mut host = RegistryHost::default_for(registry);
    for path in &names {
        match path.extension().and_then(|e| e.to_str()) {
            Some("crt") => host.ca.push(path.clone()),
            Some("cert") => {
                let key = path.with_extension("key");
                if !key.exists() {
                    return Err(RegistryError::Config(format!(
                        "client certificate {} has no matching {}",
                        path.display(),
                        key.display()
                    )));
                }
                host.client.push((path.clone(), Some(key)));
            }
            _ => {}
        }
    }
    Ok(vec![host])
}

/// Parses a hosts.toml (`file` is only for messages; relative paths resolve against `dir`).
pub fn parse_hosts_toml(
    text: &str,
    dir: &Path,
    file: &Path,
    registry: &str,
) -> Result<Vec<RegistryHost>, RegistryError> {
    let err = |msg: String| RegistryError::Config(format!("{}: {msg}", file.display()));
    let table: toml::Table = toml::from_str(text).map_err(|e| err(e.to_string()))?;

    let server = match table.get("server") {
        None => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(s.trim().to_string()),
        Some(other) => {
            return Err(err(format!(
                "`server` must be a string, not {}",
                other.type_str()
            )))
        }
    };

    let mut mirrors = Vec::new();
    if let Some(hosts) = table.get("host") {
        let Value::Table(hosts) = hosts else {
            return Err(err(format!(
                "`host` must be a table of [host.\"URL\"] tables, not {}",
                hosts.type_str()
            )));
        };
        for (url, config) in hosts {
            let Value::Table(config) = config else {
                return Err(err(format!(
                    "[host.{url:?}] must be a table, not {}",
                    config.type_str()
                )));
            };
            let host = parse_host_config(Some(url), config, dir)
                .map_err(|m| err(format!("[host.{url:?}]: {m}")))?;
            mirrors.push(host);
        }
    }

    let mut server_host = parse_host_config(server.as_deref(), &table, dir)
        .map_err(|m| err(format!("server: {m}")))?;
    if server.is_none() {
        // containerd fills in the default server, keeping the top-level settings.
        let default = RegistryHost::default_for(registry);
        server_host.base = default.base;
        server_host.path_prefix = default.path_prefix;
        if is_localhost(registry) && table.get("skip_verify").is_none() {
            server_host.skip_verify = true;
        }
    }
    for m in &mut mirrors {
        m.is_mirror = m.base != server_host.base;
    }
    mirrors.push(server_host);
    Ok(mirrors)
}

/// One `[host."URL"]` table, or the top level (url = `server`, None for the default).
fn parse_host_config(
    url: Option<&str>,
    config: &toml::Table,
    dir: &Path,
) -> Result<RegistryHost, String> {
    let override_path = match config.get("override_path") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(format!(
                "override_path must be a boolean, not {}",
                v.type_str()
            ))
        }
    };
    let (base, path_prefix) = match url {
        Some(url) => parse_url(url, override_path)?,
        None => (String::new(), "/v2".to_string()),
    };
    let (mut pull, mut resolve, mut push) = (true, true, true);
    if let Some(caps) = config.get("capabilities") {
        let caps = string_list(caps)
            .map_err(|t| format!("capabilities must be a list of strings, not {t}"))?;
        (pull, resolve, push) = (false, false, false);
        for c in caps {
            match c.as_str() {
                "pull" => pull = true,
                "resolve" => resolve = true,
                "push" => push = true,
                other => {
                    return Err(format!(
                        "unknown capability {other:?} (pull, resolve, push)"
                    ))
                }
            }
        }
    }
    let skip_verify = match config.get("skip_verify") {
        None => false,
        Some(Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(format!(
                "skip_verify must be a boolean, not {}",
                v.type_str()
            ))
        }
    };
    let ca = match config.get("ca") {
        None => Vec::new(),
        Some(v) => string_list(v)
            .map_err(|t| format!("ca must be a path or a list of paths, not {t}"))?
            .into_iter()
            .map(|p| abs(dir, &p))
            .collect(),
    };
    let client = match config.get("client") {
        None => Vec::new(),
        Some(v) => parse_client(v, dir)?,
    };
    let mut headers = Vec::new();
    if let Some(h) = config.get("header") {
        let Value::Table(h) = h else {
            return Err(format!("header must be a table, not {}", h.type_str()));
        };
        for (name, values) in h {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(format!("invalid header name {name:?}"));
            }
            let values = string_list(values).map_err(|t| {
                format!("header {name:?} must be a string or a list of strings, not {t}")
            })?;
            for value in values {
                if http::HeaderValue::from_str(&value).is_err() {
                    return Err(format!("invalid value for header {name:?}"));
                }
                headers.push((name.clone(), value));
            }
        }
    }
    Ok(RegistryHost {
        base,
        path_prefix,
        pull,
        resolve,
        push,
        skip_verify,
        ca,
        client,
        headers,
        is_mirror: false,
    })
}

/// `URL` → (`scheme://authority`, path prefix).
fn parse_url(url: &str, override_path: bool) -> Result<(String, String), String> {
    let full = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let parsed = reqwest::Url::parse(&full).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let scheme = parsed.scheme();
    if scheme != "http" && scheme != "https" {
        return Err(format!("URL {url:?}: scheme must be http or https"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| format!("URL {url:?} has no host"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(format!(
            "URL {url:?}: credentials in URLs are not supported"
        ));
    }
    let authority = match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let mut path = clean_path(parsed.path());
    if !override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    Ok((format!("{scheme}://{authority}"), path))
}

/// Collapses `//`, `.` and `..`, drops the trailing slash; "" for the root.
fn clean_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    parts.iter().map(|p| format!("/{p}")).collect()
}

/// A string or a list of strings. Err(type name) otherwise.
fn string_list(v: &Value) -> Result<Vec<String>, &'static str> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(other.type_str()),
            })
            .collect(),
        other => Err(other.type_str()),
    }
}

/// `client = "cert.pem"`, `["a.pem", "b.pem"]` or `[["cert.pem", "key.pem"], ...]`.
fn parse_client(v: &Value, dir: &Path) -> Result<Vec<(PathBuf, Option<PathBuf>)>, String> {
    let bad = |t: &str| {
        format!("client must be a path, a list of paths or a list of [cert, key] pairs, not {t}")
    };
    match v {
        Value::String(s) => Ok(vec![(abs(dir, s), None)]),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok((abs(dir, s), None)),
                Value::Array(pair) => match pair.as_slice() {
                    [Value::String(c)] => Ok((abs(dir, c), None)),
                    [Value::String(c), Value::String(k)] => Ok((abs(dir, c), Some(abs(dir, k)))),
                    _ => Err(bad("a malformed pair")),
                },
                other => Err(bad(other.type_str())),
            })
            .collect(),
        other => Err(bad(other.type_str())),
    }
}

fn abs(dir: &Path, p: &str) -> PathBuf {
    let path = PathBuf::from(p);
    if path.is_absolute() {
        path
    } else {
        dir.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, host: &str, text: &str) {
        let d = dir.join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
    }

    /// A scratch dir, removed when the guard drops.
    fn tmp() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("pullgate-hosts-test-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn missing_dir_gives_defaults() {
        let scratch = tmp();
        let dir = scratch.path().join("nope");
        let h = load_hosts(&dir, "docker.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].base, "https://registry-1.docker.io");
        assert_eq!(h[0].path_prefix, "/v2");
        assert!(h[0].pull && h[0].resolve && h[0].push && !h[0].is_mirror && !h[0].skip_verify);
        assert_eq!(
            h[0].url("library/x/manifests/latest"),
            "https://registry-1.docker.io/v2/library/x/manifests/latest"
        );

        let h = load_hosts(&dir, "quay.io").unwrap();
        assert_eq!(h[0].base, "https://quay.io");
        for local in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            let h = load_hosts(&dir, local).unwrap();
            assert_eq!(h[0].base, format!("http://{local}"), "{local}");
            assert!(h[0].skip_verify);
        }
        // An existing dir without hosts.toml: defaults too.
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        std::fs::create_dir_all(dir.join("quay.io")).unwrap();
        let h = load_hosts(&dir, "quay.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].base, "https://quay.io");
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        write(
            &dir,
            "docker.io",
            r#"
server = "https://registry-1.docker.io"

[host."http://127.0.0.1:65001"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:65001".header]
    x-dragonfly-registry = "https://registry-1.docker.io"
    x-multi = ["a", "b"]

[host."https://zz-mirror.example.com/some/path/"]
  capabilities = ["pull"]
  skip_verify = true
  ca = "ca.pem"

[host."aa-mirror.example.com:8443"]
  ca = ["/etc/a.pem", "b.pem"]
  override_path = true

[host."https://registry-1.docker.io"]
  capabilities = ["resolve"]
"#,
        );
        let h = load_hosts(&dir, "docker.io").unwrap();
        let bases: Vec<&str> = h.iter().map(|h| h.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://127.0.0.1:65001",
                "https://zz-mirror.example.com",
                "https://aa-mirror.example.com:8443",
                "https://registry-1.docker.io",
                "https://registry-1.docker.io",
            ]
        );
        assert!(h[0].is_mirror && h[0].pull && h[0].resolve && !h[0].push);
        assert_eq!(
            h[0].headers,
            vec![
                (
                    "x-dragonfly-registry".to_string(),
                    "https://registry-1.docker.io".to_string()
                ),
                ("x-multi".to_string(), "a".to_string()),
                ("x-multi".to_string(), "b".to_string()),
            ]
        );
        assert_eq!(h[0].path_prefix, "/v2");
        assert!(h[1].is_mirror && h[1].pull && !h[1].resolve && h[1].skip_verify);
        assert_eq!(h[1].path_prefix, "/some/path/v2");
        assert_eq!(h[1].ca, vec![dir.join("docker.io").join("ca.pem")]);
        assert!(
            h[2].pull && h[2].resolve && h[2].push,
            "default capabilities"
        );
        assert_eq!(
            h[2].path_prefix, "",
            "override_path keeps the configured (empty) path"
        );
        assert_eq!(
            h[2].ca,
            vec![PathBuf::from("/etc/a.pem"), dir.join("docker.io/b.pem")]
        );
        assert!(
            !h[3].is_mirror,
            "a [host] that is the server itself is not a mirror"
        );
        assert!(h[3].resolve && !h[3].pull);
        assert!(!h[4].is_mirror && h[4].pull && h[4].resolve && h[4].push);
    }

    #[test]
    fn override_path_and_default_server_with_top_level_settings() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        write(
            &dir,
            "registry.example.com",
            r#"
capabilities = ["pull", "resolve"]
skip_verify = true
[header]
  authorization = "Basic c2VjcmV0"

[host."https://mirror.example.com/registry/v2/proxy"]
  override_path = true
"#,
        );
        let h = load_hosts(&dir, "registry.example.com").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].base, "https://mirror.example.com");
        assert_eq!(h[0].path_prefix, "/registry/v2/proxy");
        assert!(h[0].is_mirror);
        assert_eq!(h[1].base, "https://registry.example.com");
        assert_eq!(h[1].path_prefix, "/v2");
        assert!(h[1].skip_verify && h[1].pull && h[1].resolve && !h[1].push);
        let dbg = format!("{:?}", h[1]);
        assert!(
            !dbg.contains("c2VjcmV0"),
            "header values are redacted: {dbg}"
        );
        assert!(dbg.contains("authorization"));
    }

    #[test]
    fn server_override_and_default_dir() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        write(
            &dir,
            "_default",
            r#"
server = "mirror.internal:5000"
"#,
        );
        let h = load_hosts(&dir, "ghcr.io").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].base, "https://mirror.internal:5000");
        assert!(!h[0].is_mirror);
        // A host's own dir wins over _default.
        write(&dir, "ghcr.io", "server = \"http://127.0.0.1:1234\"\n");
        let h = load_hosts(&dir, "ghcr.io").unwrap();
        assert_eq!(h[0].base, "http://127.0.0.1:1234");
    }

    #[test]
    fn broken_files_name_the_file() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        for (text, needle) in [
            ("server = \n", "hosts.toml"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"pull\", \"fly\"]\n",
                "unknown capability \"fly\"",
            ),
            ("skip_verify = \"yes\"\n", "skip_verify must be a boolean"),
            ("server = \"ftp://x\"\n", "scheme must be http or https"),
            (
                "[host.\"https://m\".header]\n\"bad name\" = \"v\"\n",
                "invalid header name",
            ),
        ] {
            write(&dir, "r.example", text);
            let e = load_hosts(&dir, "r.example").unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, RegistryError::Config(_)), "{msg}");
            assert!(
                msg.contains(&dir.join("r.example/hosts.toml").display().to_string()),
                "{msg}"
            );
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn legacy_cert_files() {
        let scratch = tmp();
        let dir = scratch.path().to_path_buf();
        let d = dir.join("secure.example");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.crt"), "x").unwrap();
        std::fs::write(d.join("client.cert"), "x").unwrap();
        std::fs::write(d.join("client.key"), "x").unwrap();
        let h = load_hosts(&dir, "secure.example").unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].ca, vec![d.join("ca.crt")]);
        assert_eq!(
            h[0].client,
            vec![(d.join("client.cert"), Some(d.join("client.key")))]
        );
    }

    #[test]
    fn localhost_detection() {
        for yes in [
            "localhost",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.9.9.9:80",
            "::1",
            "[::1]:5000",
        ] {
            assert!(is_localhost(yes), "{yes}");
        }
        for no in [
            "localhost.example.com",
            "10.0.0.1:5000",
            "docker.io",
            "[::2]:1",
        ] {
            assert!(!is_localhost(no), "{no}");
        }
    }
}
