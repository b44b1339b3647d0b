//! vsql_vault: governed opaque storage for PostgreSQL.
//!
//! The extension is a thin shell over `vsql_vault_core`: it validates with the core's rules,
//! decides with policies kept in `vault.*` tables and hands every decision to the audit writer,
//! a background worker that makes it durable before the caller sees any data.

use pgrx::prelude::*;

mod access_log;
mod api;
mod audited_call;
mod chain;
mod column_values;
mod decoding;
mod digest;
mod errors;
mod governance;
mod health;

mod keys;
mod launcher;
mod pg;
mod policy;
mod report;
mod retention;
mod security;
mod settings;
mod storage;

pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/api.sql", name = "api", requires = ["schema"]);
pgrx::extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "api",
        vault::chain_row,
        vault::chain_flush,
        api::chain::protect_builtin,
        api::chain::ddl_guard_allows,
        api::chain::ddl_guard_allows_relation
    ]
);
pgrx::extension_sql_file!(
    "../sql/retention.sql",
    name = "retention",
    requires = ["audit"]
);
pgrx::extension_sql_file!(
    "../sql/replication.sql",
    name = "replication",
    requires = [
        "retention",
        api::replication::sync_scope_impl,
        api::replication::sync_publish_impl,
        api::replication::scope_report_impl
    ]
);
pgrx::extension_sql_file!(
    "../sql/governance.sql",
    name = "governance",
    requires = [
        "replication",
        governance::key_directive_impl,
        governance::revoke_directive_impl,
        governance::key_status_impl,
        governance::apply_directive_impl
    ]
);
pgrx::extension_sql_file!(
    "../sql/digest.sql",
    name = "digest",
    requires = [
        "governance",
        digest::table_digest_buckets,
        digest::table_digest_export_query
    ]
);
pgrx::extension_sql_file!("../sql/compliance.sql", name = "compliance", finalize);

/// Set in `_PG_init` when the library is loaded through `shared_preload_libraries`: only then do
/// the shared audit queue and the audit writer exist.
static PRELOADED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub(crate) fn preloaded() -> bool {
    PRELOADED.load(std::sync::atomic::Ordering::Relaxed)
}

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // pgrx puts a captured Rust backtrace, with source paths, into the DETAIL of every error
    // raised through Rust, which goes to the client as well as the log. Capturing is switched off
    // for the whole process (and, from the postmaster, for every backend it starts), whatever
    // RUST_BACKTRACE the server was started with. Single-threaded here: no one reads the
    // environment concurrently.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    settings::define();
    security::api_entry::install();
    chain::on_conflict::install();
    launcher::install_catalog_hooks();
    // A walsender or a plain backend may load the library too; shared memory and workers can only
    // be requested while the postmaster preloads it.
    // SAFETY: a plain read of a process-global bool that PostgreSQL sets around the loading of
    // shared_preload_libraries; _PG_init runs on the process's only thread.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
        access_log::queue::init_shmem();
        launcher::init_shmem();
        decoding::init_shmem();
        launcher::register();
    }
}

/// Settings of the cluster `cargo pgrx test` starts for the `#[pg_test]` functions
/// (pg_test/in_backend.sh).
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    /// Nothing beyond the defaults, and deliberately no `shared_preload_libraries`: the tests call
    /// the code directly inside a transaction that is rolled back, so they need neither the audit
    /// writer nor the retention worker (anything that needs those, or a commit, is tested against
    /// a preloaded cluster by pg_test/ and tests/). Unpreloaded, an audited call's refusal is
    /// not recorded but warned about, and its error is returned as usual.
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}

/// The schema that holds the vault's tables and the API's internal functions.
#[pg_schema]
mod vault {
    use pgrx::prelude::*;

    /// BEFORE INSERT trigger of every protected table: links the row into its hash chain.
    #[pg_trigger]
    fn chain_row<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, crate::errors::VaultError> {
        crate::chain::chain_row(trigger).map(Some)
    }

    /// AFTER INSERT FOR EACH STATEMENT trigger of every protected table: writes back the chain
    /// heads the statement's rows advanced.
    #[pg_trigger]
    fn chain_flush<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByRust>>, crate::errors::VaultError> {
        crate::chain::flush_statement(trigger).map(|_| None)
    }
}
