//! Fixed keys shared by the fuzz targets and the seed generator (`examples/gen_seeds.rs`).
//!
//! Everything here is deterministic, so a committed seed (a signed checkpoint, a stream session
//! wrapped under the fixed KEK ring, ...) stays valid for the targets across runs and machines.
//! These are test keys: they protect nothing.

use ed25519_dalek::{SigningKey, VerifyingKey};
use std::sync::OnceLock;
use vsql_vault_core::envelope::KekRing;
use vsql_vault_core::keys;

/// The KEK file the stream reader is given: two versions, `v2` active.
pub fn kek_ring_text() -> String {
    format!(
        "# fuzz KEK ring\nv1 {}\nv2 {}\n",
        "11".repeat(32),
        "22".repeat(32)
    )
}

pub fn kek_ring() -> &'static KekRing {
    static RING: OnceLock<KekRing> = OnceLock::new();
    RING.get_or_init(|| KekRing::parse("fuzz.kek", &kek_ring_text()).expect("fixed KEK ring"))
}

/// The signing key every fixed signature is made with (seed 0x5e repeated).
pub fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_bytes(&[0x5e; 32]))
}

pub fn verifying_key() -> VerifyingKey {
    signing_key().verifying_key()
}

pub fn key_id() -> String {
    keys::key_id(&verifying_key())
}

/// A fixed 256-bit key (the data key of the fixed stream session, and the envelope target's key).
pub fn fixed_key(byte: u8) -> vsql_vault_core::envelope::Key {
    zeroize::Zeroizing::new([byte; 32])
}

/// Splits `data` into at most `n` parts at `sep` (the last part keeps the rest, separators
/// included), padding with empty slices so that exactly `n` come back.
pub fn split_n(data: &[u8], sep: u8, n: usize) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = data.splitn(n, |b| *b == sep).collect();
    while out.len() < n {
        out.push(&[]);
    }
    out
}

/// Reads a big-endian integer from up to 8 leading bytes (missing bytes count as zero).
pub fn be_i64(data: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().take(8).enumerate() {
        b[i] = *x;
    }
    i64::from_be_bytes(b)
}

/// The two ways the `stream_reader` target feeds a stream (shared with the seed generator,
/// which checks that its seeds pass). Each returns how many lines the reader accepted.
pub mod stream_harness {
    use crate::{kek_ring, signing_key, verifying_key};
    use std::collections::HashMap;
    use vsql_vault_core::canonical::sha256;
    use vsql_vault_core::envelope::{self, BatchBinding, Kek, Key};
    use vsql_vault_core::keys;
    use vsql_vault_core::merkle;
    use vsql_vault_core::continuity::{ConsumerState, Follower};
    use vsql_vault_core::stream::{Fed, Line, Reader};

    fn reader() -> Reader {
        Reader::new(Kek::File(kek_ring().clone()), vec![verifying_key()])
    }

    /// One line through the reader and the continuity checks, as `vsql-vault decrypt` runs them
    /// (with `--state`: the state's text form is written and read back after every line).
    fn consume(
        r: &mut Reader,
        f: &mut Follower,
        line: &str,
    ) -> Result<Vec<serde_json::Value>, String> {
        let out = match r.feed_line(line).map_err(|e| e.to_string())? {
            Fed::Session(s) => {
                for note in f.session(&s).map_err(|e| e.to_string())? {
                    let _ = note;
                }
                Vec::new()
            }
            Fed::Batch {
                line,
                hash,
                changes,
            } => f.batch(&line, hash, changes).0,
        };
        let text = f.state.to_text();
        assert_eq!(ConsumerState::parse(&text).as_ref(), Ok(&f.state));
        Ok(out)
    }

    fn follower() -> Follower {
        Follower::new(ConsumerState::new(), None, None)
    }

    /// The lines `vsql-vault decrypt` would feed (it skips blank lines).
    fn lines(text: &str) -> impl Iterator<Item = &str> {
        text.lines().filter(|l| !l.trim().is_empty())
    }

    /// Mode 1: the untrusted stream as it is.
    pub fn as_is(text: &str) -> usize {
        let mut accepted = 0;
        let mut r = reader();
        let mut f = follower();
        for line in lines(text) {
            match consume(&mut r, &mut f, line) {
                Ok(changes) => {
                    accepted += 1;
                    // What the tool prints for each change.
                    for c in changes {
                        let _ = c.to_string();
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
        }
        accepted
    }

    #[derive(Default)]
    struct Producer {
        deks: HashMap<String, Key>,
        prev: HashMap<String, [u8; 32]>,
    }

    impl Producer {
        /// Rewrites one parsed line the way an honest producer holding the keys would emit it.
        /// Returns the rewritten line and the hash of its signed message.
        fn fix(&mut self, line: Line) -> (String, [u8; 32]) {
            let ring = kek_ring();
            let fixed = match line {
                Line::Session(mut s) => {
                    if s.wrapped_dek.is_empty() {
                        if let Ok(kek) = ring.get(&s.kek_id) {
                            let dek = crate::fixed_key(0x44);
                            if let Ok(w) = envelope::wrap_dek(kek, &s.kek_id, &s.session, &dek) {
                                s.wrapped_dek = hex::encode(w);
                            }
                        }
                    }
                    if let (Ok(kek), Ok(w)) = (ring.get(&s.kek_id), hex::decode(&s.wrapped_dek)) {
                        if let Ok(dek) = envelope::unwrap_dek(kek, &s.kek_id, &s.session, &w) {
                            self.deks.insert(s.session.clone(), dek);
                        }
                    }
                    s.signature = hex::encode(keys::sign(signing_key(), &s.message()));
                    Line::Session(s)
                }
                Line::Batch(mut b) => {
                    if hex::decode(&b.ciphertext).is_err() {
                        let plaintext = std::mem::take(&mut b.ciphertext);
                        if b.merkle_root.is_empty() {
                            if let Ok(raw) = serde_json::from_str::<
                                Vec<Box<serde_json::value::RawValue>>,
                            >(&plaintext)
                            {
                                let leaves: Vec<[u8; 32]> = raw
                                    .iter()
                                    .map(|c| merkle::leaf_hash(c.get().as_bytes()))
                                    .collect();
                                b.merkle_root = hex::encode(merkle::root(&leaves));
                            }
                        }
                        if let Some(dek) = self.deks.get(&b.session) {
                            let binding = BatchBinding {
                                slot: &b.slot,
                                session: &b.session,
                                seq: b.seq,
                                lsn_start: &b.lsn_start,
                                lsn_end: &b.lsn_end,
                            };
                            if let Ok(c) = envelope::seal(dek, &binding, plaintext.as_bytes()) {
                                b.ciphertext = hex::encode(c);
                            }
                        }
                    }
                    if b.prev.is_empty() {
                        if let Some(p) = self.prev.get(&b.session) {
                            b.prev = hex::encode(p);
                        }
                    }
                    b.signature = hex::encode(keys::sign(signing_key(), &b.message()));
                    Line::Batch(b)
                }
            };
            let msg = match &fixed {
                Line::Session(s) => s.message(),
                Line::Batch(b) => b.message(),
            };
            let text = serde_json::to_string(&fixed).unwrap_or_default();
            (text, sha256(&msg))
        }
    }

    /// Mode 2: the harness signs (and seals) what the fuzzer wrote.
    pub fn signed(text: &str) -> usize {
        let mut accepted = 0;
        let mut r = reader();
        let mut f = follower();
        let mut p = Producer::default();
        for line in lines(text) {
            let (fed, session, hash) = match serde_json::from_str::<Line>(line) {
                Ok(parsed) => {
                    let session = match &parsed {
                        Line::Session(s) => s.session.clone(),
                        Line::Batch(b) => b.session.clone(),
                    };
                    let (fed, hash) = p.fix(parsed);
                    (fed, Some(session), hash)
                }
                Err(_) => (line.to_owned(), None, [0; 32]),
            };
            match consume(&mut r, &mut f, &fed) {
                Ok(changes) => {
                    accepted += 1;
                    if let Some(s) = session {
                        p.prev.insert(s, hash);
                    }
                    for c in changes {
                        let _ = c.to_string();
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
        }
        accepted
    }
}
