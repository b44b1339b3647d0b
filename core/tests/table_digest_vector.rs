//! The table digest's known-answer vector (tests/vectors/table_digest_v1.json): every key and row
//! encoding, the order, the root and the bucket roots, recomputed from the rows' values.

use vsql_vault_core::digest::{self, ExportLine};
use vsql_vault_core::merkle;

fn vector() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/vectors/table_digest_v1.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn hex_list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_table_digest_vector_holds() {
    let v = vector();
    let rows: Vec<ExportLine> = serde_json::from_value(v["rows"].clone()).unwrap();
    let bytes: Vec<(Vec<u8>, Vec<u8>)> = rows.iter().map(|r| r.bytes()).collect();
    let keys: Vec<String> = bytes.iter().map(|(k, _)| hex::encode(k)).collect();
    let encoded: Vec<String> = bytes.iter().map(|(_, r)| hex::encode(r)).collect();
    if std::env::var("PRINT_VECTOR").is_ok() {
        let text: String = rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        let d = digest::digest_export(&text, 4).unwrap();
        println!(
            "{}",
            serde_json::json!({"key_bytes": keys, "row_bytes": encoded, "root": hex::encode(d.root()),
            "ranges_4": d.ranges().iter().map(|r| serde_json::json!({"bucket": r.bucket, "rows": r.rows, "root": hex::encode(r.root)})).collect::<Vec<_>>()})
        );
    }
    assert_eq!(keys, hex_list(&v["key_bytes"]));
    assert_eq!(encoded, hex_list(&v["row_bytes"]));
    // The rows are listed in digest order: ascending (key bytes, row bytes).
    let mut sorted = bytes.clone();
    sorted.sort();
    assert_eq!(sorted, bytes);
    // The root is RFC 6962's over the leaves, and the export gives it in any order.
    let leaves: Vec<[u8; 32]> = bytes.iter().map(|(_, r)| merkle::leaf_hash(r)).collect();
    assert_eq!(
        hex::encode(merkle::root(&leaves)),
        v["root"].as_str().unwrap()
    );
    let reversed: String = rows
        .iter()
        .rev()
        .map(|r| serde_json::to_string(r).unwrap() + "\n")
        .collect();
    let d = digest::digest_export(&reversed, 4).unwrap();
    assert_eq!(hex::encode(d.root()), v["root"].as_str().unwrap());
    let ranges: Vec<serde_json::Value> = d
        .ranges()
        .iter()
        .map(|r| serde_json::json!({"bucket": r.bucket, "rows": r.rows, "root": hex::encode(r.root)}))
        .collect();
    assert_eq!(serde_json::Value::from(ranges), v["ranges_4"]);
    // Each bucket's root is the root over its own rows, in the same order.
    for r in d.ranges() {
        let mine: Vec<[u8; 32]> = bytes
            .iter()
            .filter(|(k, _)| digest::bucket_of(k, 4) == r.bucket)
            .map(|(_, row)| merkle::leaf_hash(row))
            .collect();
        assert_eq!(r.root, merkle::root(&mine));
    }
}
