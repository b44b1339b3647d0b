//! Continuity of a replication stream across sessions (issue 16, item 7) and the source it comes
//! from (item 8): the decisions `vsql-vault decrypt` takes at each session line, and the state it
//! keeps between runs (`--state FILE`). Pure functions, no I/O but the state file's text form.
//!
//! Positions: a batch's *emission* is the LSN of the record that made the server send it, the
//! commit record of its transaction (every chunk of a large transaction shares it) or a
//! non-transactional message. The server sends emissions in increasing order and, on resuming a
//! slot at `resume`, sends again every emission at or after `resume` and none before.

use crate::stream::{BatchLine, SessionLine};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where a reader of the stream stands: the last emission it has, and, when it has only part of
/// that emission (the first chunks of a large transaction), how many change records of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The emission's LSN as a number (`0` before anything was sent on the slot).
    pub lsn: u64,
    /// `None` when the emission is complete; `Some(n)` when only its first `n` records are had.
    pub partial: Option<u64>,
}

impl Position {
    pub const START: Position = Position {
        lsn: 0,
        partial: None,
    };

    fn text(&self) -> String {
        match self.partial {
            None => lsn_text(self.lsn),
            Some(n) => format!("{} (first {n} records)", lsn_text(self.lsn)),
        }
    }
}

/// The source a session line names (format 2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub system_id: String,
    pub database: String,
    pub database_oid: i64,
    pub slot: String,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "system {} database {} (oid {}) slot {}",
            self.system_id, self.database, self.database_oid, self.slot
        )
    }
}

/// What a session line (format 2) says about where the server resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumption {
    /// The slot's confirmed position when the decoding session started.
    pub confirmed: u64,
    /// Where decoding resumed: emissions at or after it are sent (again) in this session.
    pub resume: u64,
    /// The last emission the server sent on this slot before this session's first batch and will
    /// not send again (`Position::START` when it sent none); `None` when it has no record of it
    /// (a slot used by a library older than format 2).
    pub prev: Option<Position>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContinuityError {
    #[error(
        "gap: the server had sent up to {through} before this session and will not send it again, but this consumer processed only up to {after}: the batches after {after} up to {through} are missing (dropped, or consumed by another reader)"
    )]
    Gap { after: String, through: String },
    #[error(
        "gap: the slot was moved on to {resume} at the client's request, past {after} where this consumer stands: whatever committed in between was never sent"
    )]
    Skipped { after: String, resume: String },
    #[error(
        "this consumer's position {had} is not one the server sent before resuming at {resume} (it last sent {prev}): the slot was dropped and re-created, or the state belongs to another stream"
    )]
    Unknown {
        had: String,
        prev: String,
        resume: String,
    },
    #[error("the stream comes from {got}, but this consumer is bound to {bound}")]
    OtherSource { bound: String, got: String },
    #[error("the stream comes from {got}, not from the expected {what} {expected}")]
    Unexpected {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error(
        "a session line of format 1 names no source and no position, but {0}: refusing to continue unchecked"
    )]
    Downgrade(&'static str),
    #[error("state file: {0}")]
    State(String),
}

/// The verdict on a session line that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing missing between the consumer's position and where the server resumed.
    Continuous,
    /// The server resumed at or before the consumer's position: batches it already processed come
    /// again and are skipped.
    Replay { through: Position },
    /// Nothing can be checked; the reason, for standard error.
    Unchecked(String),
}

/// The decision at a session line of format 2: `had` is the consumer's position (`None` when it
/// has none: first run without state).
pub fn check_resume(had: Option<Position>, r: &Resumption) -> Result<Verdict, ContinuityError> {
    let Some(prev) = r.prev else {
        return Ok(Verdict::Unchecked(format!(
            "the server has no record of what it sent on this slot before resuming at {} (slot used by an older library): a gap before this session cannot be detected",
            lsn_text(r.resume)
        )));
    };
    let Some(had) = had else {
        if prev == Position::START && r.resume <= r.confirmed {
            // A slot that never sent anything: this is the very beginning of its stream.
            return Ok(Verdict::Continuous);
        }
        return Ok(Verdict::Unchecked(format!(
            "no earlier position (no --state, or a new state file): whatever the server sent on this slot before {} (up to {}) cannot be checked",
            lsn_text(r.resume),
            prev.text()
        )));
    };
    let gap = || ContinuityError::Gap {
        after: had.text(),
        through: prev.text(),
    };
    if prev.lsn > had.lsn {
        return Err(gap());
    }
    if prev.lsn == had.lsn && prev != had {
        // The same emission, more of it sent than processed (or the opposite, which only a state
        // from elsewhere explains).
        let ahead = match (prev.partial, had.partial) {
            (None, Some(_)) => true,
            (Some(p), Some(h)) => p > h,
            _ => false,
        };
        if ahead {
            return Err(gap());
        }
        return Err(unknown(had, prev, r.resume));
    }
    if prev == had {
        // Sent exactly up to where the consumer stands. With `resume` at or before it, this is a
        // new data key within one decoding session (a new session at or before the consumer's
        // position would state an earlier `prev`): its batches continue, they do not repeat.
        if r.resume > had.lsn && had.partial.is_some() {
            // The rest of the consumer's last transaction was confirmed and will not come again.
            return Err(ContinuityError::Gap {
                after: had.text(),
                through: lsn_text(had.lsn),
            });
        }
        return skipped_check(had, r);
    }
    if r.resume <= had.lsn {
        return Ok(Verdict::Replay { through: had });
    }
    // Here prev < had < resume: the server will not send the consumer's last emission again, yet
    // states that it sent only up to before it.
    Err(unknown(had, prev, r.resume))
}

/// A continuation, unless the client started decoding past the slot's confirmed position and past
/// the consumer (what committed in between was never sent).
fn skipped_check(had: Position, r: &Resumption) -> Result<Verdict, ContinuityError> {
    if r.resume > r.confirmed && r.resume > had.lsn.max(r.confirmed) {
        return Err(ContinuityError::Skipped {
            after: lsn_text(had.lsn.max(r.confirmed)),
            resume: lsn_text(r.resume),
        });
    }
    Ok(Verdict::Continuous)
}

fn unknown(had: Position, prev: Position, resume: u64) -> ContinuityError {
    ContinuityError::Unknown {
        had: had.text(),
        prev: prev.text(),
        resume: lsn_text(resume),
    }
}

/// How many leading change records of a batch of emission `emission` to skip as already
/// processed, given the consumer's position `had` and the records of that emission already seen
/// in this session before the batch (`seen`). `usize::MAX`: all of them.
pub fn records_to_skip(had: Option<Position>, emission: u64, seen: u64) -> u64 {
    match had {
        Some(h) if emission < h.lsn => u64::MAX,
        Some(h) if emission == h.lsn => match h.partial {
            None => u64::MAX,
            Some(n) => n.saturating_sub(seen),
        },
        _ => 0,
    }
}

/// The source check at a session line of format 2: `--expect-*` options first, then the source the
/// state is bound to.
pub fn check_source(
    got: &Source,
    bound: Option<&Source>,
    expect_system_id: Option<&str>,
    expect_database: Option<&str>,
) -> Result<(), ContinuityError> {
    if let Some(e) = expect_system_id.filter(|e| *e != got.system_id) {
        return Err(ContinuityError::Unexpected {
            what: "system identifier",
            expected: e.to_owned(),
            got: got.to_string(),
        });
    }
    if let Some(e) = expect_database.filter(|e| *e != got.database) {
        return Err(ContinuityError::Unexpected {
            what: "database",
            expected: e.to_owned(),
            got: got.to_string(),
        });
    }
    if let Some(b) = bound.filter(|b| *b != got) {
        return Err(ContinuityError::OtherSource {
            bound: b.to_string(),
            got: got.to_string(),
        });
    }
    Ok(())
}

/// What a consumer keeps between runs (`vsql-vault decrypt --state FILE`), as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// The format of this file: 1.
    pub version: u32,
    /// The source of the first format-2 session seen; every later one must match.
    pub source: Option<Source>,
    /// The last session seen and its last batch (sequence and SHA-256 of its signed record).
    pub session: Option<String>,
    pub last_seq: i64,
    pub last_hash: Option<String>,
    /// The last emission processed (printed or skipped as already printed).
    pub position: Option<Position>,
}

pub const STATE_VERSION: u32 = 1;

impl ConsumerState {
    pub fn new() -> ConsumerState {
        ConsumerState {
            version: STATE_VERSION,
            ..Default::default()
        }
    }

    pub fn parse(text: &str) -> Result<ConsumerState, ContinuityError> {
        let s: ConsumerState =
            serde_json::from_str(text).map_err(|e| ContinuityError::State(e.to_string()))?;
        if s.version != STATE_VERSION {
            return Err(ContinuityError::State(format!(
                "format {} (this consumer reads format {STATE_VERSION})",
                s.version
            )));
        }
        Ok(s)
    }

    pub fn to_text(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }
}

/// The continuity and source checks of one consumer, run on every verified line: in memory for
/// one run, or carried between runs in a `ConsumerState`.
pub struct Follower {
    pub state: ConsumerState,
    expect_system_id: Option<String>,
    expect_database: Option<String>,
    /// The emission of the current session's latest batch and the records of it seen in this
    /// session (a replayed large transaction comes again from its first record).
    seen: Option<(u64, u64)>,
    /// Whether the current session is of format 2 (positions tracked).
    tracked: bool,
}

impl Follower {
    pub fn new(
        state: ConsumerState,
        expect_system_id: Option<String>,
        expect_database: Option<String>,
    ) -> Follower {
        Follower {
            state,
            expect_system_id,
            expect_database,
            seen: None,
            tracked: false,
        }
    }

    /// Checks a verified session line; returns what to say on standard error.
    pub fn session(&mut self, line: &SessionLine) -> Result<Vec<String>, ContinuityError> {
        let mut notes = Vec::new();
        self.seen = None;
        match line.origin() {
            None => {
                if self.expect_system_id.is_some() || self.expect_database.is_some() {
                    return Err(ContinuityError::Downgrade(
                        "--expect-system-id or --expect-database asks for a check",
                    ));
                }
                if self.state.source.is_some() {
                    return Err(ContinuityError::Downgrade(
                        "this consumer is bound to a source that writes format 2",
                    ));
                }
                self.tracked = false;
                notes.push(format!(
                    "session {}: format 1 (a server older than format 2): its source and its continuity with earlier sessions cannot be checked",
                    line.session
                ));
            }
            Some(o) => {
                check_source(
                    &o.source,
                    self.state.source.as_ref(),
                    self.expect_system_id.as_deref(),
                    self.expect_database.as_deref(),
                )?;
                match check_resume(self.state.position, &o.resumption)? {
                    Verdict::Continuous => {
                        // A large transaction continued under a new data key: its next batches
                        // carry the records after those already had.
                        if let Some(Position {
                            lsn,
                            partial: Some(n),
                        }) = self.state.position
                        {
                            self.seen = Some((lsn, n));
                        }
                    }
                    Verdict::Replay { through } => notes.push(format!(
                        "session {}: the server resumed at {}, at or before {} already processed: what comes again is skipped",
                        line.session,
                        lsn_text(o.resumption.resume),
                        through.text()
                    )),
                    Verdict::Unchecked(why) => {
                        notes.push(format!("session {}: not checked: {why}", line.session))
                    }
                }
                if self.state.source.is_none() {
                    self.state.source = Some(o.source);
                }
                self.tracked = true;
            }
        }
        self.state.session = Some(line.session.clone());
        self.state.last_seq = 0;
        self.state.last_hash = None;
        Ok(notes)
    }

    /// Takes a verified batch: returns the changes not processed before, and what to say on
    /// standard error when some were skipped.
    pub fn batch(
        &mut self,
        line: &BatchLine,
        hash: [u8; 32],
        mut changes: Vec<serde_json::Value>,
    ) -> (Vec<serde_json::Value>, Option<String>) {
        let (skip, note) = self.batch_of(line, hash, changes.len());
        changes.drain(..skip);
        (changes, note)
    }

    /// As `batch`, for a batch of `count` changes: how many of its first changes were processed
    /// before (to skip), and what to say on standard error when some were.
    pub fn batch_of(
        &mut self,
        line: &BatchLine,
        hash: [u8; 32],
        count: usize,
    ) -> (usize, Option<String>) {
        self.state.last_seq = line.seq;
        self.state.last_hash = Some(hex::encode(hash));
        let (Some(emission), Some(last), true) = (line.emission(), line.last, self.tracked) else {
            return (0, None);
        };
        let n = count as u64;
        let seen = match self.seen {
            Some((e, k)) if e == emission => k,
            _ => 0,
        };
        self.seen = Some((emission, seen + n));
        let had = self.state.position;
        let skip = records_to_skip(had, emission, seen).min(n);
        let advanced = match had {
            Some(h) if emission < h.lsn => None,
            Some(h) if emission == h.lsn && h.partial.is_none() => None,
            Some(h) if emission == h.lsn => Some(Position {
                lsn: emission,
                partial: (!last).then(|| h.partial.unwrap_or(0).max(seen + n)),
            }),
            _ => Some(Position {
                lsn: emission,
                partial: (!last).then_some(seen + n),
            }),
        };
        if let Some(p) = advanced {
            self.state.position = Some(p);
        }
        if skip == 0 {
            return (0, None);
        }
        let note = format!(
            "batch {} of session {} ({} of transaction {} at {}): already processed, skipped",
            line.seq,
            line.session,
            if skip == n {
                format!("all {n} changes")
            } else {
                format!("the first {skip} of {n} changes")
            },
            line.xid,
            lsn_text(emission)
        );
        (skip as usize, Some(note))
    }
}

/// The server's record of what it sent on a slot (`pg_replslot/<slot>/vsql_vault.sent`, removed
/// with the slot): a base, then the emission of every transaction or message sent completely since,
/// each as 8 bytes little-endian. The base is `SENT_NOTHING` for a slot that never sent anything,
/// `SENT_UNKNOWN` when what was sent before the log began is unknown (a slot older than the log),
/// else the last emission sent below the positions kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentLog {
    pub base: u64,
    pub entries: Vec<u64>,
}

pub const SENT_NOTHING: u64 = 0;
pub const SENT_UNKNOWN: u64 = u64::MAX;

impl SentLog {
    /// Reads the file's bytes (an empty file, or a torn last entry, is read as far as it goes).
    pub fn parse(bytes: &[u8]) -> SentLog {
        let mut words = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8])));
        SentLog {
            base: words.next().unwrap_or(SENT_UNKNOWN),
            entries: words.collect(),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        std::iter::once(self.base)
            .chain(self.entries.iter().copied())
            .flat_map(u64::to_le_bytes)
            .collect()
    }

    /// The last emission sent before `resume` (what a session resuming there states as `prev`):
    /// `None` when unknown.
    pub fn sent_before(&self, resume: u64) -> Option<Position> {
        let logged = self.entries.iter().copied().filter(|e| *e < resume).max();
        let lsn = match (logged, self.base) {
            (Some(e), _) => e,
            (None, SENT_UNKNOWN) => return None,
            (None, base) => base,
        };
        Some(Position { lsn, partial: None })
    }

    /// The log with every entry below `below` folded into the base (positions a session can no
    /// longer resume before); `None` when there is nothing to fold.
    pub fn pruned(&self, below: u64) -> Option<SentLog> {
        let folded = self.entries.iter().copied().filter(|e| *e < below).max()?;
        Some(SentLog {
            base: folded,
            entries: self
                .entries
                .iter()
                .copied()
                .filter(|e| *e >= below)
                .collect(),
        })
    }
}

/// `X/Y` (PostgreSQL's text form of an LSN) as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// An LSN in PostgreSQL's text form.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64) -> Position {
        Position { lsn, partial: None }
    }

    fn part(lsn: u64, n: u64) -> Position {
        Position {
            lsn,
            partial: Some(n),
        }
    }

    fn r(confirmed: u64, resume: u64, prev: Option<Position>) -> Resumption {
        Resumption {
            confirmed,
            resume,
            prev,
        }
    }

    #[test]
    fn a_session_resuming_right_after_the_consumer_is_continuous() {
        assert_eq!(
            check_resume(Some(at(100)), &r(120, 120, Some(at(100)))),
            Ok(Verdict::Continuous)
        );
        // A fresh slot, a fresh consumer.
        assert_eq!(
            check_resume(None, &r(50, 50, Some(Position::START))),
            Ok(Verdict::Continuous)
        );
        // A data key replaced in the middle of a large transaction: the next session continues it.
        assert_eq!(
            check_resume(Some(part(100, 7)), &r(40, 40, Some(part(100, 7)))),
            Ok(Verdict::Continuous)
        );
        assert_eq!(
            check_resume(Some(at(100)), &r(40, 40, Some(at(100)))),
            Ok(Verdict::Continuous)
        );
    }

    #[test]
    fn a_missing_tail_or_session_is_a_gap_naming_the_range() {
        let e = check_resume(Some(at(100)), &r(300, 300, Some(at(200)))).unwrap_err();
        assert!(matches!(e, ContinuityError::Gap { .. }));
        let text = e.to_string();
        assert!(text.contains("0/64") && text.contains("0/C8"), "{text}");
        // Part of one large transaction missing.
        assert!(matches!(
            check_resume(Some(part(100, 3)), &r(40, 40, Some(part(100, 5)))),
            Err(ContinuityError::Gap { .. })
        ));
        assert!(matches!(
            check_resume(Some(part(100, 3)), &r(40, 40, Some(at(100)))),
            Err(ContinuityError::Gap { .. })
        ));
        // The rest of the consumer's last transaction confirmed and not coming again.
        assert!(matches!(
            check_resume(Some(part(100, 3)), &r(150, 150, Some(part(100, 3)))),
            Err(ContinuityError::Gap { .. })
        ));
    }

    #[test]
    fn a_resume_at_or_before_the_consumer_is_a_replay() {
        assert_eq!(
            check_resume(Some(at(100)), &r(60, 60, Some(at(50)))),
            Ok(Verdict::Replay { through: at(100) })
        );
        assert_eq!(
            check_resume(Some(at(100)), &r(100, 100, Some(at(50)))),
            Ok(Verdict::Replay { through: at(100) })
        );
        assert_eq!(records_to_skip(Some(at(100)), 90, 0), u64::MAX);
        assert_eq!(records_to_skip(Some(at(100)), 100, 0), u64::MAX);
        assert_eq!(records_to_skip(Some(at(100)), 101, 0), 0);
        assert_eq!(records_to_skip(Some(part(100, 5)), 100, 0), 5);
        assert_eq!(records_to_skip(Some(part(100, 5)), 100, 3), 2);
        assert_eq!(records_to_skip(Some(part(100, 5)), 100, 9), 0);
        assert_eq!(records_to_skip(None, 100, 0), 0);
    }

    #[test]
    fn positions_the_server_never_sent_and_skipped_ranges_are_refused() {
        assert!(matches!(
            check_resume(Some(at(100)), &r(300, 300, Some(at(80)))),
            Err(ContinuityError::Unknown { .. })
        ));
        assert!(matches!(
            check_resume(Some(part(100, 9)), &r(40, 40, Some(part(100, 5)))),
            Err(ContinuityError::Unknown { .. })
        ));
        // A start position past the slot's confirmed one skips what committed in between.
        assert!(matches!(
            check_resume(Some(at(100)), &r(120, 500, Some(at(100)))),
            Err(ContinuityError::Skipped { .. })
        ));
        assert!(matches!(
            check_resume(None, &r(120, 500, Some(Position::START))),
            Ok(Verdict::Unchecked(_))
        ));
    }

    #[test]
    fn without_a_record_on_either_side_nothing_is_checked() {
        assert!(matches!(
            check_resume(Some(at(100)), &r(300, 300, None)),
            Ok(Verdict::Unchecked(_))
        ));
        assert!(matches!(
            check_resume(None, &r(300, 300, Some(at(200)))),
            Ok(Verdict::Unchecked(_))
        ));
    }

    #[test]
    fn a_consumer_refuses_another_source() {
        let a = Source {
            system_id: "1".into(),
            database: "d".into(),
            database_oid: 5,
            slot: "s".into(),
        };
        let mut b = a.clone();
        b.system_id = "2".into();
        assert_eq!(check_source(&a, Some(&a), Some("1"), Some("d")), Ok(()));
        assert!(matches!(
            check_source(&b, Some(&a), None, None),
            Err(ContinuityError::OtherSource { .. })
        ));
        assert!(matches!(
            check_source(&a, None, Some("2"), None),
            Err(ContinuityError::Unexpected { .. })
        ));
        assert!(matches!(
            check_source(&a, None, None, Some("e")),
            Err(ContinuityError::Unexpected { .. })
        ));
    }

    #[test]
    fn the_sent_log_answers_what_was_sent_before_a_resume() {
        let log = SentLog {
            base: SENT_UNKNOWN,
            entries: vec![100, 200, 300, 200],
        };
        assert_eq!(SentLog::parse(&log.bytes()), log);
        assert_eq!(log.sent_before(250), Some(at(200)));
        assert_eq!(log.sent_before(301), Some(at(300)));
        assert_eq!(log.sent_before(100), None);
        let fresh = SentLog {
            base: SENT_NOTHING,
            entries: vec![],
        };
        assert_eq!(fresh.sent_before(100), Some(Position::START));
        // A torn last entry is ignored; an empty file is unknown.
        let mut torn = log.bytes();
        torn.extend([1, 2, 3]);
        assert_eq!(SentLog::parse(&torn), log);
        assert_eq!(SentLog::parse(&[]).sent_before(5), None);
        let p = log.pruned(250).unwrap();
        assert_eq!(
            p,
            SentLog {
                base: 200,
                entries: vec![300]
            }
        );
        assert_eq!(p.sent_before(260), Some(at(200)));
        assert_eq!(p.pruned(250), None);
    }

    #[test]
    fn the_state_file_reads_back_and_refuses_other_formats() {
        let mut s = ConsumerState::new();
        s.position = Some(part(0x1_0000_00ff, 3));
        s.session = Some("ab".into());
        assert_eq!(ConsumerState::parse(&s.to_text()), Ok(s.clone()));
        let other = s.to_text().replace("\"version\": 1", "\"version\": 9");
        assert!(ConsumerState::parse(&other).is_err());
        assert!(ConsumerState::parse("{").is_err());
        assert_eq!(parse_lsn("1/FF"), Some(0x1_0000_00ff));
        assert_eq!(lsn_text(0x1_0000_00ff), "1/FF");
        for bad in ["", "1", "/1", "1/", "g/1", "123456789/1", "1/-1"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
    }

    /// Sessions from the real Sealer, read by the real Reader, followed.
    mod end_to_end {
        use super::super::*;
        use super::{at, part};
        use crate::envelope::{Kek, KekRing};
        use crate::keys;
        use crate::stream::{Fed, Origin, Reader, Sealer};
        use ed25519_dalek::SigningKey;

        fn ring() -> Kek {
            Kek::File(KekRing::parse("k", &format!("v1 {}\n", "33".repeat(32))).unwrap())
        }

        fn source() -> Source {
            Source {
                system_id: "7301".into(),
                database: "db".into(),
                database_oid: 16384,
                slot: "s".into(),
            }
        }

        /// A session resuming at `resume` after `prev`, with one transaction per emission.
        fn session(
            key: &SigningKey,
            resume: u64,
            prev: Position,
            emissions: &[u64],
        ) -> Vec<String> {
            let origin = Origin {
                source: source(),
                resumption: Resumption {
                    confirmed: resume,
                    resume,
                    prev: Some(prev),
                },
            };
            let (mut s, header) = Sealer::start_from(&origin, &ring(), key.clone(), 1).unwrap();
            let mut lines = vec![header];
            for e in emissions {
                let change = format!("{{\"action\":\"I\",\"n\":{e}}}");
                let lsn = lsn_text(*e);
                lines.push(
                    s.batch_of(Some((&lsn, true)), &[change], &lsn, &lsn, 1, 5, vec![])
                        .unwrap(),
                );
            }
            lines
        }

        /// Runs the lines through a reader and `follower`: the changes printed, or the error.
        fn run(key: &SigningKey, f: &mut Follower, lines: &[String]) -> Result<usize, String> {
            let mut r = Reader::new(ring(), vec![key.verifying_key()]);
            let mut printed = 0;
            for l in lines {
                match r.feed_line(l).map_err(|e| e.to_string())? {
                    Fed::Session(s) => {
                        f.session(&s).map_err(|e| e.to_string())?;
                    }
                    Fed::Batch {
                        line,
                        hash,
                        changes,
                    } => printed += f.batch(&line, hash, changes).0.len(),
                }
            }
            Ok(printed)
        }

        #[test]
        fn sessions_chain_across_runs_gaps_are_refused_and_replays_skipped() {
            let key = keys::generate().unwrap();
            let one = session(&key, 10, Position::START, &[100, 200]);
            let two = session(&key, 250, at(200), &[300]);
            // Two runs, the state carried over.
            let mut f = Follower::new(ConsumerState::new(), None, None);
            assert_eq!(run(&key, &mut f, &one), Ok(2));
            let mut f = Follower::new(f.state.clone(), None, None);
            assert_eq!(run(&key, &mut f, &two), Ok(1));
            // In one run.
            let mut f = Follower::new(ConsumerState::new(), None, None);
            let both: Vec<String> = one.iter().chain(two.iter()).cloned().collect();
            assert_eq!(run(&key, &mut f, &both), Ok(3));
            // The last batch of session one dropped: session two names the gap.
            let mut f = Follower::new(ConsumerState::new(), None, None);
            let err = run(&key, &mut f, &[&one[..2], &two[..]].concat()).unwrap_err();
            assert!(
                err.contains("gap") && err.contains("0/64") && err.contains("0/C8"),
                "{err}"
            );
            // A whole session dropped.
            let three = session(&key, 350, at(300), &[400]);
            let mut f = Follower::new(ConsumerState::new(), None, None);
            let err = run(&key, &mut f, &[&one[..], &three[..]].concat()).unwrap_err();
            assert!(err.contains("gap"), "{err}");
            // A replay: the server resumed before what was processed; nothing printed twice.
            let again = session(&key, 150, at(100), &[200, 300]);
            let mut f = Follower::new(ConsumerState::new(), None, None);
            assert_eq!(run(&key, &mut f, &[&one[..], &again[..]].concat()), Ok(3));
            // Another source, once bound.
            let mut f = Follower::new(ConsumerState::new(), None, None);
            run(&key, &mut f, &one).unwrap();
            f.state.source.as_mut().unwrap().system_id = "9999".into();
            let err = run(&key, &mut f, &two).unwrap_err();
            assert!(err.contains("bound to"), "{err}");
            // Format 1 after format 2 is refused; format 1 alone passes, unchecked.
            let (_, old) = Sealer::start("s", &ring(), key.clone(), 1).unwrap();
            let err = run(&key, &mut f, std::slice::from_ref(&old)).unwrap_err();
            assert!(err.contains("format 1"), "{err}");
            let mut f = Follower::new(ConsumerState::new(), None, None);
            assert_eq!(run(&key, &mut f, std::slice::from_ref(&old)), Ok(0));
            let mut f = Follower::new(ConsumerState::new(), Some("7301".into()), None);
            assert!(run(&key, &mut f, &[old]).is_err());
        }

        #[test]
        fn a_large_transaction_cut_across_sessions_is_resumed_record_for_record() {
            let key = keys::generate().unwrap();
            let origin = |resume, prev| Origin {
                source: source(),
                resumption: Resumption {
                    confirmed: resume,
                    resume,
                    prev: Some(prev),
                },
            };
            let chunk = |s: &mut Sealer, from: u64, to: u64, last: bool| {
                let changes: Vec<String> = (from..to).map(|i| format!("{{\"i\":{i}}}")).collect();
                s.batch_of(Some(("0/64", last)), &changes, "0/10", "0/20", 1, 0, vec![])
                    .unwrap()
            };
            // Session one sent records 0..3 of the transaction committing at 0/64, then stopped.
            let (mut s, h) =
                Sealer::start_from(&origin(10, Position::START), &ring(), key.clone(), 1).unwrap();
            let one = vec![h, chunk(&mut s, 0, 3, false)];
            // Session two sends it all again, in other chunks.
            let (mut s, h) =
                Sealer::start_from(&origin(10, Position::START), &ring(), key.clone(), 1).unwrap();
            let two = vec![h, chunk(&mut s, 0, 2, false), chunk(&mut s, 2, 5, true)];
            let mut f = Follower::new(ConsumerState::new(), None, None);
            assert_eq!(run(&key, &mut f, &one), Ok(3));
            assert_eq!(run(&key, &mut f, &two), Ok(2));
            assert_eq!(f.state.position, Some(at(100)));
            // A new data key in the middle of it, in one decoding session: the next session
            // continues with the records after those sent, none skipped.
            let (mut s, h) =
                Sealer::start_from(&origin(10, Position::START), &ring(), key.clone(), 1).unwrap();
            let before = vec![h, chunk(&mut s, 0, 3, false)];
            let (mut s, h) =
                Sealer::start_from(&origin(10, part(100, 3)), &ring(), key.clone(), 1).unwrap();
            let after = vec![h, chunk(&mut s, 3, 5, true)];
            let mut f = Follower::new(ConsumerState::new(), None, None);
            assert_eq!(
                run(&key, &mut f, &[before.clone(), after.clone()].concat()),
                Ok(5)
            );
            assert_eq!(f.state.position, Some(at(100)));
            // The last chunk before the new key dropped: a gap.
            let mut f = Follower::new(ConsumerState::new(), None, None);
            let (mut s, h) =
                Sealer::start_from(&origin(10, Position::START), &ring(), key.clone(), 1).unwrap();
            let cut = vec![h, chunk(&mut s, 0, 2, false)];
            let (mut s2, h2) =
                Sealer::start_from(&origin(10, part(100, 3)), &ring(), key.clone(), 1).unwrap();
            let rest = vec![h2, chunk(&mut s2, 3, 5, true)];
            let err = run(&key, &mut f, &[cut, rest].concat()).unwrap_err();
            assert!(err.contains("gap"), "{err}");
        }
    }
}
