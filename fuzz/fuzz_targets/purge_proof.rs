//! Purge proofs as `vsql-vault verify-purge` checks them: each line parsed with serde_json into
//! `purge::PurgeProof`, then `PurgeProof::check` against the fixed public key (looked up by key
//! id, as the tool does).
//!
//! To reach the signature check behind the inclusion proof, the harness acts as the signer for
//! lines that ask for it: an all-zero `root` with an empty `path` becomes the statement's own
//! leaf (a tree of one), and an empty `signature` is filled with the fixed key's signature of the
//! root message. A proof so completed with the fixed key id must then verify.
#![no_main]

use fixtures::{key_id, signing_key, verifying_key};
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::keys;
use vsql_vault_core::purge::{root_message, PurgeProof};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let public = verifying_key();
    let by_id = |id: &str| (keys::key_id(&public) == id).then_some(public);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(mut p) = serde_json::from_str::<PurgeProof>(line) else {
            continue;
        };
        let _ = p.check(&by_id);
        let _ = p.statement.encode();
        let mut completed = false;
        if p.root == [0; 32] && p.path.is_empty() && p.leaf_index == 0 && p.tree_size == 1 {
            p.root = p.statement.leaf();
            completed = true;
        }
        if p.signature.is_empty() {
            let msg = root_message(&p.root, p.tree_size, p.batch_id, p.signed_at, &p.key_id);
            p.signature = hex::encode(keys::sign(signing_key(), &msg));
            let verdict = p.check(&by_id);
            if completed && p.key_id == key_id() {
                assert_eq!(verdict, Ok(()), "a completed one-leaf proof verifies");
            }
        }
        // A proof survives a JSON round trip unchanged.
        let again: PurgeProof =
            serde_json::from_str(&serde_json::to_string(&p).expect("serialize")).expect("reparse");
        assert_eq!(again, p);
    }
});
