//! The input rules of the storage API (`rules::*`): every text validator on the input and on each
//! of its lines, and the numeric ones on integers taken from the input's first bytes. Each
//! refusal must map to a SQLSTATE and print.
#![no_main]

use fixtures::be_i64;
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::rules::{self, InputError, Limits};

fn report(r: Result<(), InputError>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            let state = e.sqlstate();
            assert!(matches!(state, "22004" | "22023" | "54000"), "{state}");
            let _ = e.to_string();
            false
        }
    }
}

fn texts(s: &str) {
    if report(rules::purpose(s)) {
        assert!(!s.is_empty() && s.len() <= rules::PURPOSE_MAX_LEN);
    }
    assert_eq!(rules::purpose(s).is_ok(), rules::policy_name(s).is_ok());
    if report(rules::external_id(s)) {
        assert!(!s.is_empty() && s.len() <= rules::EXTERNAL_ID_MAX_BYTES);
    }
    if report(rules::metadata(s)) {
        assert!(s.trim_start().starts_with('{'));
    }
    if report(rules::purge_method(s)) {
        assert!(rules::PURGE_METHODS.contains(&s));
    }
    report(rules::description(Some(s)));
    let _ = rules::required(Some(s), "x");
}

fuzz_target!(|data: &[u8]| {
    let a = be_i64(data);
    let b = be_i64(data.get(8..).unwrap_or_default());
    let (max, ttl) = ((a >> 32) as i32, a as i32);
    report(rules::retention_days(max, ttl));
    report(rules::max_retrievals(Some((b >> 32) as i32)));
    report(rules::max_retrievals(None));
    report(rules::description(None));
    report(rules::required(None::<()>, "x"));
    let limits = Limits {
        max_value_bytes: (b as u32 as usize) % 8192,
    };
    report(rules::encrypted_value(data, limits));

    let text = String::from_utf8_lossy(data);
    texts(&text);
    for line in text.lines() {
        texts(line);
    }
});
