//! The worked examples of docs/audit-format.md section 10, computed here: every hex string the
//! document shows must be what the core produces, so the document cannot drift from the code.
//! `VSQL_VAULT_PRINT_EXAMPLES=1 cargo test -p vsql_vault_core --test worked_examples -- --nocapture`
//! prints them.

use ed25519_dalek::SigningKey;
use vsql_vault_core::canonical::{sha256, Encoder, Value};
use vsql_vault_core::chain::{row_hash, Checkpoint, ROW_DOMAIN};
use vsql_vault_core::keys;
use vsql_vault_core::merkle;
use vsql_vault_core::purge::{root_message, EntrySnapshot, PurgeStatement};
use vsql_vault_core::trust;

/// Hex in lines of 64 characters, as the document prints long values.
fn wrapped(bytes: &[u8]) -> String {
    hex::encode(bytes)
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap().to_owned())
        .collect::<Vec<_>>()
        .join("\n")
}

fn examples() -> Vec<(&'static str, String)> {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let public = key.verifying_key();
    let key_id = keys::key_id(&public);
    let mut out = vec![
        ("public key", hex::encode(public.as_bytes())),
        ("key id", key_id.clone()),
    ];

    // A row: its own fields, then its columns (NULL ones left out).
    let table = "public.payments/1";
    let columns = vec![
        ("id".to_string(), Value::Int(1)),
        ("payer".to_string(), Value::Text("acme".into())),
        ("memo".to_string(), Value::Null),
        ("paid".to_string(), Value::Bool(true)),
        ("at".to_string(), Value::Timestamp(850_000_000_000_000)),
        ("blob".to_string(), Value::Bytes(vec![0xde, 0xad])),
    ];
    let mut encoder = Encoder::new(ROW_DOMAIN)
        .field("table", &Value::Text(table.into()))
        .field("chain", &Value::Int(0))
        .field("seq", &Value::Int(1))
        .field("prev_hash", &Value::Bytes(vec![0; 32]));
    for (name, value) in columns.iter().filter(|(_, v)| *v != Value::Null) {
        encoder = encoder.field(name, value);
    }
    let hash = row_hash(table, 0, 1, &[0; 32], &columns);
    assert_eq!(hash, sha256(encoder.bytes()));
    out.push(("row bytes", wrapped(encoder.bytes())));
    out.push(("row hash", hex::encode(hash)));

    // A checkpoint of that row.
    let signed_at = 850_000_000_500_000;
    let message = Checkpoint::message(table, 0, 1, &hash, signed_at, &key_id);
    out.push(("checkpoint message", wrapped(&message)));
    out.push(("checkpoint signature", wrapped(&keys::sign(&key, &message))));

    // A purge: the entry's hash, three statements, the tree, a path and the signed root.
    let entry = EntrySnapshot {
        id: 41,
        purpose: "otp".into(),
        external_id: "d1".into(),
        encrypted_value: vec![1, 2, 3],
        algorithm_hint: None,
        key_ref: Some("kms://k1".into()),
        metadata: "{}".into(),
        access_policy: "owner-only".into(),
        owner: "app_a".into(),
        created_at: 849_000_000_000_000,
        updated_at: 849_000_000_000_000,
        expires_at: 849_086_400_000_000,
    };
    let entry_bytes = Encoder::new("vsql_vault.entry")
        .field("id", &Value::Int(41))
        .field("purpose", &Value::Text("otp".into()))
        .field("external_id", &Value::Text("d1".into()))
        .field("encrypted_value", &Value::Bytes(vec![1, 2, 3]))
        .field("algorithm_hint", &Value::Null)
        .field("key_ref", &Value::Text("kms://k1".into()))
        .field("metadata", &Value::Text("{}".into()))
        .field("access_policy", &Value::Text("owner-only".into()))
        .field("owner", &Value::Text("app_a".into()))
        .field("created_at", &Value::Timestamp(849_000_000_000_000))
        .field("updated_at", &Value::Timestamp(849_000_000_000_000))
        .field("expires_at", &Value::Timestamp(849_086_400_000_000));
    assert_eq!(entry.hash(), sha256(entry_bytes.bytes()));
    out.push(("entry bytes", wrapped(entry_bytes.bytes())));
    out.push(("entry hash", hex::encode(entry.hash())));
    let statements: Vec<PurgeStatement> = ["d1", "d2", "d3"]
        .iter()
        .enumerate()
        .map(|(i, external_id)| PurgeStatement {
            purpose: "otp".into(),
            external_id: (*external_id).into(),
            owner: "app_a".into(),
            entry_id: 41 + i as i64,
            created_at: 849_000_000_000_000,
            expires_at: 849_086_400_000_000,
            max_retention_days: 7,
            default_ttl_days: 1,
            purge_method: "physical-delete".into(),
            access_policy: "owner-only".into(),
            reason: "retention expired".into(),
            purged_by: "vsql_vault retention worker".into(),
            purged_at: 849_086_401_000_000,
            entry_hash: if i == 0 { entry.hash() } else { [i as u8; 32] },
        })
        .collect();
    out.push(("statement 0 bytes", wrapped(&statements[0].encode())));
    let leaves: Vec<[u8; 32]> = statements.iter().map(PurgeStatement::leaf).collect();
    for (i, leaf) in leaves.iter().enumerate() {
        out.push((["leaf 0", "leaf 1", "leaf 2"][i], hex::encode(leaf)));
    }
    let root = merkle::root(&leaves);
    out.push(("root", hex::encode(root)));
    for (i, name) in [(0, "path of leaf 0"), (2, "path of leaf 2")] {
        let path = merkle::inclusion_path(&leaves, i);
        assert!(merkle::verify_inclusion(
            &leaves[i], i as u64, 3, &path, &root
        ));
        out.push((
            name,
            path.iter().map(hex::encode).collect::<Vec<_>>().join("\n"),
        ));
    }
    let root_msg = root_message(&root, 3, 9, 849_086_401_000_000, &key_id);
    out.push(("root message", wrapped(&root_msg)));
    out.push(("root signature", wrapped(&keys::sign(&key, &root_msg))));

    // A rotation statement: the example key vouches for the key of seed 0808...08.
    let next = SigningKey::from_bytes(&[8u8; 32]).verifying_key();
    let next_id = keys::key_id(&next);
    let rotation = trust::rotation_message(
        &key_id,
        &next_id,
        next.as_bytes(),
        "generated",
        850_000_001_000_000,
    );
    let signature = keys::sign(&key, &rotation);
    let record = trust::KeyRecord {
        key_id: next_id.clone(),
        public_key: hex::encode(next.as_bytes()),
        source: "generated".into(),
        chained: true,
        previous_key_id: Some(key_id.clone()),
        signed_at: Some(850_000_001_000_000),
        signature: Some(hex::encode(signature)),
    };
    let root_record = trust::KeyRecord {
        key_id: key_id.clone(),
        public_key: hex::encode(public.as_bytes()),
        source: "generated".into(),
        chained: true,
        ..trust::KeyRecord::default()
    };
    let verdict = trust::establish(&[root_record, record]);
    assert!(verdict.trusted.contains_key(&next_id) && verdict.untrusted.is_empty());
    out.push(("rotated public key", hex::encode(next.as_bytes())));
    out.push(("rotated key id", next_id));
    out.push(("rotation message", wrapped(&rotation)));
    out.push(("rotation signature", wrapped(&signature)));
    out
}

#[test]
fn the_documents_worked_examples_are_what_the_core_computes() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/audit-format.md"
    ))
    .expect("docs/audit-format.md");
    let print = std::env::var_os("VSQL_VAULT_PRINT_EXAMPLES").is_some();
    for (name, value) in examples() {
        if print {
            println!("{name}:\n{value}\n");
        } else {
            assert!(
                doc.contains(&value),
                "docs/audit-format.md does not show the {name}:\n{value}"
            );
        }
    }
}
