//! Table digests (issue 16): `vault_table_digest`, `vault_table_digest_ranges` and
//! `vault_table_digest_export` (sql/digest.sql), over the order, encoding and tree of
//! `vsql_vault_core::digest` (docs/table-digest.md), which `vsql-vault digest` uses too.
//!
//! The rows are read with the caller's rights (the functions are SECURITY INVOKER: table and
//! column privileges and row-level security apply as to a SELECT). Each row's key bytes and row
//! bytes are computed in the query by `vault.table_digest_key` / `vault.table_digest_row`, the
//! server sorts the rows by them (bytea order is bytewise, whatever the collation; a large table
//! spills to disk under work_mem), and the root is folded from a cursor with O(log n) state.
//!
//! A digest reads only what the caller could SELECT and changes nothing, so it is not an audited
//! call: no access record is made (as for a plain SELECT), and it needs neither the audit writer
//! nor a primary.

use crate::column_values::{datum_value, pins_output_of, PinnedOutput};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, quote_literal};
use pgrx::{AnyElement, JsonB};
use thiserror::Error;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::digest::{self as core_digest, ExportLine, TableDigest};

/// The failures of the digest functions and their SQLSTATEs (README, "SQLSTATEs").
#[derive(Debug, Error)]
pub enum DigestError {
    #[error("tbl must not be NULL")]
    NullTable,
    #[error("relation with OID {0} does not exist")]
    NoSuchRelation(u32),
    #[error("{0} has no digest: only tables, partitioned tables, materialized views and foreign tables have one")]
    NotATable(String),
    #[error("column \"{column}\" of {table} does not exist")]
    UnknownColumn { table: String, column: String },
    #[error("column \"{0}\" is named more than once")]
    DuplicateColumn(String),
    #[error("columns must name at least one column, and no NULL")]
    NoColumns,
    #[error("bucket must be given with buckets, between 0 and buckets - 1 (got {0:?})")]
    Bucket(Option<i32>),
    #[error("the second argument must be a ROW(...) of the columns named")]
    NotARecord,
    #[error("the record has {got} fields for {names} names")]
    Shape { got: usize, names: usize },
    #[error(transparent)]
    Core(#[from] core_digest::DigestError),
    #[error("{0}")]
    Internal(String),
}

impl DigestError {
    pub fn code(&self) -> PgSqlErrorCode {
        use PgSqlErrorCode::*;
        match self {
            DigestError::NullTable => ERRCODE_NULL_VALUE_NOT_ALLOWED,
            DigestError::NoSuchRelation(_) => ERRCODE_UNDEFINED_TABLE,
            DigestError::NotATable(_) => ERRCODE_WRONG_OBJECT_TYPE,
            DigestError::UnknownColumn { .. } => ERRCODE_UNDEFINED_COLUMN,
            DigestError::DuplicateColumn(_) => ERRCODE_DUPLICATE_COLUMN,
            DigestError::NoColumns
            | DigestError::Bucket(_)
            | DigestError::NotARecord
            | DigestError::Shape { .. } => ERRCODE_INVALID_PARAMETER_VALUE,
            // Bytes given to vault.table_digest_line that are no canonical key or row.
            DigestError::Core(
                core_digest::DigestError::BucketCount(_)
                | core_digest::DigestError::Malformed { .. },
            ) => ERRCODE_INVALID_PARAMETER_VALUE,
            DigestError::Core(_) | DigestError::Internal(_) => ERRCODE_INTERNAL_ERROR,
        }
    }

    /// Raises the error with its SQLSTATE.
    fn raise(self) -> ! {
        pgrx::ereport!(ERROR, self.code(), self.to_string());
    }
}

fn internal(e: impl std::fmt::Display) -> DigestError {
    DigestError::Internal(e.to_string())
}

/// What a digest of one table reads: the relation as the query names it (qualified and quoted), and
/// the names of the key columns (none: the table has no key) and of the digested columns.
struct Plan {
    from: String,
    key: Vec<String>,
    columns: Vec<String>,
}

impl Plan {
    fn keyless(&self) -> bool {
        self.key.is_empty()
    }

    /// The query giving each row's key bytes `k` and row bytes `r`, in digest order.
    fn sorted_query(&self) -> String {
        let key = if self.keyless() {
            &self.columns
        } else {
            &self.key
        };
        format!(
            "SELECT vault.table_digest_key({}, ROW({})) AS k, vault.table_digest_row({}, ROW({})) AS r
               FROM {} ORDER BY 1, 2",
            names_literal(key),
            identifiers(key),
            names_literal(&self.columns),
            identifiers(&self.columns),
            self.from
        )
    }
}

/// Column names quoted as identifiers, for a select list.
fn identifiers(names: &[String]) -> String {
    names
        .iter()
        .map(quote_identifier)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A text[] literal of names, for a query text.
fn names_literal(names: &[String]) -> String {
    format!(
        "ARRAY[{}]::pg_catalog.text[]",
        names
            .iter()
            .map(quote_literal)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Checks the arguments against the catalog and works out what to read.
fn plan(
    tbl: Option<pg_sys::Oid>,
    columns: Option<Vec<Option<String>>>,
) -> Result<Plan, DigestError> {
    let tbl = tbl.ok_or(DigestError::NullTable)?;
    Spi::connect(|c| {
        let rel = c
            .select(
                "SELECT c.oid::pg_catalog.regclass::pg_catalog.text AS name, c.relkind::pg_catalog.text AS kind
                   FROM pg_catalog.pg_class c WHERE c.oid = $1",
                None,
                &[tbl.into()],
            )
            .map_err(internal)?;
        if rel.is_empty() {
            return Err(DigestError::NoSuchRelation(tbl.to_u32()));
        }
        let row = rel.first();
        let name: String = row
            .get_by_name("name")
            .map_err(internal)?
            .unwrap_or_default();
        let kind: String = row
            .get_by_name("kind")
            .map_err(internal)?
            .unwrap_or_default();
        let from = match kind.as_str() {
            // Only the table's own rows, not those of tables inheriting from it.
            "r" | "m" | "f" => format!("ONLY {name}"),
            // A partitioned table's rows are its partitions'.
            "p" => name.clone(),
            _ => return Err(DigestError::NotATable(name)),
        };
        let live = c
            .select(
                "SELECT attname::pg_catalog.text AS name, attgenerated = '' AS stored
                   FROM pg_catalog.pg_attribute
                  WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                None,
                &[tbl.into()],
            )
            .map_err(internal)?
            .map(|r| {
                Ok((
                    r.get_by_name::<String, _>("name")?.unwrap_or_default(),
                    r.get_by_name::<bool, _>("stored")?.unwrap_or(true),
                ))
            })
            .collect::<Result<Vec<(String, bool)>, pgrx::spi::Error>>()
            .map_err(internal)?;
        let columns = match columns {
            None => live
                .iter()
                .filter(|(_, stored)| *stored)
                .map(|(n, _)| n.clone())
                .collect(),
            Some(given) => chosen_columns(&name, &live, given)?,
        };
        // The primary key, else the replica identity index; their columns in index order.
        let key = c
            .select(
                "SELECT a.attname::pg_catalog.text AS name
                   FROM (SELECT i.indkey FROM pg_catalog.pg_index i
                          WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) AND i.indisvalid
                          ORDER BY i.indisprimary DESC LIMIT 1) i
                  CROSS JOIN LATERAL pg_catalog.generate_subscripts(i.indkey, 1) AS s(n)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attnum = i.indkey[s.n]
                  ORDER BY s.n",
                None,
                &[tbl.into()],
            )
            .map_err(internal)?
            .map(|r| r.get_by_name::<String, _>("name").map(Option::unwrap_or_default))
            .collect::<Result<Vec<String>, _>>()
            .map_err(internal)?;
        Ok(Plan { from, key, columns })
    })
}

fn chosen_columns(
    table: &str,
    live: &[(String, bool)],
    given: Vec<Option<String>>,
) -> Result<Vec<String>, DigestError> {
    if given.is_empty() {
        return Err(DigestError::NoColumns);
    }
    let mut out: Vec<String> = Vec::with_capacity(given.len());
    for column in given {
        let column = column.ok_or(DigestError::NoColumns)?;
        if !live.iter().any(|(n, _)| *n == column) {
            return Err(DigestError::UnknownColumn {
                table: table.to_owned(),
                column,
            });
        }
        if out.contains(&column) {
            return Err(DigestError::DuplicateColumn(column));
        }
        out.push(column);
    }
    Ok(out)
}

/// Streams the rows of `plan` in digest order into a `TableDigest`.
fn digest(plan: &Plan, buckets: u32) -> Result<TableDigest, DigestError> {
    let mut d = TableDigest::new(buckets);
    let query = plan.sorted_query();
    Spi::connect(|c| {
        let mut cursor = c.try_open_cursor(query.as_str(), &[]).map_err(internal)?;
        loop {
            let batch = cursor.fetch(1000).map_err(internal)?;
            if batch.is_empty() {
                break;
            }
            for row in batch {
                let k: &[u8] = row.get_by_name("k").map_err(internal)?.unwrap_or_default();
                let r: &[u8] = row.get_by_name("r").map_err(internal)?.unwrap_or_default();
                d.push(k, r)?;
            }
        }
        Ok(d)
    })
}

fn key_json(key: Option<&[u8]>) -> Result<Option<JsonB>, DigestError> {
    key.map(|k| core_digest::key_json(k).map(JsonB))
        .transpose()
        .map_err(DigestError::from)
}

type RangeRow = (i32, Option<JsonB>, Option<JsonB>, i64, Vec<u8>);

/// The digest of a table, whole (`buckets` 1) or by key-hash bucket: one row per bucket. Not an
/// `*_impl` function: it raises its errors itself and answers direct calls, since it does nothing
/// the caller could not do with a SELECT.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
#[allow(clippy::type_complexity)]
fn table_digest_buckets(
    tbl: Option<pg_sys::Oid>,
    columns: Option<Vec<Option<String>>>,
    buckets: Option<i32>,
) -> TableIterator<
    'static,
    (
        name!(bucket, i32),
        name!(first_key, Option<JsonB>),
        name!(last_key, Option<JsonB>),
        name!(rows, i64),
        name!(root, Vec<u8>),
    ),
> {
    let run = || -> Result<Vec<RangeRow>, DigestError> {
        let buckets = core_digest::bucket_count(i64::from(buckets.unwrap_or(1)))?;
        let plan = plan(tbl, columns)?;
        let d = digest(&plan, buckets)?;
        d.ranges()
            .into_iter()
            .map(|r| {
                Ok((
                    r.bucket as i32,
                    key_json(r.first_key.as_deref())?,
                    key_json(r.last_key.as_deref())?,
                    r.rows as i64,
                    r.root.to_vec(),
                ))
            })
            .collect()
    };
    match run() {
        Ok(rows) => TableIterator::new(rows),
        Err(e) => e.raise(),
    }
}

/// The query whose rows are the export's lines (run by `vault_table_digest_export`), in digest
/// order; with `buckets` and `bucket`, only the rows of that bucket. Checks the arguments as the
/// digest does.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn table_digest_export_query(
    tbl: Option<pg_sys::Oid>,
    columns: Option<Vec<Option<String>>>,
    buckets: Option<i32>,
    bucket: Option<i32>,
) -> String {
    let run = || -> Result<String, DigestError> {
        let only = match (buckets, bucket) {
            (None, None) => String::new(),
            (Some(n), Some(b)) => {
                let n = core_digest::bucket_count(i64::from(n))?;
                if !(0..i64::from(n)).contains(&i64::from(b)) {
                    return Err(DigestError::Bucket(Some(b)));
                }
                format!("WHERE vault.table_digest_bucket(s.k, {n}) = {b}")
            }
            (_, b) => return Err(DigestError::Bucket(b)),
        };
        let p = plan(tbl, columns)?;
        Ok(format!(
            "SELECT vault.table_digest_line(s.k, s.r, {}) FROM ({}) s {only} ORDER BY s.k, s.r",
            p.keyless(),
            p.sorted_query()
        ))
    };
    run().unwrap_or_else(|e| e.raise())
}

/// The bucket of a row among `buckets`, from its key bytes (`vsql_vault_core::digest::bucket_of`).
#[pg_extern(immutable, parallel_safe, schema = "vault")]
fn table_digest_bucket(key: &[u8], buckets: i32) -> i32 {
    match core_digest::bucket_count(i64::from(buckets)) {
        Ok(n) => core_digest::bucket_of(key, n) as i32,
        Err(e) => DigestError::from(e).raise(),
    }
}

/// The canonical values of the fields of a row made by `ROW(...)`, named by `names`.
fn record_fields(
    record: &AnyElement,
    names: &[Option<String>],
) -> Result<Vec<(String, Value)>, DigestError> {
    // SAFETY: `record` is a composite datum (the argument is always a ROW(...) the digest's own
    // query builds; anything else is refused by its type below). pg_detoast_datum gives a plain
    // HeapTupleHeader; lookup_rowtype_tupdesc finds the (blessed) descriptor of its type and
    // typmod, pinned until the DecrTupleDescRefCount below; the HeapTupleData is a stack header
    // over that data, valid for the deform; the deformed datums point into the record, which
    // outlives this function, and are turned into owned values before it returns.
    unsafe {
        if !pg_sys::type_is_rowtype(record.oid()) {
            return Err(DigestError::NotARecord);
        }
        let header =
            pg_sys::pg_detoast_datum(record.datum().cast_mut_ptr()) as pg_sys::HeapTupleHeader;
        let tupdesc = pg_sys::lookup_rowtype_tupdesc(
            pgrx::heap_tuple_header_get_type_id(header),
            pgrx::heap_tuple_header_get_typmod(header),
        );
        let natts = (*tupdesc).natts as usize;
        if natts != names.len() {
            pg_sys::DecrTupleDescRefCount(tupdesc);
            return Err(DigestError::Shape {
                got: natts,
                names: names.len(),
            });
        }
        let mut tuple = pg_sys::HeapTupleData {
            t_len: pgrx::heap_tuple_header_get_datum_length(header) as u32,
            t_self: pg_sys::ItemPointerData::default(),
            t_tableOid: pg_sys::Oid::INVALID,
            t_data: header,
        };
        let values = crate::chain::deform(&mut tuple, tupdesc);
        let types: Vec<pg_sys::Oid> = (0..natts)
            .map(|i| (*(*tupdesc).attrs.as_ptr().add(i)).atttypid)
            .collect();
        pg_sys::DecrTupleDescRefCount(tupdesc);
        let _pinned = values
            .iter()
            .zip(&types)
            .any(|(v, t)| v.is_some_and(|d| pins_output_of(d, *t)))
            .then(PinnedOutput::enter);
        Ok(names
            .iter()
            .zip(values.iter().zip(&types))
            .map(|(n, (v, t))| (n.clone().unwrap_or_default(), datum_value(*v, *t)))
            .collect())
    }
}

fn record_bytes(
    record: AnyElement,
    names: Vec<Option<String>>,
    encode: fn(&[(String, Value)]) -> Vec<u8>,
) -> Vec<u8> {
    match record_fields(&record, &names) {
        Ok(fields) => encode(&fields),
        Err(e) => e.raise(),
    }
}

/// A row's key bytes (docs/table-digest.md): the canonical encoding of `ROW(key columns)`.
#[pg_extern(stable, parallel_unsafe, schema = "vault")]
fn table_digest_key(names: Vec<Option<String>>, record: AnyElement) -> Vec<u8> {
    record_bytes(record, names, core_digest::key_bytes::<String>)
}

/// A row's row bytes (docs/table-digest.md): the canonical encoding of `ROW(digested columns)`.
#[pg_extern(stable, parallel_unsafe, schema = "vault")]
fn table_digest_row(names: Vec<Option<String>>, record: AnyElement) -> Vec<u8> {
    record_bytes(record, names, core_digest::row_bytes::<String>)
}

/// The export line of a row from its key bytes and row bytes.
#[pg_extern(immutable, parallel_safe, schema = "vault")]
fn table_digest_line(key: &[u8], row: &[u8], keyless: bool) -> String {
    match ExportLine::from_bytes(key, row, keyless)
        .map_err(DigestError::from)
        .and_then(|l| serde_json::to_string(&l).map_err(internal))
    {
        Ok(line) => line,
        Err(e) => e.raise(),
    }
}
