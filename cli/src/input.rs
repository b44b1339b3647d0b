//! Reading what an auditor is given: JSON-lines files and hex public keys.

use std::io::BufRead;
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
