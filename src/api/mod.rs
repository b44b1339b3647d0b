//! SQL entry points that span subsystems: the chains' (protect, verify, export, checkpoint, key
//! rotation, the DDL guard's questions), retention's (delete, sweep, purge proofs) and
//! replication's (the replication scope and its signed report). They sit
//! above the subsystems they drive, so that a subsystem never depends on the executor or the
//! reports through its own entry points: dependencies run one way, from `api` down.

pub mod chain;
pub mod replication;
pub mod retention;
