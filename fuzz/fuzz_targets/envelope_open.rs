//! The envelope primitives on attacker-shaped bytes: `envelope::unwrap_dek` (a wrapped data key
//! as a stream's session line carries it, hex-decoded) and `envelope::open` (a batch's sealed
//! change records under an arbitrary binding), with fixed keys.
//!
//! Input layout: `seq` (8 bytes, big-endian) then fields separated by `\n`:
//! `kek_id \n session \n slot \n lsn_start \n lsn_end \n payload` (the payload keeps any further
//! newlines). The payload is tried as a wrapped key and as a ciphertext, and it also checks the
//! round trips (wrap then unwrap, seal then open) under the fuzzed binding.
#![no_main]

use fixtures::{be_i64, fixed_key, kek_ring, split_n};
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::envelope::{self, BatchBinding};

fuzz_target!(|data: &[u8]| {
    let seq = be_i64(data);
    let rest = data.get(8..).unwrap_or_default();
    let parts = split_n(rest, b'\n', 6);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (kek_id, session, slot, lsn_start, lsn_end) = (
        text(parts[0]),
        text(parts[1]),
        text(parts[2]),
        text(parts[3]),
        text(parts[4]),
    );
    let payload = parts[5];

    // Unwrap an arbitrary wrapped key with each version of the fixed ring.
    let ring = kek_ring();
    for id in ring.ids() {
        let kek = ring.get(&id).expect("listed");
        let _ = envelope::unwrap_dek(kek, &kek_id, &session, payload);
        let _ = envelope::unwrap_dek(kek, &id, &session, payload);
    }
    // And through the ring, by the fuzzed version id (unknown ids are refused).
    let _ = envelope::Kek::File(ring.clone()).unwrap(&kek_id, &session, payload);

    // Open an arbitrary ciphertext under the fuzzed binding.
    let dek = fixed_key(0x44);
    let binding = BatchBinding {
        slot: &slot,
        session: &session,
        seq,
        lsn_start: &lsn_start,
        lsn_end: &lsn_end,
    };
    if let Err(e) = envelope::open(&dek, &binding, payload) {
        let _ = e.to_string();
    }

    // Round trips under the fuzzed binding.
    let sealed = envelope::seal(&dek, &binding, payload).expect("seal");
    assert_eq!(
        &envelope::open(&dek, &binding, &sealed).expect("open what was sealed")[..],
        payload
    );
    let other = BatchBinding {
        seq: seq.wrapping_add(1),
        ..binding.clone()
    };
    assert!(
        envelope::open(&dek, &other, &sealed).is_err(),
        "nonce/AAD bind the seq"
    );
    let (_, kek) = ring.active();
    let wrapped = envelope::wrap_dek(kek, &kek_id, &session, &dek).expect("wrap");
    assert_eq!(
        *envelope::unwrap_dek(kek, &kek_id, &session, &wrapped).expect("unwrap"),
        *dek
    );
});
