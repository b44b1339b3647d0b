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

mod daily;
mod event;
mod fixed_str;
pub mod forward;
pub mod queue;
pub mod writer;

pub use event::Event;

/// Makes `record` durable: through this server's audit writer, or on a hot standby through the
/// primary's (`forward`). Returns the writer's outcome.
pub(crate) fn make_durable(
    record: &queue::RawRecord,
    large: Option<&str>,
) -> Result<queue::Outcome, crate::errors::VaultError> {
    if forward::on_standby() {
        forward::submit(record, large)
    } else {
        queue::submit(record, large)
    }
}
