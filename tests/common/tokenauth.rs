//! Bearer-token auth for tests: an ES256 JWT [`Signer`] whose tokens carry a self-signed
//! certificate in `x5c`, and a [`TokenServer`] (a [`FakeServer`]) issuing them for one
//! username/password, to put in front of a distribution registry started with
//! `Registry::start_token_auth` (see [`TokenServer::start_registry`]).

use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::fakeserver::{FakeRequest, FakeResponse, FakeServer};
use super::registry::Registry;

/// The tokens' `aud`, and the registry's `service`.
pub const SERVICE: &str = "pullgate-test-registry";
/// The tokens' `iss`, and the registry's `issuer`.
pub const ISSUER: &str = "pullgate-test-issuer";
/// Lifetime (s) of an issued token, and the `expires_in` announced with it.
pub const TOKEN_LIFETIME: i64 = 300;

pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    cert_der: Vec<u8>,
    pub cert_pem: String,
}

impl Signer {
    pub fn new() -> Signer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate P-256 key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .expect("load P-256 key");
        let cert_key = rcgen::KeyPair::try_from(pkcs8.as_ref()).expect("rcgen key");
        let mut params =
            rcgen::CertificateParams::new(vec!["pullgate-test-token-signer".to_string()])
                .expect("cert params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pullgate test token signer");
        let cert = params.self_signed(&cert_key).expect("self-signed cert");
        Signer {
            key,
            rng,
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
        }
    }

    /// A token id no other token shares.
    fn jti(&self) -> u64 {
        let bytes: [u8; 8] = ring::rand::generate(&self.rng)
            .expect("the OS's random source")
            .expose();
        u64::from_le_bytes(bytes)
    }

    /// A registry JWT granting `actions` on each repository of `scopes`
    /// (`repository:<name>:<actions>`), expiring `exp_in` seconds from now (may be < 0).
    pub fn token(&self, subject: &str, scopes: &[String], exp_in: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|s| {
                let mut parts = s.splitn(3, ':');
                let (kind, rest) = (parts.next()?, parts.next()?);
                let actions = parts.next()?;
                // The name may contain ':' only with a port, never here.
                Some(serde_json::json!({
                    "type": kind,
                    "name": rest,
                    "actions": actions.split(',').collect::<Vec<_>>(),
                }))
            })
            .collect();
        let header = serde_json::json!({
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + exp_in,
            "nbf": now - 10,
            "iat": now - 10,
            "jti": format!("{now}-{}", self.jti()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

impl Default for Signer {
    fn default() -> Signer {
        Signer::new()
    }
}

/// Percent-decoding for query strings and forms (`+` is a space).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `a=1&b=2` → pairs, decoded.
pub fn pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A token server on 127.0.0.1 at `/token` for one user, answering as docker's and
/// distribution's token servers do:
///
/// - `GET /token?service=..&scope=..` with HTTP Basic for the user: a token (`"token"`) granting
///   the requested scopes; without `Authorization`: an anonymous token granting nothing (the
///   registry then still says 401); with any other `Authorization`: 401.
/// - `POST /token` (OAuth2 form, `"access_token"` in the answer): `grant_type=password` with the
///   user's username/password (containerd tries this first), or `grant_type=refresh_token` with
///   the refresh token given to [`TokenServer::start_with`] (none: always 401); wrong
///   credentials: 401; another grant type: 400.
/// - Any other path: 404; any other method: 405.
///
/// Every request is recorded ([`TokenServer::requests`]) and every issued token too
/// ([`TokenServer::issued`]). The `service` parameter must be [`SERVICE`] (the handler panics
/// otherwise, which drops the connection).
pub struct TokenServer {
    server: FakeServer,
    signer: Arc<Signer>,
    issued: Arc<Mutex<Vec<String>>>,
    next_exp: Arc<AtomicI64>,
}

impl TokenServer {
    /// Issues tokens for `username`/`password` (and anonymous ones); no refresh tokens.
    pub async fn start(username: &str, password: &str) -> TokenServer {
        TokenServer::start_with(username, password, None).await
    }

    /// Like [`TokenServer::start`], also accepting `refresh_token` in the OAuth2 refresh grant
    /// (tokens issued for it have the subject "refresh-user").
    pub async fn start_with(
        username: &str,
        password: &str,
        refresh_token: Option<&str>,
    ) -> TokenServer {
        let signer = Arc::new(Signer::new());
        let issued = Arc::new(Mutex::new(Vec::new()));
        let next_exp = Arc::new(AtomicI64::new(TOKEN_LIFETIME));
        let good_basic = format!(
            "Basic {}",
            STANDARD.encode(format!("{username}:{password}"))
        );
        let (user, pass) = (username.to_string(), password.to_string());
        let refresh = refresh_token.map(str::to_string);
        let handler = {
            let (signer, issued, next_exp) = (signer.clone(), issued.clone(), next_exp.clone());
            move |req: &FakeRequest| {
                let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
                if path != "/token" {
                    return Some(FakeResponse::new(404));
                }
                let exp = next_exp.swap(TOKEN_LIFETIME, Ordering::SeqCst);
                let issue = |field: &str, subject: &str, scopes: &[String]| {
                    let token = signer.token(subject, scopes, exp);
                    issued.lock().push(token.clone());
                    let mut body = serde_json::Map::new();
                    body.insert(field.to_string(), token.into());
                    body.insert("expires_in".to_string(), TOKEN_LIFETIME.into());
                    Some(
                        FakeResponse::new(200)
                            .header("Content-Type", "application/json")
                            .body(serde_json::Value::Object(body).to_string()),
                    )
                };
                match req.method.as_str() {
                    "GET" => {
                        let params = pairs(query);
                        let service = params.iter().find(|(k, _)| k == "service");
                        assert_eq!(service.map(|(_, v)| v.as_str()), Some(SERVICE));
                        let scopes: Vec<String> = params
                            .iter()
                            .filter(|(k, _)| k == "scope")
                            .map(|(_, v)| v.clone())
                            .collect();
                        match req.headers.get("authorization") {
                            None => issue("token", "", &[]),
                            Some(a) if *a == good_basic => issue("token", &user, &scopes),
                            Some(_) => Some(FakeResponse::new(401)),
                        }
                    }
                    "POST" => {
                        let form = pairs(&String::from_utf8_lossy(&req.body));
                        let get = |k: &str| {
                            form.iter()
                                .find(|(fk, _)| fk == k)
                                .map(|(_, v)| v.clone())
                                .unwrap_or_default()
                        };
                        assert_eq!(get("service"), SERVICE);
                        let scopes: Vec<String> =
                            get("scope").split(' ').map(str::to_string).collect();
                        match get("grant_type").as_str() {
                            "refresh_token" => {
                                if refresh.as_deref() != Some(get("refresh_token").as_str()) {
                                    return Some(FakeResponse::new(401));
                                }
                                issue("access_token", "refresh-user", &scopes)
                            }
                            "password" => {
                                if get("username") != user || get("password") != pass {
                                    return Some(FakeResponse::new(401));
                                }
                                issue("access_token", &user, &scopes)
                            }
                            _ => Some(FakeResponse::new(400)),
                        }
                    }
                    _ => Some(FakeResponse::new(405)),
                }
            }
        };
        TokenServer {
            server: FakeServer::start(Arc::new(handler)).await,
            signer,
            issued,
            next_exp,
        }
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> &str {
        &self.server.addr
    }

    /// "http://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The token endpoint, "http://127.0.0.1:PORT/token" (the registry's `realm`).
    pub fn realm(&self) -> String {
        format!("{}/token", self.server.url())
    }

    /// The PEM certificate the registry must trust (the signer's, self-signed).
    pub fn cert_pem(&self) -> &str {
        &self.signer.cert_pem
    }

    /// The signer, to make tokens directly.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<FakeRequest> {
        self.server.requests()
    }

    /// Every token issued so far, in order.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().clone()
    }

    /// The next token issued (by the next `/token` request, whatever its answer) expires
    /// `secs` seconds from now (may be < 0); later ones get the normal lifetime again.
    pub fn set_next_exp(&self, secs: i64) {
        self.next_exp.store(secs, Ordering::SeqCst);
    }

    /// A distribution registry serving the storage under `dir` that wants this server's tokens.
    pub async fn start_registry(&self, dir: &Path) -> Registry {
        Registry::start_token_auth(dir, &self.realm(), SERVICE, ISSUER, self.cert_pem()).await
    }
}
