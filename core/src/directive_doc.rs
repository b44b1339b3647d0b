//! Signed key directives pushed down by a governance authority (issue 18): the document format
//! (docs/key-governance.md), its canonical signed bytes, signing, and verification against the
//! public keys a superuser trusts (`vsql_vault.directive_public_keys`). Times stay RFC 3339 text
//! here; the extension compares them with the database clock.

use crate::canonical::{canonical_json, Encoder, Value};
use crate::keys;
use ed25519_dalek::{SigningKey, VerifyingKey};
use thiserror::Error;

/// The `format` of a version-1 document.
pub const FORMAT: &str = "vsql_vault.key_directive/1";
/// The domain of the signed bytes.
pub const DOMAIN: &str = "vsql_vault.key_directive";
/// A nonce's length bounds, in bytes.
pub const NONCE_MIN: usize = 16;
pub const NONCE_MAX: usize = 128;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DocError {
    /// `22023`
    #[error("invalid directive document: {0}")]
    Malformed(String),
    /// `42501`
    #[error("directive document is signed by key {0:?}, which is not in vsql_vault.directive_public_keys")]
    UnknownKey(String),
    /// `42501`
    #[error("directive document signature does not verify with key {0}")]
    BadSignature(String),
}

impl DocError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            DocError::Malformed(_) => "22023",
            DocError::UnknownKey(_) | DocError::BadSignature(_) => "42501",
        }
    }
}

/// A verified document's fields, as the extension stores them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedDirective {
    pub kind: String,
    pub target: String,
    pub effective_at: Option<String>,
    pub grace_seconds: Option<i64>,
    pub max_age_seconds: Option<i64>,
    pub reason: Option<String>,
    pub nonce: String,
    pub expires_at: String,
    pub key_id: String,
}

/// The bytes an authority signs: the canonical JSON (keys sorted) of the document without its
/// `signature`, as one text field of the `vsql_vault.key_directive` domain.
pub fn message(doc: &serde_json::Value) -> Vec<u8> {
    let mut unsigned = doc.clone();
    if let Some(m) = unsigned.as_object_mut() {
        m.remove("signature");
    }
    Encoder::new(DOMAIN)
        .field("document", &Value::Text(canonical_json(&unsigned)))
        .bytes()
        .to_vec()
}

/// A fresh random nonce: 16 bytes as 32 hex characters.
pub fn random_nonce() -> Result<String, keys::KeyError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| keys::KeyError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Signs `doc` (an object): sets `key_id` and `signature` (hex).
pub fn sign(doc: &mut serde_json::Value, key: &SigningKey) -> Result<(), DocError> {
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| DocError::Malformed("the document must be a JSON object".into()))?;
    obj.remove("signature");
    obj.insert("key_id".into(), keys::key_id(&key.verifying_key()).into());
    let sig = keys::sign(key, &message(doc));
    doc["signature"] = hex::encode(sig).into();
    Ok(())
}

fn text<'a>(doc: &'a serde_json::Value, name: &str) -> Result<Option<&'a str>, DocError> {
    match doc.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(DocError::Malformed(format!("{name} must be a string"))),
    }
}

fn seconds(doc: &serde_json::Value, name: &str) -> Result<Option<i64>, DocError> {
    match doc.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => {
            v.as_i64().filter(|n| *n >= 0).map(Some).ok_or_else(|| {
                DocError::Malformed(format!("{name} must be a non-negative integer"))
            })
        }
    }
}

const FIELDS: &[&str] = &[
    "format",
    "kind",
    "target",
    "effective_at",
    "grace_seconds",
    "max_age_seconds",
    "reason",
    "nonce",
    "expires_at",
    "key_id",
    "signature",
];

/// Checks the document's shape, then its signature with the trusted key it names. The
/// directive's own rules (kind, target, max_age) are `governance::validate`'s; expiry and
/// replay are the database's (its clock, its table of nonces).
pub fn verify(
    doc: &serde_json::Value,
    trusted: &[VerifyingKey],
) -> Result<SignedDirective, DocError> {
    let obj = doc
        .as_object()
        .ok_or_else(|| DocError::Malformed("the document must be a JSON object".into()))?;
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(DocError::Malformed(format!("unknown field {k:?}")));
    }
    let need = |name: &str| -> Result<&str, DocError> {
        text(doc, name)?.ok_or_else(|| DocError::Malformed(format!("{name} is missing")))
    };
    if need("format")? != FORMAT {
        return Err(DocError::Malformed(format!("format must be {FORMAT:?}")));
    }
    let nonce = need("nonce")?;
    if !(NONCE_MIN..=NONCE_MAX).contains(&nonce.len()) || nonce.chars().any(char::is_control) {
        return Err(DocError::Malformed(format!(
            "nonce must be {NONCE_MIN} to {NONCE_MAX} bytes without control characters"
        )));
    }
    let key_id = need("key_id")?;
    let signature = hex::decode(need("signature")?)
        .map_err(|_| DocError::Malformed("signature must be hex".into()))?;
    let public = trusted
        .iter()
        .find(|k| keys::key_id(k) == key_id)
        .ok_or_else(|| DocError::UnknownKey(key_id.to_owned()))?;
    if !keys::verify(public, &message(doc), &signature) {
        return Err(DocError::BadSignature(key_id.to_owned()));
    }
    Ok(SignedDirective {
        kind: need("kind")?.to_owned(),
        target: need("target")?.to_owned(),
        effective_at: text(doc, "effective_at")?.map(str::to_owned),
        grace_seconds: seconds(doc, "grace_seconds")?,
        max_age_seconds: seconds(doc, "max_age_seconds")?,
        reason: text(doc, "reason")?.map(str::to_owned),
        nonce: nonce.to_owned(),
        expires_at: need("expires_at")?.to_owned(),
        key_id: key_id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn doc() -> serde_json::Value {
        serde_json::json!({
            "format": FORMAT, "kind": "retire-key", "target": "kms://payments/*",
            "effective_at": "2026-12-01T00:00:00Z", "grace_seconds": 86400,
            "reason": "KMS migration", "nonce": "0123456789abcdef0123456789abcdef",
            "expires_at": "2026-12-31T00:00:00Z",
        })
    }

    #[test]
    fn a_signed_document_verifies_and_yields_its_fields() {
        let mut d = doc();
        sign(&mut d, &key(1)).unwrap();
        let v = verify(&d, &[key(2).verifying_key(), key(1).verifying_key()]).unwrap();
        assert_eq!(v.kind, "retire-key");
        assert_eq!(v.target, "kms://payments/*");
        assert_eq!(v.grace_seconds, Some(86400));
        assert_eq!(v.max_age_seconds, None);
        assert_eq!(v.key_id, keys::key_id(&key(1).verifying_key()));
    }

    #[test]
    fn tampering_an_unknown_key_and_bad_shapes_are_refused() {
        let mut d = doc();
        sign(&mut d, &key(1)).unwrap();
        let mut t = d.clone();
        t["target"] = "kms://billing/*".into();
        assert!(matches!(
            verify(&t, &[key(1).verifying_key()]),
            Err(DocError::BadSignature(_))
        ));
        assert!(matches!(
            verify(&d, &[key(2).verifying_key()]),
            Err(DocError::UnknownKey(_))
        ));
        let mut extra = d.clone();
        extra["admin"] = true.into();
        assert_eq!(
            verify(&extra, &[key(1).verifying_key()])
                .unwrap_err()
                .sqlstate(),
            "22023"
        );
        let mut short = doc();
        short["nonce"] = "abc".into();
        sign(&mut short, &key(1)).unwrap();
        assert!(verify(&short, &[key(1).verifying_key()]).is_err());
        let mut neg = doc();
        neg["grace_seconds"] = (-1).into();
        sign(&mut neg, &key(1)).unwrap();
        assert!(verify(&neg, &[key(1).verifying_key()]).is_err());
        assert!(verify(&serde_json::json!([1]), &[]).is_err());
    }

    #[test]
    fn the_signed_bytes_do_not_depend_on_key_order() {
        let a = serde_json::json!({"b": 1, "a": {"d": 2, "c": 3}});
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a": {"c": 3, "d": 2}, "b": 1}"#).unwrap();
        assert_eq!(message(&a), message(&b));
    }
}
