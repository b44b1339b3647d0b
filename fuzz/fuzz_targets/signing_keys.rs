//! Key material from files and flags: `keys::decode_file` (the signing key file's bytes) and
//! `keys::parse_public` (a `--public-key` hex argument), then `keys::verify` of an arbitrary
//! signature over arbitrary bytes with whatever key parsed.
//!
//! Input layout: `key text \n signature hex \n message` (the message keeps further newlines).
#![no_main]

use fixtures::{split_n, verifying_key};
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::keys;

fuzz_target!(|data: &[u8]| {
    let parts = split_n(data, b'\n', 3);
    let (key_text, sig_text, message) = (parts[0], parts[1], parts[2]);

    // The whole input and its first line as a key file.
    for contents in [data, key_text] {
        match keys::decode_file("fuzz.key", contents) {
            Ok(k) => {
                let file = keys::encode_file(&k);
                let back = keys::decode_file("fuzz.key", file.as_bytes()).expect("round trip");
                assert_eq!(back.to_bytes(), k.to_bytes());
                let sig = keys::sign(&k, message);
                assert!(keys::verify(&k.verifying_key(), message, &sig));
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }

    let sig =
        hex::decode(String::from_utf8_lossy(sig_text).trim()).unwrap_or_else(|_| sig_text.to_vec());
    let _ = keys::verify(&verifying_key(), message, &sig);
    if let Ok(text) = std::str::from_utf8(key_text) {
        match keys::parse_public(text) {
            Ok(public) => {
                assert_eq!(keys::key_id(&public).len(), 16);
                let _ = keys::verify(&public, message, &sig);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
