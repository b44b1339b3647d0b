//! Signed JSON reports as `vsql-vault verify-report` checks them: the file's text, trimmed,
//! parsed as a `serde_json::Value`; `signing_key_id` and the hex `signature` read from it;
//! `canonical::report_message` over the report without its signature; then the signature checked
//! with the fixed public key.
//!
//! It also checks the property the format rests on: signing `report_message` of a report and
//! adding the signature leaves `report_message` unchanged, and the re-signed report, written out
//! and read back, still verifies.
//!
//! This target found that, with serde_json's default (inexact) float parsing, a float could change
//! between writing a report and reading it back (`12e100`), so a signed report holding one did not
//! verify (fuzz/artifacts-found/signed_report/; the core now enables `float_roundtrip`).
#![no_main]

use fixtures::{key_id, signing_key, verifying_key};
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::canonical::{canonical_json, report_message};
use vsql_vault_core::keys;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(mut report) = serde_json::from_str::<serde_json::Value>(text.trim()) else {
        return;
    };
    // As the tool does it.
    let kid = report["signing_key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let sig = hex::decode(report["signature"].as_str().unwrap_or_default()).unwrap_or_default();
    let msg = report_message(&report);
    let public = verifying_key();
    let _ = keys::key_id(&public) == kid && keys::verify(&public, &msg, &sig);

    // canonical_json is valid JSON that means the same document.
    let canon = canonical_json(&report);
    let back: serde_json::Value = serde_json::from_str(&canon).expect("canonical JSON parses");
    assert_eq!(
        canonical_json(&back),
        canon,
        "canonical JSON is a fixed point"
    );

    // Re-signed by the fixed key, the report verifies.
    if let Some(obj) = report.as_object_mut() {
        obj.insert("signing_key_id".into(), key_id().into());
        let unsigned = report_message(&report);
        let sig = keys::sign(signing_key(), &unsigned);
        report
            .as_object_mut()
            .expect("object")
            .insert("signature".into(), hex::encode(sig).into());
        let signed = report_message(&report);
        assert_eq!(signed, unsigned, "the signature is not part of the message");
        let sig = hex::decode(report["signature"].as_str().unwrap_or_default()).unwrap_or_default();
        assert!(keys::verify(&public, &signed, &sig));
        // Written as the extension writes it, read as the tool reads it.
        let file = report.to_string();
        let read: serde_json::Value = serde_json::from_str(file.trim()).expect("reparse");
        let sig = hex::decode(read["signature"].as_str().unwrap_or_default()).unwrap_or_default();
        assert!(
            keys::verify(&public, &report_message(&read), &sig),
            "a signed report verifies after a write and a read"
        );
    }
});
