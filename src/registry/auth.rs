//! Registry credentials, `WWW-Authenticate` challenges, bearer tokens and their cache.
//!
//! Secrets never leave this module in readable form except in request headers: `Debug` redacts
//! them, error messages never include them, the token cache keys on a sha256 fingerprint.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use super::digest::hex;
use super::error::chain;
use super::RegistryError;
use crate::proto::runtime::v1::AuthConfig;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum Credentials {
    /// No credentials: anonymous bearer tokens only.
    #[default]
    Anonymous,
    /// Username and password: sent as HTTP Basic to a Basic registry, or to the bearer token
    /// server.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token: exchanged at the bearer realm with
    /// `POST grant_type=refresh_token`.
    IdentityToken {
        username: Option<String>,
        token: String,
    },
    /// A registry bearer token, sent as is.
    RegistryToken(String),
}

const REDACTED: &str = "<redacted>";

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &format_args!("{REDACTED}"))
                .finish(),
            Credentials::IdentityToken { username, .. } => f
                .debug_struct("IdentityToken")
                .field("username", username)
                .field("token", &format_args!("{REDACTED}"))
                .finish(),
            Credentials::RegistryToken(_) => write!(f, "RegistryToken({REDACTED})"),
        }
    }
}

impl Credentials {
    /// From a CRI `AuthConfig`, in containerd's order: `username`/`password`, else
    /// `identity_token`, else `auth` (base64 "user:password"), else `registry_token`; all empty:
    /// anonymous. A malformed `auth` gives anonymous (logged without its content): the registry
    /// then refuses or serves the pull, and containerd reports the bad field when it finishes.
    pub fn from_auth_config(auth: &AuthConfig) -> Credentials {
        match Credentials::try_from_auth_config(auth) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed credentials");
                Credentials::Anonymous
            }
        }
    }

    /// Like [`Credentials::from_auth_config`], but a malformed `auth` is an `Unauthorized` error
    /// (a fallback error: containerd gets to report it).
    pub fn try_from_auth_config(auth: &AuthConfig) -> Result<Credentials, RegistryError> {
        if !auth.username.is_empty() {
            return Ok(Credentials::Basic {
                username: auth.username.clone(),
                password: auth.password.clone(),
            });
        }
        if !auth.identity_token.is_empty() {
            return Ok(Credentials::IdentityToken {
                username: None,
                token: auth.identity_token.clone(),
            });
        }
        if !auth.auth.is_empty() {
            return decode_basic(&auth.auth)
                .ok_or_else(|| {
                    RegistryError::Unauthorized(
                        "AuthConfig.auth is not base64 of \"username:password\"".to_string(),
                    )
                })
                .map(|(username, password)| Credentials::Basic { username, password });
        }
        if !auth.registry_token.is_empty() {
            return Ok(Credentials::RegistryToken(auth.registry_token.clone()));
        }
        Ok(Credentials::Anonymous)
    }

    /// From a docker `config.json`'s `auths` for `registry_host` (`host[:port]`, `docker.io`
    /// for Docker Hub, which also matches the `https://index.docker.io/v1/` key). Keys may carry
    /// a scheme and a path. A missing file or entry is anonymous; credential helpers
    /// (`credsStore`, `credHelpers`) are not run.
    pub fn from_docker_config(
        path: &Path,
        registry_host: &str,
    ) -> Result<Credentials, RegistryError> {
        let text = match crate::small_file::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Credentials::Anonymous)
            }
            Err(e) => {
                return Err(RegistryError::Config(format!(
                    "cannot read {}: {e}",
                    path.display()
                )))
            }
        };
        // Deliberately no serde error text: it could quote a piece of the file.
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            RegistryError::Config(format!(
                "{}: not valid JSON (line {}, column {})",
                path.display(),
                e.line(),
                e.column()
            ))
        })?;
        let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
            return Ok(Credentials::Anonymous);
        };
        let wanted: Vec<&str> = if registry_host == "docker.io" {
            vec!["docker.io", "index.docker.io", "registry-1.docker.io"]
        } else {
            vec![registry_host]
        };
        // Exact keys first, then keys normalised to their host part (docker's ConvertToHostname).
        let mut entry = None;
        for key in [
            format!("https://{registry_host}"),
            registry_host.to_string(),
            "https://index.docker.io/v1/".to_string(),
        ] {
            if key.contains("index.docker.io") && registry_host != "docker.io" {
                continue;
            }
            if let Some(v) = auths.get(&key) {
                entry = Some(v);
                break;
            }
        }
        if entry.is_none() {
            entry = auths
                .iter()
                .find(|(k, _)| wanted.contains(&key_host(k)))
                .map(|(_, v)| v);
        }
        let Some(entry) = entry else {
            return Ok(Credentials::Anonymous);
        };
        let field = |name: &str| {
            entry
                .get(name)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let bad = || {
            RegistryError::Config(format!(
                "{}: the \"auth\" field for {registry_host} is not base64 of \"username:password\"",
                path.display()
            ))
        };
        let (mut username, mut password) = (field("username"), field("password"));
        if username.is_none() {
            if let Some(auth) = field("auth") {
                let (u, p) = decode_basic(&auth).ok_or_else(bad)?;
                username = Some(u).filter(|u| !u.is_empty());
                password = Some(p);
            }
        }
        if let Some(token) = field("identitytoken") {
            return Ok(Credentials::IdentityToken { username, token });
        }
        if let Some(token) = field("registrytoken") {
            return Ok(Credentials::RegistryToken(token));
        }
        match username {
            Some(username) => Ok(Credentials::Basic {
                username,
                password: password.unwrap_or_default(),
            }),
            None => Ok(Credentials::Anonymous),
        }
    }

    /// True for [`Credentials::Anonymous`].
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Credentials::Anonymous)
    }

    /// A sha256 over the credentials, for cache keys (in memory only; never logged).
    pub(crate) fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        match self {
            Credentials::Anonymous => h.update(b"anonymous"),
            Credentials::Basic { username, password } => {
                h.update(b"basic\0");
                h.update(username.as_bytes());
                h.update(b"\0");
                h.update(password.as_bytes());
            }
            Credentials::IdentityToken { username, token } => {
                h.update(b"identity\0");
                h.update(username.as_deref().unwrap_or("").as_bytes());
                h.update(b"\0");
                h.update(token.as_bytes());
            }
            Credentials::RegistryToken(t) => {
                h.update(b"registry-token\0");
                h.update(t.as_bytes());
            }
        }
        hex(&h.finalize())
    }
}

/// `https://index.docker.io/v1/` → `index.docker.io`.
fn key_host(key: &str) -> &str {
    let rest = key.split_once("://").map(|(_, r)| r).unwrap_or(key);
    rest.split('/').next().unwrap_or(rest)
}

/// HTTP Basic's credentials part: base64 of `user:password` (RFC 7617). The one encoder for
/// the registry client's requests.
pub fn encode_basic(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"))
}

/// The reverse of [`encode_basic`], also for a Docker config's `auth` field and a mirror
/// request's `Authorization`: `None` unless it is base64 of UTF-8 with a `:` (the password may
/// hold more).
pub fn decode_basic(b64: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic {
        realm: Option<String>,
    },
    Bearer {
        /// The token endpoint ("" if the registry forgot it).
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// Any other scheme (lower-cased).
    Other {
        scheme: String,
    },
}

/// Parses a `WWW-Authenticate` value: one or more challenges, `scheme param=value, ...`, values
/// quoted or not; quoted values may hold commas and `\"` escapes. Schemes are case-insensitive.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let mut raw: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for item in split_outside_quotes(header) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (first, rest) = match item.find(char::is_whitespace) {
            Some(i) => (&item[..i], item[i..].trim_start()),
            None => (item, ""),
        };
        let starts_challenge = !first.contains('=') && !rest.starts_with('=');
        let param_text = if starts_challenge {
            raw.push((first.to_ascii_lowercase(), Vec::new()));
            rest
        } else {
            item
        };
        if param_text.is_empty() {
            continue;
        }
        if let (Some(current), Some((k, v))) = (raw.last_mut(), param_text.split_once('=')) {
            current
                .1
                .push((k.trim().to_ascii_lowercase(), unquote(v.trim())));
        }
    }
    raw.into_iter()
        .map(|(scheme, params)| {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(pk, _)| pk == k)
                    .map(|(_, v)| v.clone())
            };
            match scheme.as_str() {
                "basic" => Challenge::Basic {
                    realm: get("realm"),
                },
                "bearer" => Challenge::Bearer {
                    realm: get("realm").unwrap_or_default(),
                    service: get("service"),
                    scope: get("scope"),
                },
                _ => Challenge::Other { scheme },
            }
        })
        .collect()
}

fn split_outside_quotes(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            cur.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if in_quotes => {
                cur.push(c);
                escaped = true;
            }
            '"' => {
                in_quotes = !in_quotes;
                cur.push(c);
            }
            ',' if !in_quotes => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn unquote(v: &str) -> String {
    let Some(inner) = v.strip_prefix('"') else {
        return v.to_string();
    };
    let inner = inner.strip_suffix('"').unwrap_or(inner);
    let mut out = String::with_capacity(inner.len());
    let mut escaped = false;
    for c in inner.chars() {
        if escaped {
            out.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Picks the challenge to answer: Bearer over Basic; None if only unknown schemes.
pub(crate) fn pick_challenge(challenges: &[Challenge]) -> Option<&Challenge> {
    challenges
        .iter()
        .find(|c| matches!(c, Challenge::Bearer { .. }))
        .or_else(|| {
            challenges
                .iter()
                .find(|c| matches!(c, Challenge::Basic { .. }))
        })
}

/// Tokens live `expires_in` (default 60 s) minus this margin (at most half their life).
const TOKEN_MARGIN: Duration = Duration::from_secs(10);
/// A token is kept at most this long, whatever the server says: `expires_in` is the server's
/// word, and `Instant + u64::MAX seconds` overflows.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    realm: String,
    service: String,
    scope: String,
    creds: String,
}

/// Bearer tokens by (realm, service, scope, credentials fingerprint), until they expire.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.tokens.lock().len();
        write!(f, "TokenCache({n} tokens)")
    }
}

impl TokenCache {
    fn key(realm: &str, service: Option<&str>, scope: &str, creds: &Credentials) -> TokenKey {
        TokenKey {
            realm: realm.to_string(),
            service: service.unwrap_or("").to_string(),
            scope: scope.to_string(),
            creds: creds.fingerprint(),
        }
    }

    /// A cached, unexpired token.
    pub fn get(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: &Credentials,
    ) -> Option<String> {
        let key = Self::key(realm, service, scope, creds);
        let mut tokens = self.tokens.lock();
        match tokens.get(&key) {
            Some((token, until)) if Instant::now() < *until => Some(token.clone()),
            Some(_) => {
                tokens.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Stores a token valid for `expires_in` (minus the margin).
    pub fn insert(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        creds: &Credentials,
        token: String,
        expires_in: Duration,
    ) {
        let until = token_deadline(Instant::now(), expires_in);
        let key = Self::key(realm, service, scope, creds);
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, (_, u)| Instant::now() < *u);
        tokens.insert(key, (token, until));
    }

    /// Drops a token the registry refused.
    pub fn invalidate(&self, realm: &str, service: Option<&str>, scope: &str, creds: &Credentials) {
        let key = Self::key(realm, service, scope, creds);
        self.tokens.lock().remove(&key);
    }
}

/// When a token valid for `expires_in` from `now` is dropped from the cache: the lifetime capped
/// at [`MAX_TOKEN_LIFETIME`], minus the margin.
pub(crate) fn token_deadline(now: Instant, expires_in: Duration) -> Instant {
    let life = expires_in.min(MAX_TOKEN_LIFETIME);
    let margin = TOKEN_MARGIN.min(life / 2);
    now.checked_add(life - margin).unwrap_or(now)
}

/// A token from a token server.
#[derive(Clone)]
pub(crate) struct Token {
    pub token: String,
    pub expires_in: Duration,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Asks the token server at `realm` for a token for `scopes`. `what` ("host/repository") is for
/// messages. Basic credentials go along as HTTP Basic; an identity token is exchanged with the
/// OAuth2 refresh-token grant (POST), falling back to GET with basic auth if the server has no
/// POST endpoint (404/405), as containerd does.
pub(crate) async fn fetch_token(
    http: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scopes: &[String],
    creds: &Credentials,
    timeout: Duration,
    what: &str,
) -> Result<Token, RegistryError> {
    let realm_url = reqwest::Url::parse(realm).map_err(|e| {
        RegistryError::Protocol(format!(
            "{what}: bearer challenge has an invalid realm {realm:?}: {e}"
        ))
    })?;
    if realm_url.scheme() != "https" && realm_url.scheme() != "http" {
        return Err(RegistryError::Protocol(format!(
            "{what}: bearer realm {realm:?} is not http(s)"
        )));
    }
    let realm_host = realm_url.host_str().unwrap_or("").to_string();
    if let Credentials::IdentityToken { token, username } = creds {
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token.as_str()),
            ("client_id", "pullgate"),
        ];
        if let Some(s) = service {
            form.push(("service", s));
        }
        let scope = scopes.join(" ");
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let rb = http.post(realm_url.clone()).form(&form);
        match token_request(rb, timeout, what, &realm_host).await {
            Err(TokenErr::NoPost) => {
                let user = username.as_deref().unwrap_or("<token>");
                let rb = http
                    .get(get_url(&realm_url, service, scopes))
                    .basic_auth(user, Some(token));
                return token_request(rb, timeout, what, &realm_host)
                    .await
                    .map_err(TokenErr::into_error);
            }
            other => return other.map_err(TokenErr::into_error),
        }
    }
    let mut rb = http.get(get_url(&realm_url, service, scopes));
    if let Credentials::Basic { username, password } = creds {
        rb = rb.basic_auth(username, Some(password));
    }
    token_request(rb, timeout, what, &realm_host)
        .await
        .map_err(TokenErr::into_error)
}

fn get_url(realm: &reqwest::Url, service: Option<&str>, scopes: &[String]) -> reqwest::Url {
    let mut url = realm.clone();
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        for s in scopes {
            q.append_pair("scope", s);
        }
    }
    url
}

enum TokenErr {
    /// 404/405 to the OAuth2 POST.
    NoPost,
    Err(RegistryError),
}

impl TokenErr {
    fn into_error(self) -> RegistryError {
        match self {
            TokenErr::NoPost => {
                RegistryError::Protocol("token server has no OAuth2 endpoint".to_string())
            }
            TokenErr::Err(e) => e,
        }
    }
}

async fn token_request(
    rb: reqwest::RequestBuilder,
    timeout: Duration,
    what: &str,
    realm_host: &str,
) -> Result<Token, TokenErr> {
    let err = |e: RegistryError| TokenErr::Err(e);
    let resp = match tokio::time::timeout(timeout, rb.send()).await {
        Err(_) => {
            return Err(err(RegistryError::Timeout(format!(
                "token server {realm_host} (for {what}) did not answer within {timeout:?}"
            ))))
        }
        Ok(Err(e)) if e.is_timeout() => {
            return Err(err(RegistryError::Timeout(format!(
                "token server {realm_host} (for {what}): {}",
                chain(&e)
            ))))
        }
        Ok(Err(e)) => {
            return Err(err(RegistryError::Transport(format!(
                "token server {realm_host} (for {what}): {}",
                chain(&e)
            ))))
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    tracing::debug!(
        host = realm_host,
        path = resp.url().path(),
        status = status.as_u16(),
        "registry token response"
    );
    match status.as_u16() {
        200..=299 => {}
        404 | 405 => return Err(TokenErr::NoPost),
        401 | 403 => {
            return Err(err(RegistryError::Unauthorized(format!(
                "token server {realm_host} refused the credentials for {what} ({status})"
            ))))
        }
        s if s >= 500 || s == 429 => {
            return Err(err(RegistryError::Transport(format!(
                "token server {realm_host} (for {what}) answered {status}"
            ))))
        }
        _ => {
            return Err(err(RegistryError::Protocol(format!(
                "token server {realm_host} (for {what}) answered {status}"
            ))))
        }
    }
    let body = match tokio::time::timeout(timeout, read_limited(resp, MAX_TOKEN_RESPONSE)).await {
        Err(_) => {
            return Err(err(RegistryError::Timeout(format!(
                "token server {realm_host} (for {what}): body not read within {timeout:?}"
            ))))
        }
        Ok(r) => r.map_err(|m| {
            err(RegistryError::Transport(format!(
                "token server {realm_host} (for {what}): {m}"
            )))
        })?,
    };
    parse_token_response(&body).map_err(|why| {
        err(RegistryError::Protocol(format!(
            "token server {realm_host} (for {what}) answered {why}"
        )))
    })
}

/// Reads a token server's JSON answer: `token` (or OAuth2's `access_token`) and `expires_in`
/// seconds (absent or 0: [`DEFAULT_TOKEN_LIFETIME`]). The error completes "answered ...".
pub(crate) fn parse_token_response(body: &[u8]) -> Result<Token, &'static str> {
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|_| "something that is not a token response")?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or("without a token")?;
    let expires_in = match parsed.expires_in {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok(Token { token, expires_in })
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| chain(&e))? {
        if out.len() + chunk.len() > limit {
            return Err(format!("response larger than {limit} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_bearer_with_commas_in_quotes() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull,push""#,
        );
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull,push".into()),
            }]
        );
    }

    #[test]
    fn parse_basic_and_multiple_challenges() {
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="pullgate-harness""#),
            vec![Challenge::Basic {
                realm: Some("pullgate-harness".into())
            }]
        );
        let c = parse_www_authenticate(
            r#"Negotiate, basic realm="a \"quoted\", realm", BEARER realm = "https://t/x?a=b", service=svc"#,
        );
        assert_eq!(
            c,
            vec![
                Challenge::Other {
                    scheme: "negotiate".into()
                },
                Challenge::Basic {
                    realm: Some(r#"a "quoted", realm"#.into())
                },
                Challenge::Bearer {
                    realm: "https://t/x?a=b".into(),
                    service: Some("svc".into()),
                    scope: None,
                },
            ]
        );
        assert!(matches!(pick_challenge(&c), Some(Challenge::Bearer { .. })));
        let c = parse_www_authenticate("Digest realm=\"x\", nonce=\"y\"");
        assert_eq!(
            c,
            vec![Challenge::Other {
                scheme: "digest".into()
            }]
        );
        assert!(pick_challenge(&c).is_none());
        assert!(parse_www_authenticate("").is_empty());
    }

    fn auth_config() -> AuthConfig {
        AuthConfig::default()
    }

    #[test]
    fn credentials_from_auth_config() {
        assert_eq!(
            Credentials::from_auth_config(&auth_config()),
            Credentials::Anonymous
        );
        let mut a = auth_config();
        a.username = "bob".into();
        a.password = "s3cret".into();
        a.identity_token = "ignored".into();
        assert_eq!(
            Credentials::try_from_auth_config(&a).unwrap(),
            Credentials::Basic {
                username: "bob".into(),
                password: "s3cret".into()
            }
        );
        let mut a = auth_config();
        a.auth = base64::engine::general_purpose::STANDARD.encode("alice:pa:ss");
        assert_eq!(
            Credentials::try_from_auth_config(&a).unwrap(),
            Credentials::Basic {
                username: "alice".into(),
                password: "pa:ss".into()
            }
        );
        let mut a = auth_config();
        a.identity_token = "refresh".into();
        a.auth = "garbage".into();
        assert_eq!(
            Credentials::try_from_auth_config(&a).unwrap(),
            Credentials::IdentityToken {
                username: None,
                token: "refresh".into()
            }
        );
        let mut a = auth_config();
        a.registry_token = "tok".into();
        assert_eq!(
            Credentials::try_from_auth_config(&a).unwrap(),
            Credentials::RegistryToken("tok".into())
        );
        let mut a = auth_config();
        a.auth = "bm90LWEtcGFpcg==".into(); // "not-a-pair"
        let e = Credentials::try_from_auth_config(&a).unwrap_err();
        assert!(e.is_fallback());
        assert_eq!(Credentials::from_auth_config(&a), Credentials::Anonymous);
        assert!(!e.to_string().contains("bm90"));
    }

    #[test]
    fn basic_credentials_round_trip_and_bad_ones_are_none() {
        for (u, p) in [
            ("u", "p"),
            ("alice", "pa:ss:word"),
            ("", "token"),
            ("ü", ""),
        ] {
            assert_eq!(
                decode_basic(&encode_basic(u, p)),
                Some((u.to_string(), p.to_string()))
            );
        }
        assert_eq!(encode_basic("u", "p"), "dTpw");
        assert_eq!(
            decode_basic(" dTpw\n"),
            Some(("u".to_string(), "p".to_string()))
        );
        assert_eq!(decode_basic("!!!"), None, "not base64");
        assert_eq!(decode_basic("dXNlcg=="), None, "no colon");
        assert_eq!(decode_basic("/w=="), None, "not UTF-8");
    }

    #[test]
    fn credentials_from_docker_config() {
        let dir = std::env::temp_dir().join(format!("pullgate-dockercfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        std::fs::write(
            &path,
            serde_json::json!({
                "auths": {
                    "https://index.docker.io/v1/": { "auth": b64("hubuser:hubpass") },
                    "127.0.0.1:5000": { "username": "u", "password": "p" },
                    "https://quay.io/v2/": { "auth": b64("q:qp") },
                    "ghcr.io": { "username": "g", "identitytoken": "refresh-me" },
                    "reg.example": { "registrytoken": "bearer-me" },
                },
                "credsStore": "desktop",
            })
            .to_string(),
        )
        .unwrap();
        let get = |h: &str| Credentials::from_docker_config(&path, h).unwrap();
        assert_eq!(
            get("docker.io"),
            Credentials::Basic {
                username: "hubuser".into(),
                password: "hubpass".into()
            }
        );
        assert_eq!(
            get("127.0.0.1:5000"),
            Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            }
        );
        assert_eq!(
            get("quay.io"),
            Credentials::Basic {
                username: "q".into(),
                password: "qp".into()
            }
        );
        assert_eq!(
            get("ghcr.io"),
            Credentials::IdentityToken {
                username: Some("g".into()),
                token: "refresh-me".into()
            }
        );
        assert_eq!(
            get("reg.example"),
            Credentials::RegistryToken("bearer-me".into())
        );
        assert_eq!(get("other.example"), Credentials::Anonymous);
        assert_eq!(
            Credentials::from_docker_config(&dir.join("missing.json"), "docker.io").unwrap(),
            Credentials::Anonymous
        );
        std::fs::write(&path, "{\"auths\": {\"x\": {\"auth\": \"secret-not-json").unwrap();
        let e = Credentials::from_docker_config(&path, "x").unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn debug_hides_secrets() {
        let all = [
            Credentials::Basic {
                username: "bob".into(),
                password: "hunter2".into(),
            },
            Credentials::IdentityToken {
                username: Some("bob".into()),
                token: "hunter2".into(),
            },
            Credentials::RegistryToken("hunter2".into()),
        ];
        for c in all {
            let d = format!("{c:?} {c:#?}");
            assert!(!d.contains("hunter2"), "{d}");
            assert!(d.contains("redacted"), "{d}");
            assert!(!c.fingerprint().contains("hunter2"));
        }
        assert_eq!(format!("{:?}", Credentials::Anonymous), "Anonymous");
    }

    #[test]
    fn token_cache_expiry_and_keys() {
        let cache = TokenCache::default();
        let a = Credentials::Anonymous;
        let b = Credentials::Basic {
            username: "u".into(),
            password: "p".into(),
        };
        cache.insert(
            "r",
            Some("s"),
            "repository:x:pull",
            &a,
            "t1".into(),
            Duration::from_secs(60),
        );
        assert_eq!(
            cache
                .get("r", Some("s"), "repository:x:pull", &a)
                .as_deref(),
            Some("t1")
        );
        assert_eq!(
            cache.get("r", Some("s"), "repository:x:pull", &b),
            None,
            "other creds"
        );
        assert_eq!(
            cache.get("r", Some("s"), "repository:y:pull", &a),
            None,
            "other scope"
        );
        assert_eq!(
            cache.get("r", None, "repository:x:pull", &a),
            None,
            "other service"
        );
        cache.invalidate("r", Some("s"), "repository:x:pull", &a);
        assert_eq!(cache.get("r", Some("s"), "repository:x:pull", &a), None);
        // 0 s lifetime: expired at once.
        cache.insert("r", None, "s", &a, "t2".into(), Duration::ZERO);
        assert_eq!(cache.get("r", None, "s", &a), None);
        assert!(!format!("{cache:?}").contains("t1"));
    }

    #[test]
    fn huge_expires_in_is_capped_not_a_panic() {
        // A token server answering `expires_in: u64::MAX` used to panic on `Instant + Duration`.
        let body = format!(r#"{{"token":"t","expires_in":{}}}"#, u64::MAX);
        let token = parse_token_response(body.as_bytes()).unwrap();
        assert_eq!(token.expires_in, Duration::from_secs(u64::MAX));
        let now = Instant::now();
        assert_eq!(
            token_deadline(now, token.expires_in),
            now + MAX_TOKEN_LIFETIME - TOKEN_MARGIN
        );
        let cache = TokenCache::default();
        let a = Credentials::Anonymous;
        cache.insert("r", None, "s", &a, token.token, token.expires_in);
        assert_eq!(cache.get("r", None, "s", &a).as_deref(), Some("t"));
        // Short lives keep at least half of themselves.
        assert_eq!(
            token_deadline(now, Duration::from_secs(4)),
            now + Duration::from_secs(2)
        );
    }

    #[test]
    fn token_responses() {
        let t = parse_token_response(br#"{"access_token":"a","token":""}"#).unwrap();
        assert_eq!(
            (t.token.as_str(), t.expires_in),
            ("a", DEFAULT_TOKEN_LIFETIME)
        );
        let t = parse_token_response(br#"{"token":"b","expires_in":300}"#).unwrap();
        assert_eq!((t.token.as_str(), t.expires_in.as_secs()), ("b", 300));
        assert_eq!(
            parse_token_response(br#"{"token":""}"#).err(),
            Some("without a token")
        );
        assert!(parse_token_response(br#"{"expires_in":-1,"token":"c"}"#).is_err());
        assert!(parse_token_response(b"<html>").is_err());
    }
}
