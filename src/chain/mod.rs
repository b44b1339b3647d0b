//! Tamper evidence: hash-chained, append-only tables (the vault's own evidence tables and those
//! given to `vault_protect_table`), signed checkpoints, verification and export. The row hash,
//! the checkpoint message and the verifier come from `vsql_vault_core::chain`, which the offline
//! tool uses too.
//!
//! - `head`: taking a chain and writing its head back; `ChainBatch` for a single writer;
//! - `trigger`: the chain trigger on every protected table;
//! - `protect`: `vault_protect_table` and forgetting a table that is gone;
//! - `verify`: reading a protected table back, for verification and export;
//! - `checkpoint`: signing chain heads, reading checkpoints and keys.
//!
//! This module keeps what they share: how a row's columns become hashed values, and how the
//! vault finds its registrations (by OID, or by the names a 0.1.0 schema recorded).

use crate::column_values::{datum_value, pins_output_of, PinnedOutput};
use crate::errors::VaultError;
use crate::pg::plans::{self, types::*};
use crate::security::{AsOwner, AsTableOwner};
use crate::{keys, settings};
use pgrx::prelude::*;
use pgrx::PgTupleDesc;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::chain::{self, Checkpoint, ExportRow, Verifier, CHAIN_COLUMNS, GENESIS};

/// The OID of registration `p`'s table from the name 0.1.0 recorded (`schema.table`, unquoted),
/// written out rather than through `vault.table_oid`, which a 0.1.0 install creates only after
/// it protects its own tables.
macro_rules! oid_by_recorded_name {
    () => {
        "(SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n
                ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
           WHERE n.nspname OPERATOR(pg_catalog.=) pg_catalog.split_part(p.table_name, '.', 1)
             AND c.relname OPERATOR(pg_catalog.=) pg_catalog.substr(p.table_name,
                     pg_catalog.length(pg_catalog.split_part(p.table_name, '.', 1)) OPERATOR(pg_catalog.+) 2))"
    };
}

mod checkpoint;
mod head;
mod held;
pub mod on_conflict;
mod protect;
mod restore;
mod trigger;
mod trust;
mod verify;

pub use checkpoint::*;
pub use head::*;
pub use protect::*;
pub(crate) use restore::protection_restored;
pub use trigger::*;
pub use trust::*;
pub use verify::*;

/// The table's columns other than generated ones, quoted, for a select list. A query result's
/// descriptor does not say which columns are generated, and the chain trigger (which runs before
/// they are computed) hashes without them: an export or a check must read without them too.
fn stored_columns(relid: pg_sys::Oid) -> Result<String, VaultError> {
    crate::pg::select_one::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.quote_ident(attname), ', ' ORDER BY attnum)
           FROM pg_catalog.pg_attribute
          WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
        &[relid.into()],
    )
    .map_err(|e| VaultError::Internal(e.to_string()))?
    .ok_or_else(|| VaultError::Internal(format!("relation {} has no columns", relid.to_u32())))
}

/// The hashed columns of a table: live, not generated, not the chain's own fields.
fn hashed_attributes(tupdesc: pg_sys::TupleDesc) -> Vec<(usize, String, pg_sys::Oid)> {
    // SAFETY: every caller passes a live descriptor: the trigger relation's `rd_att` (row_shape,
    // for chain_row, valid for the trigger call) or the `tupdesc` of the current SPI result (export_row via
    // scan_rows, chain_existing_rows), valid until SPI_finish. The wrapper does not outlive this
    // function and, made with `from_pg_unchecked`, never releases the descriptor.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    desc.iter()
        .enumerate()
        .filter(|(_, a)| {
            !a.attisdropped && a.attgenerated == 0 && !CHAIN_COLUMNS.contains(&a.name())
        })
        .map(|(i, a)| (i, a.name().to_owned(), a.atttypid))
        .collect()
}

/// The OID of `vault.<name>` (given as `vault.<name>`), if it exists.
pub(crate) fn vault_relation(qualified: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(qualified.strip_prefix("vault.")?).ok()?;
    // SAFETY: syscache lookups, made inside a transaction (SQL functions, triggers, and the
    // workers' `BackgroundWorker::transaction` bodies). Both names are NUL-terminated and outlive
    // the calls; `missing_ok` is true, and an invalid namespace OID just finds no relation.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"vault".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(name.as_ptr(), ns);
        (ns != pg_sys::Oid::INVALID && rel != pg_sys::Oid::INVALID).then_some(rel)
    }
}

/// Whether `vault.protected_tables` has its `relid` column. It has not between installing this
/// version's library over 0.1.0 and `ALTER EXTENSION vsql_vault UPDATE`: tables are then still
/// registered by name, and the chains must keep working (the audit writer too) until the update.
/// Two syscache lookups, cheap enough for every chained statement.
pub fn registry_by_oid() -> bool {
    // SAFETY: a syscache lookup inside a transaction (as for `vault_relation`); `rel` is a
    // relation OID just found, the attribute name a NUL-terminated static string, and an unknown
    // name gives InvalidAttrNumber rather than an error.
    vault_relation("vault.protected_tables").is_none_or(|rel| unsafe {
        pg_sys::get_attnum(rel, c"relid".as_ptr()) != pg_sys::InvalidAttrNumber as i16
    })
}

/// The SQL expression for the OID of registration `p`'s table (see `registry_by_oid`).
fn registered_oid() -> &'static str {
    if registry_by_oid() {
        "p.relid::pg_catalog.oid"
    } else {
        oid_by_recorded_name!()
    }
}

/// The attribute values of a heap tuple, NULL as None.
///
/// # Safety
///
/// `tuple` must be a valid heap tuple formed with `tupdesc` (or an earlier version of it with
/// fewer attributes), and `tupdesc` a valid descriptor. By-reference datums in the result point
/// into `tuple` and are valid only as long as it is.
pub(crate) unsafe fn deform(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
) -> Vec<Option<pg_sys::Datum>> {
    // SAFETY: the caller guarantees `tuple` and `tupdesc` are valid and match;
    // heap_deform_tuple writes `natts` entries, exactly the length of both vectors.
    unsafe {
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0usize); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        values
            .into_iter()
            .zip(nulls)
            .map(|(v, n)| (!n).then_some(v))
            .collect()
    }
}

fn columns_of(
    values: &[Option<pg_sys::Datum>],
    attrs: &[(usize, String, pg_sys::Oid)],
) -> Vec<(String, Value)> {
    hashed_values(values, attrs)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

/// The hashed values of a row, named by `attrs` (no copy of the names).
fn hashed_values<'n>(
    values: &[Option<pg_sys::Datum>],
    attrs: &'n [(usize, String, pg_sys::Oid)],
) -> Vec<(&'n str, Value)> {
    let _pinned = attrs
        .iter()
        .any(|(i, _, typid)| values[*i].is_some_and(|d| pins_output_of(d, *typid)))
        .then(PinnedOutput::enter);
    attrs
        .iter()
        .map(|(i, name, typid)| (name.as_str(), datum_value(values[*i], *typid)))
        .collect()
}

/// What the chain trigger reads of a table's descriptor: the hashed attributes and where the
/// chain fields are. Made once and kept while the descriptor stays the same (`row_shape`).
pub(crate) struct RowShape {
    pub hashed: Vec<(usize, String, pg_sys::Oid)>,
    /// chain_id, chain_seq, prev_hash, row_hash, when present with their types.
    pub chain_fields: [Option<usize>; 4],
}

/// A table's shape, with its OID and the bytes of the descriptor it was made from.
type CachedShape = (u32, Vec<u8>, std::rc::Rc<RowShape>);

thread_local! {
    /// The last table's shape.
    static SHAPE: RefCell<Option<CachedShape>> = const { RefCell::new(None) };
}

/// The bytes of a descriptor that its shape depends on: each attribute's name, type, and dropped
/// and generated flags. Compared on every row, so a cached shape is never used for a descriptor
/// that changed (an ALTER TABLE in the same session).
///
/// # Safety
///
/// `tupdesc` must be a valid descriptor.
unsafe fn descriptor_bytes(tupdesc: pg_sys::TupleDesc) -> Vec<u8> {
    // SAFETY: as for `hashed_attributes`: a live descriptor, wrapped without being released.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    let mut out = Vec::with_capacity(desc.len() * 72);
    for a in desc.iter() {
        // SAFETY: `attname` is a NameData, NAMEDATALEN bytes, plain data.
        let name = unsafe {
            std::slice::from_raw_parts(a.attname.data.as_ptr().cast::<u8>(), a.attname.data.len())
        };
        out.extend_from_slice(name);
        out.extend_from_slice(&a.atttypid.to_u32().to_ne_bytes());
        out.push(u8::from(a.attisdropped));
        out.push(a.attgenerated as u8);
    }
    out
}

/// The shape of relation `relid`'s rows under `tupdesc`, from the cache when the descriptor is
/// the same as the one it was made from.
///
/// # Safety
///
/// `tupdesc` must be a valid descriptor (the trigger relation's `rd_att`).
pub(crate) unsafe fn row_shape(relid: u32, tupdesc: pg_sys::TupleDesc) -> std::rc::Rc<RowShape> {
    use pg_sys::BuiltinOid::{BYTEAOID, INT4OID, INT8OID};
    // SAFETY: the caller's guarantee.
    let bytes = unsafe { descriptor_bytes(tupdesc) };
    let cached = SHAPE.with(|s| {
        s.borrow()
            .as_ref()
            .filter(|(r, b, _)| *r == relid && *b == bytes)
            .map(|(_, _, shape)| shape.clone())
    });
    if let Some(shape) = cached {
        return shape;
    }
    let field = |name, typid| attribute_index(tupdesc, name, typid);
    let shape = std::rc::Rc::new(RowShape {
        hashed: hashed_attributes(tupdesc),
        chain_fields: [
            field("chain_id", INT4OID),
            field("chain_seq", INT8OID),
            field("prev_hash", BYTEAOID),
            field("row_hash", BYTEAOID),
        ],
    });
    SHAPE.with(|s| *s.borrow_mut() = Some((relid, bytes, shape.clone())));
    shape
}

/// Index of a named attribute of the given type in a tuple descriptor: a chain field is read as
/// its datum type only when the column really is of that type.
fn attribute_index(
    tupdesc: pg_sys::TupleDesc,
    name: &str,
    typid: pg_sys::BuiltinOid,
) -> Option<usize> {
    // SAFETY: its callers pass a live descriptor: the `tupdesc` of the current SPI result, valid
    // until SPI_finish (export_row), or the trigger relation's `rd_att` (row_shape); the
    // wrapper is local and never releases the descriptor.
    let desc = unsafe { PgTupleDesc::from_pg_unchecked(tupdesc) };
    desc.iter()
        .position(|a| !a.attisdropped && a.name() == name && a.atttypid == pg_sys::Oid::from(typid))
}

/// Calls `each` with every tuple of the current SPI result (`SPI_tuptable`) and its descriptor.
///
/// # Safety
///
/// Call inside an SPI connection, right after the query (or cursor fetch) whose result is to be
/// read, with no other command run on that connection in between: `SPI_tuptable` and
/// `SPI_processed` must describe that result. `each` must not run commands on the same
/// connection (a nested `Spi::connect` is fine: SPI_finish restores both variables).
unsafe fn for_each_spi_tuple(mut each: impl FnMut(pg_sys::HeapTuple, pg_sys::TupleDesc)) {
    // SAFETY: by the caller's guarantee `SPI_tuptable` is null or the result just produced,
    // allocated in the SPI procedure's memory and valid until SPI_finish; `vals` holds
    // `SPI_processed` tuples, so every `add(i)` stays in bounds.
    unsafe {
        let tt = pg_sys::SPI_tuptable;
        if tt.is_null() {
            return;
        }
        for i in 0..pg_sys::SPI_processed as usize {
            each(*(*tt).vals.add(i), (*tt).tupdesc);
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::{columns_of, deform, for_each_spi_tuple, hashed_attributes};
    use pgrx::prelude::*;
    use vsql_vault_core::canonical::{encode, Value};

    /// The values the chain trigger (and the export) hashes for the one row `query` returns.
    fn hashed_values(query: &str) -> Vec<(String, Value)> {
        Spi::connect(|c| {
            let _rows = c.select(query, None, &[])?;
            let mut rows = Vec::new();
            // SAFETY: right after the query on this connection, whose result `_rows` keeps; the
            // callback runs no command. Each tuple comes with its own result's descriptor and is
            // turned into owned values at once.
            unsafe {
                for_each_spi_tuple(|t, d| {
                    rows.push(columns_of(&deform(t, d), &hashed_attributes(d)));
                });
            }
            Ok::<_, pgrx::spi::Error>(rows)
        })
        .expect("the query runs")
        .pop()
        .expect("the query returns a row")
    }

    /// Each known-answer vector of tests/vectors/canonical_v1.json as a row of the column types
    /// its values come from in the vault's tables.
    const VECTOR_ROWS: [(&str, &str); 3] = [
        (
            "vsql_vault.access_log",
            "SELECT 'get'::text AS operation, 'card'::text AS purpose, 'p1'::text AS external_id,
                    true AS granted, 42::bigint AS entry_id,
                    timestamptz '2025-11-24 01:30:00+00' AS logged_at, NULL::text AS reason",
        ),
        (
            "vsql_vault.entries",
            r#"SELECT '\x00ff10'::bytea AS encrypted_value, '{"k":"ü 100%"}'::jsonb AS metadata,
                      -1 AS count"#,
        ),
        ("empty", "SELECT"),
    ];

    #[pg_test]
    fn rows_encode_to_the_known_answer_vectors() {
        // Far from the pinned values: the hashed values must not depend on the session.
        Spi::run("SET LOCAL TimeZone = 'Asia/Tokyo'").unwrap();
        Spi::run("SET LOCAL DateStyle = 'SQL, DMY'").unwrap();
        let vectors: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/vectors/canonical_v1.json")).unwrap();
        assert_eq!(vectors.len(), VECTOR_ROWS.len(), "a vector without its row");
        for v in &vectors {
            let domain = v["domain"].as_str().unwrap();
            let (_, query) = VECTOR_ROWS
                .iter()
                .find(|(d, _)| *d == domain)
                .unwrap_or_else(|| panic!("no row for vector {domain}"));
            let expected: Vec<(String, Value)> =
                serde_json::from_value(v["fields"].clone()).unwrap();
            let values = hashed_values(query);
            assert_eq!(values, expected, "values of {domain}");
            let encoded = encode(domain, &values);
            assert_eq!(
                Some(hex::encode(encoded.bytes()).as_str()),
                v["canonical_hex"].as_str(),
                "bytes of {domain}"
            );
            assert_eq!(
                Some(hex::encode(encoded.sha256()).as_str()),
                v["sha256_hex"].as_str(),
                "hash of {domain}"
            );
        }
    }

    #[pg_test]
    fn text_forms_are_made_under_the_pinned_settings() {
        // One column for each setting of PINNED_OUTPUT_SETTINGS but lc_monetary (which needs a
        // locale this machine may not have).
        let row = r"SELECT ARRAY[timestamptz '2024-02-29 23:30:00+00'] AS at,
                           ARRAY[date '2024-02-29'] AS days,
                           interval '1 day 02:03:04' AS span,
                           (1::float8 / 3) AS third,
                           ARRAY['\x00ff'::bytea] AS blobs,
                           'vault.entries'::regclass AS rel";
        let pinned = hashed_values(row);
        let text = |s: &str| Value::Text(s.to_owned());
        assert_eq!(
            pinned,
            [
                ("at", text(r#"{"2024-02-29 23:30:00+00"}"#)),
                ("days", text("{2024-02-29}")),
                ("span", text("1 day 02:03:04")),
                ("third", text("0.3333333333333333")),
                ("blobs", text(r#"{"\\x00ff"}"#)),
                ("rel", text("vault.entries")),
            ]
            .map(|(n, v)| (n.to_owned(), v))
        );
        for set in [
            "SET LOCAL TimeZone = 'Asia/Tokyo'",
            "SET LOCAL DateStyle = 'SQL, DMY'",
            "SET LOCAL IntervalStyle = 'iso_8601'",
            "SET LOCAL extra_float_digits = -3",
            "SET LOCAL bytea_output = 'escape'",
            "SET LOCAL search_path = vault, public",
        ] {
            Spi::run(set).unwrap();
        }
        assert_eq!(hashed_values(row), pinned);
    }
}
