//! Encrypted replication: the `vsql_vault` output plugin. Its SQL side (which columns never leave
//! the server, and the signed scope report) is `src/api/replication.rs`.
//!
//! The plugin is split by concern so each part can be read on its own: `plugin` (the callbacks
//! PostgreSQL calls, and the session's state), `options` (what a consumer may ask for), `kek`
//! (the key-encryption keys), `relation_cache` and `exclusions` (what is read of the catalogs),
//! `record` (the JSON form of one change) and `batch` (sealing and writing the output).

use pgrx::PgSqlErrorCode;

mod batch;
mod exclusions;
mod kek;
mod options;
mod plugin;
mod record;
mod relation_cache;
mod sent;

pub(crate) use batch::{batches_sealed, init_shmem};
pub(crate) use kek::{health as kek_health, kek_ids};

/// Raises an ERROR with a specific SQLSTATE (decoding errors end the walsender's session).
fn fail(code: PgSqlErrorCode, message: String) -> ! {
    pgrx::ereport!(ERROR, code, message);
}

fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}
