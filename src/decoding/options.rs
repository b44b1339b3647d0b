//! The options a consumer passes to the slot (`pg_recvlogical -o`, `pg_logical_slot_get_changes`).
//! They only narrow what it receives of what the server publishes, never widen it, and an unknown
//! or malformed one is refused rather than ignored, so a typo cannot silently change the stream.

use super::fail;
use pgrx::prelude::*;
use std::ffi::CStr;
use vsql_vault_core::table_patterns::{parse_table_patterns, TablePattern};

/// Consumer-side options, for convenience only: they choose what a consumer receives of what
/// the server publishes (they can never widen it).
#[derive(Default)]
pub(super) struct Options {
    pub(super) include_xids: bool,
    pub(super) include_timestamp: bool,
    add_tables: Vec<TablePattern>,
    filter_tables: Vec<TablePattern>,
}

impl Options {
    pub(super) fn wants(&self, schema: &str, table: &str) -> bool {
        let hit = |list: &[TablePattern]| list.iter().any(|p| p.matches(schema, table));
        (self.add_tables.is_empty() || hit(&self.add_tables)) && !hit(&self.filter_tables)
    }
}

/// `schema.table` patterns separated by commas, read exactly as wal2json reads them
/// (`vsql_vault_core::table_patterns`); what wal2json would match nothing with is refused.
fn parse_tables(option: &str, value: &str) -> Vec<TablePattern> {
    parse_table_patterns(value).unwrap_or_else(|e| {
        fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("vsql_vault decoding: {option}: {e}"),
        )
    })
}

fn parse_bool(option: &str, value: Option<&str>) -> bool {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("1" | "true" | "on" | "yes") => true,
        Some("0" | "false" | "off" | "no") => false,
        Some(other) => fail(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("vsql_vault decoding: {option} expects a boolean, got \"{other}\""),
        ),
    }
}

/// Unknown options are refused rather than silently ignored.
///
/// # Safety
///
/// `list` must be NIL or a valid `List` of `DefElem` nodes (a decoding context's
/// `output_plugin_options`), alive for the duration of the call.
pub(super) unsafe fn parse_options(list: *mut pg_sys::List) -> Options {
    let mut o = Options {
        include_xids: true,
        ..Default::default()
    };
    // SAFETY: by the caller's guarantee `list` is NIL (PgList handles null) or a List whose
    // elements are DefElem pointers; the wrapper is only iterated here, not freed or kept.
    let opts = unsafe { pgrx::PgList::<pg_sys::DefElem>::from_pg(list) };
    for d in opts.iter_ptr() {
        // SAFETY: `d` is a DefElem of that list: its `defname` is a non-null NUL-terminated
        // string, and defGetString is called only for a non-null `arg` (it ERRORs on a node type
        // it cannot print). Both strings are copied into Rust Strings at once.
        let (name, value) = unsafe {
            let name = CStr::from_ptr((*d).defname).to_string_lossy().into_owned();
            let arg = (*d).arg;
            let value = if arg.is_null() {
                None
            } else {
                Some(
                    CStr::from_ptr(pg_sys::defGetString(d))
                        .to_string_lossy()
                        .into_owned(),
                )
            };
            (name, value)
        };
        match name.as_str() {
            "include-xids" => o.include_xids = parse_bool(&name, value.as_deref()),
            "include-timestamp" => o.include_timestamp = parse_bool(&name, value.as_deref()),
            "add-tables" => o.add_tables = parse_tables(&name, value.as_deref().unwrap_or("")),
            "filter-tables" => {
                o.filter_tables = parse_tables(&name, value.as_deref().unwrap_or(""))
            }
            _ => fail(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("vsql_vault decoding: unknown option \"{name}\""),
            ),
        }
    }
    o
}
