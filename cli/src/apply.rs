//! `vsql-vault apply`: applies a vsql_vault replication stream to a target PostgreSQL, in order,
//! one target transaction per source transaction (however many batches it was split into),
//! exactly once: the source position is recorded in the target in the same transaction as the
//! changes (`vsql_vault_apply.progress`), and transactions at or before it are skipped.
//!
//! Input: the sealed stream itself (with `--kek-file`/`--kek-command` and `--public-key`, checked
//! by the same `Reader` as `vsql-vault decrypt`), or `vsql-vault decrypt --markers` output, whose
//! marker lines carry what the batch lines say in clear (session, xid, LSNs, whether the batch
//! ends its transaction).

use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls, Statement};
use std::collections::HashMap;
use std::io::BufRead;
use thiserror::Error;
use vsql_vault_core::stream::{BatchLine, Line, Reader, SessionLine};

#[derive(clap::Args)]
pub struct Args {
    /// The target database: a libpq connection string or URL (`postgres://user@host/db`). No TLS.
    #[arg(long = "target", value_name = "CONNINFO")]
    target: String,
    /// Key-encryption key file: the input is the sealed stream (pg_recvlogical's output).
    #[arg(long = "kek-file", value_name = "FILE")]
    kek_file: Option<String>,
    /// A KMS command (as for `decrypt`): the input is the sealed stream.
    #[arg(long = "kek-command", value_name = "CMD")]
    kek_command: Option<String>,
    /// A trusted Ed25519 public key of the source (with a KEK); repeatable.
    #[arg(long = "public-key", value_name = "HEX")]
    public_keys: Vec<String>,
    /// The stream; standard input when absent.
    #[arg(long = "input", value_name = "FILE")]
    input: Option<String>,
    /// Logical messages: skipped, or stored in `vsql_vault_apply.messages`.
    #[arg(long = "messages", value_enum, default_value = "skip")]
    messages: Messages,
    /// An UPDATE or DELETE whose row is not in the target: an error, or skipped.
    #[arg(long = "missing-rows", value_enum, default_value = "error")]
    missing_rows: Missing,
    /// The name under which the target records its position (default: the source's slot).
    #[arg(long = "source", value_name = "NAME")]
    source: Option<String>,
    /// After each commit, also write the applied position to this file (atomically).
    #[arg(long = "state", value_name = "FILE")]
    state: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Messages {
    Skip,
    Table,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Missing {
    Error,
    Skip,
}

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error("cannot connect to the target: {0}")]
    Connect(String),
    #[error("the target refused its setup ({0}); apply needs a role that may SET session_replication_role (superuser) and create schema vsql_vault_apply")]
    Setup(String),
    #[error("{0}")]
    Stream(#[from] vsql_vault_core::stream::StreamError),
    #[error("input line {0}: {1}")]
    Input(usize, String),
    #[error("input line {0}: a change before any session marker (decrypted input must come from `vsql-vault decrypt --markers`)")]
    NoMarkers(usize),
    #[error(
        "input line {0}: a sealed stream line; give --kek-file (or --kek-command) and --public-key"
    )]
    Sealed(usize),
    #[error("a batch (xid {0}) before any session marker")]
    NoSession(i64),
    #[error("batch of xid {0}: malformed LSN {1:?}")]
    BadLsn(i64, String),
    #[error("batch of xid {got} while transaction {open} is unfinished (stream cut or spliced?)")]
    Interleaved { open: i64, got: i64 },
    #[error("xid {xid}, {action} at {lsn}: table {table} does not exist in the target (create it first: DDL is not replicated)")]
    NoTable {
        xid: i64,
        action: String,
        lsn: String,
        table: String,
    },
    #[error(
        "xid {xid}, {action} at {lsn}: column {column} of {table} does not exist in the target"
    )]
    NoColumn {
        xid: i64,
        action: String,
        lsn: String,
        table: String,
        column: String,
    },
    #[error("xid {xid}, {action} at {lsn} on {table}: {reason}")]
    Change {
        xid: i64,
        action: String,
        lsn: String,
        table: String,
        reason: String,
    },
    #[error("xid {xid}, {action} at {lsn} on {table}: no target row matches the old key {key} (use --missing-rows skip to go on)")]
    NoRow {
        xid: i64,
        action: String,
        lsn: String,
        table: String,
        key: String,
    },
    #[error("xid {xid}, {action} at {lsn} on {table}: {count} target rows match the old key {key}; the key is not unique in the target")]
    ManyRows {
        xid: i64,
        action: String,
        lsn: String,
        table: String,
        key: String,
        count: u64,
    },
    #[error("xid {xid} (commit {lsn}): the target refused it: {reason}")]
    Target {
        xid: i64,
        lsn: String,
        reason: String,
    },
    #[error("source {name}: the target's position moved past {lsn} while this transaction was applied (another apply for the same source?)")]
    Raced { name: String, lsn: String },
    #[error("state file {0}: {1}")]
    State(String, String),
}

/// The marker `decrypt --markers` prints for a (verified) stream line: `"action":"S"` for a
/// session, `"action":"B"` before a batch's changes, with what the batch line says in clear.
/// A batch whose `commit_time` is 0 is a chunk of a larger transaction that the next batch of
/// the session continues; the batch the commit seals has its commit time, and its `lsn_end` is
/// the commit LSN. (A non-transactional message is a batch of its own, `lsn_end` its LSN.)
pub fn marker(line: &str) -> Option<serde_json::Value> {
    match serde_json::from_str::<Line>(line).ok()? {
        Line::Session(s) => Some(session_marker(&s)),
        Line::Batch(b) => Some(batch_marker(&b)),
    }
}

/// The marker of a session line already read.
pub fn session_marker(s: &SessionLine) -> serde_json::Value {
    serde_json::json!({
        "action": "S", "slot": s.slot, "session": s.session, "started_at": s.started_at,
    })
}

/// The marker of a batch line already read.
pub fn batch_marker(b: &BatchLine) -> serde_json::Value {
    serde_json::json!({
        "action": "B", "slot": b.slot, "session": b.session, "seq": b.seq,
        "xid": b.xid, "lsn_start": b.lsn_start, "lsn_end": b.lsn_end,
        "commit_time": b.commit_time, "commit": b.commit_time != 0, "changes": b.changes,
    })
}

/// A batch as apply needs it: what its marker says, and its changes.
struct Batch {
    session: String,
    seq: i64,
    xid: i64,
    lsn_end: String,
    commit: bool,
    changes: Vec<serde_json::Value>,
}

enum Event {
    Session { slot: String },
    Batch(Batch),
}

fn text(v: &serde_json::Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

impl Batch {
    fn from_marker(m: &serde_json::Value, changes: Vec<serde_json::Value>) -> Batch {
        Batch {
            session: text(m, "session"),
            seq: m["seq"].as_i64().unwrap_or_default(),
            xid: m["xid"].as_i64().unwrap_or_default(),
            lsn_end: text(m, "lsn_end"),
            commit: m["commit"].as_bool().unwrap_or_default(),
            changes,
        }
    }
}

/// Reads events from either form of the stream; `None` at the end of the input. An input that
/// ends inside a batch (decrypted form) ends the stream there.
struct Events {
    lines: std::io::Lines<Box<dyn BufRead>>,
    n: usize,
    reader: Option<Reader>,
}

impl Events {
    fn next_line(&mut self) -> Result<Option<String>, ApplyError> {
        for line in self.lines.by_ref() {
            self.n += 1;
            let line = line.map_err(|e| ApplyError::Input(self.n, e.to_string()))?;
            if !line.trim().is_empty() {
                return Ok(Some(line));
            }
        }
        Ok(None)
    }

    fn next(&mut self) -> Result<Option<Event>, ApplyError> {
        let Some(line) = self.next_line()? else {
            return Ok(None);
        };
        let n = self.n;
        if let Some(reader) = &mut self.reader {
            let changes = reader.feed(&line)?;
            let m = marker(&line).ok_or(ApplyError::Input(n, "not a stream line".into()))?;
            return Ok(Some(Self::event(&m, changes)));
        }
        let m: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| ApplyError::Input(n, e.to_string()))?;
        if m.get("type").is_some() && m.get("action").is_none() {
            return Err(ApplyError::Sealed(n));
        }
        match m["action"].as_str() {
            Some("S") => Ok(Some(Self::event(&m, Vec::new()))),
            Some("B") => {
                let want = m["changes"].as_u64().unwrap_or_default();
                let mut changes = Vec::new();
                while (changes.len() as u64) < want {
                    let Some(line) = self.next_line()? else {
                        return Ok(None);
                    };
                    let c: serde_json::Value = serde_json::from_str(&line)
                        .map_err(|e| ApplyError::Input(self.n, e.to_string()))?;
                    if matches!(c["action"].as_str(), Some("S" | "B")) {
                        return Err(ApplyError::Input(
                            self.n,
                            "a marker inside a batch (lines lost?)".into(),
                        ));
                    }
                    changes.push(c);
                }
                Ok(Some(Self::event(&m, changes)))
            }
            _ => Err(ApplyError::NoMarkers(n)),
        }
    }

    fn event(m: &serde_json::Value, changes: Vec<serde_json::Value>) -> Event {
        if m["action"] == "S" {
            Event::Session {
                slot: text(m, "slot"),
            }
        } else {
            Event::Batch(Batch::from_marker(m, changes))
        }
    }
}

/// `X/Y` (hexadecimal) as a number; None when malformed.
fn lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// One target column: its name and its type as the target formats it (a cast target).
struct Column {
    name: String,
    ty: String,
    generated: bool,
}

struct Table {
    qualified: String,
    columns: Vec<Column>,
}

impl Table {
    fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

/// One change's identifying part: the table, the action and where it is in the stream.
struct At<'a> {
    xid: i64,
    change: &'a serde_json::Value,
}

impl At<'_> {
    fn action(&self) -> String {
        text(self.change, "action")
    }
    fn lsn(&self) -> String {
        text(self.change, "lsn")
    }
    fn table(&self) -> String {
        format!(
            "{}.{}",
            ident(&text(self.change, "schema")),
            ident(&text(self.change, "table"))
        )
    }
    fn change_error(&self, reason: String) -> ApplyError {
        ApplyError::Change {
            xid: self.xid,
            action: self.action(),
            lsn: self.lsn(),
            table: self.table(),
            reason,
        }
    }
}

/// A value as a column entry carries it: `Some(None)` is SQL NULL, `None` an unchanged TOAST value.
fn value(col: &serde_json::Value) -> Option<Option<String>> {
    if col["unchanged_toast"] == true {
        return None;
    }
    Some(col["value"].as_str().map(str::to_owned))
}

/// A statement being built: SQL text and its text parameters.
#[derive(Default)]
struct Sql {
    text: String,
    params: Vec<Option<String>>,
}

impl Sql {
    /// `$n::text::type`, the value passed as text and converted by the type's input function.
    fn param(&mut self, v: Option<String>, ty: &str) -> String {
        self.params.push(v);
        format!("${}::text::{ty}", self.params.len())
    }
}

/// Position of a source in the target.
struct Position {
    source: String,
    applied: Option<u64>,
}

/// The source transaction being applied.
struct Open {
    xid: i64,
    /// Decided to apply (target transaction open), to skip, or not yet (held back: an earlier
    /// chunk whose every change lies at or before the recorded position).
    apply: Option<bool>,
    held: Vec<serde_json::Value>,
    /// Consecutive TRUNCATE records (one source TRUNCATE of several tables), executed together.
    truncate: Vec<String>,
    truncate_lsn: String,
}

struct Applier {
    client: Client,
    messages: Messages,
    missing_rows: Missing,
    source_override: Option<String>,
    state: Option<String>,
    position: Option<Position>,
    open: Option<Open>,
    tables: HashMap<(String, String), std::rc::Rc<Table>>,
    statements: HashMap<String, Statement>,
    applied: u64,
    skipped: u64,
}

fn db(e: postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{} ({})", d.message(), d.code().code()),
        None => e.to_string(),
    }
}

const SETUP: &str = "SET session_replication_role = replica;
SET datestyle = 'ISO, MDY';
SET intervalstyle = postgres;
CREATE SCHEMA IF NOT EXISTS vsql_vault_apply;
CREATE TABLE IF NOT EXISTS vsql_vault_apply.progress (
    source text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    session text NOT NULL,
    seq bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS vsql_vault_apply.messages (
    source text NOT NULL,
    lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    prefix text NOT NULL,
    content bytea NOT NULL,
    transactional boolean NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now());";

impl Applier {
    fn exec(&mut self, sql: &str) -> Result<(), String> {
        self.client.batch_execute(sql).map_err(db)
    }

    fn statement(&mut self, sql: &str, params: usize) -> Result<Statement, String> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self
            .client
            .prepare_typed(sql, &vec![Type::TEXT; params])
            .map_err(db)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    fn run(&mut self, sql: &Sql) -> Result<u64, String> {
        let st = self.statement(&sql.text, sql.params.len())?;
        let params: Vec<&(dyn ToSql + Sync)> = sql
            .params
            .iter()
            .map(|p| p as &(dyn ToSql + Sync))
            .collect();
        self.client.execute(&st, &params).map_err(db)
    }

    fn session(&mut self, slot: &str) -> Result<(), ApplyError> {
        if let Some(open) = self.open.take() {
            // The transaction did not end in its session: the next session sends it again.
            eprintln!(
                "vsql-vault apply: transaction {} ended unfinished at a new session; not applied",
                open.xid
            );
            if open.apply == Some(true) {
                self.exec("ROLLBACK").map_err(ApplyError::Setup)?;
            }
        }
        let source = self.source_override.clone().unwrap_or_else(|| slot.into());
        if self.position.as_ref().is_some_and(|p| p.source == source) {
            return Ok(());
        }
        let row = self
            .client
            .query_opt(
                "SELECT commit_lsn::text FROM vsql_vault_apply.progress WHERE source = $1",
                &[&source],
            )
            .map_err(|e| ApplyError::Setup(db(e)))?;
        let applied = row.and_then(|r| lsn(r.get::<_, &str>(0)));
        self.position = Some(Position { source, applied });
        Ok(())
    }

    fn batch(&mut self, mut b: Batch) -> Result<(), ApplyError> {
        let Some(pos) = &self.position else {
            return Err(ApplyError::NoSession(b.xid));
        };
        let recorded = pos.applied;
        let end = lsn(&b.lsn_end).ok_or_else(|| ApplyError::BadLsn(b.xid, b.lsn_end.clone()))?;
        if let Some(open) = &self.open {
            if open.xid != b.xid {
                return Err(ApplyError::Interleaved {
                    open: open.xid,
                    got: b.xid,
                });
            }
        } else {
            self.open = Some(Open {
                xid: b.xid,
                apply: None,
                held: Vec::new(),
                truncate: Vec::new(),
                truncate_lsn: String::new(),
            });
        }
        // Transactions come in commit order: one committing at or before the recorded position
        // was applied already. A chunk's changes past the position mean a later commit.
        let past = recorded.is_none_or(|r| end > r);
        let decision = self.open.as_ref().and_then(|o| o.apply);
        let decision = match decision {
            Some(d) => Some(d),
            None if past => Some(true),
            None if b.commit => Some(false),
            None => None,
        };
        if let Some(open) = &mut self.open {
            if open.apply.is_none() && decision.is_some() {
                open.apply = decision;
                let held = std::mem::take(&mut open.held);
                if decision == Some(true) {
                    self.exec("BEGIN").map_err(|reason| ApplyError::Target {
                        xid: b.xid,
                        lsn: b.lsn_end.clone(),
                        reason,
                    })?;
                    for c in &held {
                        self.change(b.xid, c)?;
                    }
                }
            }
        }
        match decision {
            Some(true) => {
                for c in &b.changes {
                    self.change(b.xid, c)?;
                }
            }
            Some(false) => {}
            None => {
                if let Some(open) = &mut self.open {
                    open.held.append(&mut b.changes);
                }
            }
        }
        if b.commit {
            self.commit(&b)?;
        }
        Ok(())
    }

    fn commit(&mut self, b: &Batch) -> Result<(), ApplyError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        if open.apply != Some(true) {
            self.skipped += 1;
            return Ok(());
        }
        self.open = Some(open);
        self.flush_truncate(b.xid)?;
        self.open = None;
        let source = self
            .position
            .as_ref()
            .map(|p| p.source.clone())
            .unwrap_or_default();
        let target = |reason| ApplyError::Target {
            xid: b.xid,
            lsn: b.lsn_end.clone(),
            reason,
        };
        let moved = self
            .client
            .execute(
                "INSERT INTO vsql_vault_apply.progress (source, commit_lsn, xid, session, seq)
                 VALUES ($1, $2::text::pg_lsn, $3, $4, $5)
                 ON CONFLICT (source) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn,
                    xid = EXCLUDED.xid, session = EXCLUDED.session, seq = EXCLUDED.seq,
                    applied_at = now()
                 WHERE progress.commit_lsn < EXCLUDED.commit_lsn",
                &[&source, &b.lsn_end, &b.xid, &b.session, &b.seq],
            )
            .map_err(|e| target(db(e)))?;
        if moved != 1 {
            let _ = self.exec("ROLLBACK");
            return Err(ApplyError::Raced {
                name: source,
                lsn: b.lsn_end.clone(),
            });
        }
        self.exec("COMMIT").map_err(target)?;
        self.applied += 1;
        if let Some(p) = &mut self.position {
            p.applied = lsn(&b.lsn_end);
        }
        if let Some(path) = &self.state {
            let doc = serde_json::json!({
                "source": source, "commit_lsn": b.lsn_end, "xid": b.xid,
                "session": b.session, "seq": b.seq,
            });
            write_state(path, &doc.to_string())
                .map_err(|e| ApplyError::State(path.clone(), e.to_string()))?;
        }
        Ok(())
    }

    fn table(&mut self, at: &At) -> Result<std::rc::Rc<Table>, ApplyError> {
        let key = (text(at.change, "schema"), text(at.change, "table"));
        if let Some(t) = self.tables.get(&key) {
            return Ok(t.clone());
        }
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), a.attgenerated <> ''
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                  WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
                  ORDER BY a.attnum",
                &[&key.0, &key.1],
            )
            .map_err(|e| at.change_error(db(e)))?;
        if rows.is_empty() {
            return Err(ApplyError::NoTable {
                xid: at.xid,
                action: at.action(),
                lsn: at.lsn(),
                table: at.table(),
            });
        }
        let t = std::rc::Rc::new(Table {
            qualified: at.table(),
            columns: rows
                .iter()
                .map(|r| Column {
                    name: r.get(0),
                    ty: r.get(1),
                    generated: r.get(2),
                })
                .collect(),
        });
        self.tables.insert(key, t.clone());
        Ok(t)
    }

    fn column<'t>(&self, t: &'t Table, at: &At, name: &str) -> Result<&'t Column, ApplyError> {
        t.column(name).ok_or_else(|| ApplyError::NoColumn {
            xid: at.xid,
            action: at.action(),
            lsn: at.lsn(),
            table: at.table(),
            column: name.to_owned(),
        })
    }

    fn change(&mut self, xid: i64, c: &serde_json::Value) -> Result<(), ApplyError> {
        let at = At { xid, change: c };
        let action = at.action();
        if action != "T" {
            self.flush_truncate(xid)?;
        }
        match action.as_str() {
            "I" => self.insert(&at),
            "U" | "D" => self.modify(&at),
            "T" => {
                let t = self.table(&at)?;
                self.truncate(xid, &t.qualified, &at.lsn())
            }
            "M" => self.message(&at),
            other => Err(at.change_error(format!("unknown action {other:?}"))),
        }
    }

    fn truncate(&mut self, xid: i64, table: &str, lsn: &str) -> Result<(), ApplyError> {
        let same = self.open.as_ref().is_some_and(|o| o.truncate_lsn == lsn);
        if !same {
            self.flush_truncate(xid)?;
        }
        if let Some(open) = &mut self.open {
            open.truncate_lsn = lsn.to_owned();
            open.truncate.push(table.to_owned());
        }
        Ok(())
    }

    /// One TRUNCATE of every table the source truncated together (so foreign keys between them
    /// hold), `ONLY` the tables named: the source lists each truncated table, cascaded ones too.
    fn flush_truncate(&mut self, xid: i64) -> Result<(), ApplyError> {
        let Some(open) = &mut self.open else {
            return Ok(());
        };
        if open.truncate.is_empty() {
            return Ok(());
        }
        let tables = std::mem::take(&mut open.truncate);
        let lsn = std::mem::take(&mut open.truncate_lsn);
        let sql = format!("TRUNCATE ONLY {}", tables.join(", "));
        self.exec(&sql).map_err(|reason| ApplyError::Change {
            xid,
            action: "T".into(),
            lsn,
            table: tables.join(", "),
            reason,
        })
    }

    fn insert(&mut self, at: &At) -> Result<(), ApplyError> {
        let t = self.table(at)?;
        let mut sql = Sql::default();
        let (mut names, mut values) = (Vec::new(), Vec::new());
        for col in at.change["columns"].as_array().into_iter().flatten() {
            let column = self.column(&t, at, col["name"].as_str().unwrap_or_default())?;
            if column.generated {
                continue;
            }
            let v = value(col).ok_or_else(|| {
                at.change_error("an inserted row with an unchanged TOAST value".into())
            })?;
            names.push(ident(&column.name));
            values.push(sql.param(v, &column.ty));
        }
        sql.text = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            t.qualified,
            names.join(", "),
            values.join(", ")
        );
        self.run(&sql).map_err(|e| at.change_error(e))?;
        Ok(())
    }

    /// UPDATE or DELETE of the row the old key (`identity`) names, or, when the change carries no
    /// old key (an UPDATE that left the key unchanged), the row the key columns' values name.
    fn modify(&mut self, at: &At) -> Result<(), ApplyError> {
        let t = self.table(at)?;
        let c = at.change;
        let identity = c["identity"].as_array().cloned().unwrap_or_default();
        let columns = c["columns"].as_array().cloned().unwrap_or_default();
        let key_names: Vec<String> = c["key"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        let key: Vec<serde_json::Value> = if !identity.is_empty() {
            identity
        } else {
            columns
                .iter()
                .filter(|col| {
                    key_names
                        .iter()
                        .any(|k| col["name"].as_str() == Some(k.as_str()))
                })
                .cloned()
                .collect()
        };
        if key.is_empty() {
            return Err(at.change_error(
                "the change names no key (the source table has no replica identity)".into(),
            ));
        }
        let mut sql = Sql::default();
        let mut set = Vec::new();
        if at.action() == "U" {
            for col in &columns {
                let column = self.column(&t, at, col["name"].as_str().unwrap_or_default())?;
                // An unchanged TOAST value keeps what the target has.
                let Some(v) = value(col).filter(|_| !column.generated) else {
                    continue;
                };
                let p = sql.param(v, &column.ty);
                set.push(format!("{} = {p}", ident(&column.name)));
            }
        }
        let mut conds = Vec::new();
        let mut shown = Vec::new();
        for col in &key {
            let column = self.column(&t, at, col["name"].as_str().unwrap_or_default())?;
            let Some(v) = value(col) else { continue };
            shown.push(format!(
                "{}={}",
                column.name,
                v.as_deref().unwrap_or("NULL")
            ));
            match v {
                None => conds.push(format!("{} IS NULL", ident(&column.name))),
                Some(v) => {
                    let p = sql.param(Some(v), &column.ty);
                    conds.push(format!("{} = {p}", ident(&column.name)));
                }
            }
        }
        // Under REPLICA IDENTITY FULL (the key is every column) identical rows cannot be told
        // apart: change one of them, as PostgreSQL's own subscriber does.
        let full = t
            .columns
            .iter()
            .filter(|col| !col.generated)
            .all(|col| key_names.contains(&col.name));
        let mut filter = conds.join(" AND ");
        if full {
            filter = format!(
                "ctid = (SELECT ctid FROM {} WHERE {filter} LIMIT 1)",
                t.qualified
            );
        }
        sql.text = if at.action() == "U" {
            if set.is_empty() {
                let first = ident(&t.columns[0].name);
                set.push(format!("{first} = {first}"));
            }
            format!(
                "UPDATE {} SET {} WHERE {filter}",
                t.qualified,
                set.join(", ")
            )
        } else {
            format!("DELETE FROM {} WHERE {filter}", t.qualified)
        };
        let count = self.run(&sql).map_err(|e| at.change_error(e))?;
        let key = format!("({})", shown.join(", "));
        match count {
            1 => Ok(()),
            0 if self.missing_rows == Missing::Skip => Ok(()),
            0 => Err(ApplyError::NoRow {
                xid: at.xid,
                action: at.action(),
                lsn: at.lsn(),
                table: at.table(),
                key,
            }),
            count => Err(ApplyError::ManyRows {
                xid: at.xid,
                action: at.action(),
                lsn: at.lsn(),
                table: at.table(),
                key,
                count,
            }),
        }
    }

    fn message(&mut self, at: &At) -> Result<(), ApplyError> {
        if self.messages == Messages::Skip {
            return Ok(());
        }
        let c = at.change;
        let source = self
            .position
            .as_ref()
            .map(|p| p.source.clone())
            .unwrap_or_default();
        let mut sql = Sql::default();
        for v in [
            source,
            at.lsn(),
            at.xid.to_string(),
            text(c, "prefix"),
            text(c, "content"),
            text(c, "content_encoding"),
            (c["transactional"] == true).to_string(),
        ] {
            sql.params.push(Some(v));
        }
        sql.text = "INSERT INTO vsql_vault_apply.messages
                      (source, lsn, xid, prefix, content, transactional)
                    VALUES ($1, $2::pg_lsn, $3::bigint, $4,
                      CASE $6 WHEN 'base64' THEN decode($5, 'base64') ELSE convert_to($5, 'UTF8') END,
                      $7::boolean)"
            .into();
        self.run(&sql).map_err(|e| at.change_error(e))?;
        Ok(())
    }
}

/// Writes the state file atomically: a temporary file, synced, renamed over the old one.
fn write_state(path: &str, doc: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = format!("{path}.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(doc.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn run(args: &Args) -> Result<bool, String> {
    let sealed = args.kek_file.is_some() || args.kek_command.is_some();
    if sealed == args.public_keys.is_empty() {
        return Err("a sealed stream needs both a KEK (--kek-file or --kek-command) and --public-key; decrypted input neither".into());
    }
    let reader = if sealed {
        let keys = crate::input::public_keys(&args.public_keys)?;
        let kek = crate::input::kek(args.kek_file.as_deref(), args.kek_command.as_deref())?;
        Some(Reader::new(kek, keys))
    } else {
        None
    };
    let input: Box<dyn BufRead> = match &args.input {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{p}: {e}"))?,
        )),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let mut events = Events {
        lines: input.lines(),
        n: 0,
        reader,
    };
    match apply(args, &mut events) {
        Ok((applied, skipped)) => {
            eprintln!(
                "vsql-vault apply: {applied} transactions applied, {skipped} already applied"
            );
            Ok(true)
        }
        Err(e) => {
            eprintln!("vsql-vault apply: {e}");
            Ok(false)
        }
    }
}

fn apply(args: &Args, events: &mut Events) -> Result<(u64, u64), ApplyError> {
    let client = Client::connect(&args.target, NoTls).map_err(|e| ApplyError::Connect(db(e)))?;
    let mut a = Applier {
        client,
        messages: args.messages,
        missing_rows: args.missing_rows,
        source_override: args.source.clone(),
        state: args.state.clone(),
        position: None,
        open: None,
        tables: HashMap::new(),
        statements: HashMap::new(),
        applied: 0,
        skipped: 0,
    };
    a.exec(SETUP).map_err(ApplyError::Setup)?;
    let outcome = (|| {
        while let Some(event) = events.next()? {
            match event {
                Event::Session { slot } => a.session(&slot)?,
                Event::Batch(b) => a.batch(b)?,
            }
        }
        Ok(())
    })();
    if let Err(e) = outcome {
        // Nothing of the failing transaction stays: its target transaction is rolled back.
        let _ = a.exec("ROLLBACK");
        return Err(e);
    }
    if let Some(open) = a.open.take() {
        eprintln!(
            "vsql-vault apply: the input ended inside transaction {}; not applied (it is applied when the stream is read again)",
            open.xid
        );
        if open.apply == Some(true) {
            let _ = a.exec("ROLLBACK");
        }
    }
    Ok((a.applied, a.skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_and_identifiers() {
        assert_eq!(lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(lsn("1/0"), Some(1 << 32));
        assert_eq!(lsn("zz"), None);
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }

    fn events(text: &str) -> Events {
        let input: Box<dyn BufRead> = Box::new(std::io::Cursor::new(text.to_owned()));
        Events {
            lines: input.lines(),
            n: 0,
            reader: None,
        }
    }

    #[test]
    fn decrypted_input_needs_markers_and_a_batch_ends_after_its_changes() {
        let plain = r#"{"action":"I","schema":"public","table":"t","columns":[]}"#;
        assert!(matches!(
            events(plain).next(),
            Err(ApplyError::NoMarkers(1))
        ));
        let sealed = r#"{"type":"session","slot":"s"}"#;
        assert!(matches!(events(sealed).next(), Err(ApplyError::Sealed(1))));
        let s = r#"{"action":"S","slot":"s1","session":"a"}"#;
        let b = r#"{"action":"B","session":"a","seq":1,"xid":7,"lsn_end":"0/10","commit":true,"changes":2}"#;
        let mut e = events(&format!("{s}\n{b}\n{plain}\n\n{plain}\n{s}\n"));
        assert!(matches!(e.next(), Ok(Some(Event::Session { slot })) if slot == "s1"));
        match e.next() {
            Ok(Some(Event::Batch(b))) => {
                assert_eq!((b.xid, b.commit, b.changes.len()), (7, true, 2));
                assert_eq!(b.lsn_end, "0/10");
            }
            _ => panic!("a batch of two changes"),
        }
        assert!(matches!(e.next(), Ok(Some(Event::Session { .. }))));
        assert!(matches!(e.next(), Ok(None)));
        // Cut inside a batch: the stream ends there; a marker where a change was due is an error.
        assert!(matches!(
            events(&format!("{b}\n{plain}\n")).next(),
            Ok(None)
        ));
        let mut e = events(&format!("{b}\n{plain}\n{s}\n"));
        assert!(matches!(e.next(), Err(ApplyError::Input(3, _))));
    }

    #[test]
    fn unchanged_toast_is_not_null() {
        let c = serde_json::json!({"name": "a", "type": "text", "unchanged_toast": true});
        assert_eq!(value(&c), None);
        let c = serde_json::json!({"name": "a", "type": "text", "value": null});
        assert_eq!(value(&c), Some(None));
    }
}
