//! The envelope format of the replication stream: a random data key (DEK) per session, wrapped by
//! a versioned key-encryption key (KEK); each batch of changes sealed with AES-256-GCM under the
//! DEK, its associated data binding it to slot, session, sequence and LSN range.
//!
//! Nonces are the batch sequence number (never repeated under one DEK, since a session's sequence
//! only grows and a new DEK starts a new session).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::canonical::{Encoder, Value};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("KEK file {0}: {1}")]
    KekFile(String, String),
    #[error(
        "no KEK version {0} (destroyed or never known): the data sealed under it is unrecoverable"
    )]
    UnknownKek(String),
    #[error("the wrapped data key does not open with KEK {0} (wrong key or altered)")]
    Unwrap(String),
    #[error("batch {0} does not open: its ciphertext, nonce or associated data was altered, or the key is wrong")]
    Open(i64),
    #[error("no randomness available: {0}")]
    Random(String),
    #[error("KEK command failed: {0}")]
    Command(String),
}

/// A 256-bit key that zeroizes itself.
pub type Key = Zeroizing<[u8; 32]>;

pub fn random_key() -> Result<Key, EnvelopeError> {
    let mut k = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(k.as_mut()).map_err(|e| EnvelopeError::Random(e.to_string()))?;
    Ok(k)
}

pub fn random_bytes<const N: usize>() -> Result<[u8; N], EnvelopeError> {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).map_err(|e| EnvelopeError::Random(e.to_string()))?;
    Ok(b)
}

/// A KEK file: one version per line, `<id> <64 hex characters>`; the last line is the active
/// version. Removing a line destroys that version (crypto-shredding every stream sealed under it).
#[derive(Clone)]
pub struct KekRing {
    versions: Vec<(String, Key)>,
}

impl KekRing {
    pub fn parse(path: &str, text: &str) -> Result<KekRing, EnvelopeError> {
        let mut versions = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(id), Some(hexkey), None) = (parts.next(), parts.next(), parts.next()) else {
                return Err(EnvelopeError::KekFile(
                    path.into(),
                    format!("line {} is not `<id> <hex key>`", n + 1),
                ));
            };
            let mut k = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(hexkey, k.as_mut()).map_err(|_| {
                EnvelopeError::KekFile(
                    path.into(),
                    format!("line {}: the key is not 64 hex characters", n + 1),
                )
            })?;
            // The same id twice would seal under one key and unwrap with the other: every
            // stream made with such a file would be lost without a word.
            if versions.iter().any(|(v, _)| v == id) {
                return Err(EnvelopeError::KekFile(
                    path.into(),
                    format!("line {}: key version \"{id}\" appears twice", n + 1),
                ));
            }
            versions.push((id.to_owned(), k));
        }
        if versions.is_empty() {
            return Err(EnvelopeError::KekFile(
                path.into(),
                "no key versions".into(),
            ));
        }
        Ok(KekRing { versions })
    }

    pub fn active(&self) -> (&str, &Key) {
        let (id, k) = self
            .versions
            .last()
            .expect("a ring has at least one version");
        (id, k)
    }

    pub fn ids(&self) -> Vec<String> {
        self.versions.iter().map(|(id, _)| id.clone()).collect()
    }

    pub fn get(&self, id: &str) -> Result<&Key, EnvelopeError> {
        self.versions
            .iter()
            .find(|(v, _)| v == id)
            .map(|(_, k)| k)
            .ok_or_else(|| EnvelopeError::UnknownKek(id.into()))
    }
}

/// Where data keys are wrapped: a KEK file, or a command that talks to a KMS.
///
/// The command runs under `sh -c` with `VSQL_VAULT_OP` set to `wrap` or `unwrap` and
/// `VSQL_VAULT_SESSION` to the session id (an encryption context a KMS can bind). To wrap, it reads
/// the data key as 64 hex characters on stdin and prints `<kek id> <wrapped key in hex>`; to
/// unwrap (with `VSQL_VAULT_KEK_ID` set), it reads the wrapped key in hex and prints the data key
/// in hex.
pub enum Kek {
    File(KekRing),
    Command(String),
}

fn run_command(
    cmd: &str,
    op: &str,
    session: &str,
    kek_id: Option<&str>,
    input: &str,
) -> Result<Zeroizing<String>, EnvelopeError> {
    use std::io::Write;
    let mut c = std::process::Command::new("sh");
    c.args(["-c", cmd])
        .env("VSQL_VAULT_OP", op)
        .env("VSQL_VAULT_SESSION", session)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    if let Some(id) = kek_id {
        c.env("VSQL_VAULT_KEK_ID", id);
    }
    let mut child = c
        .spawn()
        .map_err(|e| EnvelopeError::Command(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| EnvelopeError::Command(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| EnvelopeError::Command(e.to_string()))?;
    if !out.status.success() {
        return Err(EnvelopeError::Command(format!(
            "{op} exited with {}",
            out.status
        )));
    }
    Ok(Zeroizing::new(
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

impl Kek {
    /// Wraps a session's data key under the active KEK: (KEK id, wrapped key).
    pub fn wrap(&self, session: &str, dek: &Key) -> Result<(String, Vec<u8>), EnvelopeError> {
        match self {
            Kek::File(ring) => {
                let (id, kek) = ring.active();
                Ok((id.to_owned(), wrap_dek(kek, id, session, dek)?))
            }
            Kek::Command(cmd) => {
                let input = Zeroizing::new(format!("{}\n", hex::encode(dek.as_ref())));
                let out = run_command(cmd, "wrap", session, None, &input)?;
                let (id, wrapped) = out.split_once(' ').ok_or_else(|| {
                    EnvelopeError::Command("wrap did not print `<kek id> <hex>`".into())
                })?;
                let wrapped = hex::decode(wrapped.trim())
                    .map_err(|_| EnvelopeError::Command("wrap printed no hex".into()))?;
                Ok((id.to_owned(), wrapped))
            }
        }
    }

    pub fn unwrap(
        &self,
        kek_id: &str,
        session: &str,
        wrapped: &[u8],
    ) -> Result<Key, EnvelopeError> {
        match self {
            Kek::File(ring) => unwrap_dek(ring.get(kek_id)?, kek_id, session, wrapped),
            Kek::Command(cmd) => {
                let out = run_command(
                    cmd,
                    "unwrap",
                    session,
                    Some(kek_id),
                    &format!("{}\n", hex::encode(wrapped)),
                )?;
                let mut k = Zeroizing::new([0u8; 32]);
                hex::decode_to_slice(out.as_str(), k.as_mut())
                    .map_err(|_| EnvelopeError::Unwrap(kek_id.into()))?;
                Ok(k)
            }
        }
    }

    pub fn ids(&self) -> Vec<String> {
        match self {
            Kek::File(ring) => ring.ids(),
            Kek::Command(_) => vec!["(kek_wrap_command)".into()],
        }
    }
}

fn wrap_aad(kek_id: &str, session: &str) -> Vec<u8> {
    Encoder::new("vsql_vault.dek")
        .field("kek_id", &Value::Text(kek_id.into()))
        .field("session", &Value::Text(session.into()))
        .bytes()
        .to_vec()
}

/// Wraps a DEK under a KEK: random 96-bit nonce, then the sealed key.
pub fn wrap_dek(
    kek: &Key,
    kek_id: &str,
    session: &str,
    dek: &Key,
) -> Result<Vec<u8>, EnvelopeError> {
    let cipher = Aes256Gcm::new_from_slice(kek.as_ref())
        .map_err(|_| EnvelopeError::Unwrap(kek_id.into()))?;
    let nonce: [u8; 12] = random_bytes()?;
    let aad = wrap_aad(kek_id, session);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: dek.as_ref(),
                aad: &aad,
            },
        )
        .map_err(|_| EnvelopeError::Unwrap(kek_id.into()))?;
    Ok([nonce.as_slice(), &sealed].concat())
}

pub fn unwrap_dek(
    kek: &Key,
    kek_id: &str,
    session: &str,
    wrapped: &[u8],
) -> Result<Key, EnvelopeError> {
    if wrapped.len() < 12 + 32 + 16 {
        return Err(EnvelopeError::Unwrap(kek_id.into()));
    }
    let cipher = Aes256Gcm::new_from_slice(kek.as_ref())
        .map_err(|_| EnvelopeError::Unwrap(kek_id.into()))?;
    let aad = wrap_aad(kek_id, session);
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                Nonce::from_slice(&wrapped[..12]),
                Payload {
                    msg: &wrapped[12..],
                    aad: &aad,
                },
            )
            .map_err(|_| EnvelopeError::Unwrap(kek_id.into()))?,
    );
    let mut k = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(EnvelopeError::Unwrap(kek_id.into()));
    }
    k.copy_from_slice(&plain);
    Ok(k)
}

/// What a batch's ciphertext is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchBinding<'a> {
    pub slot: &'a str,
    pub session: &'a str,
    pub seq: i64,
    pub lsn_start: &'a str,
    pub lsn_end: &'a str,
}

impl BatchBinding<'_> {
    fn aad(&self) -> Vec<u8> {
        Encoder::new("vsql_vault.batch_aad")
            .field("slot", &Value::Text(self.slot.into()))
            .field("session", &Value::Text(self.session.into()))
            .field("seq", &Value::Int(self.seq))
            .field("lsn_start", &Value::Text(self.lsn_start.into()))
            .field("lsn_end", &Value::Text(self.lsn_end.into()))
            .bytes()
            .to_vec()
    }

    fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&(self.seq as u64).to_be_bytes());
        n
    }
}

pub fn seal(dek: &Key, binding: &BatchBinding, plaintext: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let cipher =
        Aes256Gcm::new_from_slice(dek.as_ref()).map_err(|_| EnvelopeError::Open(binding.seq))?;
    let aad = binding.aad();
    cipher
        .encrypt(
            Nonce::from_slice(&binding.nonce()),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| EnvelopeError::Open(binding.seq))
}

pub fn open(
    dek: &Key,
    binding: &BatchBinding,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let cipher =
        Aes256Gcm::new_from_slice(dek.as_ref()).map_err(|_| EnvelopeError::Open(binding.seq))?;
    let aad = binding.aad();
    cipher
        .decrypt(
            Nonce::from_slice(&binding.nonce()),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::Open(binding.seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KekRing {
        KekRing::parse(
            "k",
            &format!("v1 {}\nv2 {}\n", "11".repeat(32), "22".repeat(32)),
        )
        .unwrap()
    }

    #[test]
    fn a_key_file_naming_one_version_twice_is_refused() {
        let text = format!("v1 {}\nv1 {}\n", "11".repeat(32), "22".repeat(32));
        let e = KekRing::parse("k", &text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("appears twice"), "{e}");
    }

    #[test]
    fn dek_wraps_under_the_active_kek_and_unwraps_with_that_version_only() {
        let r = ring();
        let (id, kek) = r.active();
        assert_eq!(id, "v2");
        let dek = random_key().unwrap();
        let w = wrap_dek(kek, id, "s1", &dek).unwrap();
        assert_eq!(
            *unwrap_dek(r.get("v2").unwrap(), "v2", "s1", &w).unwrap(),
            *dek
        );
        assert!(unwrap_dek(r.get("v1").unwrap(), "v1", "s1", &w).is_err());
        assert!(unwrap_dek(kek, "v2", "other-session", &w).is_err());
        let mut bad = w.clone();
        bad[20] ^= 1;
        assert!(unwrap_dek(kek, "v2", "s1", &bad).is_err());
        assert_eq!(
            r.get("v9").err(),
            Some(EnvelopeError::UnknownKek("v9".into()))
        );
    }

    #[test]
    fn batches_are_bound_to_slot_session_seq_and_lsns() {
        let dek = random_key().unwrap();
        let b = BatchBinding {
            slot: "s",
            session: "x",
            seq: 7,
            lsn_start: "0/1",
            lsn_end: "0/2",
        };
        let c = seal(&dek, &b, b"{\"a\":1}").unwrap();
        assert_eq!(&open(&dek, &b, &c).unwrap()[..], b"{\"a\":1}");
        for other in [
            BatchBinding {
                slot: "t",
                ..b.clone()
            },
            BatchBinding {
                session: "y",
                ..b.clone()
            },
            BatchBinding {
                seq: 8,
                ..b.clone()
            },
            BatchBinding {
                lsn_end: "0/3",
                ..b.clone()
            },
        ] {
            assert_eq!(
                open(&dek, &other, &c).err(),
                Some(EnvelopeError::Open(other.seq))
            );
        }
        let mut flipped = c.clone();
        flipped[0] ^= 0x80;
        assert!(open(&dek, &b, &flipped).is_err());
        assert!(open(&random_key().unwrap(), &b, &c).is_err());
    }

    #[test]
    fn a_kek_command_wraps_and_unwraps() {
        // A stand-in KMS: swaps hex digits (an involution), so unwrap undoes wrap.
        let cmd = "read x; y=$(echo $x | tr 0123456789abcdef fedcba9876543210); \
                   if [ \"$VSQL_VAULT_OP\" = wrap ]; then echo \"kms-1 $y\"; else echo $y; fi";
        let kek = Kek::Command(cmd.into());
        let dek = random_key().unwrap();
        let (id, wrapped) = kek.wrap("s1", &dek).unwrap();
        assert_eq!(id, "kms-1");
        assert_ne!(wrapped.as_slice(), dek.as_ref());
        assert_eq!(*kek.unwrap(&id, "s1", &wrapped).unwrap(), *dek);
        assert!(matches!(
            Kek::Command("exit 3".into()).wrap("s1", &dek),
            Err(EnvelopeError::Command(_))
        ));
    }

    #[test]
    fn kek_files_are_checked() {
        assert!(KekRing::parse("k", "").is_err());
        assert!(KekRing::parse("k", "v1 zz").is_err());
        assert!(KekRing::parse("k", "v1").is_err());
        assert!(KekRing::parse("k", &format!("# comment\nv1 {}\n", "aa".repeat(32))).is_ok());
    }
}
