//! Reading what an auditor is given: JSON-lines files and hex public keys.

use std::io::BufRead;
use vsql_vault_core::envelope::{Kek, KekRing};
use vsql_vault_core::keys;
use vsql_vault_core::keys::VerifyingKey;

/// Reads one JSON object per non-empty line.
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &str) -> Result<Vec<T>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{path}: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| format!("{path} line {}: {e}", n + 1))?);
    }
    Ok(out)
}

pub fn public_keys(hex: &[String]) -> Result<Vec<VerifyingKey>, String> {
    hex.iter()
        .map(|k| keys::parse_public(k).map_err(|e| e.to_string()))
        .collect()
}

/// The key-encryption key a stream consumer unwraps data keys with: a KMS command, else the
/// KEK file (`<id> <64 hex characters>` per line).
pub fn kek(file: Option<&str>, command: Option<&str>) -> Result<Kek, String> {
    match (command, file) {
        (Some(cmd), _) => Ok(Kek::Command(cmd.to_owned())),
        (None, path) => {
            let path = path.unwrap_or_default();
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            Ok(Kek::File(
                KekRing::parse(path, &text).map_err(|e| e.to_string())?,
            ))
        }
    }
}
