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
