//! Known-answer tests: the vectors under `tests/vectors/` are what documentation and other
//! implementations check themselves against, so the encoder must keep producing exactly them.

use vsql_vault_core::canonical::{encode, Value};

#[derive(serde::Deserialize)]
struct Vector {
    domain: String,
    fields: Vec<(String, Value)>,
    canonical_hex: String,
    sha256_hex: String,
}

#[test]
fn canonical_vectors() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/canonical_v1.json"
    );
    let text = std::fs::read_to_string(path).expect("vector file");
    let vectors: Vec<Vector> = serde_json::from_str(&text).expect("vector json");
    assert!(!vectors.is_empty());
    for v in vectors {
        let e = encode(&v.domain, &v.fields);
        assert_eq!(
            hex::encode(e.bytes()),
            v.canonical_hex,
            "bytes of {}",
            v.domain
        );
        assert_eq!(
            hex::encode(e.sha256()),
            v.sha256_hex,
            "hash of {}",
            v.domain
        );
    }
}

/// A key directive document signed by the authority key of seed 32 × 0x07: the signed bytes and
/// the (deterministic) Ed25519 signature are fixed (docs/key-governance.md).
#[test]
fn key_directive_vector() {
    use vsql_vault_core::directive_doc;
    use vsql_vault_core::keys;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/key_directive_v1.json"
    );
    let text = std::fs::read_to_string(path).expect("vector file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("vector json");
    let seed = hex::decode(v["authority_seed_hex"].as_str().unwrap()).unwrap();
    let key = keys::decode_file("vector", hex::encode(&seed).as_bytes()).unwrap();
    assert_eq!(
        hex::encode(key.verifying_key().as_bytes()),
        v["authority_public_key_hex"].as_str().unwrap()
    );
    let signed = &v["signed_document"];
    assert_eq!(
        hex::encode(directive_doc::message(signed)),
        v["signed_bytes_hex"].as_str().unwrap()
    );
    let mut resigned = v["unsigned_document"].clone();
    directive_doc::sign(&mut resigned, &key).unwrap();
    assert_eq!(
        &resigned, signed,
        "signing the unsigned document gives the vector"
    );
    let d = directive_doc::verify(signed, &[key.verifying_key()]).unwrap();
    assert_eq!(d.target, "kms://payments/*");
}

/// The replication stream's format-2 lines (issue 16, items 7 and 8): a session line naming its
/// source and where the server resumed, and a batch naming its commit position, both signed by
/// the key of seed 32 × 0x07. The signed bytes and the (deterministic) signatures are fixed.
#[test]
fn stream_v2_vectors() {
    use ed25519_dalek::SigningKey;
    use vsql_vault_core::keys;
    use vsql_vault_core::stream::Line;
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/stream_v2.json"
    );
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let text = std::fs::read_to_string(path).expect("vector file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("vector json");
    for (line, bytes) in [
        ("session_line", "session_signed_bytes_hex"),
        ("batch_line", "batch_signed_bytes_hex"),
    ] {
        let parsed: Line = serde_json::from_value(v[line].clone()).expect("a stream line");
        let (msg, sig) = match &parsed {
            Line::Session(s) => (s.message(), s.signature.clone()),
            Line::Batch(b) => (b.message(), b.signature.clone()),
        };
        assert_eq!(hex::encode(&msg), v[bytes].as_str().unwrap(), "{line}");
        assert_eq!(hex::encode(keys::sign(&key, &msg)), sig, "{line}");
        // The line reads back to the same JSON (no field lost or added).
        assert_eq!(serde_json::to_value(&parsed).unwrap(), v[line], "{line}");
    }
}
