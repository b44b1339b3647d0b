//! The pure-Rust core of vsql_vault.
//!
//! Everything here builds and tests with plain `cargo test`, without a PostgreSQL server, so that
//! the extension and the offline tool apply byte-for-byte the same rules and encodings.

pub mod canonical;
pub mod chain;
pub mod continuity;
pub mod decide;
pub mod digest;
pub mod directive_doc;
pub mod envelope;
pub mod export;
pub mod forward;
pub mod governance;
pub mod keys;
pub mod merkle;
pub mod purge;
pub mod rules;
pub mod schedule;
pub mod shown;
pub mod stream;
pub mod table_patterns;
pub mod trust;

pub use rules::{InputError, Limits};
