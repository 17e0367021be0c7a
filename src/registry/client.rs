//! The pull side of an OCI distribution client: resolve an image to its manifest for a platform,
//! and stream blobs (whole or a byte range), trying containerd's configured mirrors first, and
//! remember which hosts honour `Range`. Each GET goes through the auth session
//! (`session.rs`); bodies are read by `body.rs`, over the HTTP clients of
//! `http_client.rs`.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use http::header::{HeaderValue, ACCEPT, RANGE};
use http::StatusCode;
use oci_spec::image::{Descriptor, Digest, MediaType};

use super::auth::{Challenge, TokenCache};
use super::body::{body_stream, content_range_start, read_body};
use super::digest::sha256_digest;
use super::hosts::{load_hosts, RegistryHost, DEFAULT_CONFIG_PATH};
use super::http_client::{build_http_client, TlsKey};
use super::manifest::{self, Parsed, Platform, MANIFEST_ACCEPT, MAX_MANIFEST_SIZE};
use super::{Credentials, ImageRef, RegistryError};

/// How to reach registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// containerd's registry `config_path` (directories with `hosts.toml`).
    pub config_path: PathBuf,
    /// Limit for connecting and receiving response headers of one request; also the longest
    /// wait for the next chunk of a body while the consumer is reading.
    pub request_timeout: Duration,
    /// `User-Agent` of every request.
    pub user_agent: String,
    /// Send the pull's credentials to mirrors too (containerd does not; default false).
    pub mirror_credentials: bool,
    /// Hosts (`host[:port]`) left out of every hosts.toml: pullgate's own listeners (mirror,
    /// metrics), so that its upstream requests never come back to itself; redirects to them
    /// are refused too.
    pub skip_hosts: Vec<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            config_path: PathBuf::from(DEFAULT_CONFIG_PATH),
            request_timeout: Duration::from_secs(30),
            user_agent: format!("pullgate/{}", env!("CARGO_PKG_VERSION")),
            mirror_credentials: false,
            skip_hosts: Vec::new(),
        }
    }
}

/// Where bytes came from (for metrics).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The image's own registry (its `server`).
    Registry,
    /// A mirror `[host]` from hosts.toml: its `host[:port]`.
    Mirror(String),
}

impl Source {
    fn of(host: &RegistryHost) -> Source {
        if host.is_mirror {
            Source::Mirror(host.authority().to_string())
        } else {
            Source::Registry
        }
    }
}

/// A manifest or index as fetched: its descriptor (media type, digest, size; for a manifest
/// picked from an index, the index's descriptor with its platform) and its exact bytes.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub descriptor: Descriptor,
    pub bytes: Bytes,
}

/// An image resolved for one platform.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The index / manifest list the reference pointed at, if it was one (the outermost one).
    pub index: Option<FetchedManifest>,
    /// The image manifest for the platform.
    pub manifest: FetchedManifest,
    pub config: Descriptor,
    /// Layers in manifest order.
    pub layers: Vec<Descriptor>,
    /// Where the image manifest came from.
    pub source: Source,
}

/// The body of an empty range: no request is made.
fn empty_body(hosts: &[RegistryHost]) -> BlobBody {
    let first = hosts.iter().find(|h| h.pull);
    BlobBody {
        source: first.map(Source::of).unwrap_or(Source::Registry),
        host: first.map(|h| h.authority().to_string()).unwrap_or_default(),
        len: 0,
        stream: stream::empty().boxed(),
    }
}

/// A blob body being streamed.
pub struct BlobBody {
    pub source: Source,
    /// The host that answered (`host[:port]`).
    pub host: String,
    /// The number of bytes `stream` yields when it completes (`range.end - range.start`).
    pub len: u64,
    /// Chunks in order; ends with an error if the body is cut short, runs long or stalls.
    pub stream: BoxStream<'static, Result<Bytes, RegistryError>>,
}

impl fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobBody")
            .field("source", &self.source)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) config: RegistryConfig,
    pub(super) clients: Mutex<HashMap<TlsKey, reqwest::Client>>,
    pub(super) tokens: TokenCache,
    /// The last auth challenge seen per (host base, repository), to authenticate up front.
    pub(super) challenges: Mutex<HashMap<(String, String), Challenge>>,
    /// Serialises token fetches so parallel blob requests share one token.
    pub(super) token_fetch: tokio::sync::Mutex<()>,
    /// Per host (`host[:port]`): whether it honours `Range` (206), as last seen.
    pub(super) ranges: Mutex<HashMap<String, bool>>,
}

/// A registry client; cheap to clone (clones share HTTP clients, tokens and challenges).
#[derive(Clone)]
pub struct RegistryClient {
    pub(super) inner: Arc<Inner>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Limit on manifest nesting (index → index → manifest).
const MAX_INDEX_DEPTH: usize = 4;

impl RegistryClient {
    /// A client. HTTP clients are built lazily, one per distinct TLS setting. (reqwest uses
    /// rustls with the ring provider when no process-wide provider is installed, so nothing has
    /// to be installed here.)
    pub fn new(config: RegistryConfig) -> RegistryClient {
        RegistryClient {
            inner: Arc::new(Inner {
                config,
                clients: Mutex::new(HashMap::new()),
                tokens: TokenCache::default(),
                challenges: Mutex::new(HashMap::new()),
                token_fetch: tokio::sync::Mutex::new(()),
                ranges: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.config
    }

    /// The endpoints for `image`'s registry, from containerd's hosts.toml (re-read every call).
    pub fn hosts(&self, image: &ImageRef) -> Result<Vec<RegistryHost>, RegistryError> {
        let mut hosts = load_hosts(&self.inner.config.config_path, &image.registry)?;
        let skip = &self.inner.config.skip_hosts;
        hosts.retain(|h| !(h.is_mirror && skip.iter().any(|s| s == h.authority())));
        Ok(hosts)
    }

    /// The size of blob `digest` of `image`'s repository, for a blob no manifest announced (a
    /// pull pullgate did not resolve): a one-byte ranged GET, whose `Content-Range` carries the
    /// size (or, from a registry ignoring ranges, the 200's `Content-Length`).
    pub async fn blob_size(
        &self,
        image: &ImageRef,
        creds: &Credentials,
        digest: &str,
    ) -> Result<u64, RegistryError> {
        let hosts = self.hosts(image)?;
        let what = format!("blob {digest} of {}", image.name());
        self.try_hosts(
            &hosts,
            |h| h.pull,
            "pull",
            &what,
            |host| {
                let path = format!("{}/blobs/{digest}", image.repository);
                let what = what.clone();
                async move {
                    let range = vec![(RANGE, HeaderValue::from_static("bytes=0-0"))];
                    let resp = self.get(host, image, creds, &path, range, &what).await?;
                    let size = match resp.status() {
                        StatusCode::PARTIAL_CONTENT => resp
                            .headers()
                            .get(http::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.rsplit_once('/'))
                            .and_then(|(_, total)| total.parse::<u64>().ok()),
                        StatusCode::OK => resp.content_length(),
                        s => return Err(status_error(s, host, image, &what)),
                    };
                    size.ok_or_else(|| {
                        RegistryError::Protocol(format!(
                            "{} did not say the size of {what}",
                            host.authority()
                        ))
                    })
                }
            },
        )
        .await
    }

    /// Resolves `image` to its manifest for `platform` (through an index if it is one),
    /// checking digests and that every layer is something we can fetch.
    pub async fn resolve(
        &self,
        image: &ImageRef,
        creds: &Credentials,
        platform: &Platform,
    ) -> Result<Resolved, RegistryError> {
        let hosts = self.hosts(image)?;
        let (mut fetched, mut parsed, mut source) = self
            .fetch_manifest(&hosts, image, creds, image.manifest_reference(), None)
            .await?;
        let mut index = None;
        for _ in 0..MAX_INDEX_DEPTH {
            let idx = match parsed {
                Parsed::Manifest(m) => {
                    let what = format!(
                        "manifest {} of {}",
                        fetched.descriptor.digest(),
                        image.name()
                    );
                    manifest::check_manifest(&m, &what)?;
                    return Ok(Resolved {
                        index,
                        manifest: fetched,
                        config: m.config().clone(),
                        layers: m.layers().clone(),
                        source,
                    });
                }
                Parsed::Index(idx) => idx,
            };
            let what = format!("index {} of {}", fetched.descriptor.digest(), image.name());
            let child = manifest::select_manifest(&idx, platform, &what)?.clone();
            tracing::debug!(
                image = %image,
                index = %fetched.descriptor.digest(),
                manifest = %child.digest(),
                platform = %platform,
                "selected manifest from index"
            );
            if index.is_none() {
                index = Some(fetched);
            }
            let digest = child.digest().to_string();
            (fetched, parsed, source) = self
                .fetch_manifest(&hosts, image, creds, &digest, Some(&child))
                .await?;
        }
        Err(RegistryError::Unsupported(format!(
            "{}: indexes nested more than {MAX_INDEX_DEPTH} deep",
            image.whole()
        )))
    }

    /// Streams `range` of blob `desc` of `image`'s repository (`range.end == desc.size()` for
    /// the rest of it). A whole blob is asked for without a `Range` header. A registry that
    /// answers a ranged request with 200 (whole blob) is accepted: the bytes before
    /// `range.start` are read and dropped, and the stream stops at `range.end`. Bytes are not
    /// digest-checked here (a range cannot be): the caller verifies the whole blob.
    pub async fn fetch_blob(
        &self,
        image: &ImageRef,
        creds: &Credentials,
        desc: &Descriptor,
        range: Range<u64>,
    ) -> Result<BlobBody, RegistryError> {
        let size = desc.size();
        let digest = desc.digest().to_string();
        if range.start > range.end || range.end > size {
            return Err(RegistryError::Protocol(format!(
                "invalid range {}..{} for blob {digest} of {} ({size} bytes)",
                range.start,
                range.end,
                image.name()
            )));
        }
        let hosts = self.hosts(image)?;
        if range.start == range.end {
            return Ok(empty_body(&hosts));
        }
        let whole = range.start == 0 && range.end == size;
        let what = format!("blob {digest} of {}", image.name());
        let read_timeout = self.inner.config.request_timeout;
        self.try_hosts(
            &hosts,
            |h| h.pull,
            "pull",
            &what,
            |host| {
                let path = format!("{}/blobs/{digest}", image.repository);
                let what = what.clone();
                let range = range.clone();
                async move {
                    let mut extra = Vec::new();
                    if !whole {
                        let value = format!("bytes={}-{}", range.start, range.end - 1);
                        extra.push((RANGE, HeaderValue::from_str(&value).expect("ascii")));
                    }
                    let resp = self.get(host, image, creds, &path, extra, &what).await?;
                    let status = resp.status();
                    let skip = self.skip_of(&resp, host, image, &range, size, &what)?;
                    let want = range.end - range.start;
                    Ok(BlobBody {
                        source: Source::of(host),
                        host: host.authority().to_string(),
                        len: want,
                        stream: body_stream(
                            resp,
                            skip,
                            want,
                            status == StatusCode::OK && range.end < size,
                            read_timeout,
                            format!("{what} from {}", host.authority()),
                        ),
                    })
                }
            },
        )
        .await
    }

    /// How many bytes of `resp`'s body come before `range.start`: 0 for a 206 from there, the
    /// prefix for a 200 (a host that ignores `Range`); else the error the answer is.
    fn skip_of(
        &self,
        resp: &reqwest::Response,
        host: &RegistryHost,
        image: &ImageRef,
        range: &Range<u64>,
        size: u64,
        what: &str,
    ) -> Result<u64, RegistryError> {
        let whole = range.start == 0 && range.end == size;
        let skip = match resp.status() {
            StatusCode::OK => {
                if let Some(len) = resp.content_length().filter(|l| *l != size) {
                    return Err(RegistryError::Protocol(format!(
                        "{} sent {len} bytes for {what}, whose size is {size}",
                        host.authority()
                    )));
                }
                if !whole {
                    self.note_ranges(host, false);
                    tracing::debug!(
                        host = host.authority(),
                        %what,
                        skip = range.start,
                        "registry ignored Range (200): dropping the prefix"
                    );
                }
                range.start
            }
            StatusCode::PARTIAL_CONTENT => {
                let start = content_range_start(resp).ok_or_else(|| {
                    RegistryError::Protocol(format!(
                        "{} answered 206 for {what} without a valid Content-Range",
                        host.authority()
                    ))
                })?;
                if start != range.start {
                    return Err(RegistryError::Protocol(format!(
                        "{} answered bytes from {start} for {what}, asked from {}",
                        host.authority(),
                        range.start
                    )));
                }
                self.note_ranges(host, true);
                0
            }
            s => return Err(status_error(s, host, image, what)),
        };
        Ok(skip)
    }

    /// GETs one manifest (by tag or digest) from the first host that has it.
    async fn fetch_manifest(
        &self,
        hosts: &[RegistryHost],
        image: &ImageRef,
        creds: &Credentials,
        reference: &str,
        expected: Option<&Descriptor>,
    ) -> Result<(FetchedManifest, Parsed, Source), RegistryError> {
        let what = format!("manifest {reference} of {}", image.name());
        let by_digest = reference.contains(':');
        self.try_hosts(
            hosts,
            |h| h.resolve,
            "resolve",
            &what,
            |host| {
                let what = what.clone();
                async move {
                    let path = format!("{}/manifests/{reference}", image.repository);
                    let accept = vec![(ACCEPT, HeaderValue::from_static(MANIFEST_ACCEPT))];
                    let resp = self.get(host, image, creds, &path, accept, &what).await?;
                    if !resp.status().is_success() {
                        return Err(status_error(resp.status(), host, image, &what));
                    }
                    let header = |name: &str| {
                        resp.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    };
                    let content_type = header("content-type");
                    let announced = header("docker-content-digest");
                    let location = format!("{what} from {}", host.authority());
                    let bytes = read_body(
                        resp,
                        MAX_MANIFEST_SIZE,
                        self.inner.config.request_timeout,
                        &location,
                    )
                    .await?;
                    let actual = sha256_digest(&bytes);
                    let check = |expected_digest: &str| {
                        if expected_digest.starts_with("sha256:") && expected_digest != actual {
                            Err(RegistryError::DigestMismatch {
                                expected: expected_digest.to_string(),
                                actual: actual.clone(),
                                location: location.clone(),
                            })
                        } else {
                            Ok(())
                        }
                    };
                    if by_digest {
                        if !reference.starts_with("sha256:") {
                            return Err(RegistryError::Unsupported(format!(
                                "{what}: only sha256 digests are verified"
                            )));
                        }
                        check(reference)?;
                    } else if let Some(announced) = &announced {
                        check(announced)?;
                    }
                    if let Some(desc) = expected {
                        if desc.size() != bytes.len() as u64 {
                            return Err(RegistryError::Protocol(format!(
                                "{location}: {} bytes, the index says {}",
                                bytes.len(),
                                desc.size()
                            )));
                        }
                    }
                    let (media_type, parsed) =
                        manifest::parse(&bytes, content_type.as_deref(), &location)?;
                    let descriptor = match expected {
                        Some(desc) => {
                            let mut d = desc.clone();
                            d.set_media_type(MediaType::from(media_type.as_str()));
                            d
                        }
                        None => {
                            let digest = Digest::from_str(&actual).map_err(|e| {
                                RegistryError::Protocol(format!("{location}: digest {actual}: {e}"))
                            })?;
                            Descriptor::new(
                                MediaType::from(media_type.as_str()),
                                bytes.len() as u64,
                                digest,
                            )
                        }
                    };
                    Ok((
                        FetchedManifest { descriptor, bytes },
                        parsed,
                        Source::of(host),
                    ))
                }
            },
        )
        .await
    }

    /// Runs `attempt` on each host with the capability, in order, until one succeeds. A failing
    /// host that is not the last is logged and skipped; the last one's error is returned.
    async fn try_hosts<'a, T, F, Fut>(
        &self,
        hosts: &'a [RegistryHost],
        capable: impl Fn(&RegistryHost) -> bool,
        capability: &str,
        what: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(&'a RegistryHost) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let candidates: Vec<&RegistryHost> = hosts.iter().filter(|h| capable(h)).collect();
        let Some(last) = candidates.len().checked_sub(1) else {
            return Err(RegistryError::Unsupported(format!(
                "no host with the {capability} capability is configured for {what}"
            )));
        };
        let mut result = None;
        for (i, host) in candidates.into_iter().enumerate() {
            match attempt(host).await {
                Ok(v) => return Ok(v),
                Err(e) if i < last => {
                    if matches!(e, RegistryError::NotFound(_)) {
                        tracing::debug!(host = host.authority(), error = %e, "host failed, trying the next one");
                    } else {
                        tracing::warn!(host = host.authority(), error = %e, "host failed, trying the next one");
                    }
                }
                Err(e) => result = Some(e),
            }
        }
        Err(result.expect("the last candidate ran"))
    }

    fn note_ranges(&self, host: &RegistryHost, work: bool) {
        let mut ranges = self.inner.ranges.lock();
        if ranges.insert(host.authority().to_string(), work) != Some(work) && !work {
            tracing::info!(
                host = host.authority(),
                "host ignores Range: its streams are not split or closed early (each reopening \
                 would read the blob from its start)"
            );
        }
    }

    /// Whether `host` (`host[:port]`) honoured `Range` when last asked; `None`: never asked.
    pub fn ranges_work(&self, host: &str) -> Option<bool> {
        let ranges = self.inner.ranges.lock();
        ranges.get(host).copied()
    }

    pub(super) fn http_for(&self, host: &RegistryHost) -> Result<reqwest::Client, RegistryError> {
        let key = if host.scheme() == "https" {
            TlsKey {
                skip_verify: host.skip_verify,
                ca: host.ca.clone(),
                client: host.client.clone(),
            }
        } else {
            TlsKey::default()
        };
        let mut clients = self.inner.clients.lock();
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = &self.inner.config;
        let client =
            build_http_client(&c.user_agent, c.request_timeout, c.skip_hosts.clone(), &key)?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

fn status_error(
    status: StatusCode,
    host: &RegistryHost,
    image: &ImageRef,
    what: &str,
) -> RegistryError {
    let h = host.authority();
    match status.as_u16() {
        401 | 403 => RegistryError::Unauthorized(format!(
            "{h} refused access to repository {} ({status})",
            image.repository
        )),
        404 => RegistryError::NotFound(format!("{what} on {h}")),
        s if s >= 500 || s == 429 => {
            RegistryError::Transport(format!("{h} answered {status} for {what}"))
        }
        _ => RegistryError::Protocol(format!("{h} answered {status} for {what}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn https_host(skip_verify: bool, ca: Vec<PathBuf>) -> RegistryHost {
        let mut h = load_hosts(std::path::Path::new("/nonexistent"), "registry.example").unwrap();
        let mut h = h.remove(0);
        h.skip_verify = skip_verify;
        h.ca = ca;
        h
    }

    #[test]
    fn one_http_client_per_tls_setting() {
        let dir = std::env::temp_dir().join(format!("pullgate-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["ca.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let bad_file = dir.join("bad.pem");
        std::fs::write(&bad_file, "not a certificate").unwrap();

        let c = RegistryClient::new(RegistryConfig::default());
        // rustls with ring builds without a process-wide provider being installed.
        c.http_for(&https_host(false, vec![])).unwrap();
        c.http_for(&https_host(true, vec![])).unwrap();
        c.http_for(&https_host(false, vec![ca_file.clone()]))
            .unwrap();
        c.http_for(&https_host(false, vec![ca_file.clone()]))
            .unwrap();
        assert_eq!(c.inner.clients.lock().len(), 3);
        let e = c
            .http_for(&https_host(false, vec![bad_file.clone()]))
            .unwrap_err();
        assert!(matches!(e, RegistryError::Config(_)), "{e}");
        assert!(e.to_string().contains("bad.pem"), "{e}");
        let e = c
            .http_for(&https_host(false, vec![dir.join("missing.pem")]))
            .unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults() {
        let c = RegistryConfig::default();
        assert_eq!(c.config_path, PathBuf::from("/etc/containerd/certs.d"));
        assert!(!c.mirror_credentials);
        assert!(c.user_agent.starts_with("pullgate/"));
    }
}
