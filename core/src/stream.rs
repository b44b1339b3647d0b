//! The replication stream: one JSON line per message. A session line carries the wrapped data
//! key; each batch line carries a sealed array of change records and a signed record that chains
//! it to the previous line of its session. The consumer checks everything before it emits a
//! change as trusted, and stops at the first fault.

use crate::canonical::{sha256, Encoder, Value};
use crate::envelope::{self, BatchBinding, EnvelopeError, Kek, Key};
use crate::keys;
use crate::merkle;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionLine {
    pub slot: String,
    pub session: String,
    pub kek_id: String,
    pub wrapped_dek: String,
    pub started_at: i64,
    pub key_id: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchLine {
    pub slot: String,
    pub session: String,
    pub seq: i64,
    pub lsn_start: String,
    pub lsn_end: String,
    pub xid: i64,
    pub commit_time: i64,
    pub tables: Vec<String>,
    pub changes: i64,
    pub ciphertext: String,
    pub merkle_root: String,
    pub prev: String,
    pub key_id: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    Session(SessionLine),
    Batch(BatchLine),
}

impl SessionLine {
    pub fn message(&self) -> Vec<u8> {
        Encoder::new("vsql_vault.stream_session")
            .field("slot", &Value::Text(self.slot.clone()))
            .field("session", &Value::Text(self.session.clone()))
            .field("kek_id", &Value::Text(self.kek_id.clone()))
            .field("wrapped_dek", &Value::Text(self.wrapped_dek.clone()))
            .field("started_at", &Value::Timestamp(self.started_at))
            .field("key_id", &Value::Text(self.key_id.clone()))
            .bytes()
            .to_vec()
    }
}

impl BatchLine {
    pub fn message(&self) -> Vec<u8> {
        let mut e = Encoder::new("vsql_vault.stream_batch")
            .field("slot", &Value::Text(self.slot.clone()))
            .field("session", &Value::Text(self.session.clone()))
            .field("seq", &Value::Int(self.seq))
            .field("lsn_start", &Value::Text(self.lsn_start.clone()))
            .field("lsn_end", &Value::Text(self.lsn_end.clone()))
            .field("xid", &Value::Int(self.xid))
            .field("commit_time", &Value::Timestamp(self.commit_time))
            .field("changes", &Value::Int(self.changes));
        for t in &self.tables {
            e = e.field("table", &Value::Text(t.clone()));
        }
        e.field(
            "ciphertext_sha256",
            &Value::Bytes(sha256(self.ciphertext.as_bytes()).to_vec()),
        )
        .field("merkle_root", &Value::Text(self.merkle_root.clone()))
        .field("prev", &Value::Text(self.prev.clone()))
        .field("key_id", &Value::Text(self.key_id.clone()))
        .bytes()
        .to_vec()
    }
}

fn signing_failed(e: keys::KeyError) -> EnvelopeError {
    EnvelopeError::Command(e.to_string())
}

/// Builds a session's lines (used by the output plugin).
pub struct Sealer {
    slot: String,
    session: String,
    dek: Key,
    signing: keys::EvidenceSigner,
    key_id: String,
    seq: i64,
    prev: [u8; 32],
}

impl Sealer {
    /// Starts a session: a fresh DEK wrapped under the ring's active KEK. Returns the session line.
    pub fn start(
        slot: &str,
        kek: &Kek,
        signing: impl Into<keys::EvidenceSigner>,
        now: i64,
    ) -> Result<(Sealer, String), EnvelopeError> {
        use keys::SignEvidence;
        let signing = signing.into();
        let session = hex::encode(envelope::random_bytes::<12>()?);
        let dek = envelope::random_key()?;
        let (kek_id, wrapped) = kek.wrap(&session, &dek)?;
        let key_id = keys::key_id(&signing.public());
        let mut line = SessionLine {
            slot: slot.into(),
            session: session.clone(),
            kek_id,
            wrapped_dek: hex::encode(wrapped),
            started_at: now,
            key_id: key_id.clone(),
            signature: String::new(),
        };
        let msg = line.message();
        line.signature = hex::encode(signing.sign_evidence(&msg).map_err(signing_failed)?);
        let prev = sha256(&msg);
        let json = serde_json::to_string(&Line::Session(line)).unwrap_or_default();
        Ok((
            Sealer {
                slot: slot.into(),
                session,
                dek,
                signing,
                key_id,
                seq: 0,
                prev,
            },
            json,
        ))
    }

    /// Seals one batch of change records (each a JSON object) into a signed, chained line.
    #[allow(clippy::too_many_arguments)]
    pub fn batch(
        &mut self,
        changes: &[String],
        lsn_start: &str,
        lsn_end: &str,
        xid: i64,
        commit_time: i64,
        tables: Vec<String>,
    ) -> Result<String, EnvelopeError> {
        self.seq += 1;
        let leaves: Vec<[u8; 32]> = changes
            .iter()
            .map(|c| merkle::leaf_hash(c.as_bytes()))
            .collect();
        let mut plaintext = zeroize::Zeroizing::new(String::with_capacity(
            changes.iter().map(|c| c.len() + 1).sum::<usize>() + 2,
        ));
        plaintext.push('[');
        for (i, c) in changes.iter().enumerate() {
            if i > 0 {
                plaintext.push(',');
            }
            plaintext.push_str(c);
        }
        plaintext.push(']');
        let binding = BatchBinding {
            slot: &self.slot,
            session: &self.session,
            seq: self.seq,
            lsn_start,
            lsn_end,
        };
        let sealed = envelope::seal(&self.dek, &binding, plaintext.as_bytes())?;
        let mut line = BatchLine {
            slot: self.slot.clone(),
            session: self.session.clone(),
            seq: self.seq,
            lsn_start: lsn_start.into(),
            lsn_end: lsn_end.into(),
            xid,
            commit_time,
            tables,
            changes: changes.len() as i64,
            ciphertext: BASE64.encode(sealed),
            merkle_root: hex::encode(merkle::root(&leaves)),
            prev: hex::encode(self.prev),
            key_id: self.key_id.clone(),
            signature: String::new(),
        };
        let msg = line.message();
        line.signature = hex::encode(
            keys::SignEvidence::sign_evidence(&self.signing, &msg).map_err(signing_failed)?,
        );
        self.prev = sha256(&msg);
        Ok(serde_json::to_string(&Line::Batch(line)).unwrap_or_default())
    }

    /// Batches sealed under this session's DEK so far.
    pub fn sealed(&self) -> i64 {
        self.seq
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("line {0}: not a vsql_vault stream line (truncated or altered?)")]
    Malformed(usize),
    #[error(
        "line {0}: batch of session {1} before that session's header (stream cut or spliced?)"
    )]
    UnknownSession(usize, String),
    #[error("line {0}: signature does not verify with any given public key (altered or forged)")]
    Signature(usize),
    #[error("line {line}: batch {got} where {expected} was due (dropped, duplicated, reordered or replayed)")]
    Sequence {
        line: usize,
        expected: i64,
        got: i64,
    },
    #[error(
        "line {0}: the chain link to the previous line is broken (batch moved from elsewhere?)"
    )]
    Link(usize),
    #[error("line {0}: a session of slot {1} inside another slot's stream (spliced?)")]
    OtherSlot(usize, String),
    #[error("line {0}: batch of session {1} after a later session began (spliced or replayed?)")]
    Superseded(usize, String),
    #[error("line {0}: batch belongs to slot {1}, not to this session's slot")]
    Slot(usize, String),
    #[error("line {0}: {1}")]
    Envelope(usize, EnvelopeError),
    #[error("line {0}: the decrypted changes do not match the signed Merkle root")]
    Root(usize),
    #[error("line {0}: session {1} starts a second time (the stream was replayed or spliced)")]
    ReplayedSession(usize, String),
}

struct Open {
    slot: String,
    dek: Key,
    seq: i64,
    prev: [u8; 32],
}

/// The content of a logical message (`pg_logical_emit_message`) as a change record carries it:
/// the text itself when the bytes are valid UTF-8 (`"content":"..."`), otherwise their standard
/// base64 with the encoding named (`"content":"/wD+","content_encoding":"base64"`), so every
/// byte arrives as sent.
pub fn message_content(content: &[u8]) -> (String, Option<&'static str>) {
    match std::str::from_utf8(content) {
        Ok(text) => (text.to_owned(), None),
        Err(_) => (BASE64.encode(content), Some("base64")),
    }
}

/// On the wire a column is `[name, type, value]` (`[name, type]` for an unchanged TOAST value):
/// a third smaller than named fields, which matters once sealed and encoded. The consumer shows
/// each as `{"name", "type", "value"}` (or `"unchanged_toast": true`).
pub fn expand_columns(mut change: serde_json::Value) -> serde_json::Value {
    for key in ["columns", "identity"] {
        if let Some(serde_json::Value::Array(cols)) = change.get_mut(key) {
            for c in cols.iter_mut() {
                let serde_json::Value::Array(parts) = c else {
                    continue;
                };
                let mut parts = std::mem::take(parts).into_iter();
                let name = parts.next().unwrap_or_default();
                let kind = parts.next().unwrap_or_default();
                *c = match parts.next() {
                    Some(value) => serde_json::json!({"name": name, "type": kind, "value": value}),
                    None => {
                        serde_json::json!({"name": name, "type": kind, "unchanged_toast": true})
                    }
                };
            }
        }
    }
    change
}

/// Checks a stream line by line and yields the plaintext change records it vouches for.
pub struct Reader {
    kek: Kek,
    keys: Vec<VerifyingKey>,
    sessions: std::collections::HashMap<String, Open>,
    line: usize,
    /// The slot of the first session: a stream never carries another slot's sessions.
    slot: Option<String>,
    /// Sessions follow one another; only the latest may still send batches.
    current: Option<String>,
}

impl Reader {
    pub fn new(kek: Kek, keys: Vec<VerifyingKey>) -> Reader {
        Reader {
            kek,
            keys,
            sessions: Default::default(),
            line: 0,
            slot: None,
            current: None,
        }
    }

    fn verify(&self, key_id: &str, msg: &[u8], sig: &str) -> bool {
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        self.keys
            .iter()
            .any(|k| keys::key_id(k) == key_id && keys::verify(k, msg, &sig))
    }

    /// Feeds one line; returns the change records of a batch (empty for a session line).
    pub fn feed(&mut self, text: &str) -> Result<Vec<serde_json::Value>, StreamError> {
        self.line += 1;
        let n = self.line;
        let line: Line = serde_json::from_str(text).map_err(|_| StreamError::Malformed(n))?;
        match line {
            Line::Session(s) => {
                let msg = s.message();
                if !self.verify(&s.key_id, &msg, &s.signature) {
                    return Err(StreamError::Signature(n));
                }
                let wrapped = hex::decode(&s.wrapped_dek).map_err(|_| StreamError::Malformed(n))?;
                let dek = self
                    .kek
                    .unwrap(&s.kek_id, &s.session, &wrapped)
                    .map_err(|e| StreamError::Envelope(n, e))?;
                if self.sessions.contains_key(&s.session) {
                    return Err(StreamError::ReplayedSession(n, s.session.clone()));
                }
                if self.slot.as_ref().is_some_and(|slot| *slot != s.slot) {
                    return Err(StreamError::OtherSlot(n, s.slot.clone()));
                }
                self.slot = Some(s.slot.clone());
                self.current = Some(s.session.clone());
                self.sessions.insert(
                    s.session.clone(),
                    Open {
                        slot: s.slot,
                        dek,
                        seq: 0,
                        prev: sha256(&msg),
                    },
                );
                Ok(Vec::new())
            }
            Line::Batch(b) => {
                let msg = b.message();
                if !self.verify(&b.key_id, &msg, &b.signature) {
                    return Err(StreamError::Signature(n));
                }
                let open = self
                    .sessions
                    .get_mut(&b.session)
                    .ok_or_else(|| StreamError::UnknownSession(n, b.session.clone()))?;
                if b.slot != open.slot {
                    return Err(StreamError::Slot(n, b.slot.clone()));
                }
                if self.current.as_deref() != Some(b.session.as_str()) {
                    return Err(StreamError::Superseded(n, b.session.clone()));
                }
                if b.seq != open.seq + 1 {
                    return Err(StreamError::Sequence {
                        line: n,
                        expected: open.seq + 1,
                        got: b.seq,
                    });
                }
                if b.prev != hex::encode(open.prev) {
                    return Err(StreamError::Link(n));
                }
                let binding = BatchBinding {
                    slot: &b.slot,
                    session: &b.session,
                    seq: b.seq,
                    lsn_start: &b.lsn_start,
                    lsn_end: &b.lsn_end,
                };
                let ct = BASE64
                    .decode(&b.ciphertext)
                    .map_err(|_| StreamError::Malformed(n))?;
                let plain = envelope::open(&open.dek, &binding, &ct)
                    .map_err(|e| StreamError::Envelope(n, e))?;
                // Leaves are the change records exactly as the plugin wrote them.
                let raw: Vec<Box<serde_json::value::RawValue>> =
                    serde_json::from_slice(&plain).map_err(|_| StreamError::Malformed(n))?;
                let leaves: Vec<[u8; 32]> = raw
                    .iter()
                    .map(|c| merkle::leaf_hash(c.get().as_bytes()))
                    .collect();
                let changes: Vec<serde_json::Value> = raw
                    .iter()
                    .map(|c| serde_json::from_str(c.get()))
                    .collect::<Result<_, _>>()
                    .map_err(|_| StreamError::Malformed(n))?;
                if hex::encode(merkle::root(&leaves)) != b.merkle_root
                    || changes.len() as i64 != b.changes
                {
                    return Err(StreamError::Root(n));
                }
                open.seq = b.seq;
                open.prev = sha256(&msg);
                Ok(changes.into_iter().map(expand_columns).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    use crate::envelope::KekRing;

    fn setup() -> (KekRing, SigningKey) {
        let ring = KekRing::parse("k", &format!("v1 {}\n", "33".repeat(32))).unwrap();
        (ring, keys::generate().unwrap())
    }

    fn stream(ring: &KekRing, key: &SigningKey, batches: usize) -> Vec<String> {
        stream_of("slot1", ring, key, batches)
    }

    fn stream_of(slot: &str, ring: &KekRing, key: &SigningKey, batches: usize) -> Vec<String> {
        let (mut s, header) =
            Sealer::start(slot, &Kek::File(ring.clone()), key.clone(), 1).unwrap();
        let mut lines = vec![header];
        for i in 0..batches {
            let changes = vec![
                format!("{{\"table\":\"t\",\"action\":\"I\",\"n\":{i}}}"),
                serde_json::json!({"action": "D", "table": "t", "n": i, "note": "100% \"quoted\"\nnew line ü"}).to_string(),
            ];
            lines.push(
                s.batch(
                    &changes,
                    "0/10",
                    "0/20",
                    700 + i as i64,
                    5,
                    vec!["public.t".into()],
                )
                .unwrap(),
            );
        }
        lines
    }

    fn reader(key: &SigningKey) -> Reader {
        let ring = KekRing::parse("k", &format!("v1 {}\n", "33".repeat(32))).unwrap();
        Reader::new(Kek::File(ring), vec![key.verifying_key()])
    }

    #[test]
    fn an_intact_stream_yields_every_change_and_hides_the_values() {
        let (ring, key) = setup();
        let lines = stream(&ring, &key, 3);
        assert!(
            lines.iter().all(|l| !l.contains("quoted")),
            "plaintext leaked"
        );
        let mut r = reader(&key);
        let mut all = Vec::new();
        for l in &lines {
            all.extend(r.feed(l).unwrap());
        }
        assert_eq!(all.len(), 6);
        assert_eq!(all[1]["note"], "100% \"quoted\"\nnew line ü");
    }

    #[test]
    fn wire_columns_are_shown_with_their_names() {
        let wire = serde_json::json!({
            "action": "U", "table": "t",
            "columns": [["id", "integer", "1"], ["note", "text", null], ["big", "text"]],
            "identity": [["id", "integer", "1"]],
        });
        let shown = expand_columns(wire);
        assert_eq!(
            shown["columns"],
            serde_json::json!([
                {"name": "id", "type": "integer", "value": "1"},
                {"name": "note", "type": "text", "value": null},
                {"name": "big", "type": "text", "unchanged_toast": true},
            ])
        );
        assert_eq!(shown["identity"][0]["value"], "1");
        // Records of other shapes pass unchanged.
        let other = serde_json::json!({"action": "M", "content": "x"});
        assert_eq!(expand_columns(other.clone()), other);
    }

    #[test]
    fn every_kind_of_tampering_stops_the_reader() {
        let (ring, key) = setup();
        let lines = stream(&ring, &key, 3);
        let run = |ls: Vec<String>| -> Result<(), StreamError> {
            let mut r = reader(&key);
            for l in ls {
                r.feed(&l)?;
            }
            Ok(())
        };
        // flipped bit in the ciphertext
        let mut l = lines.clone();
        let pos = l[2].find("\"ciphertext\":\"").unwrap() + 20;
        let c = l[2].as_bytes()[pos];
        l[2].replace_range(pos..pos + 1, if c == b'0' { "1" } else { "0" });
        assert!(matches!(run(l), Err(StreamError::Signature(3))));
        // dropped, duplicated, reordered
        let mut l = lines.clone();
        l.remove(2);
        assert!(matches!(
            run(l),
            Err(StreamError::Sequence {
                line: 3,
                expected: 2,
                got: 3
            })
        ));
        let mut l = lines.clone();
        l.insert(2, l[1].clone());
        assert!(matches!(run(l), Err(StreamError::Sequence { line: 3, .. })));
        let mut l = lines.clone();
        l.swap(1, 2);
        assert!(matches!(run(l), Err(StreamError::Sequence { line: 2, .. })));
        // a batch from another session or slot
        let other = stream(&ring, &key, 2);
        let mut l = lines.clone();
        l[2] = other[2].clone();
        assert!(matches!(run(l), Err(StreamError::UnknownSession(3, _))));
        // a whole session of another slot spliced in
        let other = stream_of("slot2", &ring, &key, 1);
        let mut l = lines.clone();
        l.insert(2, other[0].clone());
        l.insert(3, other[1].clone());
        assert!(matches!(run(l), Err(StreamError::OtherSlot(3, _))));
        // a later session of the same slot, then a batch of the earlier one
        let later = stream(&ring, &key, 1);
        let mut l = lines[..3].to_vec();
        l.extend(later.clone());
        l.push(lines[3].clone());
        assert!(matches!(run(l), Err(StreamError::Superseded(6, _))));
        // sessions one after another are fine
        let mut l = lines.clone();
        l.extend(later);
        assert!(run(l).is_ok());
        // the whole session replayed after itself
        let mut l = lines.clone();
        l.extend(lines.clone());
        assert!(matches!(run(l), Err(StreamError::ReplayedSession(5, _))));
        // truncated line
        let mut l = lines.clone();
        let half = l[3].len() / 2;
        l[3].truncate(half);
        assert!(matches!(run(l), Err(StreamError::Malformed(4))));
        // wrong KEK, unknown signing key
        let mut r = Reader::new(
            Kek::File(KekRing::parse("k", &format!("v1 {}\n", "44".repeat(32))).unwrap()),
            vec![key.verifying_key()],
        );
        assert!(matches!(
            r.feed(&lines[0]),
            Err(StreamError::Envelope(1, _))
        ));
        let mut r = Reader::new(
            Kek::File(KekRing::parse("k", &format!("v1 {}\n", "33".repeat(32))).unwrap()),
            vec![keys::generate().unwrap().verifying_key()],
        );
        assert!(matches!(r.feed(&lines[0]), Err(StreamError::Signature(1))));
        // destroyed KEK version: unrecoverable
        let mut r = Reader::new(
            Kek::File(KekRing::parse("k", &format!("v2 {}\n", "33".repeat(32))).unwrap()),
            vec![key.verifying_key()],
        );
        assert!(matches!(
            r.feed(&lines[0]),
            Err(StreamError::Envelope(1, EnvelopeError::UnknownKek(_)))
        ));
    }

    #[test]
    fn message_content_is_text_when_utf8_and_base64_otherwise() {
        assert_eq!(message_content(b"plain \0 \xc3\xbc".as_slice()).1, None);
        assert_eq!(message_content("ü\0".as_bytes()), ("ü\0".to_owned(), None));
        let (text, enc) = message_content(&[0xff, 0x00, 0xfe]);
        assert_eq!((text.as_str(), enc), ("/wD+", Some("base64")));
        assert_eq!(BASE64.decode(text).unwrap(), [0xff, 0x00, 0xfe]);
    }
}
