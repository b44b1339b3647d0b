//! The Ed25519 signing key: loaded from `vsql_vault.signing_key_file`, or generated once inside
//! the data directory. The private key never leaves this module: not in SQL, a log line or an
//! error message; `SigningKey` zeroizes itself when dropped.

use crate::security::AsOwner;
use crate::settings;
use ed25519_dalek::SigningKey;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use vsql_vault_core::keys::{self, KeyError};

/// Where the generated key lives when no key file is configured.
fn generated_path() -> String {
    // SAFETY: DataDir is set (absolute, NUL-terminated) by the postmaster before any backend,
    // worker or walsender exists, inherited by them and never changed or freed afterwards.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) }
        .to_string_lossy()
        .into_owned();
    format!("{dir}/vsql_vault_signing.key")
}

fn configured_path() -> Option<String> {
    settings::SIGNING_KEY_FILE
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

fn read_key(path: &str) -> Result<SigningKey, KeyError> {
    let io = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => KeyError::Missing { path: path.into() },
        kind => KeyError::Io {
            path: path.into(),
            why: kind.to_string(),
        },
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    // SAFETY: libc_geteuid has no precondition (see its Safety section).
    keys::check_permissions(path, &meta, unsafe { libc_geteuid() })?;
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(io)?);
    keys::decode_file(path, &bytes)
}

/// The file the current key is read from: the configured one, else the data-directory key.
pub fn path() -> String {
    configured_path().unwrap_or_else(generated_path)
}

/// Where the current key comes from, as `vault.signing_keys.source` records it.
pub fn source() -> &'static str {
    if configured_path().is_some() {
        "signing_key_file"
    } else {
        "generated"
    }
}

/// The current key as it is on disk; never creates one (decoding sessions, vault_health).
pub fn existing() -> Result<SigningKey, KeyError> {
    read_key(&path())
}

/// Whether a generated key was ever registered in this database. Outside a transaction, or when
/// the question cannot be answered, the answer is yes: a key is then never generated (fail closed).
pub fn generated_key_registered() -> bool {
    // SAFETY: a read of the backend's transaction state, allowed at any time on its thread.
    if !unsafe { pg_sys::IsTransactionState() } {
        return true;
    }
    let installed = crate::pg::select_one::<bool>(
        "SELECT pg_catalog.to_regclass('vault.signing_keys') IS NOT NULL
            AND pg_catalog.to_regclass('vault.entries') IS NOT NULL",
        &[],
    );
    match installed {
        Ok(Some(false)) => false,
        Ok(Some(true)) => {
            let _owner = AsOwner::enter();
            crate::pg::select_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM vault.signing_keys WHERE source OPERATOR(pg_catalog.=) 'generated')",
            &[],
        )
            .map(|b| b.unwrap_or(true))
            .unwrap_or(true)
        }
        _ => true,
    }
}

/// The process's effective user id.
///
/// # Safety
///
/// None for the caller: geteuid takes no argument, touches no memory and cannot fail. The one
/// obligation is on the declaration below, which matches POSIX on the supported platforms
/// (`uid_t` is a 32-bit unsigned integer on Linux and macOS).
unsafe fn libc_geteuid() -> u32 {
    unsafe extern "C" {
        fn geteuid() -> u32;
    }
    // SAFETY: a call through the declaration above, which matches libc's `uid_t geteuid(void)`.
    unsafe { geteuid() }
}

fn write_new(path: &str, key: &SigningKey) -> Result<(), KeyError> {
    let io = |e: std::io::Error| KeyError::Io {
        path: path.into(),
        why: e.kind().to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(keys::encode_file(key).as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The current signing key. The data-directory key is generated only on a fresh install (no
/// generated key registered yet): after that a missing file is an error (58P01), never a new key,
/// which would break the continuity of the evidence quietly. Only vault_rotate_signing_key()
/// makes a new one.
pub fn current() -> Result<SigningKey, KeyError> {
    if let Some(path) = configured_path() {
        return read_key(&path);
    }
    let path = generated_path();
    match read_key(&path) {
        Err(KeyError::Missing { .. }) if !generated_key_registered() => {}
        other => return other,
    }
    let key = keys::generate()?;
    match write_new(&path, &key) {
        Ok(()) => Ok(key),
        // Another process created it first: use theirs.
        Err(_) if std::path::Path::new(&path).exists() => read_key(&path),
        Err(e) => Err(e),
    }
}

/// Records the key's public half in `vault.signing_keys` (once).
pub fn register(key: &SigningKey) -> Result<String, pgrx::spi::Error> {
    let public = key.verifying_key();
    let id = keys::key_id(&public);
    let source = source();
    let _owner = AsOwner::enter();
    // Only write when the key is new, so signing also works in read-only transactions (a
    // compliance report on a standby or under default_transaction_read_only).
    let known = crate::pg::select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM vault.signing_keys WHERE key_id = $1)",
        &[id.as_str().into()],
    )?
    .unwrap_or(false);
    if known {
        return Ok(id);
    }
    Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO vault.signing_keys (key_id, public_key, source) VALUES ($1, $2, $3)
             ON CONFLICT (key_id) DO NOTHING",
            None,
            &[
                id.as_str().into(),
                hex::encode(public.as_bytes()).into(),
                source.into(),
            ],
        )
        .map(|_| ())
    })?;
    Ok(id)
}

/// Replaces the generated key with a new one; old public keys stay for verification.
pub fn rotate() -> Result<String, crate::errors::VaultError> {
    use crate::errors::VaultError;
    if configured_path().is_some() {
        return Err(VaultError::KeyManagedExternally);
    }
    let path = generated_path();
    let key = keys::generate().map_err(VaultError::Key)?;
    let tmp = format!("{path}.new");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &key).map_err(VaultError::Key)?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        VaultError::Key(KeyError::Io {
            path: path.clone(),
            why: e.kind().to_string(),
        })
    })?;
    {
        let _owner = AsOwner::enter();
        Spi::connect_mut(|c| {
            c.update(
                "UPDATE vault.signing_keys SET retired_at = now() WHERE retired_at IS NULL",
                None,
                &[],
            )
            .map(|_| ())
        })
        .unwrap_or_else(|e| pgrx::error!("vsql_vault: retiring the old key failed: {e}"));
    }
    register(&key).map_err(|e| VaultError::Internal(e.to_string()))
}
