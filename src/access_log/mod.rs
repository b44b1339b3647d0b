//! The access log: every decision of the vault, granted or refused, made durable in
//! `vault.access_log` before the caller sees its result.
//!
//! - `event`: an access record as a call builds it (`Event`), and the ways it is made durable;
//! - `queue`: the shared-memory queue between backends and the writer (`fixed_str`: its text
//!   fields);
//! - `writer`: the background worker that inserts queued records in batches, one commit each,
//!   and enforces `max_retrievals`.
//!
//! (The hash chain the log's rows are linked into is the chain subsystem's: `crate::chain`.)

mod event;
mod fixed_str;
pub mod queue;
pub mod writer;

pub use event::Event;
