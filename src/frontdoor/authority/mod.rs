//! Accepting every `:authority` gRPC clients send on a unix socket.
//!
//! Clients put all sorts of things in `:authority` on unix sockets: grpc-go (crictl, critest,
//! older kubelets) and grpcio send the socket path percent-encoded, grpc-java sends it raw, some
//! send it empty. containerd, a Go server, ignores it. The h2 crate parses it as a URI authority
//! and resets the stream with PROTOCOL_ERROR before tonic or pullgate see the request
//! (hyperium/h2 PR #487 is still open), and has no switch to turn that off.
//!
//! So the fix sits below h2: every accepted connection is wrapped in [`AnyAuthority`], which reads
//! the client's bytes first and rewrites its header blocks before h2 parses them, replacing an
//! `:authority` that h2 would refuse with `localhost`. Rewriting a header block safely means
//! decoding it with the client's HPACK state and encoding it again without touching h2's dynamic
//! table (see [`block`]); everything else on the connection, and everything pullgate sends
//! back, passes through as it is. Nothing in pullgate reads the authority, and the upstream
//! channel to containerd sets its own.

mod block;
mod frames;

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use frames::Rewriter;
pub(crate) use frames::{rewrite_in_pieces, PREFACE};

/// How much is read from the client at a time.
const READ_CHUNK: usize = 16 * 1024;

/// A server-side connection whose client header blocks get a valid `:authority`.
pub struct AnyAuthority<T> {
    io: T,
    rewriter: Rewriter,
    /// Read from the client, not yet decided on (an incomplete frame).
    raw: BytesMut,
    /// Ready for h2.
    ready: BytesMut,
    eof: bool,
}

impl<T> AnyAuthority<T> {
    pub fn new(io: T) -> Self {
        AnyAuthority {
            io,
            rewriter: Rewriter::new(),
            raw: BytesMut::new(),
            ready: BytesMut::new(),
            eof: false,
        }
    }
}

/// The connections of `listener`, each wrapped in [`AnyAuthority`].
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = io::Result<AnyAuthority<UnixStream>>> {
    UnixListenerStream::new(listener).map(|conn| conn.map(AnyAuthority::new))
}

impl<T: AsyncRead + Unpin> AsyncRead for AnyAuthority<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() || buf.remaining() == 0 {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.raw.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.raw
            ))?;
            if n == 0 {
                this.eof = true;
                this.rewriter.finish(&mut this.raw, &mut this.ready);
            } else {
                this.rewriter.process(&mut this.raw, &mut this.ready);
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AnyAuthority<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// A real h2 server behind the wrapper accepts the requests grpc-go, grpcio and grpc-java
    /// send on unix sockets; without the wrapper it resets each of them.
    #[tokio::test]
    async fn h2_accepts_socket_path_authorities() {
        for wrapped in [true, false] {
            let (client, server) = tokio::io::duplex(1 << 20);
            let server_task = tokio::spawn(async move {
                let mut authorities = Vec::new();
                let serve = |io| async move {
                    let mut conn = h2::server::handshake(io).await.unwrap();
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        authorities.push(req.uri().authority().map(|a| a.to_string()));
                        let resp = http::Response::new(());
                        respond.send_response(resp, true).unwrap();
                    }
                    authorities
                };
                if wrapped {
                    serve(Box::new(AnyAuthority::new(server)) as Box<dyn Io>).await
                } else {
                    serve(Box::new(server) as Box<dyn Io>).await
                }
            });
            let (mut rd, mut wr) = tokio::io::split(client);
            let mut enc = Encoder::new();
            let mut bytes = PREFACE.to_vec();
            bytes.extend(frame(0x4, 0, 0, &[]));
            for (i, authority) in [
                &b"%2Frun%2Fpullgate%2Fpullgate.sock"[..],
                b"/run/pullgate/pullgate.sock",
                b"",
                b"localhost",
            ]
            .iter()
            .enumerate()
            {
                let block = enc.encode([
                    (&b":method"[..], &b"POST"[..]),
                    (b":scheme", b"http"),
                    (b":path", b"/runtime.v1.ImageService/ImageFsInfo"),
                    (b":authority", authority),
                    (b"content-type", b"application/grpc"),
                ]);
                bytes.extend(frame(0x1, 0x4 | 0x1, 1 + 2 * i as u32, &block));
            }
            wr.write_all(&bytes).await.unwrap();
            // Read the server's frames for a while, then hang up.
            let mut reply = vec![0u8; 1 << 16];
            let mut got = Vec::new();
            while let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_millis(300), rd.read(&mut reply))
                    .await
            {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&reply[..n]);
            }
            drop(wr);
            drop(rd);
            let authorities = server_task.await.unwrap();
            if wrapped {
                assert_eq!(
                    authorities,
                    [
                        Some("localhost".to_string()),
                        Some("localhost".to_string()),
                        Some("localhost".to_string()),
                        Some("localhost".to_string())
                    ]
                );
            } else {
                // Only the valid one reaches the server.
                assert_eq!(authorities, [Some("localhost".to_string())]);
            }
        }
    }

    trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
    impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
}
