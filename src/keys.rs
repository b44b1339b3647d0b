//! The Ed25519 evidence signer: an external `vsql_vault.signing_command` (the private key stays
//! in a KMS or HSM), else a key loaded from `vsql_vault.signing_key_file`, else one generated once
//! inside the data directory. The private key never leaves this module: not in SQL, a log line or
//! an error message; `SigningKey` zeroizes itself when dropped.

use crate::security::AsOwner;
use crate::settings;
use ed25519_dalek::SigningKey;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use vsql_vault_core::keys::{self, EvidenceSigner, KeyError, SignEvidence};

/// Where the generated key lives when no key file is configured.
fn generated_path() -> String {
    // SAFETY: DataDir is set (absolute, NUL-terminated) by the postmaster before any backend,
    // worker or walsender exists, inherited by them and never changed or freed afterwards.
    let dir = unsafe { CStr::from_ptr(pg_sys::DataDir) }
        .to_string_lossy()
        .into_owned();
    format!("{dir}/vsql_vault_signing.key")
}

fn signing_command() -> Option<String> {
    settings::SIGNING_COMMAND
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
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

/// Where the current key is: the signing command (never shown: it may hold credentials), the
/// configured file, else the data-directory key.
pub fn path() -> String {
    if signing_command().is_some() {
        return "vsql_vault.signing_command".into();
    }
    configured_path().unwrap_or_else(generated_path)
}

/// Where the current key comes from, as `vault.signing_keys.source` records it.
pub fn source() -> &'static str {
    if signing_command().is_some() {
        "signing_command"
    } else if configured_path().is_some() {
        "signing_key_file"
    } else {
        "generated"
    }
}

/// The current signer as configured; never creates a key (decoding sessions, vault_health).
pub fn existing() -> Result<EvidenceSigner, KeyError> {
    if let Some(command) = signing_command() {
        return EvidenceSigner::from_command(&command);
    }
    read_key(&path()).map(EvidenceSigner::from)
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

/// The current signer. The data-directory key is generated only on a fresh install (no
/// generated key registered yet): after that a missing file is an error (58P01), never a new key,
/// which would break the continuity of the evidence quietly. Only vault_rotate_signing_key()
/// makes a new one.
pub fn current() -> Result<EvidenceSigner, KeyError> {
    match signing_command() {
        Some(command) => EvidenceSigner::from_command(&command),
        None => current_key_file().map(EvidenceSigner::from),
    }
}

fn current_key_file() -> Result<SigningKey, KeyError> {
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

/// Records the key's public half in `vault.signing_keys` (once), vouched for by a key already
/// registered whose private half the vault holds (see `register_with`).
pub fn register(key: &EvidenceSigner) -> Result<String, pgrx::spi::Error> {
    register_with(key, None)
}

/// A registered key other than `new_id` whose file the vault can read: the one that vouches for
/// a new key. The most recently registered wins.
fn held_previous(new_id: &str) -> Result<Option<SigningKey>, pgrx::spi::Error> {
    let mut held: Vec<SigningKey> = [
        Some(generated_path()),
        Some(previous_path()),
        configured_path(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| read_key(&p).ok())
    .filter(|k| keys::key_id(&k.verifying_key()) != new_id)
    .collect();
    let ids: Vec<String> = held
        .iter()
        .map(|k| keys::key_id(&k.verifying_key()))
        .collect();
    let latest = crate::pg::select_one::<String>(
        "SELECT key_id FROM vault.signing_keys WHERE key_id OPERATOR(pg_catalog.=) ANY ($1)
          ORDER BY created_at DESC LIMIT 1",
        &[ids.clone().into()],
    )?;
    Ok(latest.and_then(|id| {
        ids.iter()
            .position(|i| *i == id)
            .map(|n| held.swap_remove(n))
    }))
}

/// As `register`; `previous`, when given, is the key that vouches for the new one (a rotation,
/// which replaces the previous key's file afterwards). Each key after the first carries a rotation
/// statement signed by the previous key (docs/audit-format.md section 4); with no previous key
/// at hand (it was lost), the key is registered without one, and in-database verification will
/// not trust it (a WARNING says so).
pub fn register_with(
    key: &impl SignEvidence,
    previous: Option<&SigningKey>,
) -> Result<String, pgrx::spi::Error> {
    let public = key.public();
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
    // Two sessions registering the same new key: the second waits here and finds it (a plain
    // INSERT, since ON CONFLICT is refused on a protected table).
    crate::pg::select_one::<bool>(
        "SELECT true FROM (SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('vsql_vault.signing_keys'))) l",
        &[],
    )?;
    if crate::pg::select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM vault.signing_keys WHERE key_id = $1)",
        &[id.as_str().into()],
    )?
    .unwrap_or(false)
    {
        return Ok(id);
    }
    let first =
        !crate::pg::select_one::<bool>("SELECT EXISTS (SELECT 1 FROM vault.signing_keys)", &[])?
            .unwrap_or(false);
    let held;
    let previous = match previous {
        Some(p) => Some(p),
        None => {
            held = held_previous(&id)?;
            held.as_ref()
        }
    };
    let signed_at = crate::pg::now_micros();
    let statement = previous.map(|p| {
        let previous_id = keys::key_id(&p.verifying_key());
        let msg = vsql_vault_core::trust::rotation_message(
            &previous_id,
            &id,
            public.as_bytes(),
            source,
            signed_at,
        );
        (previous_id, keys::sign(p, &msg).to_vec())
    });
    // A 0.1.0 schema (library updated, ALTER EXTENSION UPDATE not run yet) has no statement
    // columns; its keys become the trust roots at the update.
    let statements_kept = crate::pg::select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
          WHERE attrelid OPERATOR(pg_catalog.=) 'vault.signing_keys'::pg_catalog.regclass
            AND attname OPERATOR(pg_catalog.=) 'rotation_signature' AND NOT attisdropped)",
        &[],
    )?
    .unwrap_or(false);
    let statement = statement.filter(|_| statements_kept);
    if statements_kept && statement.is_none() && !first {
        warning!("vsql_vault: signing key {id} is registered without a rotation statement (no earlier key is at hand): in-database verification will not trust it");
    }
    insert_key(
        &id,
        &public,
        source,
        statement.as_ref(),
        signed_at,
        statements_kept,
    )?;
    Ok(id)
}

/// Inserts a key's row (as the vault, past the evidence tables' guard), with its rotation
/// statement when there is one.
fn insert_key(
    id: &str,
    public: &ed25519_dalek::VerifyingKey,
    source: &str,
    statement: Option<&(String, Vec<u8>)>,
    signed_at: i64,
    statements_kept: bool,
) -> Result<(), pgrx::spi::Error> {
    let _writing = crate::chain::VaultWriting::enter();
    if !statements_kept {
        return Spi::connect_mut(|c| {
            c.update(
                "INSERT INTO vault.signing_keys (key_id, public_key, source) VALUES ($1, $2, $3)",
                None,
                &[
                    id.into(),
                    hex::encode(public.as_bytes()).into(),
                    source.into(),
                ],
            )
            .map(|_| ())
        });
    }
    Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO vault.signing_keys
                (key_id, public_key, source, previous_key_id, signed_at_us, rotation_signature)
             VALUES ($1, $2, $3, $4, $5, $6)",
            None,
            &[
                id.into(),
                hex::encode(public.as_bytes()).into(),
                source.into(),
                statement.as_ref().map(|(p, _)| p.as_str()).into(),
                statement.as_ref().map(|_| signed_at).into(),
                statement.as_ref().map(|(_, sig)| sig.as_slice()).into(),
            ],
        )
        .map(|_| ())
    })
}

/// Where a rotation leaves the key it replaced. The key file is the cluster's, the registries are
/// each database's: the other databases register the new key later, at their next checkpoint,
/// and need the old key then to sign its rotation statement (else the new key would be
/// registered there without one, and not trusted). The next rotation replaces it.
fn previous_path() -> String {
    format!("{}.previous", generated_path())
}

/// Replaces the generated key with a new one, vouched for by the old one when its file is still
/// there; old public keys stay for verification. The new key is registered before its file
/// replaces the old one, so a failure leaves the old key in place.
pub fn rotate() -> Result<String, crate::errors::VaultError> {
    use crate::errors::VaultError;
    if configured_path().is_some() || signing_command().is_some() {
        return Err(VaultError::KeyManagedExternally);
    }
    let path = generated_path();
    let old = read_key(&path).ok();
    let key = keys::generate().map_err(VaultError::Key)?;
    let tmp = format!("{path}.new");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &key).map_err(VaultError::Key)?;
    let id = register_with(&key, old.as_ref()).map_err(|e| VaultError::Internal(e.to_string()))?;
    if let Some(old) = &old {
        let previous = previous_path();
        let _ = std::fs::remove_file(&previous);
        write_new(&previous, old).map_err(VaultError::Key)?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| {
        VaultError::Key(KeyError::Io {
            path: path.clone(),
            why: e.kind().to_string(),
        })
    })?;
    Ok(id)
}

/// The current key's id and age in seconds (by the database clock, from its registration in
/// `vault.signing_keys`), with where it stands against `vsql_vault.signing_key_max_age`; None
/// when no current key is registered.
pub fn age() -> Result<Option<(String, i64, keys::KeyAge)>, crate::errors::VaultError> {
    let Ok(key) = existing() else {
        return Ok(None);
    };
    let id = keys::key_id(&key.public());
    let _owner = AsOwner::enter();
    let age = crate::pg::select_one::<i64>(
        "SELECT floor(extract(epoch FROM now() - created_at))::bigint FROM vault.signing_keys
          WHERE key_id OPERATOR(pg_catalog.=) $1",
        &[id.as_str().into()],
    )?;
    let max = i64::from(settings::SIGNING_KEY_MAX_AGE_S.get());
    Ok(age.map(|a| (id, a, keys::key_age(a, max))))
}

/// Called by the audit writer with each scheduled checkpoint: rotates the generated key once it
/// has reached `vsql_vault.signing_key_max_age` (as `vault_rotate_signing_key` does, the new key
/// vouched for by the old one) and records nothing else; a key from `vsql_vault.signing_key_file`
/// or `vsql_vault.signing_command` is left to whoever manages it (vault_health() warns). A failure is a WARNING, retried at
/// the next checkpoint.
pub fn rotate_when_due() {
    if settings::SIGNING_KEY_MAX_AGE_S.get() <= 0
        || configured_path().is_some()
        || signing_command().is_some()
    {
        return;
    }
    let result = pgrx::bgworkers::BackgroundWorker::transaction(|| {
        let installed = crate::pg::select_one::<bool>(
            "SELECT pg_catalog.to_regclass('vault.signing_keys') IS NOT NULL",
            &[],
        )?
        .unwrap_or(false);
        match age()? {
            Some((old, age, keys::KeyAge::Due)) if installed => {
                let new = rotate()?;
                log!("vsql_vault: signing key {old} reached vsql_vault.signing_key_max_age ({age} s old): rotated to {new}");
                Ok(())
            }
            _ => Ok::<(), crate::errors::VaultError>(()),
        }
    });
    if let Err(e) = result {
        warning!("vsql_vault: scheduled rotation of the signing key failed: {e}");
    }
}
