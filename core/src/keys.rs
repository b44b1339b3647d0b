//! Ed25519 signing keys: generation, the key file format and its permission rule, key ids.

pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::{Signer, SigningKey};
use thiserror::Error;
use zeroize::Zeroizing;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("signing key file {path} is readable or writable by others (mode {mode:o}); it must be owner-only (chmod 600)")]
    Permissions { path: String, mode: u32 },
    #[error("signing key file {path} is not owned by the server's user")]
    Owner { path: String },
    #[error("signing key file {path}: {why}")]
    Io { path: String, why: String },
    /// The key file is gone after a key was registered: it is never quietly regenerated, since a
    /// new key would break the continuity of the evidence it signs.
    #[error("signing key file {path} is missing, and signing keys are already registered: restore the file, or have a superuser call vault_rotate_signing_key()")]
    Missing { path: String },
    #[error("signing key file {path} does not hold a 32-byte Ed25519 seed in hex")]
    Format { path: String },
    #[error("no randomness available to generate a key: {0}")]
    Random(String),
    #[error("invalid public key: {0}")]
    PublicKey(String),
}

impl KeyError {
    /// The SQLSTATE a signing operation fails with: 58P01 (undefined_file) for a missing key file,
    /// F0000 (config_file_error) for one that is unreadable, exposed or malformed.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            KeyError::Missing { .. } => "58P01",
            KeyError::Permissions { .. }
            | KeyError::Owner { .. }
            | KeyError::Io { .. }
            | KeyError::Format { .. } => "F0000",
            KeyError::Random(_) | KeyError::PublicKey(_) => "58000",
        }
    }
}

/// A short, stable name for a key: the first 8 bytes of SHA-256 over its public key, in hex.
pub fn key_id(public: &VerifyingKey) -> String {
    hex::encode(&crate::canonical::sha256(public.as_bytes())[..8])
}

pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(seed.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The key file holds the 32-byte seed as 64 hex characters (and an optional newline).
pub fn encode_file(key: &SigningKey) -> Zeroizing<String> {
    Zeroizing::new(format!("{}\n", hex::encode(key.to_bytes())))
}

pub fn decode_file(path: &str, contents: &[u8]) -> Result<SigningKey, KeyError> {
    let text = std::str::from_utf8(contents).map_err(|_| KeyError::Format { path: path.into() })?;
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), seed.as_mut())
        .map_err(|_| KeyError::Format { path: path.into() })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Refuses a key file that anyone but its owner can read or write, or that another user owns.
#[cfg(unix)]
pub fn check_permissions(
    path: &str,
    meta: &std::fs::Metadata,
    expected_uid: u32,
) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.into(),
            mode,
        });
    }
    if meta.uid() != expected_uid {
        return Err(KeyError::Owner { path: path.into() });
    }
    Ok(())
}

/// A trusted public key, strictly: RFC 8032's canonical encoding (no y >= p, no negative zero)
/// and not of small order, whose "signatures" anyone could make.
pub fn parse_public(hex_text: &str) -> Result<VerifyingKey, KeyError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_text.trim(), &mut bytes)
        .map_err(|e| KeyError::PublicKey(e.to_string()))?;
    let key = VerifyingKey::from_bytes(&bytes).map_err(|e| KeyError::PublicKey(e.to_string()))?;
    if key.to_edwards().compress().to_bytes() != bytes {
        return Err(KeyError::PublicKey("not a canonical encoding".into()));
    }
    if key.is_weak() {
        return Err(KeyError::PublicKey(
            "a point of small order, which verifies forged signatures".into(),
        ));
    }
    Ok(key)
}

pub fn sign(key: &SigningKey, message: &[u8]) -> [u8; 64] {
    key.sign(message).to_bytes()
}

pub fn verify(public: &VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
        return false;
    };
    // Strict: a small-order R or a non-canonical S is refused, so one message has one valid
    // signature per key and no key of small order verifies anything.
    public.verify_strict(message, &sig).is_ok()
}

/// Where the evidence signing key stands against `vsql_vault.signing_key_max_age`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAge {
    /// No maximum age is set (0).
    Unlimited,
    /// Younger than the warning window.
    Fresh,
    /// In the last tenth of its maximum age (at least the last second): rotated soon.
    RotatingSoon,
    /// At or past its maximum age: rotated at the audit writer's next check.
    Due,
}

/// `age_s` and `max_age_s` in seconds; a maximum of 0 or less means none.
pub fn key_age(age_s: i64, max_age_s: i64) -> KeyAge {
    if max_age_s <= 0 {
        return KeyAge::Unlimited;
    }
    let window = (max_age_s / 10).max(1);
    if age_s >= max_age_s {
        KeyAge::Due
    } else if age_s >= max_age_s - window {
        KeyAge::RotatingSoon
    } else {
        KeyAge::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_round_trip_and_signatures() {
        let key = generate().unwrap();
        let file = encode_file(&key);
        let back = decode_file("k", file.as_bytes()).unwrap();
        assert_eq!(back.to_bytes(), key.to_bytes());
        let sig = sign(&key, b"head");
        assert!(verify(&key.verifying_key(), b"head", &sig));
        assert!(!verify(&key.verifying_key(), b"head!", &sig));
        assert!(!verify(&generate().unwrap().verifying_key(), b"head", &sig));
        assert!(!verify(&key.verifying_key(), b"head", &sig[..10]));
        assert_eq!(key_id(&key.verifying_key()).len(), 16);
        assert!(decode_file("k", b"not hex").is_err());
    }

    #[test]
    fn weak_and_non_canonical_public_keys_are_refused() {
        // The identity point: (R = identity, S = 0) would verify any message under it.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_public(&hex::encode(identity)).is_err());
        // The identity again, with the sign bit set on x = 0 (negative zero).
        identity[31] = 0x80;
        assert!(parse_public(&hex::encode(identity)).is_err());
        // y >= p: a non-canonical encoding.
        let mut big = [0xffu8; 32];
        big[0] = 0xee;
        big[31] = 0x7f;
        assert!(parse_public(&hex::encode(big)).is_err());
        // An honest key still parses.
        let key = generate().unwrap().verifying_key();
        assert!(parse_public(&hex::encode(key.as_bytes())).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn permissions_are_checked() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = std::env::temp_dir().join(format!("vv-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "00").unwrap();
        let uid = std::fs::metadata(&path).unwrap().uid();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(matches!(
            check_permissions("key", &meta, uid),
            Err(KeyError::Permissions { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(check_permissions("key", &meta, uid).is_ok());
        assert!(matches!(
            check_permissions("key", &meta, uid + 1),
            Err(KeyError::Owner { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_age_warns_in_the_last_tenth_and_is_due_at_the_maximum() {
        assert_eq!(key_age(10_000, 0), KeyAge::Unlimited);
        assert_eq!(key_age(0, 100), KeyAge::Fresh);
        assert_eq!(key_age(89, 100), KeyAge::Fresh);
        assert_eq!(key_age(90, 100), KeyAge::RotatingSoon);
        assert_eq!(key_age(99, 100), KeyAge::RotatingSoon);
        assert_eq!(key_age(100, 100), KeyAge::Due);
        assert_eq!(key_age(5, 5), KeyAge::Due);
        assert_eq!(key_age(4, 5), KeyAge::RotatingSoon);
        assert_eq!(key_age(3, 5), KeyAge::Fresh);
    }
}
