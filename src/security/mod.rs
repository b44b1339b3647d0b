//! Who may do what: the one public API (`api_entry`).

pub mod api_entry;
