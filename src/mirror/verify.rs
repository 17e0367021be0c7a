//! What the mirror serves under a digest hashes to that digest: every byte of a blob response
//! is hashed in order as it goes to containerd, and the last byte is sent only when the hash
//! matches. A mismatch cuts the body one byte short, so no client ever receives a complete blob
//! that is not what its digest says.
//!
//! containerd resumes an ingest with `Range: bytes=N-`: the hash of bytes `0..N` then comes from
//! a checkpoint (the hasher state, cloned every [`CHECKPOINT_EVERY`] bytes served) at or below
//! `N`, and only `checkpoint..N` is read upstream again, hash-only; a stream that stops leaves
//! finer ones ([`RECENT_EVERY`]) over its last [`RECENT_SPAN`] bytes, where containerd resumes.
//! Checkpoints are bounded: [`BLOBS`] blobs (least recently used out), [`PER_BLOB`] per blob
//! (every other of the older half dropped when full), under 1 MiB in all.

use parking_lot::Mutex;
use std::collections::VecDeque;

use bytes::Bytes;
use sha2::{Digest, Sha256, Sha512};

use crate::registry::digest::hex;

/// How often (in bytes hashed) a checkpoint is taken.
pub const CHECKPOINT_EVERY: u64 = 4 << 20;
/// Finer checkpoints of the last [`RECENT_SPAN`] bytes a stream hashed, stored when it stops:
/// containerd resumes where its writes stopped, at most the bytes in flight behind that.
pub const RECENT_EVERY: u64 = 64 << 10;
pub const RECENT_SPAN: u64 = 8 << 20;
/// Blobs whose checkpoints are kept.
pub const BLOBS: usize = 32;
/// Checkpoints kept per blob (the older half thinned when full).
pub const PER_BLOB: usize = 192;

/// A running hash, cheap to clone (a few hundred bytes of state).
#[derive(Clone)]
pub enum State {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl State {
    fn update(&mut self, data: &[u8]) {
        match self {
            State::Sha256(h) => h.update(data),
            State::Sha512(h) => h.update(data),
        }
    }

    fn finish(self) -> String {
        match self {
            State::Sha256(h) => format!("sha256:{}", hex(&h.finalize())),
            State::Sha512(h) => format!("sha512:{}", hex(&h.finalize())),
        }
    }
}

/// The empty hash state for digest `name` (`sha256:<64 hex>` or `sha512:<128 hex>`), or
/// `None` for an algorithm or form the mirror cannot check (it then refuses to serve it).
pub fn fresh(name: &str) -> Option<State> {
    let (algo, hex) = name.split_once(':')?;
    let ok = |len| {
        hex.len() == len
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match algo {
        "sha256" if ok(64) => Some(State::Sha256(Sha256::new())),
        "sha512" if ok(128) => Some(State::Sha512(Sha512::new())),
        _ => None,
    }
}

/// Hashes one response's bytes in blob order.
pub struct Verifier {
    digest: String,
    /// `None`: the response does not reach the blob's end, and cannot be checked.
    state: Option<State>,
    /// The blob offset of the next byte fed.
    pos: u64,
    size: u64,
    /// Bytes before this offset are hashed only (containerd already has them).
    deliver_from: u64,
    last_checkpoint: u64,
    /// States of the last [`RECENT_SPAN`] bytes, every [`RECENT_EVERY`].
    recent: VecDeque<(u64, State)>,
}

/// What to do with a chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum Fed {
    /// Send these bytes (the chunk without its hash-only prefix, possibly empty).
    Send(Bytes),
    /// The blob does not hash to its digest: send these bytes (all but the blob's last byte),
    /// then fail the body.
    Mismatch { send: Bytes, actual: String },
}

impl Verifier {
    /// A response for bytes `deliver_from..end` of blob `digest` of `size` bytes, whose hash
    /// of bytes `0..pos` is `state` (`pos <= deliver_from`). A response that ends before `size`
    /// is not checked (`state` is dropped).
    pub fn new(
        digest: &str,
        size: u64,
        state: State,
        pos: u64,
        deliver_from: u64,
        end: u64,
    ) -> Verifier {
        Verifier {
            digest: digest.to_string(),
            state: (end == size).then_some(state),
            pos,
            size,
            deliver_from,
            last_checkpoint: pos,
            recent: VecDeque::new(),
        }
    }

    /// The stream stops short of the blob's end: its recent states become checkpoints.
    pub fn stopped(&mut self, checkpoints: &Checkpoints) {
        if self.state.is_some() {
            for (at, state) in self.recent.drain(..) {
                checkpoints.put(&self.digest, at, state);
            }
        }
    }

    /// Gives up checking this response.
    pub fn unchecked(mut self) -> Verifier {
        self.state = None;
        self
    }

    /// Whether this response is checked.
    pub fn checks(&self) -> bool {
        self.state.is_some()
    }

    /// Hashes the next chunk (blob bytes `pos..pos + chunk.len()`), recording checkpoints.
    pub fn feed(&mut self, mut chunk: Bytes, checkpoints: &Checkpoints) -> Fed {
        let start = self.pos;
        self.pos += chunk.len() as u64;
        let Some(state) = self.state.as_mut() else {
            return Fed::Send(chunk);
        };
        state.update(&chunk);
        if start < self.deliver_from {
            let skip = (self.deliver_from - start).min(chunk.len() as u64) as usize;
            let _ = chunk.split_to(skip);
        }
        if self.pos >= self.size {
            let actual = state.clone().finish();
            if actual == self.digest {
                self.state = None;
                checkpoints.verified(&self.digest);
                return Fed::Send(chunk);
            }
            checkpoints.mismatched(&self.digest);
            self.state = None;
            let keep = chunk.len().saturating_sub(1);
            chunk.truncate(keep);
            return Fed::Mismatch {
                send: chunk,
                actual,
            };
        }
        if self.pos - self.last_checkpoint >= CHECKPOINT_EVERY {
            self.last_checkpoint = self.pos;
            checkpoints.put(&self.digest, self.pos, state.clone());
        }
        let last = self.recent.back().map_or(0, |(at, _)| *at);
        if self.recent.is_empty() || self.pos - last >= RECENT_EVERY {
            self.recent.push_back((self.pos, state.clone()));
            while self
                .recent
                .front()
                .is_some_and(|(at, _)| *at + RECENT_SPAN < self.pos)
            {
                self.recent.pop_front();
            }
        }
        Fed::Send(chunk)
    }
}

/// A blob's digest and its hash states by offset, sorted.
type BlobCheckpoints = (String, Vec<(u64, State)>);

/// Hash states of partly served blobs, for containerd's resumed requests.
#[derive(Default)]
pub struct Checkpoints {
    /// Least recently used first; each blob's checkpoints sorted by offset.
    blobs: Mutex<VecDeque<BlobCheckpoints>>,
    /// Digests whose last checked response did not match (at most [`BLOBS`], oldest out).
    /// containerd 1.6 to 2.1 resume a cut body at once within the same pull, corrupt prefix
    /// included: such a resume is always re-read and checked, never served unchecked.
    failed: Mutex<VecDeque<String>>,
}

impl Checkpoints {
    /// The latest checkpoint of `digest` at or below offset `n` (`(0, fresh)` if none).
    pub fn at_or_below(&self, digest: &str, n: u64, fresh: State) -> (u64, State) {
        let blobs = self.blobs.lock();
        blobs
            .iter()
            .find(|(d, _)| d == digest)
            .and_then(|(_, cps)| cps.iter().rev().find(|(at, _)| *at <= n).cloned())
            .unwrap_or((0, fresh))
    }

    pub fn put(&self, digest: &str, at: u64, state: State) {
        let mut blobs = self.blobs.lock();
        let mut entry = match blobs.iter().position(|(d, _)| d == digest) {
            Some(i) => blobs.remove(i).expect("found"),
            None => (digest.to_string(), Vec::new()),
        };
        let cps = &mut entry.1;
        // Another stream of the same blob may be behind or ahead: keep the list sorted.
        match cps.binary_search_by_key(&at, |(a, _)| *a) {
            Ok(_) => {}
            Err(i) => cps.insert(i, (at, state)),
        }
        if cps.len() > PER_BLOB {
            // Every other one of the older half goes: the spacing grows away from the end.
            let (half, mut i) = (cps.len() / 2, 0);
            cps.retain(|_| {
                i += 1;
                i > half || i % 2 == 0
            });
        }
        blobs.push_back(entry);
        while blobs.len() > BLOBS {
            blobs.pop_front();
        }
    }

    /// Drops `digest`'s checkpoints (they hash bytes that turned out wrong) and remembers that
    /// its upstream served bytes that do not match it.
    pub fn mismatched(&self, digest: &str) {
        self.blobs.lock().retain(|(d, _)| d != digest);
        let mut failed = self.failed.lock();
        failed.retain(|d| d != digest);
        failed.push_back(digest.to_string());
        while failed.len() > BLOBS {
            failed.pop_front();
        }
    }

    /// A response of `digest` was served whole and matched: an earlier mismatch is history
    /// (its checkpoints stay, for other streams of the blob still open).
    pub fn verified(&self, digest: &str) {
        self.failed.lock().retain(|d| d != digest);
    }

    /// Whether the last checked response of `digest` did not match.
    pub fn has_mismatched(&self, digest: &str) -> bool {
        self.failed.lock().iter().any(|d| d == digest)
    }

    #[cfg(test)]
    fn count(&self, digest: &str) -> usize {
        let blobs = self.blobs.lock();
        blobs
            .iter()
            .find(|(d, _)| d == digest)
            .map_or(0, |(_, c)| c.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::digest::sha256_digest;

    fn blob(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Feeds `data[from..]` in `chunk`-sized pieces; returns what was sent and the mismatch.
    fn run(
        v: &mut Verifier,
        data: &[u8],
        from: usize,
        chunk: usize,
        cps: &Checkpoints,
    ) -> (Vec<u8>, Option<String>) {
        let mut sent = Vec::new();
        for piece in data[from..].chunks(chunk) {
            match v.feed(Bytes::copy_from_slice(piece), cps) {
                Fed::Send(b) => sent.extend_from_slice(&b),
                Fed::Mismatch { send, actual } => {
                    sent.extend_from_slice(&send);
                    return (sent, Some(actual));
                }
            }
        }
        (sent, None)
    }

    #[test]
    fn only_checkable_digests_are_accepted() {
        let d = sha256_digest(b"x");
        assert!(fresh(&d).is_some());
        assert!(fresh(&format!("sha512:{}", "a".repeat(128))).is_some());
        assert!(fresh(&format!("sha384:{}", "a".repeat(96))).is_none());
        assert!(fresh("sha256:abc").is_none());
        assert!(fresh(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(fresh("blake3:00").is_none());
        assert!(fresh("").is_none());
    }

    #[test]
    fn a_good_blob_passes_whole_and_a_bad_one_is_one_byte_short() {
        let data = blob(10_000);
        let d = sha256_digest(&data);
        let cps = Checkpoints::default();
        let mut v = Verifier::new(&d, 10_000, fresh(&d).unwrap(), 0, 0, 10_000);
        assert_eq!(run(&mut v, &data, 0, 333, &cps), (data.clone(), None));

        let mut bad = data.clone();
        bad[5000] ^= 1;
        let mut v = Verifier::new(&d, 10_000, fresh(&d).unwrap(), 0, 0, 10_000);
        let (sent, mismatch) = run(&mut v, &bad, 0, 333, &cps);
        assert_eq!(sent, bad[..9_999]);
        assert_eq!(mismatch, Some(sha256_digest(&bad)));
        // One chunk of one byte at the end: nothing of it goes.
        let mut v = Verifier::new(&d, 10_000, fresh(&d).unwrap(), 0, 0, 10_000);
        let (sent, _) = run(&mut v, &bad, 0, 1, &cps);
        assert_eq!(sent.len(), 9_999);
    }

    #[test]
    fn sha512_is_checked_too() {
        use sha2::Digest as _;
        let data = blob(1000);
        let d = format!("sha512:{}", hex(&Sha512::digest(&data)));
        let cps = Checkpoints::default();
        let mut v = Verifier::new(&d, 1000, fresh(&d).unwrap(), 0, 0, 1000);
        assert_eq!(run(&mut v, &data, 0, 100, &cps).1, None);
        let mut v = Verifier::new(&d, 1000, fresh(&d).unwrap(), 0, 0, 1000);
        assert!(run(&mut v, &blob(1001)[1..], 0, 100, &cps).1.is_some());
    }

    #[test]
    fn a_resumed_range_hashes_from_the_checkpoint_and_sends_from_its_start() {
        let size = (3 * CHECKPOINT_EVERY + 12_345) as usize;
        let data = blob(size);
        let d = sha256_digest(&data);
        let cps = Checkpoints::default();
        // A first response cut (containerd went away) after 2.5 checkpoints' worth.
        let mut v = Verifier::new(&d, size as u64, fresh(&d).unwrap(), 0, 0, size as u64);
        let cut = (5 * CHECKPOINT_EVERY / 2) as usize;
        run(&mut v, &data[..cut], 0, 65_536, &cps);
        assert_eq!(cps.count(&d), 2);
        // Stopped there: its last states are kept too, so a resume right behind reads little.
        v.stopped(&cps);
        assert!(cps.count(&d) > 2);
        let (near, _) = cps.at_or_below(&d, cut as u64 - 1, fresh(&d).unwrap());
        assert!(cut as u64 - near <= RECENT_EVERY, "{near}");
        // containerd resumes at N: the checkpoint at or below N is used.
        let n = (cut as u64 - RECENT_SPAN).max(2 * CHECKPOINT_EVERY + 1000);
        let (from, state) = cps.at_or_below(&d, n, fresh(&d).unwrap());
        assert!(from <= n && n - from <= RECENT_EVERY, "{from} {n}");
        let mut v = Verifier::new(&d, size as u64, state, from, n, size as u64);
        let (sent, mismatch) = run(&mut v, &data, from as usize, 65_536, &cps);
        assert_eq!(mismatch, None);
        assert_eq!(sent, data[n as usize..]);
        // No checkpoint below N: from 0.
        assert_eq!(cps.at_or_below(&d, 10, fresh(&d).unwrap()).0, 0);
        // A corrupt resumed stream is cut, and its blob's checkpoints dropped.
        let mut bad = data.clone();
        bad[size - 10] ^= 1;
        let (from, state) = cps.at_or_below(&d, n, fresh(&d).unwrap());
        let mut v = Verifier::new(&d, size as u64, state, from, n, size as u64);
        let (sent, mismatch) = run(&mut v, &bad, from as usize, 65_536, &cps);
        assert!(mismatch.is_some());
        assert_eq!(sent.len(), size - n as usize - 1);
        assert_eq!(cps.count(&d), 0);
    }

    #[test]
    fn a_range_short_of_the_end_is_passed_unchecked() {
        let data = blob(1000);
        let d = sha256_digest(b"other");
        let cps = Checkpoints::default();
        let mut v = Verifier::new(&d, 1000, fresh(&d).unwrap(), 100, 100, 500);
        assert!(!v.checks());
        assert_eq!(
            run(&mut v, &data[..500], 100, 64, &cps),
            (data[100..500].to_vec(), None)
        );
    }

    #[test]
    fn checkpoints_are_bounded() {
        let cps = Checkpoints::default();
        let s = || fresh(&sha256_digest(b"")).unwrap();
        for i in 0..(PER_BLOB as u64 * 3) {
            cps.put("a", i * CHECKPOINT_EVERY, s());
        }
        assert!(cps.count("a") <= PER_BLOB);
        // The latest is kept, so a resume near the end re-reads little.
        assert_eq!(
            cps.at_or_below("a", u64::MAX, s()).0 / CHECKPOINT_EVERY,
            PER_BLOB as u64 * 3 - 1
        );
        for b in 0..(BLOBS + 10) {
            cps.put(&format!("b{b}"), 1, s());
        }
        assert_eq!(cps.count("a"), 0);
        assert_eq!(cps.count("b0"), 0);
        assert_eq!(cps.count(&format!("b{}", BLOBS + 9)), 1);
        assert!(cps.blobs.lock().len() <= BLOBS);
    }

    #[test]
    fn a_mismatch_is_remembered_until_the_blob_is_served_whole() {
        let data = blob(10_000);
        let d = sha256_digest(&data);
        let cps = Checkpoints::default();
        let mut bad = data.clone();
        bad[10] ^= 1;
        let mut v = Verifier::new(&d, 10_000, fresh(&d).unwrap(), 0, 0, 10_000);
        assert!(run(&mut v, &bad, 0, 1000, &cps).1.is_some());
        assert!(cps.has_mismatched(&d));
        assert_eq!(cps.count(&d), 0, "checkpoints of wrong bytes are dropped");
        let mut v = Verifier::new(&d, 10_000, fresh(&d).unwrap(), 0, 0, 10_000);
        assert_eq!(run(&mut v, &data, 0, 1000, &cps).1, None);
        assert!(!cps.has_mismatched(&d));
        for b in 0..(BLOBS + 1) {
            cps.mismatched(&format!("sha256:{b}"));
        }
        assert!(!cps.has_mismatched("sha256:0"));
        assert!(cps.failed.lock().len() <= BLOBS);
    }
}
