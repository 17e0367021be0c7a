//! The mirror's requests, parsed: the OCI distribution pull routes containerd uses, with the
//! `ns` query parameter naming the registry, and the `Range` header of a resumed download.

use super::demand::Key;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    Manifest(Key),
    Blob(Key),
    /// Anything else, with why (for the 404's body and the debug log).
    Unknown(&'static str),
}

/// Parses a request target (`path?query`).
pub fn parse(path: &str, query: Option<&str>) -> Route {
    if path == "/v2" || path == "/v2/" {
        return Route::Base;
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Route::Unknown("not a /v2/ path");
    };
    let Some(registry) = query.and_then(ns) else {
        return Route::Unknown(
            "no ns query parameter: pullgate serves containerd's mirror requests only",
        );
    };
    let (kind, repository, name) =
        match (rest.rsplit_once("/manifests/"), rest.rsplit_once("/blobs/")) {
            (Some((repo, name)), _) if !name.contains('/') => ("manifest", repo, name),
            (_, Some((repo, name))) if !name.contains('/') => ("blob", repo, name),
            _ => return Route::Unknown("not a manifest or blob path"),
        };
    if repository.is_empty() || name.is_empty() || !valid_repository(repository) {
        return Route::Unknown("invalid repository or reference");
    }
    let key = Key {
        registry,
        repository: repository.to_string(),
        name: name.to_string(),
    };
    if kind == "manifest" {
        Route::Manifest(key)
    } else if valid_digest(name) {
        Route::Blob(key)
    } else {
        Route::Unknown("blob name is not a digest")
    }
}

/// The `ns` parameter: the registry, `host[:port]`.
fn ns(query: &str) -> Option<String> {
    let value = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())?;
    let ok = !value.is_empty()
        && value.len() <= 255
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    ok.then_some(value)
}

/// Repository path components: lowercase alphanumerics with `.`, `_`, `-` separators inside
/// (so never `.` or `..`).
fn valid_repository(repo: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    repo.len() <= 255
        && repo.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && alnum(b[0])
                && alnum(b[b.len() - 1])
                && b.iter().all(|&x| alnum(x) || b"._-".contains(&x))
        })
}

fn valid_digest(name: &str) -> bool {
    match name.split_once(':') {
        Some((algo, hex)) => {
            !algo.is_empty()
                && algo
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+')
                && !hex.is_empty()
                && hex.len() <= 128
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// A range that starts at or past the end of the blob (answered 416).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsatisfiable;

/// A `Range` header, for a blob of `size` bytes: `Ok(None)` without one, `Ok(Some(a..b))` for
/// `bytes=a-` or `bytes=a-b`, `Err` for a range that cannot be satisfied (416). Suffix ranges
/// and multiple ranges (which containerd never sends) are ignored: the whole blob is served.
pub fn parse_range(
    header: Option<&str>,
    size: u64,
) -> Result<Option<std::ops::Range<u64>>, Unsatisfiable> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Ok(None);
    };
    let Ok(start) = a.trim().parse::<u64>() else {
        return Ok(None); // suffix range
    };
    let end = match b.trim() {
        "" => size,
        b => match b.parse::<u64>() {
            Ok(last) if last >= start => last.saturating_add(1).min(size),
            _ => return Ok(None),
        },
    };
    if start >= size {
        return Err(Unsatisfiable);
    }
    Ok(Some(start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn containerds_requests_parse() {
        assert_eq!(parse("/v2/", None), Route::Base);
        let Route::Blob(k) = parse(
            &format!("/v2/library/busybox/blobs/{D}"),
            Some("ns=docker.io"),
        ) else {
            panic!("blob")
        };
        assert_eq!(
            (k.registry.as_str(), k.repository.as_str(), k.name.as_str()),
            ("docker.io", "library/busybox", D)
        );
        let Route::Manifest(k) = parse("/v2/a/b/c/manifests/v1.2", Some("ns=127.0.0.1%3A5000"))
        else {
            panic!("manifest")
        };
        assert_eq!(
            (k.registry.as_str(), k.name.as_str()),
            ("127.0.0.1:5000", "v1.2")
        );
        // A repository may itself be called "blobs" or "manifests".
        let Route::Blob(k) = parse(&format!("/v2/x/manifests/blobs/{D}"), Some("ns=r")) else {
            panic!("blob in a repo named manifests")
        };
        assert_eq!(k.repository, "x/manifests");
    }

    #[test]
    fn what_containerd_never_sends_is_unknown() {
        for (path, query) in [
            ("/v2/busybox/blobs/sha256:abc", None),
            ("/v2/busybox/blobs/latest", Some("ns=docker.io")),
            ("/v2/../etc/blobs/sha256:ab", Some("ns=docker.io")),
            ("/v2/Busy/manifests/x", Some("ns=docker.io")),
            ("/v2/busybox/tags/list", Some("ns=docker.io")),
            ("/v2/busybox/manifests/x", Some("ns=evil.test/path")),
            ("/metrics", None),
        ] {
            assert!(
                matches!(parse(path, query), Route::Unknown(_)),
                "{path} {query:?}"
            );
        }
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=4-"), 10), Ok(Some(4..10)));
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Ok(Some(0..4)));
        assert_eq!(parse_range(Some("bytes=2-99"), 10), Ok(Some(2..10)));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 10), Ok(None));
    }
}
