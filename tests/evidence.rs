//! Evidence exported by vsql_vault 0.1.0 (`tests/evidence/v0.1.0/`, see its README) keeps
//! verifying with this `vsql-vault`, and tampered 0.1.0 evidence keeps failing. Every case is also
//! given to the second verifier written from docs/audit-format.md alone
//! (`tests/verifier/verify.py`), which must reach the same verdicts. No server is needed; the
//! suite runs with the others because `VSQL_VAULT_CLI` names the tool.

mod common;

use common::offline_tools;
use std::path::PathBuf;

fn evidence(file: &str) -> String {
    format!("{}/evidence/v0.1.0/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn public_key() -> String {
    std::fs::read_to_string(evidence("public_key.hex"))
        .unwrap()
        .trim()
        .to_owned()
}

/// `vsql-vault` and the Python verifier on the same arguments (they must agree).
fn both(args: &[&str]) -> (i32, String) {
    offline_tools(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

/// A copy of an evidence file with `edit` applied to its lines, in a scratch directory.
fn edited(file: &str, tag: &str, edit: impl FnOnce(&mut Vec<String>)) -> String {
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vsql-vault-evidence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lines: Vec<String> = std::fs::read_to_string(evidence(file))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    edit(&mut lines);
    let path = dir.join(format!("{tag}.jsonl"));
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path.to_string_lossy().into_owned()
}

fn verify_ledger(ledger: &str, checkpoints: &str) -> (i32, String) {
    let key = public_key();
    both(&[
        "verify",
        "--export",
        ledger,
        "--export",
        &evidence("access_log.jsonl"),
        "--export",
        &evidence("purge_log.jsonl"),
        "--export",
        &evidence("audit_checkpoints.jsonl"),
        "--checkpoints",
        checkpoints,
        "--public-key",
        &key,
    ])
}

/// The ledger set with `ledger` in place of the committed export fails, naming `subject`.
fn ledger_fails_at(ledger: &str, checkpoints: &str, subject: &str) {
    let (code, out) = verify_ledger(ledger, checkpoints);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("FAILED  {subject}:")),
        "{subject}: {out}"
    );
}

#[test]
fn intact_0_1_0_evidence_verifies() {
    let (code, out) = verify_ledger(&evidence("ledger.jsonl"), &evidence("checkpoints.jsonl"));
    assert_eq!(code, 0, "{out}");
    for line in [
        "ok      public.ledger/4 chain 0: 8 rows intact",
        "ok      public.ledger/4 chain 3: 16 rows intact",
        "ok      vault.access_log/1 chain 0: 40 rows intact",
        "ok      vault.audit_checkpoints/2 chain 0: 11 rows intact",
        "ok      vault.purge_log/3 chain 0: 4 rows intact",
    ] {
        assert!(out.contains(line), "{line} not in {out}");
    }
    let (code, out) = both(&[
        "verify-purge",
        "--proofs",
        &evidence("purge_proofs.jsonl"),
        "--public-key",
        &public_key(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok      4 purge proofs verify"), "{out}");
}

#[test]
fn a_0_1_0_row_without_chain_fields_is_named() {
    let (code, out) = both(&[
        "verify",
        "--export",
        &evidence("tampered_unchained.jsonl"),
        "--checkpoints",
        &evidence("tampered_checkpoints.jsonl"),
        "--public-key",
        &public_key(),
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED  public.tampered/5: 1 row carries no chain fields"),
        "{out}"
    );
    assert!(
        out.contains("ok      public.tampered/5 chain 0: 4 rows intact"),
        "{out}"
    );
}

#[test]
fn a_0_1_0_export_of_a_generated_column_stays_unverifiable() {
    // 0.1.0 exported a generated column it had not hashed; nothing in the export says which, so
    // no verifier can undo it (docs/audit-format.md section 11: re-export with 0.2.0 or later).
    let (code, out) = both(&[
        "verify",
        "--export",
        &evidence("generated_column.jsonl"),
        "--checkpoints",
        &evidence("generated_column_checkpoints.jsonl"),
        "--public-key",
        &public_key(),
    ]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn tampered_0_1_0_evidence_fails_at_the_right_row() {
    let checkpoints = evidence("checkpoints.jsonl");
    // A changed value.
    let changed = edited("ledger.jsonl", "changed", |lines| {
        let i = lines
            .iter()
            .position(|l| l.contains(r#""chain":2,"seq":4,"#))
            .unwrap();
        let flag = r#"["flag",{"type":"bool","value":true}]"#;
        assert!(lines[i].contains(flag), "{}", lines[i]);
        lines[i] = lines[i].replacen(flag, r#"["flag",{"type":"bool","value":false}]"#, 1);
    });
    ledger_fails_at(&changed, &checkpoints, "public.ledger/4 chain 2 at seq 4");
    // The newest checkpointed rows deleted.
    let truncated = edited("ledger.jsonl", "truncated", |lines| {
        lines.retain(|l| {
            !(l.contains(r#""chain":1,"#)
                && (l.contains(r#""seq":7,"#) || l.contains(r#""seq":8,"#)))
        });
    });
    ledger_fails_at(&truncated, &checkpoints, "public.ledger/4 chain 1 at seq 7");
    // A row given twice.
    let doubled = edited("ledger.jsonl", "doubled", |lines| {
        let i = lines
            .iter()
            .position(|l| l.contains(r#""chain":0,"seq":3,"#))
            .unwrap();
        let row = lines[i].clone();
        lines.push(row);
    });
    ledger_fails_at(&doubled, &checkpoints, "public.ledger/4 chain 0 at seq 3");
    // A checkpoint with a forged signature.
    let forged = edited("checkpoints.jsonl", "forged", |lines| {
        let i = lines
            .iter()
            .position(|l| l.contains("public.ledger/4"))
            .unwrap();
        let sig_at = lines[i].find(r#""signature":""#).unwrap() + 13;
        let flipped = if &lines[i][sig_at..sig_at + 1] == "0" {
            "1"
        } else {
            "0"
        };
        lines[i].replace_range(sig_at..sig_at + 1, flipped);
    });
    let (code, out) = verify_ledger(&evidence("ledger.jsonl"), &forged);
    assert_eq!(code, 1, "{out}");
    // A checkpointed table left out of the exports fails, unless it is named as left out.
    let key = public_key();
    let ledger = evidence("ledger.jsonl");
    let ledger_alone = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--export",
            &ledger,
            "--checkpoints",
            &checkpoints,
            "--public-key",
            &key,
        ];
        args.extend_from_slice(extra);
        both(&args)
    };
    let (code, out) = ledger_alone(&[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAILED  vault.access_log/1 chain 0 at seq 1:"),
        "{out}"
    );
    let (code, out) = ledger_alone(&["--table", "public.ledger"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("skipped vault.access_log/1"), "{out}");
    // A purge proof whose statement was changed.
    let proofs = edited("purge_proofs.jsonl", "proofs", |lines| {
        lines[1] = lines[1].replacen(r#""reason":"logout""#, r#""reason":"expired""#, 1);
    });
    let (code, out) = both(&["verify-purge", "--proofs", &proofs, "--public-key", &key]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED  purge proof"), "{out}");
}
