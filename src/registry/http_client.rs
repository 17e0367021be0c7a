//! The HTTP clients the registry client talks through: one per distinct TLS setting of the
//! hosts (CA bundles, client certificates, verification off), each with pullgate's redirect
//! policy and DNS resolver ([`super::egress`]).

use std::path::PathBuf;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};

use super::error::chain;
use super::RegistryError;

/// TLS settings of a host: one HTTP client per distinct value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub(super) struct TlsKey {
    pub skip_verify: bool,
    pub ca: Vec<PathBuf>,
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
}

/// An HTTP client for hosts with TLS settings `key`: `user_agent`, `connect_timeout`, redirects
/// never to `skip_hosts` (pullgate's own listeners), and pullgate's loop-detection header.
pub(super) fn build_http_client(
    user_agent: &str,
    connect_timeout: Duration,
    skip_hosts: Vec<String>,
    key: &TlsKey,
) -> Result<reqwest::Client, RegistryError> {
    let read = |p: &PathBuf| {
        crate::small_file::read(p)
            .map_err(|e| RegistryError::Config(format!("cannot read {}: {e}", p.display())))
    };
    let mut b = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(connect_timeout)
        .redirect(super::egress::redirect_policy(skip_hosts))
        .dns_resolver(super::egress::resolver())
        .default_headers(http::HeaderMap::from_iter([(
            HeaderName::from_static(super::HOP_HEADER),
            HeaderValue::from_static("1"),
        )]));
    if key.skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    for ca in &key.ca {
        let pem = read(ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "{}: not a PEM certificate bundle: {}",
                ca.display(),
                chain(&e)
            ))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "{}: no certificate found",
                ca.display()
            )));
        }
        for cert in certs {
            b = b.add_root_certificate(cert);
        }
    }
    if let Some((cert, key_file)) = key.client.first() {
        let mut pem = read(cert)?;
        if let Some(k) = key_file {
            pem.push(b'\n');
            pem.extend_from_slice(&read(k)?);
        }
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "client certificate {}: {}",
                cert.display(),
                chain(&e)
            ))
        })?;
        b = b.identity(identity);
    }
    b.build()
        .map_err(|e| RegistryError::Config(format!("cannot build an HTTP client: {}", chain(&e))))
}
