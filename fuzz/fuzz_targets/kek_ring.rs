//! The KEK file: `envelope::KekRing::parse` on arbitrary text (`vsql-vault decrypt --kek-file`
//! reads it with `read_to_string`, so only UTF-8 reaches the parser), then every accessor, and
//! an unwrap of a fixed wrapped key with each version the file names, and a wrap/unwrap round trip
//! under the active version.
//!
//! This target found that a file naming one version twice was accepted, and then sealed under one
//! key and unwrapped with the other (fuzz/artifacts-found/kek_ring/, fixed in the core since):
//! it checks that a parsed ring has distinct ids and always round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsql_vault_core::envelope::{self, Kek, KekRing};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match KekRing::parse("fuzz.kek", text) {
        Ok(ring) => {
            let (active, _) = ring.active();
            let active = active.to_owned();
            let ids = ring.ids();
            assert!(!ids.is_empty(), "a parsed ring has a version");
            assert_eq!(
                ids.last(),
                Some(&active),
                "the last line is the active version"
            );
            for id in &ids {
                assert!(ring.get(id).is_ok(), "every listed version is found");
            }
            let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len();
            assert_eq!(distinct, ids.len(), "a parsed ring names each version once");
            let _ = ring.get("no such version");
            // A wrapped key that matches nothing in the ring: unwrap must refuse, not panic.
            let kek = Kek::File(ring);
            for id in kek.ids() {
                assert!(kek.unwrap(&id, "s", &[0u8; 60]).is_err());
            }
            // And the ring wraps and unwraps with its active version.
            let dek = fixtures::fixed_key(0x44);
            if let Ok((id, wrapped)) = kek.wrap("s", &dek) {
                assert_eq!(id, active);
                let back = kek
                    .unwrap(&id, "s", &wrapped)
                    .expect("wrap/unwrap round trip");
                assert_eq!(*back, *dek);
                let _ = envelope::EnvelopeError::Unwrap(id).to_string();
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
