//! Retention enforcement: entries past their expiry are destroyed, each with a signed purge proof.
//!
//! - `destroy`: choosing entries, destroying them and writing their proofs in one transaction
//!   (sweeps and manual deletes), and reading proofs back;
//! - `worker`: the background worker that sweeps on schedule and vacuums destroyed values away.
//!
//! Dependencies run one way: `worker` uses `destroy`. The SQL entry points (`vault_delete`,
//! `vault_purge_sweep`, proof verification and export) are in `src/api/retention.rs`.

pub(crate) mod destroy;
pub mod worker;
