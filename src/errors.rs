//! The storage API's failures and their SQLSTATEs.
//!
//! pgrx's `ErrorReport` only carries SQLSTATEs PostgreSQL itself defines, and ours (`VV410`,
//! `VV422`, ...) are custom. So the Rust functions return a failure as a (sqlstate, message) pair
//! and the SQL wrappers in `sql/api.sql` raise it with `RAISE ... USING ERRCODE`, after the
//! attempt has been made durable in the access log.

use thiserror::Error;
use vsql_vault_core::InputError;

#[derive(Debug, Error)]
pub enum VaultError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("purpose \"{0}\" has no retention policy; an administrator must call vault_set_retention_policy first")]
    NoRetentionPolicy(String),
    #[error("expires_at {requested} is beyond the maximum retention of purpose \"{purpose}\" ({max_days} days from the entry's first storage, until {limit})")]
    BeyondRetention {
        purpose: String,
        requested: String,
        max_days: i32,
        limit: String,
    },
    #[error("expires_at {0} is in the past")]
    ExpiryInPast(String),
    #[error("unknown access policy \"{0}\"")]
    UnknownPolicy(String),
    #[error("access policy \"{0}\" is built in and cannot be changed")]
    BuiltinPolicy(String),
    #[error("role \"{0}\" does not exist")]
    UnknownRole(String),
    #[error("permission denied: {0}")]
    Denied(String),
    #[error("entry \"{external_id}\" of purpose \"{purpose}\" is gone ({why})")]
    Gone {
        purpose: String,
        external_id: String,
        why: &'static str,
    },
    #[error("entry \"{external_id}\" of purpose \"{purpose}\" does not exist")]
    NotFound {
        purpose: String,
        external_id: String,
    },
    #[error("the access record could not be made durable: {0}")]
    AuditUnavailable(String),
    #[error("vsql_vault serves database \"{0}\" only (vsql_vault.database)")]
    WrongDatabase(String),
    #[error("vsql_vault already serves vsql_vault.max_databases ({0}) other databases: raise the setting (and max_worker_processes) or drop the extension where it is not needed")]
    TooManyDatabases(i32),
    #[error("vsql_vault must be loaded through shared_preload_libraries")]
    NotPreloaded,
    #[error("this transaction holds a lock on {0} (it created or updated the extension, or ran a command on that table), so the audit writer cannot record a call until it ends: make audited calls after COMMIT")]
    WriterBlockedByThisTransaction(String),
    #[error(transparent)]
    Key(#[from] vsql_vault_core::keys::KeyError),
    #[error("the signing key is managed through vsql_vault.signing_key_file or vsql_vault.signing_command: rotate it there")]
    KeyManagedExternally,
    #[error("{0} is not protected by vsql_vault")]
    NotProtected(String),
    #[error("chains must be between 1 and 256, got {0}")]
    ChainCount(i32),
    #[error("{0} is refused: the table is protected (vsql_vault.break_glass is off)")]
    ProtectedDdl(String),
    #[error("column \"{0}\" does not exist in that table")]
    UnknownColumn(String),
    #[error("purge proof {0} does not exist")]
    NoSuchProof(i64),
    #[error("only ordinary tables can be protected")]
    NotATable,
    #[error("only tables can be published, and {0} is not one")]
    NotPublishable(String),
    #[error("protected table {0} still exists: only a registration whose table is gone can be forgotten")]
    CannotForget(String),
    #[error("this table cannot be protected: {0}")]
    CannotProtect(String),
    #[error("{0} is locked by another session; try again later (vsql_vault.verify_lock_timeout)")]
    Locked(String),
    #[error("{0}; try again later (vsql_vault.put_lock_timeout)")]
    Busy(String),
    #[error("the record of this call would exceed {0} bytes of details; nothing was changed")]
    RecordTooLarge(usize),
    /// An error caught inside an audited call, carried to where its subtransaction ends; never
    /// returned to a caller (see `audited_call`).
    #[error("an error was raised inside the call")]
    Raised(Box<pgrx::pg_sys::panic::CaughtError>),
    /// An ERROR raised by PostgreSQL inside an audited call, with its own SQLSTATE.
    #[error("{message}")]
    Database { sqlstate: String, message: String },
    #[error("the internal function of operation \"{0}\" answers only vsql_vault's own SQL functions: call the vault_* function")]
    NotThroughApi(String),
    #[error("this entry's access policy requires the end user or service the call is made for: SET LOCAL vsql_vault.on_behalf_of = '...' in the calling transaction")]
    IdentityRequired,
    #[error("key directive {id} ({kind} {target}) refuses new data under this key or algorithm: store it encrypted under a compliant key")]
    KeyDirective {
        id: i64,
        kind: &'static str,
        target: String,
    },
    #[error(transparent)]
    DirectiveDocument(#[from] vsql_vault_core::directive_doc::DocError),
    #[error("vsql_vault.directive_public_keys: {0}")]
    DirectiveKeys(String),
    #[error("directive document refused: {0}")]
    DirectiveNotFresh(String),
    #[error("key directive {0} does not exist")]
    NoSuchDirective(i64),
    #[error("key directive {0} is not in force (it is revoked, or is itself a revocation)")]
    DirectiveNotActive(i64),
    #[error("{0}")]
    Internal(String),
}

impl VaultError {
    pub fn sqlstate(&self) -> &str {
        match self {
            VaultError::Input(e) => e.sqlstate(),
            VaultError::NoRetentionPolicy(_) => "VV428",
            VaultError::BeyondRetention { .. } => "VV422",
            VaultError::ExpiryInPast(_) | VaultError::UnknownPolicy(_) => "22023",
            VaultError::BuiltinPolicy(_) | VaultError::Denied(_) => "42501",
            VaultError::UnknownRole(_) => "42704",
            VaultError::Gone { .. } => "VV410",
            VaultError::NotFound { .. } => "P0002",
            VaultError::AuditUnavailable(_) => "VV503",
            VaultError::WrongDatabase(_) | VaultError::NotPreloaded => "55000",
            VaultError::TooManyDatabases(_) => "53400",
            VaultError::Key(e) => e.sqlstate(),
            VaultError::KeyManagedExternally | VaultError::NotProtected(_) => "55000",
            VaultError::ChainCount(_) => "22023",
            VaultError::ProtectedDdl(_) => "VV403",
            VaultError::NotATable | VaultError::NotPublishable(_) => "42809",
            VaultError::CannotProtect(_) | VaultError::CannotForget(_) => "55000",
            VaultError::Locked(_)
            | VaultError::Busy(_)
            | VaultError::WriterBlockedByThisTransaction(_) => "55P03",
            VaultError::RecordTooLarge(_) => "54000",
            VaultError::NoSuchProof(_) => "P0002",
            VaultError::UnknownColumn(_) => "42703",
            VaultError::Database { sqlstate, .. } => sqlstate,
            VaultError::Raised(_) => "XX000",
            VaultError::NotThroughApi(_) => "42501",
            VaultError::IdentityRequired => "28000",
            VaultError::KeyDirective { .. } => "VV426",
            VaultError::NoSuchDirective(_) => "P0002",
            VaultError::DirectiveDocument(e) => e.sqlstate(),
            VaultError::DirectiveKeys(_) => "F0000",
            VaultError::DirectiveNotFresh(_) => "42501",
            VaultError::DirectiveNotActive(_) => "22023",
            VaultError::Internal(_) => "XX000",
        }
    }
}

/// The `(sqlstate, message)` columns every `*_impl` function returns: both NULL on success.
pub fn status<T>(r: &Result<T, VaultError>) -> (Option<String>, Option<String>) {
    match r {
        Ok(_) => (None, None),
        Err(e) => (Some(e.sqlstate().to_owned()), Some(e.to_string())),
    }
}
