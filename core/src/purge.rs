//! Purge proofs: what existed, when it was destroyed, under which policy, signed.
//!
//! Each proof is a leaf of its sweep's Merkle tree; the sweep signs the root once. A proof line
//! carries everything needed to check it with the public key alone.

use crate::canonical::{Encoder, Value};
use crate::keys;
use crate::merkle;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

pub const ENTRY_DOMAIN: &str = "vsql_vault.entry";
pub const PROOF_DOMAIN: &str = "vsql_vault.purge";
pub const ROOT_DOMAIN: &str = "vsql_vault.purge_root";

/// The entry as it was, before it was destroyed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntrySnapshot {
    pub id: i64,
    pub purpose: String,
    pub external_id: String,
    #[serde(with = "crate::canonical::hex_bytes")]
    pub encrypted_value: Vec<u8>,
    pub algorithm_hint: Option<String>,
    pub key_ref: Option<String>,
    pub metadata: String,
    pub access_policy: String,
    pub owner: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub expires_at: i64,
}

fn opt(v: &Option<String>) -> Value {
    v.as_ref().map_or(Value::Null, |s| Value::Text(s.clone()))
}

impl EntrySnapshot {
    /// SHA-256 of the canonical encoding of the entry, ciphertext included.
    pub fn hash(&self) -> [u8; 32] {
        Encoder::new(ENTRY_DOMAIN)
            .field("id", &Value::Int(self.id))
            .field("purpose", &Value::Text(self.purpose.clone()))
            .field("external_id", &Value::Text(self.external_id.clone()))
            .field(
                "encrypted_value",
                &Value::Bytes(self.encrypted_value.clone()),
            )
            .field("algorithm_hint", &opt(&self.algorithm_hint))
            .field("key_ref", &opt(&self.key_ref))
            .field("metadata", &Value::Text(self.metadata.clone()))
            .field("access_policy", &Value::Text(self.access_policy.clone()))
            .field("owner", &Value::Text(self.owner.clone()))
            .field("created_at", &Value::Timestamp(self.created_at))
            .field("updated_at", &Value::Timestamp(self.updated_at))
            .field("expires_at", &Value::Timestamp(self.expires_at))
            .sha256()
    }
}

/// The statement a purge proof makes. Times are microseconds since 2000-01-01 UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurgeStatement {
    pub purpose: String,
    pub external_id: String,
    pub owner: String,
    pub entry_id: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub max_retention_days: i32,
    pub default_ttl_days: i32,
    pub purge_method: String,
    pub access_policy: String,
    pub reason: String,
    pub purged_by: String,
    pub purged_at: i64,
    #[serde(with = "crate::canonical::hex32")]
    pub entry_hash: [u8; 32],
}

impl PurgeStatement {
    pub fn encode(&self) -> Vec<u8> {
        Encoder::new(PROOF_DOMAIN)
            .field("purpose", &Value::Text(self.purpose.clone()))
            .field("external_id", &Value::Text(self.external_id.clone()))
            .field("owner", &Value::Text(self.owner.clone()))
            .field("entry_id", &Value::Int(self.entry_id))
            .field("created_at", &Value::Timestamp(self.created_at))
            .field("expires_at", &Value::Timestamp(self.expires_at))
            .field(
                "max_retention_days",
                &Value::Int(i64::from(self.max_retention_days)),
            )
            .field(
                "default_ttl_days",
                &Value::Int(i64::from(self.default_ttl_days)),
            )
            .field("purge_method", &Value::Text(self.purge_method.clone()))
            .field("access_policy", &Value::Text(self.access_policy.clone()))
            .field("reason", &Value::Text(self.reason.clone()))
            .field("purged_by", &Value::Text(self.purged_by.clone()))
            .field("purged_at", &Value::Timestamp(self.purged_at))
            .field("entry_hash", &Value::Bytes(self.entry_hash.to_vec()))
            .bytes()
            .to_vec()
    }

    pub fn leaf(&self) -> [u8; 32] {
        merkle::leaf_hash(&self.encode())
    }
}

/// The signed root of one sweep batch (or of a single manual purge: a tree of one leaf).
pub fn root_message(
    root: &[u8; 32],
    tree_size: i64,
    batch_id: i64,
    signed_at: i64,
    key_id: &str,
) -> Vec<u8> {
    Encoder::new(ROOT_DOMAIN)
        .field("root", &Value::Bytes(root.to_vec()))
        .field("tree_size", &Value::Int(tree_size))
        .field("batch_id", &Value::Int(batch_id))
        .field("signed_at", &Value::Timestamp(signed_at))
        .field("key_id", &Value::Text(key_id.to_owned()))
        .bytes()
        .to_vec()
}

/// One purge proof as exported (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurgeProof {
    pub id: i64,
    pub statement: PurgeStatement,
    pub batch_id: i64,
    pub leaf_index: i64,
    pub tree_size: i64,
    pub path: Vec<String>,
    #[serde(with = "crate::canonical::hex32")]
    pub root: [u8; 32],
    pub signed_at: i64,
    pub key_id: String,
    pub signature: String,
    /// The times the purge log shows people beside the signed ones (its `timestamptz` columns,
    /// in microseconds since 2000-01-01 UTC). Not signed: `check` requires them to equal the
    /// statement's. Exports of 0.1.0 do not carry them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub displayed: Option<DisplayedTimes>,
}

/// The purge log's `purged_at`, `created_at` and `expires_at` columns as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayedTimes {
    pub purged_at: i64,
    pub created_at: i64,
    pub expires_at: i64,
}

impl DisplayedTimes {
    /// Why the displayed times differ from the signed ones, if they do.
    pub fn disagreement(&self, st: &PurgeStatement) -> Option<String> {
        [
            ("purged_at", self.purged_at, st.purged_at),
            ("created_at", self.created_at, st.created_at),
            ("expires_at", self.expires_at, st.expires_at),
        ]
        .into_iter()
        .find(|(_, shown, signed)| shown != signed)
        .map(|(name, shown, signed)| {
            format!("the displayed {name} ({shown} us) is not the signed one ({signed} us)")
        })
    }
}

impl PurgeProof {
    /// Checks the statement's inclusion under the root and the root's signature. Returns why not.
    pub fn check(&self, keys_by_id: &dyn Fn(&str) -> Option<VerifyingKey>) -> Result<(), String> {
        let mut path = Vec::with_capacity(self.path.len());
        for p in &self.path {
            let mut h = [0u8; 32];
            hex::decode_to_slice(p, &mut h).map_err(|_| "malformed inclusion path".to_string())?;
            path.push(h);
        }
        if self.leaf_index < 0 || self.tree_size < 1 {
            return Err("malformed leaf index or tree size".into());
        }
        if !merkle::verify_inclusion(
            &self.statement.leaf(),
            self.leaf_index as u64,
            self.tree_size as u64,
            &path,
            &self.root,
        ) {
            return Err("the proof's statement is not in the signed tree (proof altered)".into());
        }
        let public = keys_by_id(&self.key_id)
            .ok_or_else(|| format!("unknown signing key {}", self.key_id))?;
        let sig = hex::decode(&self.signature).map_err(|_| "malformed signature".to_string())?;
        let msg = root_message(
            &self.root,
            self.tree_size,
            self.batch_id,
            self.signed_at,
            &self.key_id,
        );
        if !keys::verify(&public, &msg, &sig) {
            return Err("the root's signature does not verify".into());
        }
        // A person reads the displayed times: they must be the signed ones.
        match self.displayed.and_then(|d| d.disagreement(&self.statement)) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

/// One statement of a batch with its place in the batch's signed tree.
#[derive(Debug, Clone)]
pub struct ProvedLeaf {
    pub statement: PurgeStatement,
    pub leaf_index: i64,
    pub tree_size: i64,
    pub path: Vec<[u8; 32]>,
    pub root: [u8; 32],
    pub key_id: String,
    pub signature: Vec<u8>,
}

/// Builds the signed proofs of one batch of statements: one Merkle root, one signature.
pub fn prove_batch(
    statements: Vec<PurgeStatement>,
    batch_id: i64,
    signed_at: i64,
    key: &impl keys::SignEvidence,
) -> Result<Vec<ProvedLeaf>, keys::KeyError> {
    let leaves: Vec<[u8; 32]> = statements.iter().map(PurgeStatement::leaf).collect();
    let (root, paths) = merkle::root_and_paths(&leaves);
    let key_id = keys::key_id(&key.public());
    let size = leaves.len() as i64;
    let signature = key
        .sign_evidence(&root_message(&root, size, batch_id, signed_at, &key_id))?
        .to_vec();
    Ok(statements
        .into_iter()
        .zip(paths)
        .enumerate()
        .map(|(i, (statement, path))| ProvedLeaf {
            statement,
            leaf_index: i as i64,
            tree_size: size,
            path,
            root,
            key_id: key_id.clone(),
            signature: signature.clone(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement(n: i64) -> PurgeStatement {
        PurgeStatement {
            purpose: "card".into(),
            external_id: format!("e{n}"),
            owner: "app".into(),
            entry_id: n,
            created_at: 1,
            expires_at: 2,
            max_retention_days: 365,
            default_ttl_days: 90,
            purge_method: "physical-delete".into(),
            access_policy: "owner-only".into(),
            reason: "retention".into(),
            purged_by: "vsql_vault retention worker".into(),
            purged_at: 3,
            entry_hash: [7; 32],
        }
    }

    fn proofs(n: i64) -> (ed25519_dalek::SigningKey, Vec<PurgeProof>) {
        let key = keys::generate().unwrap();
        let out = prove_batch((0..n).map(statement).collect(), 9, 5, &key)
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, l)| PurgeProof {
                id: i as i64,
                statement: l.statement,
                batch_id: 9,
                leaf_index: l.leaf_index,
                tree_size: l.tree_size,
                path: l.path.iter().map(hex::encode).collect(),
                root: l.root,
                signed_at: 5,
                key_id: l.key_id,
                signature: hex::encode(l.signature),
                displayed: Some(DisplayedTimes {
                    purged_at: 3,
                    created_at: 1,
                    expires_at: 2,
                }),
            })
            .collect();
        (key, out)
    }

    #[test]
    fn every_proof_of_a_batch_verifies_alone() {
        let (key, ps) = proofs(7);
        let public = key.verifying_key();
        for p in &ps {
            assert_eq!(p.check(&|_| Some(public)), Ok(()));
            let line = serde_json::to_string(p).unwrap();
            let back: PurgeProof = serde_json::from_str(&line).unwrap();
            assert_eq!(back.check(&|_| Some(public)), Ok(()));
        }
    }

    #[test]
    fn altered_statement_path_or_signature_fails() {
        let (key, ps) = proofs(5);
        let public = key.verifying_key();
        let mut p = ps[3].clone();
        p.statement.reason = "manual".into();
        assert!(p
            .check(&|_| Some(public))
            .unwrap_err()
            .contains("not in the signed tree"));
        let mut p = ps[3].clone();
        p.path[0] = hex::encode([0u8; 32]);
        assert!(p.check(&|_| Some(public)).is_err());
        let mut p = ps[3].clone();
        p.signed_at += 1;
        assert!(p
            .check(&|_| Some(public))
            .unwrap_err()
            .contains("signature"));
        let other = keys::generate().unwrap().verifying_key();
        assert!(ps[0].check(&|_| Some(other)).is_err());
        assert!(ps[0].check(&|_| None).is_err());
    }

    #[test]
    fn a_displayed_time_that_is_not_the_signed_one_fails() {
        let (key, ps) = proofs(3);
        let public = key.verifying_key();
        for field in 0..3 {
            let mut p = ps[1].clone();
            let d = p.displayed.as_mut().unwrap();
            *[&mut d.purged_at, &mut d.created_at, &mut d.expires_at][field] += 1;
            let why = p.check(&|_| Some(public)).unwrap_err();
            assert!(why.contains("is not the signed one"), "{why}");
        }
        // An export without displayed times (0.1.0) is checked on its signed values alone.
        let mut p = ps[1].clone();
        p.displayed = None;
        let line = serde_json::to_string(&p).unwrap();
        assert!(!line.contains("displayed"));
        assert_eq!(p.check(&|_| Some(public)), Ok(()));
    }

    #[test]
    fn entry_hash_covers_the_ciphertext() {
        let e = EntrySnapshot {
            id: 1,
            purpose: "card".into(),
            external_id: "x".into(),
            encrypted_value: vec![1, 2, 3],
            algorithm_hint: None,
            key_ref: Some("k".into()),
            metadata: "{}".into(),
            access_policy: "owner-only".into(),
            owner: "app".into(),
            created_at: 1,
            updated_at: 1,
            expires_at: 2,
        };
        let mut f = e.clone();
        f.encrypted_value[0] = 9;
        assert_ne!(e.hash(), f.hash());
    }
}
