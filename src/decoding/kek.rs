//! The key-encryption keys that wrap each session's data key. They come from an external wrap
//! command when one is set, else from the owner-only KEK file; the file is checked and parsed
//! strictly because a decoding session must never start with a key it cannot trust.

use super::fail;
use crate::settings;
use pgrx::guc::GucSetting;
use pgrx::prelude::*;
use std::ffi::CString;
use vsql_vault_core::envelope::{Kek, KekRing};

/// A text setting's value, `None` when unset or empty.
fn text_setting(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .filter(|c| !c.is_empty())
}

fn wrap_command() -> Option<String> {
    text_setting(&settings::KEK_WRAP_COMMAND)
}

/// The KEK versions the server knows (ids only), for the scope report.
pub(crate) fn kek_ids() -> Vec<String> {
    if let Some(cmd) = wrap_command() {
        return Kek::Command(cmd).ids();
    }
    let Some(path) = text_setting(&settings::KEK_FILE) else {
        return Vec::new();
    };
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(&path).unwrap_or_default());
    KekRing::parse(&path, &text)
        .map(|r| r.ids())
        .unwrap_or_default()
}

/// The KEK a new decoding session seals its data keys with: the wrap command if set, else the
/// KEK file (an ERROR if neither is usable).
pub(super) fn session_kek() -> Kek {
    match wrap_command() {
        Some(cmd) => Kek::Command(cmd),
        None => Kek::File(load_ring()),
    }
}

/// What identifies the KEK source as configured now, without reading any key: the wrap command,
/// or the file's path, inode, size and modification time. A session compares it before each
/// batch, so a rotation or revocation (a rewritten file, or a setting changed on reload) reaches
/// a running walsender at its next batch.
pub(super) fn kek_stamp() -> String {
    use std::os::unix::fs::MetadataExt;
    if let Some(cmd) = wrap_command() {
        return format!("command {cmd}");
    }
    let Some(path) = text_setting(&settings::KEK_FILE) else {
        return String::new();
    };
    match std::fs::metadata(&path) {
        Ok(m) => format!(
            "file {path} {} {} {}.{}",
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(e) => format!("file {path} {}", e.kind()),
    }
}

fn load_ring() -> KekRing {
    let Some(path) = text_setting(&settings::KEK_FILE) else {
        fail(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "vsql_vault decoding needs a key-encryption key: set vsql_vault.kek_file".into(),
        );
    };
    let meta = std::fs::metadata(&path).unwrap_or_else(|e| {
        fail(
            PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR,
            format!("KEK file {path}: {}", e.kind()),
        )
    });
    use std::os::unix::fs::MetadataExt;
    if meta.mode() & 0o077 != 0 {
        fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, format!("KEK file {path} is readable or writable by others; it must be owner-only (chmod 600)")
        );
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(&path).unwrap_or_default());
    KekRing::parse(&path, &text)
        .unwrap_or_else(|e| fail(PgSqlErrorCode::ERRCODE_CONFIG_FILE_ERROR, e.to_string()))
}

/// vault_health's KEK row: (status, detail), naming ids and paths only, never key material.
pub(crate) fn health() -> (&'static str, String) {
    if wrap_command().is_some() {
        return (
            "ok",
            "data keys are wrapped by vsql_vault.kek_wrap_command".into(),
        );
    }
    let Some(path) = text_setting(&settings::KEK_FILE) else {
        return (
            "warning",
            "no KEK is configured (vsql_vault.kek_file): replication decoding refuses to start"
                .into(),
        );
    };
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(&path) {
        Err(e) => ("failing", format!("KEK file {path}: {}", e.kind())),
        Ok(meta) if meta.mode() & 0o077 != 0 => (
            "failing",
            format!("KEK file {path} is readable or writable by others; it must be owner-only (chmod 600)"),
        ),
        Ok(_) => {
            let text = zeroize::Zeroizing::new(std::fs::read_to_string(&path).unwrap_or_default());
            match KekRing::parse(&path, &text) {
                Ok(ring) => ("ok", format!("KEK file {path} holds versions {}", ring.ids().join(", "))),
                Err(e) => ("failing", e.to_string()),
            }
        }
    }
}
