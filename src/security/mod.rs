//! Who may do what: the caller and its role checks (`caller`), switching to the vault's owner or
//! a table's owner (`owner`), and the one public API (`api_entry`).

pub mod api_entry;
mod caller;
mod owner;

pub use caller::{has_role, require, Caller};
pub use owner::{AsOwner, AsTableOwner};
