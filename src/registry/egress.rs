//! Where the registry client's requests may go: redirects are bounded and never reach
//! pullgate's own listeners or a link-local / cloud metadata address, and host names that
//! resolve only to such addresses are refused, so neither a registry's `Location` nor a caller's
//! `ns=` turns pullgate into a proxy to the node's metadata service or back into itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// The most redirects one request follows (containerd's resolver follows 10; registries and
/// their CDNs use 1 or 2).
pub const MAX_REDIRECTS: usize = 5;

/// Why a request target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("redirect to {host} refused: {why}")]
pub struct Refused {
    pub host: String,
    pub why: &'static str,
}

/// True for addresses no registry lives at: link-local (169.254.0.0/16, fe80::/10, where the
/// clouds' metadata services are), Alibaba's 100.100.100.200, AWS's fd00:ec2::254, and the same
/// IPv4 addresses in IPv4-mapped, -compatible or NAT64 (64:ff9b::/96) form.
pub fn blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = v6.to_ipv4().or_else(|| {
                (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]).then(|| {
                    let o = v6.octets();
                    Ipv4Addr::new(o[12], o[13], o[14], o[15])
                })
            });
            (s[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || embedded.is_some_and(blocked_v4)
        }
    }
}

fn blocked_v4(v4: Ipv4Addr) -> bool {
    v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// The IP of a URL host given as a literal (`[v6]` brackets stripped).
fn literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Whether `host:port` is one of pullgate's own listeners (`own`, as `host:port`; an unspecified
/// listen address stands for every loopback address and `localhost`).
fn is_own(host: &str, port: u16, own: &[String]) -> bool {
    let ip = literal(host).or_else(|| {
        let h = host.trim_end_matches('.').to_ascii_lowercase();
        (h == "localhost" || h.ends_with(".localhost")).then_some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    });
    own.iter().any(|o| {
        let Ok(addr) = o.parse::<SocketAddr>() else {
            return o.eq_ignore_ascii_case(&format!("{host}:{port}"));
        };
        if addr.port() != port {
            return false;
        }
        match ip {
            Some(ip) if addr.ip().is_unspecified() => ip.is_loopback() || ip.is_unspecified(),
            Some(ip) if ip.is_loopback() && addr.ip().is_loopback() => {
                // `localhost` reaches 127.0.0.1 and ::1 alike.
                host.parse::<IpAddr>().is_err() || ip == addr.ip()
            }
            Some(ip) => ip == addr.ip(),
            None => false,
        }
    })
}

/// Checks one redirect target; `hops` is how many redirects were followed before it.
pub fn check_redirect(
    target: &reqwest::Url,
    previous: &[reqwest::Url],
    own: &[String],
) -> Result<(), Refused> {
    let host = target.host_str().unwrap_or("").to_string();
    let port = target.port_or_known_default().unwrap_or(0);
    let refuse = |why| {
        Err(Refused {
            host: format!("{host}:{port}"),
            why,
        })
    };
    if previous.len() > MAX_REDIRECTS {
        return refuse("more than 5 redirects");
    }
    if previous.iter().any(|p| p == target) {
        return refuse("redirect loop");
    }
    if !matches!(target.scheme(), "http" | "https") {
        return refuse("not http(s)");
    }
    if literal(&host).is_some_and(blocked) {
        return refuse("link-local or cloud metadata address");
    }
    if is_own(&host, port, own) {
        return refuse("pullgate's own listen address");
    }
    Ok(())
}

/// The redirect policy of every registry client.
pub fn redirect_policy(own: Vec<String>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        match check_redirect(attempt.url(), attempt.previous(), &own) {
            Ok(()) => attempt.follow(),
            Err(refused) => {
                tracing::warn!(target_host = %refused.host, why = refused.why,
                               from = %attempt.previous().last().map(|u| u.authority()).unwrap_or(""),
                               "registry redirect refused");
                attempt.error(refused)
            }
        }
    })
}

/// A request to an IP literal that no registry lives at (a caller's `ns=`, a hosts.toml entry).
pub fn check_target(url: &str) -> Result<(), Refused> {
    let Ok(u) = reqwest::Url::parse(url) else {
        return Ok(());
    };
    let host = u.host_str().unwrap_or("");
    if literal(host).is_some_and(blocked) {
        return Err(Refused {
            host: format!("{host}:{}", u.port_or_known_default().unwrap_or(0)),
            why: "link-local or cloud metadata address",
        });
    }
    Ok(())
}

/// The system resolver (getaddrinfo, as reqwest's default) without blocked addresses: a name
/// that resolves only to such addresses fails to connect.
#[derive(Debug, Default)]
pub struct SafeResolver;

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept = keep_allowed(&host, addrs).map_err(|refused| {
                tracing::warn!(
                    host,
                    "registry host resolves only to link-local or metadata addresses: refused"
                );
                Box::new(refused) as Box<dyn std::error::Error + Send + Sync>
            })?;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// `addrs` without blocked addresses; an error when that leaves none.
fn keep_allowed(host: &str, addrs: Vec<SocketAddr>) -> Result<Vec<SocketAddr>, Refused> {
    let found = addrs.len();
    let kept: Vec<SocketAddr> = addrs.into_iter().filter(|a| !blocked(a.ip())).collect();
    if kept.is_empty() && found > 0 {
        return Err(Refused {
            host: host.to_string(),
            why: "resolves only to link-local or cloud metadata addresses",
        });
    }
    Ok(kept)
}

pub fn resolver() -> Arc<SafeResolver> {
    Arc::new(SafeResolver)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_addresses_are_blocked() {
        for a in [
            "169.254.169.254",
            "169.254.0.1",
            "100.100.100.200",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(blocked(a.parse().unwrap()), "{a}");
        }
        for a in [
            "127.0.0.1",
            "10.0.0.1",
            "100.100.100.201",
            "::1",
            "fec0::1",
            "8.8.8.8",
        ] {
            assert!(!blocked(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn redirects_are_checked() {
        let own = vec!["127.0.0.1:5050".to_string(), "0.0.0.0:9090".to_string()];
        let prev = [url("http://127.0.0.1:5000/v2/r/blobs/sha256:aa")];
        let ok = |u: &str| check_redirect(&url(u), &prev, &own);
        assert!(ok("https://cdn.example.com/blob?sig=1").is_ok());
        assert!(ok("http://127.0.0.1:5001/x").is_ok());
        let e = ok("http://169.254.169.254/latest/meta-data/").unwrap_err();
        assert_eq!(e.host, "169.254.169.254:80");
        assert!(e.to_string().contains("metadata"), "{e}");
        assert!(ok("http://[::ffff:169.254.169.254]/").is_err());
        assert!(ok("http://[fd00:ec2::254]/").is_err());
        assert!(ok("http://127.0.0.1:5050/v2/")
            .unwrap_err()
            .why
            .contains("own"));
        assert!(ok("http://localhost:5050/v2/").is_err());
        assert!(ok("http://localhost:9090/metrics").is_err());
        assert!(ok("http://127.0.0.5:9090/metrics").is_err());
        assert!(ok("http://10.1.1.1:9090/metrics").is_ok());
        assert!(ok("ftp://example.com/").is_err());
        assert!(ok("http://127.0.0.1:5000/v2/r/blobs/sha256:aa")
            .unwrap_err()
            .why
            .contains("loop"));
        let many: Vec<_> = (0..6).map(|i| url(&format!("http://h{i}/"))).collect();
        assert!(check_redirect(&url("http://h9/"), &many[..5], &own).is_ok());
        assert!(check_redirect(&url("http://h9/"), &many, &own)
            .unwrap_err()
            .why
            .contains("more than 5"));
    }

    #[test]
    fn targets_given_as_metadata_literals_are_refused() {
        assert!(check_target("http://169.254.169.254/v2/").is_err());
        assert!(check_target("https://[fe80::1]:5000/v2/").is_err());
        assert!(check_target("https://registry-1.docker.io/v2/").is_ok());
    }

    #[tokio::test]
    async fn names_resolving_to_metadata_only_fail() {
        use reqwest::dns::Resolve;
        let name: reqwest::dns::Name = "169.254.169.254.nip.invalid".parse().unwrap();
        // An unresolvable name fails as before (no address to keep or drop).
        assert!(SafeResolver.resolve(name).await.is_err());
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert!(keep_allowed("m", vec![a("169.254.169.254:0"), a("[fe80::1]:0")]).is_err());
        assert_eq!(
            keep_allowed("m", vec![a("169.254.169.254:0"), a("10.0.0.1:0")]).unwrap(),
            vec![a("10.0.0.1:0")]
        );
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let kept: Vec<_> = SafeResolver.resolve(name).await.unwrap().collect();
        assert!(kept.iter().all(|a| a.ip().is_loopback()) && !kept.is_empty());
    }
}
