//! Reading registry response bodies: a small one whole (bounded), a blob as a stream of exactly
//! the bytes asked for, both failing on a body that stalls, ends early or runs long.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use super::error::chain;
use super::RegistryError;

/// The first byte position of a `Content-Range: bytes a-b/n`.
pub(super) fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp
        .headers()
        .get(http::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (start, _) = rest.split_once('-')?;
    start.trim().parse().ok()
}

/// Reads a whole small body (at most `limit` bytes).
pub(super) async fn read_body(
    mut resp: reqwest::Response,
    limit: usize,
    idle: Duration,
    location: &str,
) -> Result<Bytes, RegistryError> {
    if resp.content_length().is_some_and(|l| l > limit as u64) {
        return Err(RegistryError::Protocol(format!(
            "{location}: larger than {limit} bytes"
        )));
    }
    let mut out = Vec::new();
    loop {
        let chunk = match tokio::time::timeout(idle, resp.chunk()).await {
            Err(_) => {
                return Err(RegistryError::Timeout(format!(
                    "{location}: no data for {idle:?}"
                )))
            }
            Ok(Err(e)) => {
                return Err(RegistryError::Transport(format!(
                    "{location}: {}",
                    chain(&e)
                )))
            }
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if out.len() + chunk.len() > limit {
            return Err(RegistryError::Protocol(format!(
                "{location}: larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

struct BodyState {
    resp: Option<reqwest::Response>,
    skip: u64,
    remaining: u64,
    want: u64,
    /// The body may run past `want` (a 200 to a ranged request): stop there.
    truncate: bool,
    idle: Duration,
    location: String,
}

/// The body as a stream of exactly `want` bytes after dropping `skip` bytes.
pub(super) fn body_stream(
    resp: reqwest::Response,
    skip: u64,
    want: u64,
    truncate: bool,
    idle: Duration,
    location: String,
) -> BoxStream<'static, Result<Bytes, RegistryError>> {
    let state = BodyState {
        resp: Some(resp),
        skip,
        remaining: want,
        want,
        truncate,
        idle,
        location,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            let resp = st.resp.as_mut()?;
            let next = tokio::time::timeout(st.idle, resp.chunk()).await;
            let mut chunk = match next {
                Err(_) => {
                    st.resp = None;
                    let e = RegistryError::Timeout(format!(
                        "{}: no data for {:?}",
                        st.location, st.idle
                    ));
                    return Some((Err(e), st));
                }
                Ok(Err(e)) => {
                    st.resp = None;
                    let e = RegistryError::Transport(format!("{}: {}", st.location, chain(&e)));
                    return Some((Err(e), st));
                }
                Ok(Ok(None)) => {
                    st.resp = None;
                    if st.remaining > 0 || st.skip > 0 {
                        let got = st.want - st.remaining;
                        let e = RegistryError::Protocol(format!(
                            "{}: body ended after {got} of {} bytes",
                            st.location, st.want
                        ));
                        return Some((Err(e), st));
                    }
                    return None;
                }
                Ok(Ok(Some(c))) => c,
            };
            if st.skip > 0 {
                let n = st.skip.min(chunk.len() as u64);
                chunk = chunk.slice(n as usize..);
                st.skip -= n;
            }
            if chunk.is_empty() {
                continue;
            }
            if chunk.len() as u64 > st.remaining {
                if !st.truncate {
                    st.resp = None;
                    let e = RegistryError::Protocol(format!(
                        "{}: body longer than the expected {} bytes",
                        st.location, st.want
                    ));
                    return Some((Err(e), st));
                }
                chunk = chunk.slice(..st.remaining as usize);
            }
            st.remaining -= chunk.len() as u64;
            if st.remaining == 0 && st.truncate {
                st.resp = None; // stop reading the rest of a whole-blob answer
            }
            return Some((Ok(chunk), st));
        }
    })
    .boxed()
}
