//! Writes the seed corpus of every fuzz target under `fuzz/corpus/<target>/seed-*`: real, valid
//! inputs made with the core crate and the fixed keys of `src/lib.rs`, plus the "template"
//! inputs the harnesses complete (empty signatures, all-zero hashes, plaintext ciphertexts).
//!
//!   cargo run --manifest-path fuzz/Cargo.toml --target-dir fuzz/target/seeds --example gen_seeds
//!
//! Stream sessions use random nonces and session ids, so re-running changes some seed bytes;
//! every seed stays valid for the targets.

use fixtures::stream_harness::{as_is, signed};
use fixtures::{fixed_key, kek_ring, kek_ring_text, key_id, signing_key, verifying_key};
use serde_json::json;
use std::path::{Path, PathBuf};
use vsql_vault_core::canonical::Value;
use vsql_vault_core::chain::{row_hash, Checkpoint, ExportRow, GENESIS};
use vsql_vault_core::envelope::{self, BatchBinding, Kek};
use vsql_vault_core::keys;
use vsql_vault_core::purge::{prove_batch, PurgeProof, PurgeStatement};
use vsql_vault_core::stream::{Reader, Sealer};

fn write(dir: &Path, target: &str, name: &str, data: impl AsRef<[u8]>) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join(format!("seed-{name}")), data).unwrap();
}

fn lines(v: &[String]) -> String {
    v.iter().map(|l| format!("{l}\n")).collect()
}

fn stream(dir: &Path) {
    let t = "stream_reader";
    // A real stream from the output plugin's Sealer, under the fixed ring and key.
    let kek = Kek::File(kek_ring().clone());
    let (mut s, header) = Sealer::start("slot1", &kek, signing_key().clone(), 1).unwrap();
    let mut real = vec![header];
    for i in 0..2 {
        let changes = vec![
            format!("{{\"table\":\"public.t\",\"action\":\"I\",\"new\":{{\"id\":{i}}}}}"),
            json!({"action": "D", "table": "public.t", "old": {"id": i, "note": "ü \"q\"\n"}})
                .to_string(),
        ];
        real.push(
            s.batch(
                &changes,
                "0/10",
                "0/20",
                700 + i,
                5,
                vec!["public.t".into()],
            )
            .unwrap(),
        );
    }
    // The real stream must pass the reader the target builds.
    let mut r = Reader::new(Kek::File(kek_ring().clone()), vec![verifying_key()]);
    for l in &real {
        r.feed(l).expect("seed stream verifies");
    }
    assert_eq!(as_is(&lines(&real)), 3);
    assert_eq!(signed(&lines(&real)), 3);
    write(dir, t, "real-stream", lines(&real));
    write(dir, t, "real-session-only", lines(&real[..1]));

    // Templates the harness completes in its signing mode.
    let kid = key_id();
    let session = |id: &str, slot: &str| {
        json!({"type": "session", "slot": slot, "session": id, "kek_id": "v2",
               "wrapped_dek": "", "started_at": 1, "key_id": kid, "signature": ""})
        .to_string()
    };
    let batch = |id: &str, slot: &str, seq: i64, plain: &str| {
        json!({"type": "batch", "slot": slot, "session": id, "seq": seq,
               "lsn_start": "0/10", "lsn_end": "0/20", "xid": 700, "commit_time": 5,
               "tables": ["public.t"], "changes": 1, "ciphertext": plain,
               "merkle_root": "", "prev": "", "key_id": kid, "signature": ""})
        .to_string()
    };
    let tpl = lines(&[
        session("a1", "slot1"),
        batch("a1", "slot1", 1, "[{\"action\":\"I\",\"n\":1}]"),
        batch("a1", "slot1", 2, "[{\"action\":\"U\",\"n\":2}]"),
    ]);
    assert_eq!(as_is(&tpl), 0, "templates are not signed");
    assert_eq!(signed(&tpl), 3, "the harness completes the template");
    write(dir, t, "template", tpl);
    // A second session of the slot supersedes the first: the old session's next batch is
    // refused, and so is a session of another slot.
    let two = lines(&[
        session("a1", "slot1"),
        batch("a1", "slot1", 1, "[{\"x\":[true,null,1.5,\"s\"]}]"),
        session("b2", "slot1"),
        batch("b2", "slot1", 1, "[1]"),
        batch("a1", "slot1", 2, "[]"),
        session("c3", "slot2"),
    ]);
    assert_eq!(signed(&two), 4);
    let mut other_slot = two.lines().take(4).collect::<Vec<_>>().join("\n");
    other_slot.push('\n');
    other_slot.push_str(&session("c3", "slot2"));
    assert_eq!(signed(&other_slot), 4);
    write(dir, t, "template-two-sessions", two);
    write(dir, t, "malformed", "{\"type\":\"batch\"}\nnot json\n");
}

fn kek(dir: &Path) {
    let t = "kek_ring";
    write(dir, t, "ring", kek_ring_text());
    write(dir, t, "one", format!("v1 {}", "ab".repeat(32)));
    write(dir, t, "bad-hex", "v1 zz\n");
    write(
        dir,
        t,
        "three-fields",
        format!("v1 {} extra\n", "00".repeat(32)),
    );
}

fn envelope_seeds(dir: &Path) {
    let t = "envelope_open";
    let dek = fixed_key(0x44);
    let (slot, session, lsn_start, lsn_end, seq) = ("slot1", "sess", "0/10", "0/20", 1i64);
    let binding = BatchBinding {
        slot,
        session,
        seq,
        lsn_start,
        lsn_end,
    };
    let head = |kek_id: &str| {
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(
            format!("{kek_id}\n{session}\n{slot}\n{lsn_start}\n{lsn_end}\n").as_bytes(),
        );
        v
    };
    let mut sealed = head("v2");
    sealed.extend(envelope::seal(&dek, &binding, b"[{\"a\":1}]").unwrap());
    write(dir, t, "sealed-batch", sealed);
    let (id, k) = kek_ring().active();
    let mut wrapped = head(id);
    wrapped.extend(envelope::wrap_dek(k, id, session, &dek).unwrap());
    write(dir, t, "wrapped-dek", wrapped);
    write(dir, t, "short", head("v1"));
}

fn rows(table: &str, n: i64) -> Vec<ExportRow> {
    let mut prev = GENESIS;
    (1..=n)
        .map(|seq| {
            let columns = vec![
                ("id".to_string(), Value::Int(seq)),
                ("note".to_string(), Value::Text(format!("r{seq}"))),
                ("blob".to_string(), Value::Bytes(vec![0, 255, seq as u8])),
                ("ok".to_string(), Value::Bool(seq % 2 == 0)),
                (
                    "at".to_string(),
                    Value::Timestamp(817_263_000_000_000 + seq),
                ),
                ("gone".to_string(), Value::Null),
            ];
            let h = row_hash(table, 0, seq, &prev, &columns);
            let r = ExportRow {
                table: table.into(),
                chain: 0,
                seq,
                prev_hash: prev,
                row_hash: h,
                columns,
            };
            prev = h;
            r
        })
        .collect()
}

fn checkpoint(row: &ExportRow) -> Checkpoint {
    let kid = key_id();
    let msg = Checkpoint::message(&row.table, row.chain, row.seq, &row.row_hash, 9, &kid);
    Checkpoint {
        table: row.table.clone(),
        chain: row.chain,
        seq: row.seq,
        head_hash: row.row_hash,
        signed_at: 9,
        key_id: kid,
        signature: hex::encode(keys::sign(signing_key(), &msg)),
    }
}

fn audit(dir: &Path) {
    let t = "audit_verify";
    let rs = rows("vault.access_log", 3);
    let mut text: Vec<String> = rs
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    text.push(serde_json::to_string(&checkpoint(&rs[2])).unwrap());
    write(dir, t, "chain-and-checkpoint", lines(&text));
    // Template: the harness links zero prev hashes, computes zero row hashes and signs empty
    // checkpoint signatures.
    let mut tpl = rows("t", 2);
    for r in &mut tpl {
        r.row_hash = [0; 32];
        r.prev_hash = [0; 32];
    }
    let mut cp = checkpoint(&rows("t", 2)[1]);
    cp.signature = String::new();
    let mut text: Vec<String> = tpl
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    text.push(serde_json::to_string(&cp).unwrap());
    write(dir, t, "template", lines(&text));
    // A partial export starting at seq 2, and an unchained row.
    let rs = rows("u", 3);
    write(
        dir,
        t,
        "partial",
        lines(
            &rs[1..]
                .iter()
                .map(|r| serde_json::to_string(r).unwrap())
                .collect::<Vec<_>>(),
        ),
    );
    let mut un = rows("v", 1).remove(0);
    un.chain = -1;
    write(dir, t, "unchained", serde_json::to_string(&un).unwrap());
}

fn statement(n: i64) -> PurgeStatement {
    PurgeStatement {
        purpose: "card".into(),
        external_id: format!("e{n}"),
        owner: "app".into(),
        entry_id: n,
        created_at: 1,
        expires_at: 2,
        max_retention_days: 365,
        default_ttl_days: 90,
        purge_method: "physical-delete".into(),
        access_policy: "owner-only".into(),
        reason: "retention".into(),
        purged_by: "vsql_vault retention worker".into(),
        purged_at: 3,
        entry_hash: [7; 32],
    }
}

fn purge(dir: &Path) {
    let t = "purge_proof";
    let proofs: Vec<String> = prove_batch((0..3).map(statement).collect(), 9, 5, signing_key())
        .expect("the seed batch signs")
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let p = PurgeProof {
                id: i as i64,
                statement: l.statement,
                batch_id: 9,
                leaf_index: l.leaf_index,
                tree_size: l.tree_size,
                path: l.path.iter().map(hex::encode).collect(),
                root: l.root,
                signed_at: 5,
                key_id: l.key_id,
                signature: hex::encode(l.signature),
                displayed: None,
            };
            assert_eq!(
                p.check(&|_| Some(verifying_key())),
                Ok(()),
                "seed proof verifies"
            );
            serde_json::to_string(&p).unwrap()
        })
        .collect();
    write(dir, t, "batch-of-three", lines(&proofs));
    let tpl = PurgeProof {
        id: 1,
        statement: statement(1),
        batch_id: 1,
        leaf_index: 0,
        tree_size: 1,
        path: vec![],
        root: [0; 32],
        signed_at: 5,
        key_id: key_id(),
        signature: String::new(),
        displayed: None,
    };
    write(dir, t, "template", serde_json::to_string(&tpl).unwrap());
}

fn report(dir: &Path) {
    let t = "signed_report";
    let mut r = json!({
        "tables": [{"table": "public.t", "published": ["id", "note"],
                    "excluded": [{"column": "pan", "since": "2026-11-25T10:00:00+00:00", "by": "admin"}]}],
        "slots": [{"slot": "s1", "database": "db", "active": true}],
        "generated_at": "2026-11-25T10:00:00.123456+00:00",
        "kek_ids": ["v1", "v2"],
        "extension_version": "0.1.0",
        "signing_key_id": key_id(),
        "report": "vsql_vault scope report",
        "n": [1, -2, 3.5, 1e300, null, "ü\u{1}"]
    });
    let sig = keys::sign(
        signing_key(),
        &vsql_vault_core::canonical::report_message(&r),
    );
    r["signature"] = json!(hex::encode(sig));
    write(dir, t, "scope-report", r.to_string());
    write(dir, t, "array", "[1,{\"b\":2,\"a\":[]}]");
}

fn signing(dir: &Path) {
    let t = "signing_keys";
    let file = keys::encode_file(signing_key());
    let sig = hex::encode(keys::sign(signing_key(), b"head"));
    write(dir, t, "key-file", format!("{}{sig}\nhead", file.as_str()));
    write(
        dir,
        t,
        "public-key",
        format!("{}\n{sig}\nhead", hex::encode(verifying_key().as_bytes())),
    );
}

fn rules(dir: &Path) {
    let t = "input_rules";
    let mut ints = Vec::new();
    ints.extend_from_slice(&365i32.to_be_bytes());
    ints.extend_from_slice(&90i32.to_be_bytes());
    ints.extend_from_slice(&5i32.to_be_bytes());
    ints.extend_from_slice(&64u32.to_be_bytes());
    let with = |s: &str| {
        let mut v = ints.clone();
        v.extend_from_slice(s.as_bytes());
        v
    };
    write(dir, t, "purpose", "card\npan.v2\nx-1_y");
    write(
        dir,
        t,
        "metadata",
        " {\"k\": \"ü 100%\"}\n[]\nnull\ntrue\n\"s\"\n1",
    );
    write(
        dir,
        t,
        "methods",
        "physical-delete\ncrypto-shred\nretention-expire\nshred",
    );
    write(dir, t, "external-id", "Ünïcødé id\na\u{202e}b\n@owner");
    write(dir, t, "ints", with("\ncard"));
}

fn main() {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    stream(&dir);
    kek(&dir);
    envelope_seeds(&dir);
    audit(&dir);
    purge(&dir);
    report(&dir);
    signing(&dir);
    rules(&dir);
    println!("seeds written under {}", dir.display());
}
