//! Encrypted replication: the `vsql_vault` output plugin (`plugin`) and its SQL side (`api`:
//! which columns never leave the server, and the signed scope report).

pub mod api;
mod plugin;

pub use plugin::{batches_sealed, init_shmem, kek_ids};
