//! The client-to-server byte stream of one HTTP/2 connection, frame by frame: the preface and
//! every frame but HEADERS and CONTINUATION pass through untouched; header blocks (a HEADERS frame
//! and its CONTINUATIONs, padding and priority fields taken apart) are rewritten by
//! [`HeaderBlocks`] and framed again.
//!
//! Anything this layer does not understand (no HTTP/2 preface, a CONTINUATION out of place, a
//! frame larger than h2 accepts, an HPACK error) is handed on as received and the connection
//! stays pass-through from there: h2 then sees the client's bytes and answers with the protocol
//! error it would have sent anyway.

use bytes::{BufMut, BytesMut};
use tracing::{debug, trace};

use super::block::HeaderBlocks;

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// `SETTINGS_MAX_FRAME_SIZE` as h2 serves it (the protocol minimum, which every peer accepts):
/// larger frames are h2's to refuse, and rewritten blocks are framed in pieces of this size.
const MAX_FRAME_SIZE: usize = 16_384;
/// A header block spread over more than this is not rewritten (h2 refuses it for its size).
const MAX_BLOCK_SIZE: usize = 1 << 20;

pub(super) struct Rewriter {
    state: State,
    hpack: HeaderBlocks,
    /// A header block whose END_HEADERS has not arrived yet.
    pending: Option<PendingBlock>,
}

enum State {
    /// How many preface bytes have been seen.
    Preface(usize),
    FrameHeader,
    /// Payload bytes of a pass-through frame still to come.
    Copy(usize),
    /// Everything from here on is handed on as it is.
    Passthrough,
}

struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The frames as received, for the fallback.
    raw: BytesMut,
}

struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> FrameHeader {
        FrameHeader {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream_id: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Rewriter {
            state: State::Preface(0),
            hpack: HeaderBlocks::new(),
            pending: None,
        }
    }

    /// Moves everything that can be decided on from `input` to `output`; what stays in `input`
    /// is an incomplete frame that needs more bytes.
    pub fn process(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        loop {
            match self.state {
                State::Passthrough => {
                    output.extend_from_slice(&input.split());
                    return;
                }
                State::Preface(seen) => {
                    let n = input.len().min(PREFACE.len() - seen);
                    if input[..n] != PREFACE[seen..seen + n] {
                        debug!(
                            "connection does not start with the HTTP/2 preface: passed on as is"
                        );
                        self.state = State::Passthrough;
                        continue;
                    }
                    output.extend_from_slice(&input.split_to(n));
                    if seen + n < PREFACE.len() {
                        self.state = State::Preface(seen + n);
                        return;
                    }
                    self.state = State::FrameHeader;
                }
                State::Copy(left) => {
                    let n = input.len().min(left);
                    output.extend_from_slice(&input.split_to(n));
                    if n < left {
                        self.state = State::Copy(left - n);
                        return;
                    }
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    if input.len() < FRAME_HEADER_LEN {
                        return;
                    }
                    let header = FrameHeader::parse(&input[..FRAME_HEADER_LEN]);
                    let is_block = match self.pending {
                        Some(_) => header.kind == CONTINUATION,
                        None => header.kind == HEADERS,
                    };
                    if !is_block {
                        if self.pending.is_some() {
                            // RFC 9113 §6.10: nothing may come between a block's frames.
                            self.fall_back(BytesMut::new(), output);
                            continue;
                        }
                        output.extend_from_slice(&input.split_to(FRAME_HEADER_LEN));
                        self.state = State::Copy(header.len);
                        continue;
                    }
                    if header.len > MAX_FRAME_SIZE {
                        self.fall_back(BytesMut::new(), output);
                        continue;
                    }
                    if input.len() < FRAME_HEADER_LEN + header.len {
                        return;
                    }
                    let frame = input.split_to(FRAME_HEADER_LEN + header.len);
                    self.block_frame(header, frame, output);
                }
            }
        }
    }

    /// The client closed its side: whatever is left goes to h2 as it is.
    pub fn finish(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        if let Some(block) = self.pending.take() {
            output.extend_from_slice(&block.raw);
        }
        output.extend_from_slice(&input.split());
        self.state = State::Passthrough;
    }

    fn block_frame(&mut self, header: FrameHeader, frame: BytesMut, output: &mut BytesMut) {
        let payload = &frame[FRAME_HEADER_LEN..];
        if header.kind == HEADERS {
            let Some((priority, fragment)) = split_headers_payload(header.flags, payload) else {
                self.fall_back(frame, output);
                return;
            };
            self.pending = Some(PendingBlock {
                stream_id: header.stream_id,
                end_stream: header.flags & END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
                raw: BytesMut::new(),
            });
        } else {
            let fits = self.pending.as_ref().is_some_and(|b| {
                b.stream_id == header.stream_id
                    && b.fragment.len() + payload.len() <= MAX_BLOCK_SIZE
            });
            if !fits {
                self.fall_back(frame, output);
                return;
            }
        }
        let Some(block) = self.pending.as_mut() else {
            return;
        };
        if header.kind == CONTINUATION {
            block.fragment.extend_from_slice(payload);
        }
        block.raw.extend_from_slice(&frame);
        if header.flags & END_HEADERS != 0 {
            self.finish_block(output);
        }
    }

    fn finish_block(&mut self, output: &mut BytesMut) {
        let Some(block) = self.pending.take() else {
            return;
        };
        match self.hpack.rewrite(&block.fragment) {
            Ok(rewritten) => {
                if let Some(original) = &rewritten.replaced {
                    trace!(
                        stream = block.stream_id,
                        authority = %String::from_utf8_lossy(original),
                        "invalid :authority replaced"
                    );
                }
                write_block(&block, &rewritten.block, output);
            }
            Err(e) => {
                debug!(error = %e, stream = block.stream_id, "header block not rewritten: passed on as is");
                self.pending = Some(block);
                self.fall_back(BytesMut::new(), output);
            }
        }
    }

    /// Hands on the pending block's frames and `frame` as received; pass-through from here on.
    fn fall_back(&mut self, frame: BytesMut, output: &mut BytesMut) {
        if let Some(block) = self.pending.take() {
            output.extend_from_slice(&block.raw);
        }
        output.extend_from_slice(&frame);
        self.state = State::Passthrough;
    }
}

/// The priority fields and header block fragment of a HEADERS payload, padding removed; `None`
/// when the lengths do not add up (h2 answers that with PROTOCOL_ERROR).
fn split_headers_payload(flags: u8, mut payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(*payload.first()?);
        payload = &payload[1..];
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        priority = Some(<[u8; 5]>::try_from(payload.get(..5)?).ok()?);
        payload = &payload[5..];
    }
    let end = payload.len().checked_sub(pad)?;
    Some((priority, &payload[..end]))
}

/// Frames a rewritten block: HEADERS (with the client's END_STREAM and priority, no padding),
/// then CONTINUATIONs, each at most `MAX_FRAME_SIZE`, END_HEADERS on the last.
fn write_block(block: &PendingBlock, fragment: &[u8], output: &mut BytesMut) {
    let first_room = MAX_FRAME_SIZE - if block.priority.is_some() { 5 } else { 0 };
    let (first, mut rest) = fragment.split_at(fragment.len().min(first_room));
    let mut flags = if block.end_stream { END_STREAM } else { 0 };
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    let priority = block.priority.as_ref().map_or(&[][..], |p| &p[..]);
    put_frame(output, HEADERS, flags, block.stream_id, &[priority, first]);
    while !rest.is_empty() {
        let (piece, tail) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        rest = tail;
        let flags = if rest.is_empty() { END_HEADERS } else { 0 };
        put_frame(output, CONTINUATION, flags, block.stream_id, &[piece]);
    }
}

fn put_frame(output: &mut BytesMut, kind: u8, flags: u8, stream_id: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    output.reserve(FRAME_HEADER_LEN + len);
    // len ≤ MAX_FRAME_SIZE, so it fits the 24-bit length field.
    output.put_uint(len as u64, 3);
    output.put_u8(kind);
    output.put_u8(flags);
    output.put_u32(stream_id);
    for p in parts {
        output.put_slice(p);
    }
}

/// Splits a byte stream into frames (after the preface), for tests.
#[cfg(test)]
pub(super) fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    use bytes::Buf;
    assert!(bytes.starts_with(PREFACE));
    bytes.advance(PREFACE.len());
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let h = FrameHeader::parse(&bytes[..FRAME_HEADER_LEN]);
        let payload = bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + h.len].to_vec();
        frames.push((h.kind, h.flags, h.stream_id, payload));
        bytes.advance(FRAME_HEADER_LEN + h.len);
    }
    frames
}

/// What h2 gets for a client's whole stream arriving `piece` bytes at a time (for tests and the
/// fuzz target: how the bytes are split must never change the result).
pub(crate) fn rewrite_in_pieces(stream: &[u8], piece: usize) -> Vec<u8> {
    let mut rw = Rewriter::new();
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    for chunk in stream.chunks(piece.max(1)) {
        input.extend_from_slice(chunk);
        rw.process(&mut input, &mut output);
    }
    rw.finish(&mut input, &mut output);
    output.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::{Decoder, Encoder};

    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame(&mut out, kind, flags, stream, &[payload]);
        out.to_vec()
    }

    fn request_block(enc: &mut Encoder, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/runtime.v1.ImageService/ImageFsInfo"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"x-long", &[b'z'; 40_000][..]),
        ])
    }

    /// The client's stream: preface, SETTINGS, a request split into a padded, prioritised HEADERS
    /// and two CONTINUATIONs, its DATA, and a second request that reuses the indexed authority.
    fn client_stream() -> Vec<u8> {
        let mut enc = Encoder::new();
        let mut s = PREFACE.to_vec();
        s.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        let block = request_block(&mut enc, b"/run/pullgate/pullgate.sock");
        let (a, rest) = block.split_at(100);
        let mut headers = vec![3u8]; // pad length
        headers.extend([0x80, 0, 0, 1, 200]); // exclusive dependency on stream 1, weight 200
        headers.extend(a);
        headers.extend([0, 0, 0]);
        s.extend(frame(HEADERS, PADDED | PRIORITY, 3, &headers));
        let pieces: Vec<&[u8]> = rest.chunks(MAX_FRAME_SIZE).collect();
        assert!(pieces.len() >= 2);
        for (i, piece) in pieces.iter().enumerate() {
            let flags = if i + 1 == pieces.len() {
                END_HEADERS
            } else {
                0
            };
            s.extend(frame(CONTINUATION, flags, 3, piece));
        }
        s.extend(frame(DATA, END_STREAM, 3, b"\0\0\0\0\0"));
        let again = request_block(&mut enc, b"/run/pullgate/pullgate.sock");
        let block = PendingBlock {
            stream_id: 5,
            end_stream: true,
            priority: None,
            fragment: Vec::new(),
            raw: BytesMut::new(),
        };
        let mut framed = BytesMut::new();
        write_block(&block, &again, &mut framed);
        s.extend(framed);
        s
    }

    /// Reassembles the blocks of `frames` and decodes them with one decoder, as h2 would.
    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    fn requests(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<(u32, Headers)> {
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        let mut block = Vec::new();
        for (kind, flags, stream, payload) in frames {
            match *kind {
                HEADERS => {
                    let (_, frag) = split_headers_payload(*flags, payload).unwrap();
                    block = frag.to_vec();
                }
                CONTINUATION => block.extend_from_slice(payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                out.push((*stream, dec.decode(&block).unwrap()));
            }
        }
        out
    }

    #[test]
    fn rewrites_authority_across_continuations_padding_and_the_dynamic_table() {
        let input = client_stream();
        let want_in = requests(&parse_frames(&input));
        for piece in [1, 7, 4096, input.len()] {
            let out = rewrite_in_pieces(&input, piece);
            let frames = parse_frames(&out);
            let got = requests(&frames);
            assert_eq!(got.len(), 2);
            for ((stream, headers), (want_stream, want_headers)) in got.iter().zip(&want_in) {
                assert_eq!(stream, want_stream);
                assert_eq!(headers.len(), want_headers.len());
                for ((n, v), (wn, wv)) in headers.iter().zip(want_headers) {
                    assert_eq!(n, wn);
                    if n == b":authority" {
                        assert_eq!(v, b"localhost", "piece {piece} stream {stream}");
                    } else {
                        assert_eq!(v, wv);
                    }
                }
            }
            // Frame sizes within h2's limit; the priority and END_STREAM flags survive; the
            // SETTINGS and DATA frames are untouched.
            assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME_SIZE));
            let first = frames.iter().find(|f| f.0 == HEADERS).unwrap();
            assert_eq!(first.1 & (PRIORITY | PADDED), PRIORITY);
            assert_eq!(&first.3[..5], &[0x80, 0, 0, 1, 200]);
            assert!(frames.contains(&(SETTINGS, 0, 0, vec![0, 4, 0, 0, 0xff, 0xff])));
            assert!(frames.contains(&(DATA, END_STREAM, 3, b"\0\0\0\0\0".to_vec())));
            let second = frames.iter().find(|f| f.0 == HEADERS && f.2 == 5).unwrap();
            assert_eq!(second.1 & (END_STREAM | END_HEADERS), END_STREAM);
            assert_eq!(frames.last().unwrap().1, END_HEADERS);
        }
    }

    /// The bytes grpc-go (crictl's bare path, and the percent-encoded path) and grpcio
    /// (`unix:` and `unix://`) wrote on a unix socket, recorded for the fuzz corpus.
    const RECORDED: [(&str, &[u8]); 4] = [
        (
            "go-plain",
            include_bytes!("../../../tests/fuzz/seeds/h2/go-plain.bin"),
        ),
        (
            "go-escaped",
            include_bytes!("../../../tests/fuzz/seeds/h2/go-escaped.bin"),
        ),
        ("py", include_bytes!("../../../tests/fuzz/seeds/h2/py.bin")),
        (
            "py-uri",
            include_bytes!("../../../tests/fuzz/seeds/h2/py-uri.bin"),
        ),
    ];

    #[test]
    fn real_clients_streams_keep_every_header_but_a_bad_authority() {
        let mut replaced = Vec::new();
        for (name, input) in RECORDED {
            let want = requests(&parse_frames(input));
            assert!(!want.is_empty(), "{name}: no request recorded");
            for piece in [1, 13, input.len()] {
                let got = requests(&parse_frames(&rewrite_in_pieces(input, piece)));
                assert_eq!(got.len(), want.len(), "{name}");
                for ((stream, headers), (want_stream, want_headers)) in got.iter().zip(&want) {
                    assert_eq!(stream, want_stream, "{name}");
                    assert_eq!(headers.len(), want_headers.len(), "{name}");
                    for ((n, v), (wn, wv)) in headers.iter().zip(want_headers) {
                        assert_eq!(n, wn, "{name}");
                        let bad =
                            n == b":authority" && http::uri::Authority::try_from(&wv[..]).is_err();
                        if bad {
                            assert_eq!(v, b"localhost", "{name}");
                            replaced.push(name);
                        } else {
                            assert_eq!(v, wv, "{name}");
                        }
                    }
                }
            }
        }
        // The Go clients are the ones h2 would reset.
        assert!(replaced.contains(&"go-plain") && replaced.contains(&"go-escaped"));
    }

    #[test]
    fn what_it_does_not_understand_passes_unchanged() {
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(rewrite_in_pieces(&http1, 3), http1);

        // A DATA frame between a HEADERS and its CONTINUATION.
        let mut s = PREFACE.to_vec();
        let block = Encoder::new().encode([(&b":authority"[..], &b"/x.sock"[..])]);
        s.extend(frame(HEADERS, 0, 1, &block));
        s.extend(frame(DATA, 0, 1, b"abc"));
        s.extend(frame(CONTINUATION, END_HEADERS, 1, b""));
        assert_eq!(rewrite_in_pieces(&s, 5), s);

        // An HPACK error, then further frames.
        let mut s = PREFACE.to_vec();
        s.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ));
        s.extend(frame(DATA, 0, 1, b"abc"));
        assert_eq!(rewrite_in_pieces(&s, 4), s);

        // Padding longer than the payload.
        let mut s = PREFACE.to_vec();
        s.extend(frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]));
        assert_eq!(rewrite_in_pieces(&s, 64), s);

        // A connection cut inside a header block.
        let mut s = PREFACE.to_vec();
        s.extend(frame(HEADERS, 0, 1, &[0x82]));
        s.extend(&frame(CONTINUATION, END_HEADERS, 1, &[0x86])[..5]);
        assert_eq!(rewrite_in_pieces(&s, 2), s);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let base = client_stream();
        for round in 0..2000 {
            let mut bytes = base.clone();
            // Flip a few bytes after the preface.
            for _ in 0..(round % 8) + 1 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = PREFACE.len() + (seed as usize) % (bytes.len() - PREFACE.len());
                bytes[at] = (seed >> 32) as u8;
            }
            let _ = rewrite_in_pieces(&bytes, 1 + (seed as usize % 300));
        }
    }
}
