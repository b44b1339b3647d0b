//! The offline audit verifier: export rows and checkpoint lines parsed with serde_json into
//! `chain::ExportRow` / `chain::Checkpoint`, then `chain::Verifier`, the way `vsql-vault verify`
//! does it (checkpoints of tables not exported are dropped, rows sorted by table, chain, seq),
//! once for a whole-table export and once for a partial one.
//!
//! Input: one JSON object per line; a line that parses as an export row is a row, else one that
//! parses as a checkpoint is a checkpoint, else it is skipped (the tool would refuse the file).
//! To get past the hashes and the signature, the harness acts as the database for lines that ask
//! for it: after the sort, a row past seq 1 whose `prev_hash` is all zeros is linked to the row
//! before it in its chain, a row whose `row_hash` is all zeros gets its real hash, and a
//! checkpoint whose `signature` is empty is signed with the fixed key.
#![no_main]

use fixtures::{signing_key, verifying_key};
use libfuzzer_sys::fuzz_target;
use vsql_vault_core::chain::{row_hash, Checkpoint, ExportRow, Verifier};
use vsql_vault_core::keys;

fn verify(rows: &[ExportRow], checkpoints: &[Checkpoint], partial: bool) {
    let exported: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.table.as_str()).collect();
    let checkpoints: Vec<Checkpoint> = checkpoints
        .iter()
        .filter(|c| exported.contains(c.table.as_str()))
        .cloned()
        .collect();
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| (&a.table, a.chain, a.seq).cmp(&(&b.table, b.chain, b.seq)));
    // The harness as the database: complete links and hashes the input left at zero.
    for i in 0..rows.len() {
        if i > 0
            && rows[i].seq != 1
            && rows[i].prev_hash == [0; 32]
            && (&rows[i - 1].table, rows[i - 1].chain) == (&rows[i].table, rows[i].chain)
        {
            rows[i].prev_hash = rows[i - 1].row_hash;
        }
        let r = &mut rows[i];
        if r.row_hash == [0; 32] {
            r.row_hash = row_hash(&r.table, r.chain, r.seq, &r.prev_hash, &r.columns);
        }
    }
    let mut v = Verifier::with_partial(checkpoints, &[verifying_key()], partial);
    rows.iter().for_each(|r| v.push(r));
    for r in v.finish() {
        // What the tool prints.
        let _ = format!(
            "{} chain {:?} {:?} {} {}",
            r.table, r.chain, r.first_bad_seq, r.ok, r.detail
        );
        // A chain fails at a sequence number; rows without chain fields fail as such.
        match r.chain {
            Some(_) => assert_eq!(r.ok, r.first_bad_seq.is_none()),
            None => assert!(!r.ok && r.first_bad_seq.is_none()),
        }
        let _ = serde_json::to_string(&r);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut rows = Vec::new();
    let mut checkpoints = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Ok(row) = serde_json::from_str::<ExportRow>(line) {
            // Export rows survive a JSON round trip unchanged.
            let again: ExportRow =
                serde_json::from_str(&serde_json::to_string(&row).expect("serialize row"))
                    .expect("reparse row");
            assert_eq!(again, row);
            rows.push(row);
        } else if let Ok(mut cp) = serde_json::from_str::<Checkpoint>(line) {
            if cp.signature.is_empty() {
                let msg = Checkpoint::message(
                    &cp.table,
                    cp.chain,
                    cp.seq,
                    &cp.head_hash,
                    cp.signed_at,
                    &cp.key_id,
                );
                cp.signature = hex::encode(keys::sign(signing_key(), &msg));
            }
            checkpoints.push(cp);
        }
    }
    verify(&rows, &checkpoints, false);
    verify(&rows, &checkpoints, true);
});
