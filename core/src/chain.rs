//! Hash-chained rows, signed checkpoints, and the verifier shared by the database and the
//! offline tool. The format is specified in `docs/audit-format.md`.

use crate::canonical::{self, Encoder, Value};
use crate::keys;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const ROW_DOMAIN: &str = "vsql_vault.row";
pub const CHECKPOINT_DOMAIN: &str = "vsql_vault.checkpoint";
/// `prev_hash` of the first row of every chain.
pub const GENESIS: [u8; 32] = [0u8; 32];
/// Identities of the checkpoint table start so (`vault.audit_checkpoints/<n>`): each of its rows
/// carries a signature of its own, checked with the row.
pub const CHECKPOINT_TABLE: &str = "vault.audit_checkpoints/";

/// Column names the chain itself owns; they are encoded as the row's header, not as columns.
pub const CHAIN_COLUMNS: [&str; 4] = ["chain_id", "chain_seq", "prev_hash", "row_hash"];

/// The hash of one row. NULL columns are left out, so adding a nullable column to a protected
/// table later keeps every old row's hash valid.
pub fn row_hash<N: AsRef<str>>(
    table: &str,
    chain: i32,
    seq: i64,
    prev_hash: &[u8],
    columns: &[(N, Value)],
) -> [u8; 32] {
    let mut buf = Vec::with_capacity(256);
    put_row_header(&mut buf, table, chain, seq, prev_hash);
    for (name, value) in columns {
        if *value != Value::Null {
            canonical::put_field(&mut buf, name.as_ref(), value);
        }
    }
    canonical::sha256(&buf)
}

/// The canonical bytes a row's hash starts with, before its non-NULL columns: `row_hash` and the
/// export reader (`crate::export`), which writes the columns straight from the JSON after them.
pub fn put_row_header(buf: &mut Vec<u8>, table: &str, chain: i32, seq: i64, prev_hash: &[u8]) {
    canonical::put_header(buf, ROW_DOMAIN);
    canonical::put_name_tag(buf, "table", canonical::tag::TEXT);
    canonical::put_len_prefixed(buf, table.as_bytes());
    canonical::put_name_tag(buf, "chain", canonical::tag::INT);
    buf.extend_from_slice(&i64::from(chain).to_be_bytes());
    canonical::put_name_tag(buf, "seq", canonical::tag::INT);
    buf.extend_from_slice(&seq.to_be_bytes());
    canonical::put_name_tag(buf, "prev_hash", canonical::tag::BYTES);
    canonical::put_len_prefixed(buf, prev_hash);
}

/// `ExportRow::chain` of a row that carries no chain fields (inserted while the chain trigger
/// was disabled); its `seq` is 0 and its hashes are zero.
pub const UNCHAINED: i32 = -1;

/// One exported row, as `vault_export_audit` writes it (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "ExportRowJson", into = "ExportRowJson")]
pub struct ExportRow {
    pub table: String,
    /// `UNCHAINED` for a row without chain fields.
    pub chain: i32,
    pub seq: i64,
    pub prev_hash: [u8; 32],
    pub row_hash: [u8; 32],
    pub columns: Vec<(String, Value)>,
}

impl ExportRow {
    pub fn is_chained(&self) -> bool {
        self.chain >= 0
    }
}

/// An export row as JSON. A row without chain fields has its four chain keys null (or absent);
/// 0.1.0 wrote such a row as chain -1, seq 0 and zero hashes, which reads the same. A row
/// missing any one of the four is a row without chain fields: no chain can hold it.
#[derive(Serialize, Deserialize)]
struct ExportRowJson {
    table: String,
    #[serde(default)]
    chain: Option<i32>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default, with = "crate::canonical::hex32_or_null")]
    prev_hash: Option<[u8; 32]>,
    #[serde(default, with = "crate::canonical::hex32_or_null")]
    row_hash: Option<[u8; 32]>,
    columns: Vec<(String, Value)>,
}

impl From<ExportRowJson> for ExportRow {
    fn from(j: ExportRowJson) -> ExportRow {
        let link = match (j.chain, j.seq, j.prev_hash, j.row_hash) {
            (Some(chain), Some(seq), Some(prev), Some(hash)) if chain >= 0 => {
                (chain, seq, prev, hash)
            }
            _ => (UNCHAINED, 0, [0; 32], [0; 32]),
        };
        ExportRow {
            table: j.table,
            chain: link.0,
            seq: link.1,
            prev_hash: link.2,
            row_hash: link.3,
            columns: j.columns,
        }
    }
}

impl From<ExportRow> for ExportRowJson {
    fn from(r: ExportRow) -> ExportRowJson {
        let chained = r.is_chained();
        ExportRowJson {
            chain: chained.then_some(r.chain),
            seq: chained.then_some(r.seq),
            prev_hash: chained.then_some(r.prev_hash),
            row_hash: chained.then_some(r.row_hash),
            table: r.table,
            columns: r.columns,
        }
    }
}

/// A signed statement that a chain's head was `head_hash` at `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub table: String,
    pub chain: i32,
    pub seq: i64,
    #[serde(with = "crate::canonical::hex32")]
    pub head_hash: [u8; 32],
    /// Microseconds since 2000-01-01 UTC.
    pub signed_at: i64,
    pub key_id: String,
    pub signature: String,
}

impl Checkpoint {
    /// The checkpoint a row of `vault.audit_checkpoints` records, from its exported columns;
    /// None when a column is missing or of another type (that row's signature cannot hold).
    pub fn from_row(columns: &[(String, Value)]) -> Option<Checkpoint> {
        let get = |name: &str| columns.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let text = |name: &str| match get(name) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        };
        let int = |name: &str| match get(name) {
            Some(Value::Int(i)) => Some(*i),
            _ => None,
        };
        let bytes = |name: &str| match get(name) {
            Some(Value::Bytes(b)) => Some(b.clone()),
            _ => None,
        };
        Some(Checkpoint {
            table: text("table_identity")?,
            chain: i32::try_from(int("chain")?).ok()?,
            seq: int("seq")?,
            head_hash: bytes("head_hash")?.try_into().ok()?,
            signed_at: int("signed_at_us")?,
            key_id: text("key_id")?,
            signature: hex::encode(bytes("signature")?),
        })
    }

    pub fn message(
        table: &str,
        chain: i32,
        seq: i64,
        head_hash: &[u8],
        signed_at: i64,
        key_id: &str,
    ) -> Vec<u8> {
        Encoder::new(CHECKPOINT_DOMAIN)
            .field("table", &Value::Text(table.to_owned()))
            .field("chain", &Value::Int(i64::from(chain)))
            .field("seq", &Value::Int(seq))
            .field("head_hash", &Value::Bytes(head_hash.to_vec()))
            .field("signed_at", &Value::Timestamp(signed_at))
            .field("key_id", &Value::Text(key_id.to_owned()))
            .bytes()
            .to_vec()
    }

    /// The checkpoint `key` signs for the head `head_hash` at `seq` (what `vault_checkpoint()`
    /// records; tests and generated exports make theirs so).
    pub fn sign(
        key: &ed25519_dalek::SigningKey,
        (table, chain, seq): (&str, i32, i64),
        head_hash: [u8; 32],
        signed_at: i64,
    ) -> Checkpoint {
        let key_id = keys::key_id(&key.verifying_key());
        let msg = Checkpoint::message(table, chain, seq, &head_hash, signed_at, &key_id);
        Checkpoint {
            table: table.to_owned(),
            chain,
            seq,
            head_hash,
            signed_at,
            key_id,
            signature: hex::encode(keys::sign(key, &msg)),
        }
    }

    pub fn signature_ok(&self, keys: &BTreeMap<String, VerifyingKey>) -> bool {
        let Some(public) = keys.get(&self.key_id) else {
            return false;
        };
        let Ok(sig) = hex::decode(&self.signature) else {
            return false;
        };
        let msg = Checkpoint::message(
            &self.table,
            self.chain,
            self.seq,
            &self.head_hash,
            self.signed_at,
            &self.key_id,
        );
        keys::verify(public, &msg, &sig)
    }
}

/// The verdict on one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub table: String,
    /// None for the report on a table's rows that carry no chain fields.
    pub chain: Option<i32>,
    pub rows_checked: i64,
    pub first_bad_seq: Option<i64>,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Default)]
struct ChainState {
    rows: i64,
    last_seq: Option<i64>,
    last_hash: [u8; 32],
    first_bad: Option<(i64, String)>,
    /// Row hashes at the sequence numbers a checkpoint names.
    at_checkpoints: BTreeMap<i64, [u8; 32]>,
    /// The seq of the last row pushed, whatever the verdict: whether the rows come in chain order.
    pushed_seq: Option<i64>,
}

/// What the verifier needs of one row, its hash already recomputed: the export reader
/// (`crate::export`) builds it while parsing, without the row's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    /// `UNCHAINED` for a row without chain fields (then nothing else is read).
    pub chain: i32,
    pub seq: i64,
    pub prev_hash: [u8; 32],
    pub row_hash: [u8; 32],
    /// The hash recomputed from the row's contents (`row_hash()`) equals `row_hash`.
    pub hash_ok: bool,
    /// For a row of the checkpoint table: it records a checkpoint with a valid signature from a
    /// known key. Not read for other rows.
    pub signature_ok: bool,
}

impl Link {
    /// The link of a parsed row, its hash recomputed (and, for a row of the checkpoint table, its
    /// signature checked against `keys`).
    pub fn of(row: &ExportRow, keys: &BTreeMap<String, VerifyingKey>) -> Link {
        let chained = row.is_chained();
        Link {
            chain: row.chain,
            seq: row.seq,
            prev_hash: row.prev_hash,
            row_hash: row.row_hash,
            hash_ok: chained
                && row_hash(&row.table, row.chain, row.seq, &row.prev_hash, &row.columns)
                    == row.row_hash,
            signature_ok: chained
                && row.table.starts_with(CHECKPOINT_TABLE)
                && Checkpoint::from_row(&row.columns).is_some_and(|c| c.signature_ok(keys)),
        }
    }
}

/// Trusted keys by key id, as the verifier looks them up.
pub fn key_map(public_keys: &[VerifyingKey]) -> BTreeMap<String, VerifyingKey> {
    public_keys.iter().map(|k| (keys::key_id(k), *k)).collect()
}

/// Streams rows ordered by (table, chain, seq) and checks hashes, links, continuity and
/// checkpoints. Rows of an export that starts after seq 1 are accepted from their first
/// `prev_hash`; everything after is linked. Chains are independent: rows of different chains
/// may come interleaved, as long as each chain's own rows come in order.
pub struct Verifier {
    /// Whether the rows are a whole table (chains must start at seq 1) or an export from a later seq.
    partial: bool,
    checkpoints: Vec<Checkpoint>,
    keys: BTreeMap<String, VerifyingKey>,
    /// By table, then chain (a lookup by `&str` needs no key of its own).
    chains: BTreeMap<String, BTreeMap<i32, ChainState>>,
    wanted: BTreeMap<String, BTreeMap<i32, Vec<i64>>>,
    /// Per table, how many rows carry no chain fields.
    unchained: BTreeMap<String, i64>,
}

impl Verifier {
    pub fn new(checkpoints: Vec<Checkpoint>, public_keys: &[VerifyingKey]) -> Verifier {
        Verifier::with_partial(checkpoints, public_keys, false)
    }

    pub fn with_partial(
        checkpoints: Vec<Checkpoint>,
        public_keys: &[VerifyingKey],
        partial: bool,
    ) -> Verifier {
        let mut wanted: BTreeMap<String, BTreeMap<i32, Vec<i64>>> = BTreeMap::new();
        for c in &checkpoints {
            wanted
                .entry(c.table.clone())
                .or_default()
                .entry(c.chain)
                .or_default()
                .push(c.seq);
        }
        Verifier {
            partial,
            checkpoints,
            keys: key_map(public_keys),
            chains: BTreeMap::new(),
            wanted,
            unchained: BTreeMap::new(),
        }
    }

    /// The trusted keys, by key id (for `Link::of`).
    pub fn keys(&self) -> &BTreeMap<String, VerifyingKey> {
        &self.keys
    }

    pub fn push(&mut self, row: &ExportRow) {
        let link = Link::of(row, &self.keys);
        self.push_link(&row.table, &link);
    }

    /// `push` of a row whose hash (and signature) the caller has checked. Returns whether the row
    /// came in chain order: its seq above the last one pushed for its chain (a row without chain
    /// fields always does). When one does not, the verdict is that of rows in file order, not
    /// the verdict on the sorted rows.
    pub fn push_link(&mut self, table: &str, row: &Link) -> bool {
        // A row without chain fields belongs to no chain: it is reported on its own, counted
        // per table, and cannot disturb the verdict on the chains around it.
        if row.chain < 0 {
            match self.unchained.get_mut(table) {
                Some(n) => *n += 1,
                None => {
                    self.unchained.insert(table.to_owned(), 1);
                }
            }
            return true;
        }
        let wants = self
            .wanted
            .get(table)
            .and_then(|t| t.get(&row.chain))
            .is_some_and(|s| s.contains(&row.seq));
        let per_table = match self.chains.get_mut(table) {
            Some(t) => t,
            None => self.chains.entry(table.to_owned()).or_default(),
        };
        let st = per_table.entry(row.chain).or_default();
        let in_order = st.pushed_seq.is_none_or(|last| row.seq > last);
        st.pushed_seq = Some(row.seq);
        st.rows += 1;
        if wants {
            st.at_checkpoints.insert(row.seq, row.row_hash);
        }
        if st.first_bad.is_some() {
            return in_order;
        }
        let bad = |why: String| Some((row.seq, why));
        // A gap is reported at its first missing row: that is the row an auditor must ask about.
        let gap = |from: i64| {
            Some((
                from,
                format!(
                    "rows {}..{} are missing (deleted?)",
                    from,
                    row.seq.saturating_sub(1)
                ),
            ))
        };
        let partial = self.partial;
        st.first_bad = match st.last_seq {
            None if !partial && row.seq < 1 => bad(format!(
                "the chain starts at seq {}: sequence numbers start at 1",
                row.seq
            ))
            .map(|(_, why)| (1, why)),
            None if !partial && row.seq != 1 => gap(1),
            None if row.seq == 1 && row.prev_hash != GENESIS => {
                bad("first row does not start from the genesis hash".into())
            }
            Some(last) if row.seq == last => bad(format!("row {last} appears more than once")),
            Some(last) if row.seq < last => bad(format!(
                "row {} comes after row {last}: the rows are not in chain order",
                row.seq
            )),
            // Checked: an export is untrusted input, and a wrapped i64::MAX + 1 must not pass
            // for the next row.
            Some(last) if last.checked_add(1) != Some(row.seq) => gap(last.saturating_add(1)),
            Some(_) if row.prev_hash != st.last_hash => {
                bad("prev_hash does not match the previous row (link broken)".into())
            }
            _ if !row.hash_ok => {
                bad("row hash does not match the row's contents (row changed)".into())
            }
            // A row of the checkpoint table is a signed statement itself: re-hashing its chain
            // around a forged one must not pass.
            _ if table.starts_with(CHECKPOINT_TABLE) && !row.signature_ok => {
                bad("checkpoint row has no valid signature from a known key".into())
            }
            _ => None,
        };
        st.last_seq = Some(row.seq);
        st.last_hash = row.row_hash;
        in_order
    }

    pub fn finish(mut self) -> Vec<ChainReport> {
        for c in &self.checkpoints {
            let st = self
                .chains
                .entry(c.table.clone())
                .or_default()
                .entry(c.chain)
                .or_default();
            let last = st.last_seq.unwrap_or(0);
            let problem = match st.at_checkpoints.get(&c.seq) {
                _ if !c.signature_ok(&self.keys) => Some((
                    c.seq,
                    format!(
                        "checkpoint at seq {} has no valid signature from a known key ({})",
                        c.seq, c.key_id
                    ),
                )),
                // The newest rows are gone: the checkpoint proves they existed.
                None if last < c.seq => Some((
                    last.saturating_add(1),
                    format!("rows {}..{} are missing, yet a checkpoint signed row {} (newest rows deleted?)", last.saturating_add(1), c.seq, c.seq),
                )),
                None => Some((c.seq, format!("row {} was signed in a checkpoint but is missing", c.seq))),
                Some(h) if *h != c.head_hash => Some((c.seq, format!("row {} differs from its signed checkpoint", c.seq))),
                _ => None,
            };
            // The verdict is the earliest problem, whatever the order of the checkpoints; at the
            // same seq the row's own problem stands.
            if let Some((seq, why)) = problem {
                let earlier = st.first_bad.as_ref().is_some_and(|(s, _)| *s <= seq);
                if !earlier {
                    st.first_bad = Some((seq, why));
                }
            }
        }
        let unchained = self.unchained.into_iter().map(|(table, n)| ChainReport {
            table,
            chain: None,
            rows_checked: n,
            first_bad_seq: None,
            ok: false,
            detail: format!(
                "{n} row{} carr{} no chain fields (inserted while the chain trigger was disabled?)",
                if n == 1 { "" } else { "s" },
                if n == 1 { "ies" } else { "y" }
            ),
        });
        self.chains
            .into_iter()
            .flat_map(|(table, chains)| {
                chains
                    .into_iter()
                    .map(move |(chain, st)| (table.clone(), chain, st))
            })
            .map(|(table, chain, st)| {
                let (first_bad_seq, detail) = match st.first_bad {
                    Some((seq, why)) => (Some(seq), why),
                    None => (None, format!("{} rows intact", st.rows)),
                };
                ChainReport {
                    table,
                    chain: Some(chain),
                    rows_checked: st.rows,
                    ok: first_bad_seq.is_none(),
                    first_bad_seq,
                    detail,
                }
            })
            .chain(unchained)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<ExportRow> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let columns = vec![
                    ("id".to_string(), Value::Int(seq)),
                    ("note".to_string(), Value::Text(format!("r{seq}"))),
                ];
                let h = row_hash("t", 0, seq, &prev, &columns);
                let r = ExportRow {
                    table: "t".into(),
                    chain: 0,
                    seq,
                    prev_hash: prev,
                    row_hash: h,
                    columns,
                };
                prev = h;
                r
            })
            .collect()
    }

    fn checkpoint(key: &ed25519_dalek::SigningKey, row: &ExportRow) -> Checkpoint {
        Checkpoint::sign(key, (&row.table, row.chain, row.seq), row.row_hash, 1)
    }

    fn run(
        rows: &[ExportRow],
        cps: Vec<Checkpoint>,
        key: &ed25519_dalek::SigningKey,
    ) -> ChainReport {
        let mut v = Verifier::new(cps, &[key.verifying_key()]);
        rows.iter().for_each(|r| v.push(r));
        v.finish().remove(0)
    }

    #[test]
    fn extreme_sequence_numbers_are_reported_not_wrapped() {
        // Found by fuzzing: i64::MIN as the first seq overflowed; i64::MAX + 1 wrapping to
        // i64::MIN would have passed for the next row.
        let key = keys::generate().unwrap();
        let mut rows = chain(1);
        rows[0].seq = i64::MIN;
        let r = run(&rows, vec![], &key);
        assert!(!r.ok);
        let mut rows = chain(2);
        rows[0].seq = i64::MAX;
        rows[1].seq = i64::MIN;
        let r = run(&rows, vec![], &key);
        assert!(!r.ok);
    }

    /// Rows of the checkpoint table: each records a checkpoint of table "t", signed by `key`.
    fn checkpoint_rows(key: &ed25519_dalek::SigningKey, n: i64) -> Vec<ExportRow> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let cp = checkpoint(key, &chain(seq)[seq as usize - 1]);
                let columns = vec![
                    ("id".to_string(), Value::Int(seq)),
                    ("table_identity".to_string(), Value::Text(cp.table.clone())),
                    ("chain".to_string(), Value::Int(i64::from(cp.chain))),
                    ("seq".to_string(), Value::Int(cp.seq)),
                    ("head_hash".to_string(), Value::Bytes(cp.head_hash.to_vec())),
                    ("signed_at_us".to_string(), Value::Int(cp.signed_at)),
                    ("key_id".to_string(), Value::Text(cp.key_id.clone())),
                    (
                        "signature".to_string(),
                        Value::Bytes(hex::decode(&cp.signature).unwrap()),
                    ),
                ];
                let table = format!("{CHECKPOINT_TABLE}2");
                let h = row_hash(&table, 0, seq, &prev, &columns);
                let r = ExportRow {
                    table,
                    chain: 0,
                    seq,
                    prev_hash: prev,
                    row_hash: h,
                    columns,
                };
                prev = h;
                r
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_row_with_a_forged_signature_fails_even_rehashed() {
        let key = keys::generate().unwrap();
        let mut rows = checkpoint_rows(&key, 3);
        assert!(run(&rows, vec![], &key).ok);
        // The last row's signature forged, its hash recomputed: the chain links, the row does not.
        let last = &mut rows[2];
        last.columns[7].1 = Value::Bytes(vec![7u8; 64]);
        last.row_hash = row_hash(&last.table, 0, 3, &last.prev_hash, &last.columns);
        let r = run(&rows, vec![], &key);
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(3));
        assert!(r.detail.contains("no valid signature"), "{r:?}");
        // Signed by a key the verifier was not given: not trusted either.
        let other = keys::generate().unwrap();
        assert!(!run(&checkpoint_rows(&key, 2), vec![], &other).ok);
    }

    #[test]
    fn intact_chain_verifies() {
        let key = keys::generate().unwrap();
        let rows = chain(5);
        let r = run(&rows, vec![checkpoint(&key, &rows[4])], &key);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.rows_checked, 5);
    }

    #[test]
    fn edited_row_is_named() {
        let key = keys::generate().unwrap();
        let mut rows = chain(5);
        rows[2].columns[1].1 = Value::Text("forged".into());
        let r = run(&rows, vec![], &key);
        assert_eq!(r.first_bad_seq, Some(3));
        assert!(r.detail.contains("row changed"));
    }

    #[test]
    fn deleted_middle_row_is_named() {
        let key = keys::generate().unwrap();
        let mut rows = chain(5);
        rows.remove(2);
        let r = run(&rows, vec![], &key);
        assert_eq!(r.first_bad_seq, Some(3));
        assert!(r.detail.contains("3..3 are missing"), "{}", r.detail);
    }

    #[test]
    fn recomputed_chain_is_caught_by_the_checkpoint() {
        let key = keys::generate().unwrap();
        let rows = chain(5);
        let cp = checkpoint(&key, &rows[4]);
        // Whoever forges row 2 and recomputes every hash after it still cannot re-sign.
        let mut forged = rows.clone();
        forged[1].columns[1].1 = Value::Text("forged".into());
        let mut prev = forged[0].row_hash;
        for r in forged.iter_mut().skip(1) {
            r.prev_hash = prev;
            r.row_hash = row_hash(&r.table, r.chain, r.seq, &r.prev_hash, &r.columns);
            prev = r.row_hash;
        }
        let r = run(&forged, vec![cp], &key);
        assert_eq!(r.first_bad_seq, Some(5));
        assert!(r.detail.contains("differs from its signed checkpoint"));
    }

    #[test]
    fn truncated_tail_after_checkpoint_is_caught() {
        let key = keys::generate().unwrap();
        let rows = chain(5);
        let cp = checkpoint(&key, &rows[4]);
        let r = run(&rows[..3], vec![cp], &key);
        assert_eq!(r.first_bad_seq, Some(4));
        assert!(r.detail.contains("rows 4..5 are missing"), "{}", r.detail);
    }

    #[test]
    fn forged_checkpoint_signature_is_caught() {
        let key = keys::generate().unwrap();
        let rows = chain(3);
        let mut cp = checkpoint(&key, &rows[2]);
        cp.seq = 2;
        let r = run(&rows, vec![cp], &key);
        assert!(!r.ok);
        assert!(r.detail.contains("signature"));
    }

    #[test]
    fn deleted_first_rows_are_named_unless_the_export_is_partial() {
        let key = keys::generate().unwrap();
        let rows = chain(4);
        let r = run(&rows[1..], vec![], &key);
        assert_eq!(r.first_bad_seq, Some(1));
        let mut v = Verifier::with_partial(vec![], &[key.verifying_key()], true);
        rows[1..].iter().for_each(|r| v.push(r));
        assert!(v.finish()[0].ok);
    }

    #[test]
    fn unchained_rows_are_reported_per_table_and_leave_the_chain_verdict_alone() {
        let key = keys::generate().unwrap();
        let mut rows = chain(3);
        let mut stray = rows[1].clone();
        stray.chain = UNCHAINED;
        rows.insert(0, stray.clone());
        rows.insert(0, stray);
        let mut v = Verifier::new(vec![], &[key.verifying_key()]);
        rows.iter().for_each(|r| v.push(r));
        let reports = v.finish();
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(reports[0].ok, "the chain itself is whole: {reports:?}");
        let stray = &reports[1];
        assert_eq!(
            (stray.chain, stray.ok, stray.first_bad_seq),
            (None, false, None)
        );
        assert_eq!(stray.rows_checked, 2);
        assert!(
            stray.detail.contains("2 rows carry no chain fields"),
            "{stray:?}"
        );
    }

    #[test]
    fn a_row_without_chain_fields_reads_from_nulls_absent_keys_and_the_0_1_0_form() {
        let columns = r#""columns":[["id",{"type":"int","value":1}]]"#;
        let lines = [
            format!(
                r#"{{"table":"t","chain":null,"seq":null,"prev_hash":null,"row_hash":null,{columns}}}"#
            ),
            format!(r#"{{"table":"t",{columns}}}"#),
            format!(
                r#"{{"table":"t","chain":3,"seq":null,"prev_hash":null,"row_hash":null,{columns}}}"#
            ),
            // 0.1.0 exported such a row with these stand-ins.
            format!(
                r#"{{"table":"t","chain":-1,"seq":0,"prev_hash":"{z}","row_hash":"{z}",{columns}}}"#,
                z = "00".repeat(32)
            ),
        ];
        for line in &lines {
            let row: ExportRow = serde_json::from_str(line).unwrap();
            assert!(!row.is_chained(), "{line}");
            // Written back, its chain keys are null.
            let out = serde_json::to_string(&row).unwrap();
            assert!(
                out.contains(r#""chain":null,"seq":null,"prev_hash":null,"row_hash":null"#),
                "{out}"
            );
        }
    }

    #[test]
    fn a_duplicated_row_is_named_at_its_own_sequence_number() {
        let key = keys::generate().unwrap();
        let mut rows = chain(5);
        rows.insert(3, rows[2].clone());
        let r = run(&rows, vec![], &key);
        assert_eq!(r.first_bad_seq, Some(3));
        assert!(r.detail.contains("row 3 appears more than once"), "{r:?}");
    }

    #[test]
    fn rows_out_of_chain_order_are_named_not_passed() {
        // The offline tool sorts first; the verifier itself refuses to guess.
        let key = keys::generate().unwrap();
        let mut rows = chain(4);
        rows.swap(1, 2);
        let r = run(&rows, vec![], &key);
        assert!(!r.ok);
        assert_eq!(r.first_bad_seq, Some(2));
    }

    #[test]
    fn null_columns_do_not_change_the_hash() {
        let a = row_hash("t", 0, 1, &GENESIS, &[("a", Value::Int(1))]);
        let b = row_hash(
            "t",
            0,
            1,
            &GENESIS,
            &[("a", Value::Int(1)), ("added_later", Value::Null)],
        );
        assert_eq!(a, b);
    }

    #[test]
    fn export_rows_round_trip_json() {
        let rows = chain(2);
        let line = serde_json::to_string(&rows[1]).unwrap();
        let back: ExportRow = serde_json::from_str(&line).unwrap();
        assert_eq!(back, rows[1]);
    }
}
