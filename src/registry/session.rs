//! The auth session of the registry client: one GET with the host's headers and the right
//! `Authorization`, answering the registry's challenge (Basic, or a Bearer token from its token
//! server, cached and shared by parallel requests) and retrying once after a 401; the last
//! challenge per host and repository is remembered, so later requests authenticate up front.

use http::header::{HeaderName, HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::StatusCode;

use super::auth::{fetch_token, parse_www_authenticate, pick_challenge, Challenge};
use super::client::RegistryClient;
use super::error::chain;
use super::hosts::RegistryHost;
use super::{Credentials, ImageRef, RegistryError};

impl RegistryClient {
    /// GET `host`'s `path_prefix/path` with `extra` headers, authenticating as needed (retries
    /// once after a 401). Returns the response whatever its status, except a 401 after the
    /// retry, which is `Unauthorized`.
    pub(super) async fn get(
        &self,
        host: &RegistryHost,
        image: &ImageRef,
        creds: &Credentials,
        path: &str,
        extra: Vec<(HeaderName, HeaderValue)>,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let creds = if host.is_mirror && !self.inner.config.mirror_credentials {
            &Credentials::Anonymous
        } else {
            creds
        };
        let http = self.http_for(host)?;
        let mut url = host.url(path);
        if host.is_mirror {
            url.push_str("?ns=");
            url.push_str(&image.registry);
        }
        let memo_key = (host.base.clone(), image.repository.clone());
        let mut auth = self.preauth(&http, image, creds, &memo_key, what).await?;
        for attempt in 0..2 {
            let resp = self.send(&http, host, &url, &extra, auth.as_ref()).await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(parse_www_authenticate)
                .collect();
            let denied = || {
                RegistryError::Unauthorized(format!(
                    "{} refused access to repository {} ({})",
                    host.authority(),
                    image.repository,
                    describe_creds(creds)
                ))
            };
            if attempt == 1 {
                return Err(denied());
            }
            let Some(challenge) = pick_challenge(&challenges).cloned() else {
                return Err(match challenges.first() {
                    Some(Challenge::Other { scheme }) => RegistryError::Unsupported(format!(
                        "{} asks for auth scheme {scheme:?} for repository {}",
                        host.authority(),
                        image.repository
                    )),
                    _ => RegistryError::Unauthorized(format!(
                        "{} answered 401 without an auth challenge for repository {}",
                        host.authority(),
                        image.repository
                    )),
                });
            };
            if let Challenge::Bearer { realm, service, .. } = &challenge {
                // The token just refused (cached under the previous challenge) and any cached
                // for the new one are dropped, so the retry gets a fresh token.
                if let Some(Challenge::Bearer {
                    realm: r,
                    service: s,
                    scope,
                }) = self.memo(&memo_key)
                {
                    let scopes = scopes_for(image, scope.as_deref());
                    self.inner
                        .tokens
                        .invalidate(&r, s.as_deref(), &scopes.join(" "), creds);
                }
                let scopes = scopes_for(image, challenge_scope(&challenge));
                self.inner
                    .tokens
                    .invalidate(realm, service.as_deref(), &scopes.join(" "), creds);
            }
            self.inner
                .challenges
                .lock()
                .insert(memo_key.clone(), challenge.clone());
            auth = self
                .answer(&http, &challenge, image, creds, what)
                .await?
                .map(Some)
                .ok_or_else(denied)?;
        }
        unreachable!("the loop returns")
    }

    fn memo(&self, key: &(String, String)) -> Option<Challenge> {
        self.inner.challenges.lock().get(key).cloned()
    }

    /// The Authorization header to send before any 401: a registry token as is, else what the
    /// last challenge from this host for this repository calls for.
    async fn preauth(
        &self,
        http: &reqwest::Client,
        image: &ImageRef,
        creds: &Credentials,
        memo_key: &(String, String),
        what: &str,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        if let Credentials::RegistryToken(t) = creds {
            return Ok(Some(bearer(t)));
        }
        match self.memo(memo_key) {
            Some(c) => self.answer(http, &c, image, creds, what).await,
            None => Ok(None),
        }
    }

    /// The Authorization header answering `challenge` with `creds`; None if they cannot.
    async fn answer(
        &self,
        http: &reqwest::Client,
        challenge: &Challenge,
        image: &ImageRef,
        creds: &Credentials,
        what: &str,
    ) -> Result<Option<HeaderValue>, RegistryError> {
        match (challenge, creds) {
            (_, Credentials::RegistryToken(t)) => Ok(Some(bearer(t))),
            (Challenge::Basic { .. }, Credentials::Basic { username, password }) => {
                Ok(Some(basic(username, password)))
            }
            (
                Challenge::Basic { .. },
                Credentials::IdentityToken {
                    username: Some(username),
                    token,
                },
            ) => Ok(Some(basic(username, token))),
            (Challenge::Basic { .. }, _) => Ok(None),
            (
                Challenge::Bearer {
                    realm,
                    service,
                    scope,
                },
                _,
            ) => {
                if realm.is_empty() {
                    return Err(RegistryError::Protocol(format!(
                        "{what}: bearer challenge without a realm"
                    )));
                }
                let scopes = scopes_for(image, scope.as_deref());
                let scope_key = scopes.join(" ");
                let tokens = &self.inner.tokens;
                if let Some(t) = tokens.get(realm, service.as_deref(), &scope_key, creds) {
                    return Ok(Some(bearer(&t)));
                }
                let _guard = self.inner.token_fetch.lock().await;
                if let Some(t) = tokens.get(realm, service.as_deref(), &scope_key, creds) {
                    return Ok(Some(bearer(&t)));
                }
                let token = fetch_token(
                    http,
                    realm,
                    service.as_deref(),
                    &scopes,
                    creds,
                    self.inner.config.request_timeout,
                    &image.name(),
                )
                .await?;
                tokens.insert(
                    realm,
                    service.as_deref(),
                    &scope_key,
                    creds,
                    token.token.clone(),
                    token.expires_in,
                );
                Ok(Some(bearer(&token.token)))
            }
            (Challenge::Other { scheme }, _) => Err(RegistryError::Unsupported(format!(
                "{what}: auth scheme {scheme:?}"
            ))),
        }
    }

    /// One request: hosts.toml headers, `extra`, `auth`; connect + headers within the timeout.
    async fn send(
        &self,
        http: &reqwest::Client,
        host: &RegistryHost,
        url: &str,
        extra: &[(HeaderName, HeaderValue)],
        auth: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, RegistryError> {
        if let Err(refused) = super::egress::check_target(url) {
            return Err(RegistryError::Protocol(format!(
                "{}: request to {} refused: {}",
                host.authority(),
                refused.host,
                refused.why
            )));
        }
        let mut rb = http.get(url);
        for (name, value) in &host.headers {
            rb = rb.header(name.as_str(), value.as_str());
        }
        for (name, value) in extra {
            rb = rb.header(name, value.clone());
        }
        if let Some(a) = auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        let timeout = self.inner.config.request_timeout;
        let path = url
            .split_once("://")
            .and_then(|(_, r)| r.find('/').map(|i| &r[i..]))
            .unwrap_or("/");
        let result = tokio::time::timeout(timeout, rb.send()).await;
        match result {
            Err(_) => {
                tracing::debug!(
                    method = "GET",
                    host = host.authority(),
                    path,
                    "registry request timed out"
                );
                Err(RegistryError::Timeout(format!(
                    "{} did not answer GET {path} within {timeout:?}",
                    host.authority()
                )))
            }
            Ok(Err(e)) => {
                tracing::debug!(method = "GET", host = host.authority(), path, error = %chain(&e), "registry request failed");
                let msg = format!("GET {path} on {}: {}", host.authority(), chain(&e));
                if e.is_redirect() {
                    // A refused redirect (see `egress`): the next host, not a retry.
                    Err(RegistryError::Protocol(msg))
                } else if e.is_timeout() {
                    Err(RegistryError::Timeout(msg))
                } else {
                    Err(RegistryError::Transport(msg))
                }
            }
            Ok(Ok(resp)) => {
                tracing::debug!(
                    method = "GET",
                    host = host.authority(),
                    path,
                    status = resp.status().as_u16(),
                    final_host = resp.url().host_str().unwrap_or(""),
                    "registry request"
                );
                Ok(resp)
            }
        }
    }
}

fn bearer(token: &str) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}"))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid-token"));
    v.set_sensitive(true);
    v
}

fn basic(username: &str, password: &str) -> HeaderValue {
    let enc = super::auth::encode_basic(username, password);
    let mut v = HeaderValue::from_str(&format!("Basic {enc}")).expect("base64 is ascii");
    v.set_sensitive(true);
    v
}

fn challenge_scope(c: &Challenge) -> Option<&str> {
    match c {
        Challenge::Bearer { scope, .. } => scope.as_deref(),
        _ => None,
    }
}

/// `repository:<repo>:pull`, plus the challenge's own scope if it asks for something else.
fn scopes_for(image: &ImageRef, challenge_scope: Option<&str>) -> Vec<String> {
    let ours = format!("repository:{}:pull", image.repository);
    let mut scopes = vec![ours.clone()];
    if let Some(s) = challenge_scope {
        if !s.is_empty() && s != ours {
            scopes.push(s.to_string());
        }
    }
    scopes
}

fn describe_creds(c: &Credentials) -> &'static str {
    match c {
        Credentials::Anonymous => "anonymous",
        Credentials::Basic { .. } => "with username and password",
        Credentials::IdentityToken { .. } => "with an identity token",
        Credentials::RegistryToken(_) => "with a registry token",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let image = ImageRef::parse("127.0.0.1:5000/a/b:1").unwrap();
        assert_eq!(scopes_for(&image, None), vec!["repository:a/b:pull"]);
        assert_eq!(
            scopes_for(&image, Some("repository:a/b:pull")),
            vec!["repository:a/b:pull"]
        );
        assert_eq!(
            scopes_for(&image, Some("repository:a/b:pull,push")),
            vec!["repository:a/b:pull", "repository:a/b:pull,push"]
        );
    }

    #[test]
    fn auth_headers_are_sensitive() {
        assert!(bearer("t").is_sensitive());
        assert!(basic("u", "p").is_sensitive());
        assert_eq!(basic("u", "p").to_str().unwrap(), "Basic dTpw");
    }
}
