//! Retention enforcement: entries past their expiry are destroyed, each with a signed purge proof.
//!
//! - `destroy`: choosing entries, destroying them and writing their proofs in one transaction
//!   (sweeps, manual deletes, and the versions a put replaces);
//! - `proofs`: reading proofs back and checking them, the columns people read included;
//! - `record`: the access record of each batch the worker destroys;
//! - `worker`: the background worker that sweeps on schedule and vacuums destroyed values away.
//!
//! Dependencies run one way: `worker` uses `destroy` and `record`, `record` uses `destroy`'s
//! batch, and `proofs` stands alone. The SQL entry points (`vault_delete`,
//! `vault_purge_sweep`, proof verification and export) are in `src/api/retention.rs`.

pub(crate) mod destroy;
pub(crate) mod proofs;
pub(crate) mod record;
pub mod worker;
