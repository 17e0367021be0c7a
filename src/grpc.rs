//! gRPC wire helpers for a proxy that keeps messages as bytes: framing, status responses, and
//! captured replies that can be replayed to several callers.
//!
//! A leaf: imports nothing of the crate.

use std::convert::Infallible;

use bytes::{Buf, Bytes};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use tonic::body::Body;
use tonic::Status;

/// kubelet's CRI message size limit; pullgate buffers intercepted requests up to this size.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The single message of a unary gRPC request body.
#[derive(Debug, PartialEq, Eq)]
pub enum UnaryMessage {
    /// An uncompressed message.
    Plain(Bytes),
    /// A compressed message: pullgate does not decode these and lets containerd decide.
    Compressed,
}

/// Splits a unary request body (`flag | u32 length | message`) into its message.
pub fn unary_message(mut body: Bytes) -> Result<UnaryMessage, Status> {
    if body.len() < 5 {
        return Err(Status::invalid_argument(
            "request body is not a gRPC message (shorter than the 5-byte frame header)",
        ));
    }
    let compressed = body.get_u8();
    let len = body.get_u32() as usize;
    if len != body.len() {
        return Err(Status::invalid_argument(format!(
            "gRPC frame announces {len} bytes but carries {}: a unary call takes exactly one message",
            body.len()
        )));
    }
    match compressed {
        0 => Ok(UnaryMessage::Plain(body)),
        1 => Ok(UnaryMessage::Compressed),
        f => Err(Status::invalid_argument(format!(
            "invalid gRPC compression flag {f}"
        ))),
    }
}

/// A trailers-only gRPC response carrying `status`.
pub fn status_response(status: Status) -> Response<Body> {
    let (parts, ()) = status.into_http::<()>().into_parts();
    Response::from_parts(parts, Body::empty())
}

/// The gRPC status of a response, from its trailers or (trailers-only) its headers.
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Status {
    trailers
        .and_then(Status::from_header_map)
        .or_else(|| Status::from_header_map(headers))
        .unwrap_or_else(|| Status::unknown("reply carried no grpc-status"))
}

/// A complete upstream reply held in memory, so one upstream call can answer many callers with
/// the very same bytes, headers and trailers.
#[derive(Debug, Clone)]
pub struct CapturedReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl CapturedReply {
    /// Reads a whole response. Only used for unary replies, which are small.
    pub async fn capture(resp: Response<Body>) -> Result<CapturedReply, Status> {
        let (parts, body) = resp.into_parts();
        let collected = body
            .collect()
            .await
            .map_err(|e| Status::unavailable(format!("containerd closed the reply early: {e}")))?;
        let trailers = collected.trailers().cloned();
        Ok(CapturedReply {
            status: parts.status,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        })
    }

    /// A reply made of a local status (no upstream call happened or it failed).
    pub fn from_status(status: Status) -> CapturedReply {
        let (parts, ()) = status.into_http::<()>().into_parts();
        CapturedReply {
            status: parts.status,
            headers: parts.headers,
            body: Bytes::new(),
            trailers: None,
        }
    }

    pub fn status(&self) -> Status {
        status_of(&self.headers, self.trailers.as_ref())
    }

    /// A fresh response with the captured bytes. A reply with neither message nor trailers is a
    /// trailers-only response (status in the headers): it must go out as one HEADERS frame with
    /// END_STREAM. A body that ends only after an empty DATA frame makes Go and Python clients
    /// report `Internal: server closed the stream without sending trailers` instead of the status.
    pub fn to_response(&self) -> Response<Body> {
        if self.body.is_empty() && self.trailers.is_none() {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = self.status;
            *resp.headers_mut() = self.headers.clone();
            return resp;
        }
        let mut frames = Vec::with_capacity(2);
        if !self.body.is_empty() {
            frames.push(http_body::Frame::data(self.body.clone()));
        }
        if let Some(t) = &self.trailers {
            frames.push(http_body::Frame::trailers(t.clone()));
        }
        let body = StreamBody::new(futures_util::stream::iter(
            frames.into_iter().map(Ok::<_, Infallible>),
        ));
        let mut resp = Response::new(Body::new(body));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tonic::Code;

    fn frame(flag: u8, msg: &[u8]) -> Bytes {
        let mut v = vec![flag];
        v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        v.extend_from_slice(msg);
        v.into()
    }

    #[test]
    fn splits_a_unary_frame() {
        assert_eq!(
            unary_message(frame(0, b"abc")).unwrap(),
            UnaryMessage::Plain(Bytes::from_static(b"abc"))
        );
        assert_eq!(
            unary_message(frame(0, b"")).unwrap(),
            UnaryMessage::Plain(Bytes::new())
        );
        assert_eq!(
            unary_message(frame(1, b"zz")).unwrap(),
            UnaryMessage::Compressed
        );
    }

    #[test]
    fn rejects_bad_frames() {
        for bad in [
            Bytes::from_static(b"\0\0\0"),
            Bytes::from_static(b"\0\0\0\0\x09abc"),
            frame(7, b"abc"),
            {
                let mut two = frame(0, b"a").to_vec();
                two.extend_from_slice(&frame(0, b"b"));
                two.into()
            },
        ] {
            assert_eq!(
                unary_message(bad).unwrap_err().code(),
                Code::InvalidArgument
            );
        }
    }

    #[test]
    fn a_status_only_reply_is_trailers_only() {
        use http_body::Body as _;
        let reply = CapturedReply::from_status(Status::not_found("no such image"));
        let resp = reply.to_response();
        assert!(resp.body().is_end_stream(), "HEADERS must carry END_STREAM");
        assert_eq!(resp.headers()["grpc-status"], "5");

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let ok = CapturedReply {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"\0\0\0\0\0"),
            trailers: Some(trailers),
        };
        assert!(!ok.to_response().body().is_end_stream());
    }

    #[test]
    fn reads_codes_and_messages() {
        let reply = CapturedReply::from_status(Status::not_found("no such image: a b%"));
        assert_eq!(reply.status().code(), Code::NotFound);
        assert_eq!(reply.status().message(), "no such image: a b%");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(
            status_of(&HeaderMap::new(), Some(&trailers)).code(),
            Code::Ok
        );
        assert_eq!(status_of(&HeaderMap::new(), None).code(), Code::Unknown);
    }
}
