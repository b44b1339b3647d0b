//! Settings, all under the `vsql_vault.` prefix. Those that could weaken governance or move the
//! audit trail are superuser-only (PGC_SUSET) or fixed at server start (PGC_POSTMASTER/SIGHUP).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Database the audit writer connects to; the storage API works in that database only.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Largest accepted `encrypted_value`, in bytes.
pub static MAX_VALUE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// How long a call waits for its access record to become durable before it fails closed.
pub static AUDIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

pub fn define() {
    GucRegistry::define_string_guc(
        c"vsql_vault.database",
        c"Database served by the vsql_vault audit writer.",
        c"The storage API records every access through a background worker connected to this database; calls in other databases are refused.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.max_value_bytes",
        c"Largest encrypted_value vault_put accepts, in bytes.",
        c"",
        &MAX_VALUE_BYTES,
        1,
        1024 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.audit_timeout",
        c"How long a call waits for its access record to be made durable.",
        c"When the audit writer cannot make a record durable in time the call fails: no data without a record.",
        &AUDIT_TIMEOUT_MS,
        10,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
}

pub fn database() -> String {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|| "postgres".to_owned())
}
