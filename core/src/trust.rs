//! The chain of trust of the signing keys: every key registered after the first is vouched for
//! by a rotation statement signed with an earlier trusted key, so a key that did not come from
//! the vault (a row added to `vault.signing_keys` behind the triggers' back) is not trusted by
//! in-database verification. The offline verifier does not use this: it takes its public keys
//! from the auditor only.

use crate::canonical::{Encoder, Value};
use crate::keys::{self, VerifyingKey};
use std::collections::BTreeMap;

pub const ROTATION_DOMAIN: &str = "vsql_vault.key_rotation";

/// The bytes the previous key signs to vouch for a new key (docs/audit-format.md section 4).
pub fn rotation_message(
    previous_key_id: &str,
    key_id: &str,
    public_key: &[u8],
    source: &str,
    signed_at: i64,
) -> Vec<u8> {
    Encoder::new(ROTATION_DOMAIN)
        .field("previous_key_id", &Value::Text(previous_key_id.to_owned()))
        .field("key_id", &Value::Text(key_id.to_owned()))
        .field("public_key", &Value::Bytes(public_key.to_vec()))
        .field("source", &Value::Text(source.to_owned()))
        .field("signed_at", &Value::Timestamp(signed_at))
        .bytes()
        .to_vec()
}

/// One registered key, in the order of its table's chain.
#[derive(Debug, Clone, Default)]
pub struct KeyRecord {
    pub key_id: String,
    /// Hex.
    pub public_key: String,
    pub source: String,
    /// Whether the row is intact in its table's chain (false for a row added with the triggers
    /// off, or whose hash no longer matches).
    pub chained: bool,
    pub previous_key_id: Option<String>,
    pub signed_at: Option<i64>,
    /// Hex; the previous key's signature over `rotation_message`.
    pub signature: Option<String>,
}

/// Which keys verification may use, and why the others are refused.
#[derive(Debug, Default)]
pub struct KeyTrust {
    /// Keys trusted without a statement: those registered before the first rotation statement
    /// (the first key of an install, and the keys of a 0.1.0 install that was upgraded).
    pub roots: Vec<String>,
    pub trusted: BTreeMap<String, VerifyingKey>,
    /// (key id, reason).
    pub untrusted: Vec<(String, String)>,
}

impl KeyTrust {
    /// One line for a verification report: the trust roots, then any refused key.
    pub fn summary(&self) -> String {
        let mut s = format!("trust root: {}", self.roots.join(", "));
        if self.roots.is_empty() {
            s = "no trust root yet: no key is registered".into();
        }
        for (id, why) in &self.untrusted {
            s.push_str(&format!("; key {id} is not trusted: {why}"));
        }
        s
    }
}

/// Walks the records in chain order: the leading records without a statement are the roots; every
/// later one must carry a valid statement signed by a key already trusted.
pub fn establish(records: &[KeyRecord]) -> KeyTrust {
    let mut trust = KeyTrust::default();
    let mut statements_seen = false;
    for r in records {
        if !r.chained {
            trust.untrusted.push((
                r.key_id.clone(),
                "its row is not part of vault.signing_keys' chain (added behind the triggers' back?)"
                    .into(),
            ));
            continue;
        }
        let public = match keys::parse_public(&r.public_key) {
            Ok(p) if keys::key_id(&p) == r.key_id => p,
            Ok(_) => {
                trust
                    .untrusted
                    .push((r.key_id.clone(), "its id is not its public key's".into()));
                continue;
            }
            Err(e) => {
                trust.untrusted.push((r.key_id.clone(), e.to_string()));
                continue;
            }
        };
        match vouched(&trust, r, &public) {
            Vouch::Root if !statements_seen => {
                trust.roots.push(r.key_id.clone());
                trust.trusted.insert(r.key_id.clone(), public);
            }
            Vouch::Root => trust.untrusted.push((
                r.key_id.clone(),
                "registered without a rotation statement signed by the previous key".into(),
            )),
            Vouch::Signed => {
                statements_seen = true;
                trust.trusted.insert(r.key_id.clone(), public);
            }
            Vouch::Bad(why) => {
                statements_seen = true;
                trust.untrusted.push((r.key_id.clone(), why));
            }
        }
    }
    trust
}

enum Vouch {
    Root,
    Signed,
    Bad(String),
}

fn vouched(trust: &KeyTrust, r: &KeyRecord, public: &VerifyingKey) -> Vouch {
    let (Some(prev), Some(at), Some(sig)) = (&r.previous_key_id, r.signed_at, &r.signature) else {
        return Vouch::Root;
    };
    let Some(prev_key) = trust.trusted.get(prev) else {
        return Vouch::Bad(format!(
            "its rotation statement names key {prev}, which is not trusted"
        ));
    };
    let msg = rotation_message(prev, &r.key_id, public.as_bytes(), &r.source, at);
    match hex::decode(sig) {
        Ok(sig) if keys::verify(prev_key, &msg, &sig) => Vouch::Signed,
        _ => Vouch::Bad(format!(
            "its rotation statement does not verify with key {prev}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn record(key: &SigningKey, previous: Option<&SigningKey>, at: i64) -> KeyRecord {
        let public = key.verifying_key();
        let id = keys::key_id(&public);
        let mut r = KeyRecord {
            key_id: id.clone(),
            public_key: hex::encode(public.as_bytes()),
            source: "generated".into(),
            chained: true,
            ..KeyRecord::default()
        };
        if let Some(p) = previous {
            let pid = keys::key_id(&p.verifying_key());
            let msg = rotation_message(&pid, &id, public.as_bytes(), "generated", at);
            r.previous_key_id = Some(pid);
            r.signed_at = Some(at);
            r.signature = Some(hex::encode(keys::sign(p, &msg)));
        }
        r
    }

    #[test]
    fn rotations_extend_trust_and_strangers_do_not() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let c = SigningKey::from_bytes(&[3; 32]);
        let rogue = SigningKey::from_bytes(&[4; 32]);
        let id = |k: &SigningKey| keys::key_id(&k.verifying_key());
        // An old install's two keys are roots; b vouches for c.
        let mut records = vec![
            record(&a, None, 0),
            record(&b, None, 0),
            record(&c, Some(&b), 5),
        ];
        let t = establish(&records);
        assert_eq!(t.roots, vec![id(&a), id(&b)]);
        assert!(t.trusted.contains_key(&id(&c)) && t.untrusted.is_empty());
        assert!(t.summary().starts_with("trust root: "));
        // After a statement, a key without one is refused; so is one added off the chain, one
        // vouched for by itself, and one whose statement was altered.
        records.push(record(&rogue, None, 0));
        let mut off_chain = record(&rogue, Some(&c), 6);
        off_chain.chained = false;
        records.push(off_chain);
        records.push(record(&rogue, Some(&rogue), 7));
        let mut altered = record(&rogue, Some(&c), 8);
        altered.signed_at = Some(9);
        records.push(altered);
        let t = establish(&records);
        assert!(!t.trusted.contains_key(&id(&rogue)));
        assert_eq!(t.untrusted.len(), 4, "{:?}", t.untrusted);
        assert!(t.summary().contains("not trusted"));
    }
}
