//! The replication stream consumer: `stream::Reader::feed`, as `vsql-vault decrypt` drives it.
//!
//! The input is a stream (one JSON line per message). It is checked twice:
//!
//! 1. as it is, by a Reader holding the fixed KEK ring and the fixed verifying key, exactly the
//!    way the offline tool consumes an untrusted stream (stop at the first fault);
//! 2. with the harness acting as an honest producer that holds the signing key: each line that
//!    parses is re-signed before it is fed, so the fuzzer also reaches what lies behind the
//!    signature check (session replay, slot, sequence, chain link, DEK unwrap, AES-GCM open, the
//!    JSON array of change records and its Merkle root). In that mode an empty `wrapped_dek` is
//!    filled with a fresh wrap of a fixed DEK, a `ciphertext` that is not hex is taken as the
//!    plaintext and sealed, and an empty `merkle_root` or `prev` is computed.
#![no_main]

use fixtures::stream_harness::{as_is, signed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The tool reads lines through `BufRead::lines`, which refuses invalid UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    as_is(text);
    signed(text);
});
