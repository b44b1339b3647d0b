//! PostgreSQL plumbing the subsystems share: prepared plans (`plans`), SPI and transaction
//! helpers (`spi`), and settings changed for a guarded section (`setting`).

pub mod plans;
mod setting;
mod spi;

pub use setting::TemporarySetting;
pub use spi::{current_xid, now_micros, select_one, write_one};
