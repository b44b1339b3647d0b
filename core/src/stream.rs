//! The replication stream: one JSON line per message. A session line carries the wrapped data
//! key; each batch line carries a sealed array of change records and a signed record that chains
//! it to the previous line of its session. The consumer checks everything before it emits a
//! change as trusted, and stops at the first fault.

use crate::canonical::{sha256, Encoder, Value};
use crate::continuity::{parse_lsn, Position, Resumption, Source};
use crate::envelope::{self, BatchBinding, EnvelopeError, Kek, Key};
use crate::keys;
use crate::merkle;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionLine {
    /// 2 since the session line names its source and where the server resumed; absent (format 1)
    /// from 0.1.0 and earlier 0.2.0 servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    pub slot: String,
    pub session: String,
    pub kek_id: String,
    pub wrapped_dek: String,
    pub started_at: i64,
    /// Format 2: the source (system identifier as decimal text, database name and OID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_oid: Option<i64>,
    /// Format 2: the slot's confirmed position when decoding started, and where it resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_lsn: Option<String>,
    /// Format 2: the last emission sent on the slot before this session (`0/0`: none; absent:
    /// the server has no record), and when only part of it was sent, how many records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_records: Option<i64>,
    pub key_id: String,
    pub signature: String,
}

/// What a session line of format 2 states about its source and where the server resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub source: Source,
    pub resumption: Resumption,
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
    /// Format 2: the batch's emission (the commit record of its transaction, shared by every
    /// chunk of it, or the non-transactional message) and whether it is the emission's last batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_lsn: Option<String>,
    #[serde(default, rename = "final", skip_serializing_if = "Option::is_none")]
    pub last: Option<bool>,
    pub key_id: String,
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Line {
    Session(SessionLine),
    Batch(BatchLine),
}

fn text_or_null(v: &Option<String>) -> Value {
    v.clone().map_or(Value::Null, Value::Text)
}

fn int_or_null(v: Option<i64>) -> Value {
    v.map_or(Value::Null, Value::Int)
}

impl SessionLine {
    /// The signed bytes: format 1 (no `version`) exactly as 0.1.0 signed them; format 2 under its
    /// own domain, with the source and the resumption fields (absent ones as NULL).
    pub fn message(&self) -> Vec<u8> {
        let v2 = self.version.is_some();
        let e = Encoder::new(if v2 {
            SESSION_DOMAIN_V2
        } else {
            "vsql_vault.stream_session"
        })
        .field("slot", &Value::Text(self.slot.clone()))
        .field("session", &Value::Text(self.session.clone()))
        .field("kek_id", &Value::Text(self.kek_id.clone()))
        .field("wrapped_dek", &Value::Text(self.wrapped_dek.clone()))
        .field("started_at", &Value::Timestamp(self.started_at));
        let e = if v2 {
            e.field("version", &int_or_null(self.version))
                .field("system_id", &text_or_null(&self.system_id))
                .field("database", &text_or_null(&self.database))
                .field("database_oid", &int_or_null(self.database_oid))
                .field("confirmed_lsn", &text_or_null(&self.confirmed_lsn))
                .field("resume_lsn", &text_or_null(&self.resume_lsn))
                .field("prev_lsn", &text_or_null(&self.prev_lsn))
                .field("prev_records", &int_or_null(self.prev_records))
        } else {
            e
        };
        e.field("key_id", &Value::Text(self.key_id.clone()))
            .bytes()
            .to_vec()
    }

    /// Whether a field of format 2 is present (a format-1 line has none).
    fn has_v2_fields(&self) -> bool {
        self.system_id.is_some()
            || self.database.is_some()
            || self.database_oid.is_some()
            || self.confirmed_lsn.is_some()
            || self.resume_lsn.is_some()
            || self.prev_lsn.is_some()
            || self.prev_records.is_some()
    }

    /// The source and resumption a format-2 line states; `None` for format 1 or when a field is
    /// missing or malformed.
    pub fn origin(&self) -> Option<Origin> {
        if self.version != Some(SESSION_VERSION) {
            return None;
        }
        let prev = match (&self.prev_lsn, self.prev_records) {
            (None, _) => None,
            (Some(l), n) => Some(Position {
                lsn: parse_lsn(l)?,
                partial: match n {
                    None => None,
                    Some(n) => Some(u64::try_from(n).ok()?),
                },
            }),
        };
        Some(Origin {
            source: Source {
                system_id: self.system_id.clone()?,
                database: self.database.clone()?,
                database_oid: self.database_oid?,
                slot: self.slot.clone(),
            },
            resumption: Resumption {
                confirmed: parse_lsn(self.confirmed_lsn.as_deref()?)?,
                resume: parse_lsn(self.resume_lsn.as_deref()?)?,
                prev,
            },
        })
    }
}

/// The session line format the plugin writes.
pub const SESSION_VERSION: i64 = 2;
/// The domain of a format-2 session line's signed bytes.
pub const SESSION_DOMAIN_V2: &str = "vsql_vault.stream_session.v2";
/// The domain of a format-2 batch line's signed bytes.
pub const BATCH_DOMAIN_V2: &str = "vsql_vault.stream_batch.v2";

impl BatchLine {
    /// The signed bytes: format 1 (no `commit_lsn`) exactly as 0.1.0 signed them; format 2 under
    /// its own domain, with the emission and whether this is its last batch.
    pub fn message(&self) -> Vec<u8> {
        let v2 = self.commit_lsn.is_some() || self.last.is_some();
        let mut e = Encoder::new(if v2 {
            BATCH_DOMAIN_V2
        } else {
            "vsql_vault.stream_batch"
        })
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
        e = e
            .field(
                "ciphertext_sha256",
                &Value::Bytes(sha256(self.ciphertext.as_bytes()).to_vec()),
            )
            .field("merkle_root", &Value::Text(self.merkle_root.clone()))
            .field("prev", &Value::Text(self.prev.clone()));
        if v2 {
            e = e
                .field("commit_lsn", &text_or_null(&self.commit_lsn))
                .field("final", &self.last.map_or(Value::Null, Value::Bool));
        }
        e.field("key_id", &Value::Text(self.key_id.clone()))
            .bytes()
            .to_vec()
    }

    /// The line as JSON, byte for byte what `serde_json::to_string(&Line::Batch(..))` writes
    /// (tested), without passing the ciphertext through serde's string escaping: base64 needs
    /// none, and escaping scanned the largest field of every line in the walsender byte by byte.
    pub fn to_json(&self) -> String {
        fn text(out: &mut Vec<u8>, name: &str, value: &str) {
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"\":");
            // Writing a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, value);
            out.push(b',');
        }
        fn int(out: &mut Vec<u8>, name: &str, value: i64) {
            use std::io::Write;
            let _ = write!(out, "\"{name}\":{value},");
        }
        // What serde would write verbatim (no control character, quote or backslash), checked
        // without a branch per byte: a short-circuiting check cost as much as the escaping.
        let verbatim = self
            .ciphertext
            .bytes()
            .fold(true, |ok, c| ok & (c >= 0x20) & (c != b'"') & (c != b'\\'));
        let mut out = Vec::with_capacity(self.ciphertext.len() + 512);
        out.extend_from_slice(b"{\"type\":\"batch\",");
        text(&mut out, "slot", &self.slot);
        text(&mut out, "session", &self.session);
        int(&mut out, "seq", self.seq);
        text(&mut out, "lsn_start", &self.lsn_start);
        text(&mut out, "lsn_end", &self.lsn_end);
        int(&mut out, "xid", self.xid);
        int(&mut out, "commit_time", self.commit_time);
        out.extend_from_slice(b"\"tables\":");
        let _ = serde_json::to_writer(&mut out, &self.tables);
        out.push(b',');
        int(&mut out, "changes", self.changes);
        if verbatim {
            out.extend_from_slice(b"\"ciphertext\":\"");
            out.extend_from_slice(self.ciphertext.as_bytes());
            out.extend_from_slice(b"\",");
        } else {
            text(&mut out, "ciphertext", &self.ciphertext);
        }
        text(&mut out, "merkle_root", &self.merkle_root);
        text(&mut out, "prev", &self.prev);
        if let Some(lsn) = &self.commit_lsn {
            text(&mut out, "commit_lsn", lsn);
        }
        if let Some(last) = self.last {
            out.extend_from_slice(if last {
                b"\"final\":true,"
            } else {
                b"\"final\":false,"
            });
        }
        text(&mut out, "key_id", &self.key_id);
        out.extend_from_slice(b"\"signature\":");
        let _ = serde_json::to_writer(&mut out, &self.signature);
        out.push(b'}');
        // Only valid UTF-8 was written: serde's JSON of strings, ASCII, and a &str's bytes.
        String::from_utf8(out).unwrap_or_default()
    }

    /// The emission of a format-2 batch, as a number.
    pub fn emission(&self) -> Option<u64> {
        parse_lsn(self.commit_lsn.as_deref()?)
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
    /// Whether this session's lines are of format 2 (batches carry their emission).
    v2: bool,
}

impl Sealer {
    /// Starts a session of format 1, as 0.1.0 and earlier 0.2.0 servers wrote it (kept for tests
    /// and seed streams of the old format). Returns the session line.
    pub fn start(
        slot: &str,
        kek: &Kek,
        signing: impl Into<keys::EvidenceSigner>,
        now: i64,
    ) -> Result<(Sealer, String), EnvelopeError> {
        Sealer::open(slot, kek, signing.into(), now, None)
    }

    /// Starts a session of format 2: a fresh DEK wrapped under the ring's active KEK, and a
    /// session line naming the source and where the server resumed. Returns the session line.
    pub fn start_from(
        origin: &Origin,
        kek: &Kek,
        signing: impl Into<keys::EvidenceSigner>,
        now: i64,
    ) -> Result<(Sealer, String), EnvelopeError> {
        Sealer::open(&origin.source.slot, kek, signing.into(), now, Some(origin))
    }

    fn open(
        slot: &str,
        kek: &Kek,
        signing: keys::EvidenceSigner,
        now: i64,
        origin: Option<&Origin>,
    ) -> Result<(Sealer, String), EnvelopeError> {
        use keys::SignEvidence;
        let session = hex::encode(envelope::random_bytes::<12>()?);
        let dek = envelope::random_key()?;
        let (kek_id, wrapped) = kek.wrap(&session, &dek)?;
        let key_id = keys::key_id(&signing.public());
        let lsn = crate::continuity::lsn_text;
        let prev = origin.and_then(|o| o.resumption.prev);
        let mut line = SessionLine {
            version: origin.map(|_| SESSION_VERSION),
            slot: slot.into(),
            session: session.clone(),
            kek_id,
            wrapped_dek: hex::encode(wrapped),
            started_at: now,
            system_id: origin.map(|o| o.source.system_id.clone()),
            database: origin.map(|o| o.source.database.clone()),
            database_oid: origin.map(|o| o.source.database_oid),
            confirmed_lsn: origin.map(|o| lsn(o.resumption.confirmed)),
            resume_lsn: origin.map(|o| lsn(o.resumption.resume)),
            prev_lsn: prev.map(|p| lsn(p.lsn)),
            prev_records: prev
                .and_then(|p| p.partial)
                .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
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
                v2: origin.is_some(),
            },
            json,
        ))
    }

    /// Seals one batch of change records (each a JSON object) into a signed, chained line.
    pub fn batch(
        &mut self,
        changes: &[String],
        lsn_start: &str,
        lsn_end: &str,
        xid: i64,
        commit_time: i64,
        tables: Vec<String>,
    ) -> Result<String, EnvelopeError> {
        self.batch_of(None, changes, lsn_start, lsn_end, xid, commit_time, tables)
    }

    /// As `batch`, and in a session of format 2 the line names its emission (`commit_lsn`) and
    /// whether it is the emission's last batch (`emission`).
    #[allow(clippy::too_many_arguments)]
    pub fn batch_of(
        &mut self,
        emission: Option<(&str, bool)>,
        changes: &[String],
        lsn_start: &str,
        lsn_end: &str,
        xid: i64,
        commit_time: i64,
        tables: Vec<String>,
    ) -> Result<String, EnvelopeError> {
        let emission = emission.filter(|_| self.v2);
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
            commit_lsn: emission.map(|(lsn, _)| lsn.to_owned()),
            last: emission.map(|(_, last)| last),
            key_id: self.key_id.clone(),
            signature: String::new(),
        };
        let msg = line.message();
        line.signature = hex::encode(
            keys::SignEvidence::sign_evidence(&self.signing, &msg).map_err(signing_failed)?,
        );
        self.prev = sha256(&msg);
        Ok(line.to_json())
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
    /// Format 2: every batch names its emission.
    v2: bool,
}

/// The decrypted change records of a verified batch, each exactly the bytes the plugin wrote and
/// the batch's Merkle leaf was hashed over (zeroized when dropped).
pub struct Records {
    plain: zeroize::Zeroizing<String>,
    spans: Vec<std::ops::Range<usize>>,
}

impl Records {
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The records in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        self.spans.iter().map(|r| &self.plain[r.clone()])
    }

    /// The records as `serde_json::Value`s, columns expanded (what `Fed::Batch` carries).
    pub fn values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        self.iter()
            .map(|c| serde_json::from_str(c).map(expand_columns))
            .collect()
    }
}

/// One verified line as `Reader::feed_raw` gives it: a batch's records as the plugin wrote them.
pub enum FedRaw {
    Session(SessionLine),
    Batch {
        line: BatchLine,
        /// SHA-256 of the batch's signed record (what the next line links to).
        hash: [u8; 32],
        /// Every record is JSON; whether each also reads as a `serde_json::Value` (as
        /// `feed_line` requires, or refuses the line as malformed) is for the caller to check.
        records: Records,
    },
}

/// One verified line, with what the continuity checks need.
pub enum Fed {
    Session(SessionLine),
    Batch {
        line: BatchLine,
        /// SHA-256 of the batch's signed record (what the next line links to).
        hash: [u8; 32],
        changes: Vec<serde_json::Value>,
    },
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
        Ok(match self.feed_line(text)? {
            Fed::Session(_) => Vec::new(),
            Fed::Batch { changes, .. } => changes,
        })
    }

    /// The number of the line fed last (1-based).
    pub fn line_number(&self) -> usize {
        self.line
    }

    /// Feeds one line; returns it, verified, with the change records of a batch.
    pub fn feed_line(&mut self, text: &str) -> Result<Fed, StreamError> {
        Ok(match self.feed_raw(text)? {
            FedRaw::Session(s) => Fed::Session(s),
            FedRaw::Batch {
                line,
                hash,
                records,
            } => Fed::Batch {
                line,
                hash,
                changes: records
                    .values()
                    .map_err(|_| StreamError::Malformed(self.line))?,
            },
        })
    }

    /// As `feed_line`, with a batch's records left as the plugin wrote them: every check but
    /// that each record reads as a `serde_json::Value` (`Records::values`,
    /// `shown::ChangeWriter`; a record that does not is refused as `Malformed`).
    pub fn feed_raw(&mut self, text: &str) -> Result<FedRaw, StreamError> {
        let line = self.parse(text)?;
        self.check(line)
    }

    /// The first half of `feed_raw`: counts the line and reads it, checking nothing else (a
    /// consumer may act between the halves, before a session line's data key is unwrapped).
    pub fn parse(&mut self, text: &str) -> Result<Line, StreamError> {
        self.line += 1;
        serde_json::from_str(text).map_err(|_| StreamError::Malformed(self.line))
    }

    /// The second half of `feed_raw`: every check of the line `parse` read last.
    pub fn check(&mut self, line: Line) -> Result<FedRaw, StreamError> {
        let n = self.line;
        match line {
            Line::Session(s) => {
                let msg = s.message();
                if !self.verify(&s.key_id, &msg, &s.signature) {
                    return Err(StreamError::Signature(n));
                }
                let v2 = s.version.is_some();
                if (v2 && s.origin().is_none()) || (!v2 && s.has_v2_fields()) {
                    return Err(StreamError::Malformed(n));
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
                        slot: s.slot.clone(),
                        dek,
                        seq: 0,
                        prev: sha256(&msg),
                        v2,
                    },
                );
                Ok(FedRaw::Session(s))
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
                let well_formed = if open.v2 {
                    b.emission().is_some() && b.last.is_some()
                } else {
                    b.commit_lsn.is_none() && b.last.is_none()
                };
                if !well_formed {
                    return Err(StreamError::Malformed(n));
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
                let mut plain = envelope::open(&open.dek, &binding, &ct)
                    .map_err(|e| StreamError::Envelope(n, e))?;
                // A JSON array (which serde_json reads only from valid UTF-8) is valid UTF-8
                // throughout: the bytes between its elements are JSON punctuation.
                let plain = zeroize::Zeroizing::new(
                    String::from_utf8(std::mem::take(&mut *plain)).map_err(|e| {
                        zeroize::Zeroize::zeroize(&mut e.into_bytes());
                        StreamError::Malformed(n)
                    })?,
                );
                // Leaves are the change records exactly as the plugin wrote them.
                let raw: Vec<&serde_json::value::RawValue> =
                    serde_json::from_str(&plain).map_err(|_| StreamError::Malformed(n))?;
                let spans: Vec<std::ops::Range<usize>> = raw
                    .iter()
                    .map(|c| {
                        let at = c.get().as_ptr() as usize - plain.as_ptr() as usize;
                        at..at + c.get().len()
                    })
                    .collect();
                let leaves: Vec<[u8; 32]> = raw
                    .iter()
                    .map(|c| merkle::leaf_hash(c.get().as_bytes()))
                    .collect();
                drop(raw);
                let records = Records { plain, spans };
                if hex::encode(merkle::root(&leaves)) != b.merkle_root
                    || records.len() as i64 != b.changes
                {
                    // A record that does not read as a Value is refused first, as it always was.
                    if records.values().is_err() {
                        return Err(StreamError::Malformed(n));
                    }
                    return Err(StreamError::Root(n));
                }
                open.seq = b.seq;
                open.prev = sha256(&msg);
                Ok(FedRaw::Batch {
                    line: b,
                    hash: open.prev,
                    records,
                })
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
    fn a_batch_line_is_written_exactly_as_serde_writes_it() {
        let base = BatchLine {
            slot: "s\"lot\\ü\n".into(),
            session: "abc".into(),
            seq: -7,
            lsn_start: "0/10".into(),
            lsn_end: "0/20".into(),
            xid: i64::MAX,
            commit_time: i64::MIN,
            tables: vec!["public.\"odd\u{1}\"".into(), "a.b".into()],
            changes: 0,
            ciphertext: "AbZ09+/=".into(),
            merkle_root: "00".into(),
            prev: "ff".into(),
            commit_lsn: None,
            last: None,
            key_id: "k".into(),
            signature: "\u{7f}".into(),
        };
        let variants = [
            base.clone(),
            BatchLine {
                commit_lsn: Some("0/30".into()),
                last: Some(true),
                tables: vec![],
                ..base.clone()
            },
            BatchLine {
                commit_lsn: Some("0/30".into()),
                last: Some(false),
                ciphertext: "not \"base64\"\t".into(),
                ..base.clone()
            },
            BatchLine {
                ciphertext: "ü\u{7f} written as it is".into(),
                ..base.clone()
            },
            BatchLine {
                ciphertext: String::new(),
                ..base
            },
        ];
        for line in variants {
            let json = line.to_json();
            assert_eq!(
                json,
                serde_json::to_string(&Line::Batch(line.clone())).unwrap()
            );
            assert_eq!(
                serde_json::from_str::<Line>(&json).unwrap(),
                Line::Batch(line)
            );
        }
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

    /// `vsql-vault decrypt`'s path (`feed_raw`, records written by `shown::ChangeWriter`) prints
    /// exactly what the `Value` path (`feed_line`, each change displayed) prints, and refuses
    /// the same line with the same error, on intact and on tampered streams.
    #[test]
    fn the_raw_path_prints_and_refuses_exactly_as_the_value_path() {
        let (ring, key) = setup();
        let run_values = |ls: &[String]| -> (Vec<u8>, Option<String>) {
            let mut r = reader(&key);
            let mut out = Vec::new();
            for l in ls {
                match r.feed_line(l) {
                    Ok(Fed::Batch { changes, .. }) => {
                        for c in changes {
                            out.extend_from_slice(format!("{c}\n").as_bytes());
                        }
                    }
                    Ok(Fed::Session(_)) => {}
                    Err(e) => return (out, Some(e.to_string())),
                }
            }
            (out, None)
        };
        let run_raw = |ls: &[String]| -> (Vec<u8>, Option<String>) {
            let mut r = reader(&key);
            let mut w = crate::shown::ChangeWriter::new();
            let mut out = Vec::new();
            for l in ls {
                match r.feed_raw(l) {
                    Ok(FedRaw::Batch { records, .. }) => {
                        let mut batch = Vec::new();
                        for c in records.iter() {
                            if w.write(c, &mut batch).is_err() {
                                let e = StreamError::Malformed(r.line_number());
                                return (out, Some(e.to_string()));
                            }
                            batch.push(b'\n');
                        }
                        out.extend_from_slice(&batch);
                    }
                    Ok(FedRaw::Session(_)) => {}
                    Err(e) => return (out, Some(e.to_string())),
                }
            }
            (out, None)
        };
        // Records of every kind the plugin writes, and some it never does (sealed and signed
        // all the same): floats, escapes serde_json prints otherwise, repeated keys, a record
        // that is JSON but not a Value (too deep).
        let seal = |batches: &[&Vec<String>]| -> Vec<String> {
            let (mut s, header) =
                Sealer::start("slot1", &Kek::File(ring.clone()), key.clone(), 1).unwrap();
            let mut lines = vec![header];
            for (i, b) in batches.iter().enumerate() {
                let t = vec!["public.t".into()];
                lines.push(s.batch(b, "0/10", "0/20", 700 + i as i64, 5, t).unwrap());
            }
            lines
        };
        let batches: Vec<Vec<String>> = vec![
            vec![
                r#"{"action":"I","schema":"public","table":"t","columns":[["id","integer","1"],["n","text","a \"q\" \n ü"],["big","text"]],"identity":[],"key":["id"],"lsn":"0/10","xid":7}"#.into(),
                r#"{"action":"M","content":"/wD+","content_encoding":"base64","lsn":"0/1","prefix":"p","transactional":false,"xid":0}"#.into(),
            ],
            vec![
                r#"{"b":1.50,"a":"\u00e9\/","columns":[["x","y","z","w"]]}"#.into(),
                r#"{"a":1,"a":2,"identity":[["k","t",-0]]}"#.into(),
            ],
            vec![format!("{{\"a\":{}1{}}}", "[".repeat(200), "]".repeat(200))],
            vec![r#"{"action":"D","table":"t"}"#.into()],
        ];
        let lines = seal(&batches.iter().collect::<Vec<_>>());
        let (values, err) = run_values(&lines);
        assert_eq!(run_raw(&lines), (values.clone(), err.clone()));
        // The deep record is refused as malformed, after the batches before it.
        assert_eq!(err, Some(StreamError::Malformed(4).to_string()));
        assert!(String::from_utf8(values)
            .unwrap()
            .contains(r#"{"a":"é/","b":1.5,"columns":[{"name":"x","type":"y","value":"z"}]}"#));
        // Without the deep batch, every line passes on both paths.
        let resealed = seal(&[&batches[0], &batches[1], &batches[3]]);
        let (values, err) = run_values(&resealed);
        assert_eq!(err, None);
        assert_eq!(run_raw(&resealed), (values, None));
        // Tampered: each line cut short, and bytes of each line replaced.
        for (n, l) in resealed.iter().enumerate() {
            for cut in (0..l.len()).step_by(97) {
                let mut t = resealed.clone();
                t[n].truncate(cut);
                assert_eq!(run_raw(&t), run_values(&t), "line {n} cut at {cut}");
            }
            for at in (0..l.len()).step_by(89) {
                let mut t = resealed.clone();
                let mut b = t[n].clone().into_bytes();
                b[at] = if b[at] == b'0' { b'1' } else { b'0' };
                t[n] = String::from_utf8_lossy(&b).into_owned();
                assert_eq!(run_raw(&t), run_values(&t), "line {n} byte {at}");
            }
        }
        // Dropped, repeated and reordered lines.
        let mut t = resealed.clone();
        t.remove(2);
        assert_eq!(run_raw(&t), run_values(&t));
        let mut t = resealed.clone();
        t.insert(2, t[1].clone());
        assert_eq!(run_raw(&t), run_values(&t));
        let mut t = resealed.clone();
        t.swap(1, 2);
        assert_eq!(run_raw(&t), run_values(&t));
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
