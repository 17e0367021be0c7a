//! One client header block, decoded and encoded again with a valid `:authority`.
//!
//! The block is decoded with the client's HPACK state (the connection's one decoder, so the
//! client's dynamic table is followed exactly) and re-encoded with literal fields only: h2's own
//! decoder then never gets a table entry, and the client's and h2's tables cannot drift apart
//! whatever the client indexes, evicts or resizes. Order, duplicates and values of every other
//! field are kept as they are.

use loona_hpack::decoder::DecoderError;
use loona_hpack::encoder::encode_integer_into;
use loona_hpack::Decoder;

/// h2's `SETTINGS_HEADER_TABLE_SIZE` (the protocol default; tonic does not change it): the client
/// may not grow its table beyond it, and a decoder standing in for h2's must refuse the same.
const H2_HEADER_TABLE_SIZE: usize = 4096;

/// A decoded header list larger than this is not rewritten (hyper refuses anything over 16 KiB
/// anyway); bounds the work a block of tiny indexed references to big entries can cause.
const MAX_DECODED_SIZE: usize = 1 << 20;

/// What an unusable `:authority` becomes: what grpc-go itself sends on unix sockets nowadays.
const REPLACEMENT: &[u8] = b"localhost";

#[derive(Debug, thiserror::Error)]
pub(super) enum BlockError {
    #[error("HPACK: {0}")]
    Hpack(DecoderError),
    #[error("decoded header list exceeds {MAX_DECODED_SIZE} bytes")]
    TooLarge,
}

/// The HPACK state of one client connection.
pub(super) struct HeaderBlocks {
    decoder: Decoder<'static>,
}

/// A rewritten block and whether its `:authority` had to change.
pub(super) struct Rewritten {
    pub block: Vec<u8>,
    pub replaced: Option<Vec<u8>>,
}

impl HeaderBlocks {
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(H2_HEADER_TABLE_SIZE);
        HeaderBlocks { decoder }
    }

    /// Decodes `block` and encodes it again, every field as a literal, with an `:authority` that
    /// `http::uri::Authority` (and so h2) rejects replaced by `localhost`.
    pub fn rewrite(&mut self, block: &[u8]) -> Result<Rewritten, BlockError> {
        let mut out = Vec::with_capacity(block.len() + 64);
        let mut replaced = None;
        let mut decoded = 0usize;
        self.decoder
            .decode_with_cb(block, |name, value| {
                // RFC 7541 §4.1 entry size: what a peer's limits are measured in.
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                if decoded > MAX_DECODED_SIZE {
                    return;
                }
                let value: &[u8] = if &*name == b":authority"
                    && http::uri::Authority::try_from(&*value).is_err()
                {
                    replaced = Some(value.to_vec());
                    REPLACEMENT
                } else {
                    &value
                };
                encode_literal(&mut out, &name, value);
            })
            .map_err(BlockError::Hpack)?;
        if decoded > MAX_DECODED_SIZE {
            return Err(BlockError::TooLarge);
        }
        Ok(Rewritten {
            block: out,
            replaced,
        })
    }
}

/// RFC 7541 §6.2.2, literal header field without indexing, new name, no Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_string(out, name);
    encode_string(out, value);
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    // Writing into a Vec cannot fail.
    let _ = encode_integer_into(s.len(), 7, 0, out);
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    fn decode_fresh(block: &[u8]) -> Vec<(String, String)> {
        Decoder::new()
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn replaces_socket_paths_and_keeps_everything_else() {
        // The client's encoder indexes :authority, so the second block refers to it by index.
        let mut client = Encoder::new();
        let headers: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/runtime.v1.ImageService/ListImages"),
            (b":authority", b"%2Frun%2Fpullgate%2Fpullgate.sock"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"x-dup", b"1"),
            (b"x-dup", b"2"),
        ];
        let first = client.encode(headers.iter().copied());
        let second = client.encode(headers.iter().copied());
        assert!(
            second.len() < first.len(),
            "second block should use the dynamic table"
        );

        let mut blocks = HeaderBlocks::new();
        for block in [first, second] {
            let out = blocks.rewrite(&block).unwrap();
            assert_eq!(
                out.replaced.as_deref(),
                Some(&b"%2Frun%2Fpullgate%2Fpullgate.sock"[..])
            );
            let got = decode_fresh(&out.block);
            let want: Vec<(String, String)> = headers
                .iter()
                .map(|(n, v)| {
                    let v = if *n == b":authority" {
                        b"localhost"
                    } else {
                        *v
                    };
                    (
                        String::from_utf8(n.to_vec()).unwrap(),
                        String::from_utf8(v.to_vec()).unwrap(),
                    )
                })
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn valid_authorities_stay() {
        let mut blocks = HeaderBlocks::new();
        for authority in [&b"localhost"[..], b"127.0.0.1:1234", b"containerd.sock"] {
            let block = Encoder::new().encode([(&b":authority"[..], authority)]);
            let out = blocks.rewrite(&block).unwrap();
            assert!(out.replaced.is_none());
            assert_eq!(decode_fresh(&out.block)[0].1.as_bytes(), authority);
        }
        for bad in [&b""[..], b"/run/x.sock", b"%2Frun%2Fx.sock", b"a b"] {
            let block = Encoder::new().encode([(&b":authority"[..], bad)]);
            let out = HeaderBlocks::new().rewrite(&block).unwrap();
            assert_eq!(out.replaced.as_deref(), Some(bad));
            assert_eq!(decode_fresh(&out.block)[0].1, "localhost");
        }
    }

    #[test]
    fn huffman_coded_fields_are_decoded() {
        // RFC 7541 C.4.1: a request with Huffman-coded :authority www.example.com.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        let out = HeaderBlocks::new().rewrite(&block).unwrap();
        assert!(out.replaced.is_none());
        assert_eq!(
            decode_fresh(&out.block)[3],
            (":authority".into(), "www.example.com".into())
        );
    }

    #[test]
    fn garbage_and_oversized_tables_are_errors() {
        let mut blocks = HeaderBlocks::new();
        // Index 70 does not exist in an empty dynamic table.
        assert!(blocks.rewrite(&[0x80 | 70]).is_err());
        // A table size update above h2's limit (5-bit prefix, 8192).
        let mut update = Vec::new();
        encode_integer_into(8192, 5, 0x20, &mut update).unwrap();
        update.push(0x82);
        assert!(HeaderBlocks::new().rewrite(&update).is_err());
    }

    #[test]
    fn huge_decoded_lists_are_refused() {
        // One 4000-byte entry, then thousands of one-byte references to it.
        let mut client = Encoder::new();
        let big = vec![b'v'; 4000];
        let mut block = client.encode([(&b"x-big"[..], &big[..])]);
        let mut blocks = HeaderBlocks::new();
        blocks.rewrite(&block).unwrap();
        block = vec![0x80 | 62; 1000];
        assert!(matches!(blocks.rewrite(&block), Err(BlockError::TooLarge)));
    }
}
