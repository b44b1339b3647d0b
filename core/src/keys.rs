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
    /// The external signing command (vsql_vault.signing_command) failed or printed something
    /// that is not a valid signature of the message under its public key.
    #[error("vsql_vault.signing_command: {0}")]
    Command(String),
}

impl KeyError {
    /// The SQLSTATE a signing operation fails with: 58P01 (undefined_file) for a missing key file,
    /// F0000 (config_file_error) for one that is unreadable, exposed or malformed, 38000
    /// (external_routine_exception) for a signing command that fails.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            KeyError::Missing { .. } => "58P01",
            KeyError::Permissions { .. }
            | KeyError::Owner { .. }
            | KeyError::Io { .. }
            | KeyError::Format { .. } => "F0000",
            KeyError::Random(_) | KeyError::PublicKey(_) => "58000",
            KeyError::Command(_) => "38000",
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

/// Whatever signs evidence: a key in memory, or an external signer.
pub trait SignEvidence {
    fn public(&self) -> VerifyingKey;
    fn sign_evidence(&self, message: &[u8]) -> Result<[u8; 64], KeyError>;
}

impl SignEvidence for SigningKey {
    fn public(&self) -> VerifyingKey {
        self.verifying_key()
    }
    fn sign_evidence(&self, message: &[u8]) -> Result<[u8; 64], KeyError> {
        Ok(sign(self, message))
    }
}

/// The evidence signer the server uses: the key file's key, or an external command (a KMS, an
/// HSM, a signing host reached over ssh) that holds the private key, so that key never has to
/// sit on the database host.
///
/// The command is run by `sh -c` with `VSQL_VAULT_OP` set. With `public-key` it prints the
/// Ed25519 public key in hex. With `sign` it reads the message in hex on stdin and prints the
/// 64-byte signature in hex. Every signature it returns is verified under its public key before
/// it is used, so a faulty signer cannot produce evidence that does not verify.
pub enum EvidenceSigner {
    Local(SigningKey),
    Command {
        command: String,
        public: VerifyingKey,
    },
}

impl From<SigningKey> for EvidenceSigner {
    fn from(key: SigningKey) -> Self {
        EvidenceSigner::Local(key)
    }
}

fn run_signing_command(command: &str, op: &str, input: &[u8]) -> Result<String, KeyError> {
    use std::io::Write;
    let fail = |why: String| KeyError::Command(format!("{op}: {why}"));
    let mut child = std::process::Command::new("sh")
        .args(["-c", command])
        .env("VSQL_VAULT_OP", op)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| fail(e.kind().to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input (public-key) may exit first: not an error.
        let _ = stdin.write_all(hex::encode(input).as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| fail(e.kind().to_string()))?;
    if !out.status.success() {
        return Err(fail(format!("exited with {}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl EvidenceSigner {
    /// A signer backed by `command`, whose public key it asks for once.
    pub fn from_command(command: &str) -> Result<Self, KeyError> {
        let printed = run_signing_command(command, "public-key", b"")?;
        let public = parse_public(&printed).map_err(|_| {
            KeyError::Command("public-key did not print a valid Ed25519 public key in hex".into())
        })?;
        Ok(EvidenceSigner::Command {
            command: command.into(),
            public,
        })
    }
}

impl SignEvidence for EvidenceSigner {
    fn public(&self) -> VerifyingKey {
        match self {
            EvidenceSigner::Local(key) => key.verifying_key(),
            EvidenceSigner::Command { public, .. } => *public,
        }
    }

    fn sign_evidence(&self, message: &[u8]) -> Result<[u8; 64], KeyError> {
        match self {
            EvidenceSigner::Local(key) => Ok(sign(key, message)),
            EvidenceSigner::Command { command, public } => {
                let printed = run_signing_command(command, "sign", message)?;
                let mut signature = [0u8; 64];
                hex::decode_to_slice(&printed, &mut signature).map_err(|_| {
                    KeyError::Command("sign did not print a 64-byte signature in hex".into())
                })?;
                if !verify(public, message, &signature) {
                    return Err(KeyError::Command(
                        "the signature printed does not verify under the command's public key"
                            .into(),
                    ));
                }
                Ok(signature)
            }
        }
    }
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

    /// A stand-in for a KMS: prints `public` for public-key and `signature` for sign.
    fn command_printing(public: &str, signature: &str) -> String {
        format!(
            "if [ \"$VSQL_VAULT_OP\" = public-key ]; then echo {public}; else cat >/dev/null; echo {signature}; fi"
        )
    }

    #[cfg(unix)]
    #[test]
    fn a_signing_command_is_used_only_for_signatures_that_verify() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = hex::encode(key.verifying_key().as_bytes());
        let good = hex::encode(sign(&key, b"head"));
        let signer = EvidenceSigner::from_command(&command_printing(&public, &good)).unwrap();
        assert_eq!(signer.public(), key.verifying_key());
        assert_eq!(hex::encode(signer.sign_evidence(b"head").unwrap()), good);
        // The same signature for another message does not verify: refused, not used.
        assert!(matches!(
            signer.sign_evidence(b"other head"),
            Err(KeyError::Command(_))
        ));
        let garbage = EvidenceSigner::from_command(&command_printing(&public, "zz")).unwrap();
        assert!(matches!(
            garbage.sign_evidence(b"head"),
            Err(KeyError::Command(_))
        ));
        assert!(matches!(
            EvidenceSigner::from_command("exit 3"),
            Err(KeyError::Command(_))
        ));
        assert!(matches!(
            EvidenceSigner::from_command("echo 00"),
            Err(KeyError::Command(_))
        ));
        assert_eq!(KeyError::Command(String::new()).sqlstate(), "38000");
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
