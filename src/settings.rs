//! Settings, all under the `vsql_vault.` prefix. Those that could weaken governance or move the
//! audit trail are superuser-only (PGC_SUSET) or fixed at server start (PGC_POSTMASTER/SIGHUP).

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Unset: every database with the extension is served. Set: only this one.
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// How many databases at most get an audit writer and a retention worker.
pub static MAX_DATABASES: GucSetting<i32> = GucSetting::<i32>::new(8);
/// Largest accepted `encrypted_value`, in bytes.
pub static MAX_VALUE_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
/// On a hot standby: the libpq connection string of the primary, where the standby's audited reads
/// forward their access records (README, "High availability and read replicas"). May hold a
/// password: superuser-only, never logged or put in an error.
pub static PRIMARY_CONNINFO: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// How long a call waits for its access record to become durable before it fails closed.
pub static AUDIT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// An Ed25519 key file (64 hex characters), owner-only; unset: a key generated in the data directory.
pub static SIGNING_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// An external command that signs evidence (a KMS or HSM client): the private key need never sit
/// on the database host. Takes precedence over `signing_key_file`.
pub static SIGNING_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Seconds between signed checkpoints of every chain head.
pub static CHECKPOINT_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(60);
/// A file each checkpoint is also appended to as one JSON line.
pub static CHECKPOINT_EXPORT_PATH: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// While on, the chain trigger keeps the chain fields rows arrive with (pg_restore of an export).
pub static RESTORE_MODE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Superuser-only: lets DDL reach protected tables (ALTER, DROP, disabling triggers); each such
/// command is recorded in the access log.
pub static BREAK_GLASS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Seconds between retention sweeps.
pub static SWEEP_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
/// A daily time (`HH:MM`, UTC) for scheduled sweeps, instead of the interval; empty for none.
pub static SWEEP_AT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Entries destroyed per committed batch (one signed Merkle root each).
pub static SWEEP_BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Longest time between a request to vacuum destroyed values out of `vault.entries` (a re-put, a
/// delete) and the retention worker's VACUUM; requests in between share one VACUUM.
pub static VACUUM_DELAY_S: GucSetting<i32> = GucSetting::<i32>::new(5);

/// How long vault_verify_audit waits for a lock on a protected table before it reports that table
/// as not verified and goes on with the next.
pub static VERIFY_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// How long vault_put waits for another transaction's uncommitted write of the same entry.
pub static PUT_LOCK_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// The key-encryption key file of the replication stream (versioned keys, the last one active).
pub static KEK_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// When on, only tables a vault_admin published (vault_sync_publish) leave through the output
/// plugin; when off, every table but the vault's own, and those of the vault's own published.
pub static SYNC_ALLOW_LIST_REQUIRED: GucSetting<bool> = GucSetting::<bool>::new(false);

/// A command that wraps data keys through a KMS instead of the KEK file.
pub static KEK_WRAP_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Seconds after which the audit writer rotates the generated evidence signing key (0: never).
pub static SIGNING_KEY_MAX_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(0);

/// Seconds after which a decoding session replaces its data key (before sealing the next batch).
pub static DATA_KEY_MAX_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(3600);

/// Plaintext kilobytes a data key seals at most before the session replaces it.
pub static DATA_KEY_MAX_KB: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);

/// Public keys (hex, comma-separated) of the governance authorities whose signed directives
/// `vault_apply_directive` accepts; superuser-only.
pub static DIRECTIVE_PUBLIC_KEYS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// The end user or service the calling application acts for: settable by any role (a pooled
/// application sets it with SET LOCAL inside its transaction), recorded in every access record.
pub static ON_BEHALF_OF: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn define() {
    define_storage();
    define_chains();
    define_retention();
    define_replication();
    define_governance();
    // A misspelt vsql_vault.* setting is an error, not a silent placeholder that governs
    // nothing (SET vsql_vault.break_glas = on must not look like it worked).
    // SAFETY: called from _PG_init, after this library defined its settings; the prefix is a
    // NUL-terminated static string.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"vsql_vault".as_ptr()) };
}

/// The storage API and its access records.
fn define_storage() {
    GucRegistry::define_string_guc(
        c"vsql_vault.database",
        c"Serve only this database (unset: every database where the extension is created).",
        c"Each served database has its own audit writer and retention worker; audited calls in other databases are refused.",
        &DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // A postmaster setting can only be defined while the postmaster preloads the library; a
    // backend that loads it later (no preload, as the #[pg_test] cluster does) keeps the default,
    // which nothing reads there: without preloading there are no workers.
    // SAFETY: a plain read of a process-global bool that PostgreSQL sets around the loading of
    // shared_preload_libraries; _PG_init runs on the process's only thread.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"vsql_vault.max_databases",
            c"How many databases at most the vault serves (two background workers each).",
            c"",
            &MAX_DATABASES,
            1,
            crate::launcher::MAX_DATABASES as i32,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
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
    GucRegistry::define_string_guc(
        c"vsql_vault.primary_conninfo",
        c"On a hot standby: connection string of the primary that records the standby's audited reads.",
        c"A libpq connection string (the standby's database name is added); its role must be a member of vault_forwarder. Unset: audited reads on a standby fail with VV503.",
        &PRIMARY_CONNINFO,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.put_lock_timeout",
        c"How long vault_put waits for another transaction's uncommitted write of the same entry.",
        c"Past it the put is refused with 55P03 and recorded, instead of waiting as long as the other transaction stays open.",
        &PUT_LOCK_TIMEOUT_MS,
        1,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    // SAFETY: the check hook is a #[pg_guard] function that only reads the proposed value.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"vsql_vault.on_behalf_of",
            c"The end user or service the application acts for; recorded in every access record.",
            c"Set by the application, typically with SET LOCAL inside its transaction behind a connection pool. A statement of the application, not an authentication: the record keeps the database role beside it. At most 128 bytes, no control characters; empty means none.",
            &ON_BEHALF_OF,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_on_behalf_of),
            None,
            None,
        );
    }
}

/// Refuses a bad `vsql_vault.on_behalf_of` when it is set (22023, with the reason), so a call
/// never finds one it cannot record.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_on_behalf_of(
    newval: *mut *mut std::ffi::c_char,
    _extra: *mut *mut std::ffi::c_void,
    _source: pgrx::pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value, NULL or a NUL-terminated
    // string it owns for the duration of the call.
    let value = unsafe {
        if newval.is_null() || (*newval).is_null() {
            return true;
        }
        std::ffi::CStr::from_ptr(*newval)
    };
    let problem = match value.to_str() {
        Ok(text) => vsql_vault_core::rules::on_behalf_of(text)
            .err()
            .map(|e| e.to_string()),
        Err(_) => Some("invalid vsql_vault.on_behalf_of: not valid UTF-8".to_owned()),
    };
    match problem {
        None => true,
        Some(message) => {
            let message = CString::new(message).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string takes a palloc'd string, as pstrdup makes; the
            // error PostgreSQL raises when this hook returns false reports it.
            unsafe {
                pgrx::pg_sys::GUC_check_errcode(
                    pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32,
                );
                pgrx::pg_sys::GUC_check_errdetail_string = pgrx::pg_sys::pstrdup(message.as_ptr());
            }
            false
        }
    }
}

/// `vsql_vault.on_behalf_of`, or None when unset or empty (checked when it was set).
pub fn on_behalf_of() -> Option<String> {
    ON_BEHALF_OF
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

/// Hash chains, their protection and signed checkpoints.
fn define_chains() {
    GucRegistry::define_bool_guc(
        c"vsql_vault.break_glass",
        c"Allow ALTER/DROP of protected tables and their triggers; every such command is recorded.",
        c"Superuser-only break-glass switch. Off: DDL that could weaken a protected table is refused.",
        &BREAK_GLASS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"vsql_vault.restore_mode",
        c"Keep the chain fields of inserted rows (for pg_restore only).",
        c"Superuser-only. While on, rows inserted into protected tables keep the chain fields they carry instead of being linked anew; vault_verify_audit still checks every one.",
        &RESTORE_MODE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.verify_lock_timeout",
        c"How long verification waits for a lock on a protected table.",
        c"A table locked longer (by its owner, say) is reported as not verified, and verification goes on with the next table.",
        &VERIFY_LOCK_TIMEOUT_MS,
        0,
        600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"vsql_vault.signing_key_file",
        c"Ed25519 signing key file for audit checkpoints (owner-only permissions).",
        c"Unset: a key is generated on first use inside the data directory.",
        &SIGNING_KEY_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"vsql_vault.signing_command",
        c"Command that signs evidence with a key held elsewhere (a KMS or HSM), instead of a key file.",
        c"Run with VSQL_VAULT_OP=public-key (prints the Ed25519 public key in hex) or VSQL_VAULT_OP=sign (reads the message in hex on stdin, prints the signature in hex).",
        &SIGNING_COMMAND,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.data_key_max_age",
        c"Age after which a replication decoding session replaces its data key.",
        c"Checked before each batch is sealed; the new key is wrapped under the KEK then active.",
        &DATA_KEY_MAX_AGE_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.data_key_max_bytes",
        c"Plaintext a replication data key seals at most before the session replaces it.",
        c"A single batch (at most 4 MB) larger than this is sealed under a fresh key of its own.",
        &DATA_KEY_MAX_KB,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.signing_key_max_age",
        c"Age after which the audit writer rotates the generated evidence signing key (0: never).",
        c"The new key carries a rotation statement signed by the old one; vault_health() warns in the last tenth of the age. A key from vsql_vault.signing_key_file is not rotated: vault_health() warns when it is older.",
        &SIGNING_KEY_MAX_AGE_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.checkpoint_interval",
        c"Seconds between signed checkpoints of the audit chains.",
        c"",
        &CHECKPOINT_INTERVAL_S,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"vsql_vault.checkpoint_export_path",
        c"File each signed checkpoint is appended to as a JSON line.",
        c"Keeps chain heads outside the database, which is how truncation of the newest rows is caught.",
        &CHECKPOINT_EXPORT_PATH,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// The retention worker.
fn define_retention() {
    GucRegistry::define_string_guc(
        c"vsql_vault.sweep_at",
        c"Daily time (HH:MM, UTC) of the retention worker's scheduled sweep, instead of vsql_vault.sweep_interval.",
        c"Empty: sweeps every sweep_interval. Either way the schedule counts from the last finished run in vault.sweep_runs, and an overdue sweep runs at once. An invalid value is reported in the server log and the interval is used.",
        &SWEEP_AT,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.sweep_interval",
        c"Seconds between retention sweeps of the retention worker.",
        c"",
        &SWEEP_INTERVAL_S,
        1,
        7 * 86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.vacuum_delay",
        c"Longest wait between destroying a value (re-put, delete) and the retention worker's VACUUM of vault.entries.",
        c"Requests within this time share one VACUUM: each VACUUM of vault.entries invalidates every backend's plans on it, and one per re-put re-planned every call. 0: vacuum after every request.",
        &VACUUM_DELAY_S,
        0,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"vsql_vault.sweep_batch_size",
        c"Expired entries destroyed per committed batch; each batch signs one Merkle root.",
        c"",
        &SWEEP_BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// The encrypted replication stream.
fn define_replication() {
    GucRegistry::define_string_guc(
        c"vsql_vault.kek_file",
        c"Key-encryption key file of the vsql_vault replication stream (owner-only).",
        c"One key version per line: `<id> <64 hex characters>`; the last line is the active version.",
        &KEK_FILE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"vsql_vault.kek_wrap_command",
        c"Command that wraps replication data keys through a KMS (instead of vsql_vault.kek_file).",
        c"Run with VSQL_VAULT_OP=wrap: reads the data key in hex on stdin, prints `<kek id> <wrapped hex>`.",
        &KEK_WRAP_COMMAND,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"vsql_vault.sync_allow_list_required",
        c"Only tables published with vault_sync_publish leave through the vsql_vault output plugin.",
        c"Server configuration only (postgresql.conf or ALTER SYSTEM, then reload). Off: every table leaves except the vault's own, which leave only when published.",
        &SYNC_ALLOW_LIST_REQUIRED,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// Key governance (issue 18).
fn define_governance() {
    GucRegistry::define_string_guc(
        c"vsql_vault.directive_public_keys",
        c"Ed25519 public keys (64 hex characters each, comma-separated) of the governance authorities whose signed key directives vault_apply_directive accepts.",
        c"Superuser-only: a key listed here can retire keys and deny algorithms. Empty: no signed directive is accepted.",
        &DIRECTIVE_PUBLIC_KEYS,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// `vsql_vault.database` when set (and not empty): the one database the vault serves.
pub fn database_restriction() -> Option<String> {
    DATABASE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}
