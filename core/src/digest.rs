//! Table digests (issue 16): one RFC 6962 Merkle root over a table's rows, in an order and an
//! encoding that do not depend on the node, so that two nodes holding the same rows get the same
//! root whatever their physical order, collation or session settings; and roots over hash buckets
//! of the key, so that two nodes that differ can narrow the difference down. Specified in
//! docs/table-digest.md; the database (`vault_table_digest`, `vault_table_digest_ranges`,
//! `vault_table_digest_export`) and the offline tool (`vsql-vault digest`) both use this module.
//!
//! - a row's **key bytes**: the canonical encoding (docs/audit-format.md section 1) with domain
//!   `vsql_vault.table_key` of its key columns (primary key, else replica identity index), or of
//!   all its digested columns when the table has neither;
//! - its **row bytes**: the canonical encoding with domain `vsql_vault.table_row` of its digested
//!   columns, NULLs included as null values;
//! - rows are taken in ascending bytewise order of (key bytes, row bytes); the leaf of a row is
//!   `leaf_hash(row bytes)` and the root is the RFC 6962 root over the leaves in that order;
//! - with `buckets` = N, a row belongs to bucket `floor(u64(SHA-256(key bytes)[0..8]) * N / 2^64)`
//!   and each bucket has its own root over its rows, in the same order.

use crate::canonical::{encode_named, Value};
use crate::merkle::{leaf_hash, RootBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// Domain of the key bytes.
pub const KEY_DOMAIN: &str = "vsql_vault.table_key";
/// Domain of the row bytes (the leaves).
pub const ROW_DOMAIN: &str = "vsql_vault.table_row";
/// The most buckets a range digest may ask for: each is kept open (its first and last key and a
/// tree of O(log n) hashes) while the rows stream past.
pub const MAX_BUCKETS: i64 = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("buckets must be between 1 and {MAX_BUCKETS}, got {0}")]
    BucketCount(i64),
    #[error("rows must come in ascending order of (key bytes, row bytes)")]
    NotSorted,
    #[error("not a canonical {domain} encoding: {why}")]
    Malformed { domain: String, why: &'static str },
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
}

impl DigestError {
    /// The SQLSTATE the database raises it with (README, "SQLSTATEs").
    pub fn sqlstate(&self) -> &'static str {
        match self {
            DigestError::BucketCount(_) => "22023",
            DigestError::NotSorted | DigestError::Malformed { .. } => "XX000",
            DigestError::Line { .. } => "22P02",
        }
    }
}

/// The key bytes of a row from its key columns (or, for a table without a key, its digested
/// columns), in the order given.
pub fn key_bytes<S: AsRef<str>>(fields: &[(S, Value)]) -> Vec<u8> {
    encode_named(KEY_DOMAIN, fields)
}

/// The row bytes of a row from its digested columns, in the order given.
pub fn row_bytes<S: AsRef<str>>(fields: &[(S, Value)]) -> Vec<u8> {
    encode_named(ROW_DOMAIN, fields)
}

/// The bucket of a row among `buckets` (1..=MAX_BUCKETS), from its key bytes: the first 8 bytes
/// of their SHA-256 as a big-endian fraction of 2^64, times `buckets`. Stable under insertion:
/// a row's bucket depends on its key alone.
pub fn bucket_of(key: &[u8], buckets: u32) -> u32 {
    let h: [u8; 32] = Sha256::digest(key).into();
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    ((u128::from(u64::from_be_bytes(first)) * u128::from(buckets)) >> 64) as u32
}

/// The number of buckets asked for, checked.
pub fn bucket_count(n: i64) -> Result<u32, DigestError> {
    if (1..=MAX_BUCKETS).contains(&n) {
        Ok(n as u32)
    } else {
        Err(DigestError::BucketCount(n))
    }
}

/// Reads back the fields of a canonical encoding of `domain` (the inverse of `encode_named`).
pub fn decode(domain: &str, bytes: &[u8]) -> Result<Vec<(String, Value)>, DigestError> {
    let bad = |why| DigestError::Malformed {
        domain: domain.to_owned(),
        why,
    };
    let mut r = Reader { bytes, at: 0 };
    if r.take(5) != Some(b"VSQLV".as_slice())
        || r.take(1) != Some([crate::canonical::FORMAT_VERSION].as_slice())
    {
        return Err(bad("bad header"));
    }
    if r.len_prefixed() != Some(domain.as_bytes()) {
        return Err(bad("another domain"));
    }
    let mut fields = Vec::new();
    while r.at < bytes.len() {
        let name = r.len_prefixed().ok_or(bad("truncated name"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad("name not UTF-8"))?;
        let tag = r.take(1).ok_or(bad("truncated tag"))?[0];
        use crate::canonical::tag;
        let value = match tag {
            tag::NULL => Value::Null,
            tag::TEXT => {
                let t = r.len_prefixed().ok_or(bad("truncated text"))?;
                Value::Text(String::from_utf8(t.to_vec()).map_err(|_| bad("text not UTF-8"))?)
            }
            tag::BYTES => Value::Bytes(r.len_prefixed().ok_or(bad("truncated bytes"))?.to_vec()),
            tag::INT | tag::TIMESTAMP => {
                let mut b = [0u8; 8];
                b.copy_from_slice(r.take(8).ok_or(bad("truncated integer"))?);
                let i = i64::from_be_bytes(b);
                if tag == tag::INT {
                    Value::Int(i)
                } else {
                    Value::Timestamp(i)
                }
            }
            tag::BOOL => match r.take(1).ok_or(bad("truncated bool"))?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(bad("bool neither 0 nor 1")),
            },
            _ => return Err(bad("unknown tag")),
        };
        fields.push((name, value));
    }
    Ok(fields)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn len_prefixed(&mut self) -> Option<&'a [u8]> {
        let mut len = [0u8; 4];
        len.copy_from_slice(self.take(4)?);
        self.take(u32::from_be_bytes(len) as usize)
    }
}

/// One line of a digest export (`vault_table_digest_export`): the row's key columns (null for a
/// table without a key) and its digested columns, each a `[name, value]` pair in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    pub key: Option<Vec<(String, Value)>>,
    pub columns: Vec<(String, Value)>,
}

impl ExportLine {
    /// The line of a row given by its key bytes and row bytes; `keyless` when the key bytes
    /// were made from the digested columns (a table without a key).
    pub fn from_bytes(key: &[u8], row: &[u8], keyless: bool) -> Result<Self, DigestError> {
        Ok(ExportLine {
            key: if keyless {
                None
            } else {
                Some(decode(KEY_DOMAIN, key)?)
            },
            columns: decode(ROW_DOMAIN, row)?,
        })
    }

    /// The key bytes and row bytes, computed again from the values.
    pub fn bytes(&self) -> (Vec<u8>, Vec<u8>) {
        let key = key_bytes(self.key.as_deref().unwrap_or(&self.columns));
        (key, row_bytes(&self.columns))
    }
}

/// The digest of a whole export, read strictly: one `ExportLine` per line (blank lines skipped,
/// a trailing `\r` tolerated), in any order. Every leaf is computed again from the values.
pub fn digest_export(text: &str, buckets: u32) -> Result<TableDigest, DigestError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(line).map_err(|e| DigestError::Line {
            line: i + 1,
            why: e.to_string(),
        })?;
        rows.push(parsed.bytes());
    }
    rows.sort_unstable();
    let mut digest = TableDigest::new(buckets);
    for (key, row) in &rows {
        digest.push(key, row)?;
    }
    Ok(digest)
}

/// One bucket's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub bucket: u32,
    /// The key bytes of the bucket's first and last rows (none for an empty bucket).
    pub first_key: Option<Vec<u8>>,
    pub last_key: Option<Vec<u8>>,
    pub rows: u64,
    pub root: [u8; 32],
}

#[derive(Debug, Clone, Default)]
struct OpenRange {
    first_key: Option<Vec<u8>>,
    last_key: Option<Vec<u8>>,
    tree: RootBuilder,
}

/// Takes rows in ascending order of (key bytes, row bytes) and keeps the whole table's root and
/// each bucket's, with O(buckets · log n) state.
#[derive(Debug, Clone)]
pub struct TableDigest {
    buckets: u32,
    whole: RootBuilder,
    ranges: Vec<OpenRange>,
    previous: Option<(Vec<u8>, Vec<u8>)>,
}

impl TableDigest {
    /// `buckets` from `bucket_count` (1 for the whole table only).
    pub fn new(buckets: u32) -> Self {
        TableDigest {
            buckets,
            whole: RootBuilder::new(),
            ranges: vec![OpenRange::default(); buckets as usize],
            previous: None,
        }
    }

    /// Adds the next row; refused if it sorts before the previous one (the order is part of
    /// the digest, so a caller that did not sort would get a root no other node agrees with).
    pub fn push(&mut self, key: &[u8], row: &[u8]) -> Result<(), DigestError> {
        if let Some((k, r)) = &self.previous {
            if (k.as_slice(), r.as_slice()) > (key, row) {
                return Err(DigestError::NotSorted);
            }
        }
        let leaf = leaf_hash(row);
        self.whole.push(leaf);
        let bucket = if self.buckets > 1 {
            bucket_of(key, self.buckets) as usize
        } else {
            0
        };
        let range = &mut self.ranges[bucket];
        if range.first_key.is_none() {
            range.first_key = Some(key.to_vec());
        }
        range.last_key = Some(key.to_vec());
        if self.buckets > 1 {
            range.tree.push(leaf);
        }
        self.previous = Some((key.to_vec(), row.to_vec()));
        Ok(())
    }

    pub fn rows(&self) -> u64 {
        self.whole.count()
    }

    pub fn root(&self) -> [u8; 32] {
        self.whole.root()
    }

    /// Every bucket, empty ones too (so two nodes' lists line up one to one). With one bucket,
    /// the whole table.
    pub fn ranges(&self) -> Vec<Range> {
        self.ranges
            .iter()
            .enumerate()
            .map(|(i, r)| Range {
                bucket: i as u32,
                first_key: r.first_key.clone(),
                last_key: r.last_key.clone(),
                rows: if self.buckets > 1 {
                    r.tree.count()
                } else {
                    self.rows()
                },
                root: if self.buckets > 1 {
                    r.tree.root()
                } else {
                    self.root()
                },
            })
            .collect()
    }
}

/// A key as JSON (`[[name, value], ...]`), for a range's first and last key.
pub fn key_json(key: &[u8]) -> Result<serde_json::Value, DigestError> {
    serde_json::to_value(decode(KEY_DOMAIN, key)?).map_err(|_| DigestError::Malformed {
        domain: KEY_DOMAIN.to_owned(),
        why: "not representable as JSON",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::root;

    fn row(id: i64, name: &str) -> ExportLine {
        ExportLine {
            key: Some(vec![("id".into(), Value::Int(id))]),
            columns: vec![
                ("id".into(), Value::Int(id)),
                ("name".into(), Value::Text(name.into())),
                ("note".into(), Value::Null),
            ],
        }
    }

    fn export(lines: &[ExportLine]) -> String {
        lines
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n")
            .collect()
    }

    #[test]
    fn the_root_does_not_depend_on_the_order_of_the_rows() {
        let rows: Vec<ExportLine> = (0..50)
            .map(|i| row(i * 7 - 100, &format!("n{i}")))
            .collect();
        let a = digest_export(&export(&rows), 8).unwrap();
        let mut reversed = rows.clone();
        reversed.reverse();
        reversed.swap(3, 40);
        let b = digest_export(&export(&reversed), 8).unwrap();
        assert_eq!(a.root(), b.root());
        assert_eq!(a.ranges(), b.ranges());
        assert_eq!(a.rows(), 50);
        // The root is RFC 6962's over the leaves in (key, row) order.
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = rows.iter().map(|r| r.bytes()).collect();
        pairs.sort();
        let leaves: Vec<[u8; 32]> = pairs.iter().map(|(_, r)| leaf_hash(r)).collect();
        assert_eq!(a.root(), root(&leaves));
    }

    #[test]
    fn one_changed_value_changes_the_root_and_exactly_one_bucket() {
        let rows: Vec<ExportLine> = (0..200).map(|i| row(i, "same")).collect();
        let mut changed = rows.clone();
        changed[123].columns[1].1 = Value::Text("other".into());
        let a = digest_export(&export(&rows), 16).unwrap();
        let b = digest_export(&export(&changed), 16).unwrap();
        assert_ne!(a.root(), b.root());
        let differing: Vec<(Range, Range)> = a
            .ranges()
            .into_iter()
            .zip(b.ranges())
            .filter(|(x, y)| x != y)
            .collect();
        assert_eq!(differing.len(), 1);
        let (x, _) = &differing[0];
        let key = key_bytes(&[("id", Value::Int(123))]);
        assert_eq!(x.bucket, bucket_of(&key, 16));
        assert!(x.first_key.as_deref().unwrap() <= key.as_slice());
        assert!(key.as_slice() <= x.last_key.as_deref().unwrap());
        let sum: u64 = a.ranges().iter().map(|r| r.rows).sum();
        assert_eq!(sum, 200);
    }

    #[test]
    fn the_empty_table_has_the_empty_tree_root() {
        let d = digest_export("\n", 4).unwrap();
        assert_eq!(d.rows(), 0);
        assert_eq!(d.root(), root(&[]));
        assert_eq!(
            hex::encode(d.root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(d
            .ranges()
            .iter()
            .all(|r| r.rows == 0 && r.first_key.is_none()));
    }

    #[test]
    fn keys_and_rows_decode_back_to_their_fields() {
        let fields = vec![
            ("a".to_string(), Value::Text("x\u{e9}".into())),
            ("b".to_string(), Value::Null),
            ("c".to_string(), Value::Bytes(vec![0, 1, 255])),
            ("d".to_string(), Value::Int(-3)),
            ("e".to_string(), Value::Bool(true)),
            ("f".to_string(), Value::Timestamp(7)),
        ];
        assert_eq!(decode(KEY_DOMAIN, &key_bytes(&fields)).unwrap(), fields);
        assert_eq!(decode(ROW_DOMAIN, &row_bytes(&fields)).unwrap(), fields);
        // Keys and rows are domain separated.
        assert!(decode(ROW_DOMAIN, &key_bytes(&fields)).is_err());
        let mut truncated = row_bytes(&fields);
        truncated.pop();
        assert!(decode(ROW_DOMAIN, &truncated).is_err());
    }

    #[test]
    fn unsorted_input_and_bad_bucket_counts_are_refused() {
        let mut d = TableDigest::new(1);
        d.push(b"b", b"1").unwrap();
        d.push(b"b", b"1").unwrap();
        assert_eq!(d.push(b"a", b"9"), Err(DigestError::NotSorted));
        assert_eq!(bucket_count(0), Err(DigestError::BucketCount(0)));
        assert_eq!(bucket_count(4097), Err(DigestError::BucketCount(4097)));
        assert_eq!(bucket_count(4096), Ok(4096));
    }

    #[test]
    fn a_bad_export_line_is_refused_with_its_number() {
        let good = export(&[row(1, "a")]);
        for bad in [
            "{\"key\":null}",
            "{\"key\":null,\"columns\":[],\"extra\":1}",
            "{\"key\":null,\"columns\":[[\"a\",{\"type\":\"int\",\"value\":\"1\"}]]}",
            "not json",
        ] {
            let text = format!("{good}{bad}\n");
            match digest_export(&text, 1) {
                Err(DigestError::Line { line: 2, .. }) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn buckets_spread_keys() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[bucket_of(&key_bytes(&[("id", Value::Int(i))]), 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
