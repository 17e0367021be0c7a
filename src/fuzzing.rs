//! Entry points for the fuzz targets in `tests/fuzz` (not an API: hidden from the docs, no
//! stability promised). Each function runs one parser the way pullgate runs it on untrusted or
//! configured input and touches every accessor of what comes out; none may panic. May import
//! any module whose parser it runs.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::frontdoor::authority;
use crate::mirror::hosts_file;
use crate::pull::PullRequestInfo;
use crate::registry::auth::{self, Credentials, TokenCache};
use crate::registry::hosts;
use crate::registry::manifest::{self, Parsed, Platform};
use crate::registry::ImageRef;

/// An intercepted `PullImage` message: decode, classify, fingerprint, then what the scheduled puller does
/// with it (its reference parsed again, its credentials read).
pub fn pull_request(message: &[u8]) {
    let Ok(info) = PullRequestInfo::decode(message) else {
        return;
    };
    let _ = info.priority();
    let _ = format!("{info:?}");
    if let Ok(r) = ImageRef::parse(&info.reference) {
        let _ = (r.whole(), r.name(), r.manifest_reference());
    }
    if let Some(a) = &info.auth {
        let _ = format!("{:?}", Credentials::try_from_auth_config(a));
        let _ = Credentials::from_auth_config(a).is_anonymous();
    }
}

/// An image reference as a pod spec, the CLI or the config writes it. A reference that parses
/// must parse again, to the same value, from its normalised form.
pub fn image_reference(s: &str) {
    if let Ok(r) = ImageRef::parse(s) {
        let whole = r.whole();
        let _ = (r.name(), r.manifest_reference(), r.to_string());
        let again = ImageRef::parse(&whole).expect("a normalised reference parses");
        assert_eq!(again, r, "normalising is idempotent");
    }
    let _ = crate::pull::normalize_reference(s);
}

/// The config file, as `pullgate check-config` and `pullgate serve` read it.
pub fn config(text: &str) {
    if let Ok(cfg) = Config::parse(text) {
        let _ = (
            crate::schedule::Limits::from(&cfg.schedule),
            crate::schedule::Admission::from(&cfg.schedule),
        );
        let _ = (cfg.server.socket_mode_bits(), cfg.api.socket_mode_bits());
    }
}

const CONTENT_TYPES: &[Option<&str>] = &[
    None,
    Some(manifest::OCI_INDEX),
    Some(manifest::OCI_MANIFEST),
    Some(manifest::DOCKER_MANIFEST_LIST),
    Some(manifest::DOCKER_MANIFEST),
    Some(manifest::DOCKER_SCHEMA1_SIGNED),
    Some("application/json; charset=utf-8"),
    Some(""),
];

/// A manifest or index from a registry (the first byte picks the `Content-Type` it came with):
/// parse, check, and select a platform the way a resolve does.
pub fn manifest(data: &[u8]) {
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(pick) % CONTENT_TYPES.len()];
    match manifest::parse(bytes, content_type, "fuzz") {
        Ok((_, Parsed::Index(index))) => {
            for p in [
                Platform::node(),
                Platform::new("linux", "arm", "v7"),
                Platform::new("linux", "arm64", ""),
                Platform::new("windows", "amd64", ""),
            ] {
                let _ = manifest::select_manifest(&index, &p, "fuzz");
            }
            for d in index.manifests() {
                if let Some(p) = d.platform() {
                    let _ = Platform::from(p).to_string();
                }
            }
        }
        Ok((_, Parsed::Manifest(m))) => {
            let _ = manifest::check_manifest(&m, "fuzz");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// A `hosts.toml` from `/etc/containerd/certs.d/<registry>/` (the first line names the registry).
pub fn hosts_toml(text: &str) {
    let (registry, body) = text.split_once('\n').unwrap_or(("docker.io", text));
    let dir = Path::new("/etc/containerd/certs.d/fuzz");
    if let Ok(list) = hosts::parse_hosts_toml(body, dir, &dir.join("hosts.toml"), registry) {
        for h in &list {
            let _ = (h.authority(), h.scheme(), h.url("manifests/latest"));
            let _ = format!("{h:?}");
        }
    }
    let _ = hosts::is_localhost(registry);
    // pullgate's own entry: placed first when the file allows it, and taken out again cleanly.
    let url = "http://127.0.0.1:5077";
    if let Ok(with) = hosts_file::with_mirror(body, url) {
        assert!(hosts_file::mirror_is_first(&with, url));
        // Taken out, the file is as it was, but for the newline `with_mirror` adds to a last
        // top-level line that had none.
        let (back, was) = (
            hosts_file::without_mirror(&with),
            hosts_file::without_mirror(body),
        );
        let i = back
            .bytes()
            .zip(was.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        assert!(
            back == was
                || (back.len() == was.len() + 1
                    && back.as_bytes()[i] == b'\n'
                    && back.as_bytes()[i + 1..] == was.as_bytes()[i..]),
            "{was:?} came back as {back:?}"
        );
        assert_eq!(hosts_file::with_mirror(&with, url).as_deref(), Ok(&*with));
    }
}

/// A `WWW-Authenticate` header from a registry, and the challenge pullgate would answer.
pub fn www_authenticate(header: &str) {
    let challenges = auth::parse_www_authenticate(header);
    let _ = auth::pick_challenge(&challenges);
}

/// A token server's answer: parse, compute the expiry, cache and read back.
pub fn token_response(body: &[u8]) {
    let Ok(token) = auth::parse_token_response(body) else {
        return;
    };
    let now = Instant::now();
    let until = auth::token_deadline(now, token.expires_in);
    assert!(until >= now && until <= now + Duration::from_secs(48 * 3600));
    let cache = TokenCache::default();
    let creds = Credentials::Anonymous;
    cache.insert("r", None, "s", &creds, token.token, token.expires_in);
    let _ = cache.get("r", None, "s", &creds);
}

/// What a gRPC client writes on the CRI socket (the HTTP/2 preface is prepended; the first byte
/// picks how the bytes arrive): the `:authority` rewriter below h2 must not panic, and must hand
/// h2 the same bytes however the stream is split into reads.
pub fn h2_client_stream(data: &[u8]) {
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let mut stream = authority::PREFACE.to_vec();
    stream.extend_from_slice(rest);
    let whole = authority::rewrite_in_pieces(&stream, stream.len());
    let split = authority::rewrite_in_pieces(&stream, usize::from(piece) + 1);
    assert!(
        whole == split,
        "the rewrite depends on how the bytes arrive"
    );
}

/// A request to pullgate's mirror (from containerd, or any local process): its target
/// (`path?query`), `Range` header and `Authorization` header, one per line. A blob route names a
/// digest; a range is within the blob.
pub fn mirror_request(text: &str) {
    use crate::mirror::demand::Presented;
    use crate::mirror::route::{self, Route};
    let mut lines = text.splitn(3, '\n');
    let target = lines.next().unwrap_or_default();
    let range = lines.next();
    let authorization = lines.next();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    match route::parse(path, query) {
        Route::Blob(k) => assert!(k.name.contains(':'), "a blob is named by digest"),
        Route::Manifest(k) => assert!(!k.repository.is_empty() && !k.registry.is_empty()),
        Route::Base | Route::Unknown(_) => {}
    }
    for size in [0, 1, 1000, u64::MAX] {
        if let Ok(Some(r)) = route::parse_range(range, size) {
            assert!(r.start < r.end && r.end <= size, "{r:?} within {size}");
        }
    }
    if let Some(p) = authorization.and_then(Presented::from_header) {
        let _ = (p.username.len(), p.password.len());
    }
}
