//! The encrypting output plugin end to end: pg_recvlogical into `vsql-vault decrypt` reproduces
//! every change, the stream holds no plaintext, and tampering or a wrong key stops the consumer.

mod common;

use common::*;
use postgres::Client;
use std::process::Command;

const SECRET: &str = "card 4111-1111-1111-1111 100% \"quoted\"\nline two ü";

#[test]
fn pg_recvlogical_into_the_consumer_reproduces_every_change_and_the_wire_is_ciphertext() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "5a"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_repl;
         CREATE TABLE it_repl (id int PRIMARY KEY, note text, amount numeric, raw bytea, doc jsonb, tags text[]);",
    )
    .unwrap();
    fresh_slot(&mut su, "it_repl_slot");
    su.execute(
        "INSERT INTO it_repl VALUES (1, $1, 12345.678, '\\x00ff10', '{\"k\": \"v\"}', '{a,\"b c\"}'),
                                    (2, NULL, NULL, NULL, NULL, NULL)",
        &[&SECRET],
    )
    .unwrap();
    su.batch_execute(
        "UPDATE it_repl SET note = 'updated' WHERE id = 1;
         DELETE FROM it_repl WHERE id = 2;
         SELECT pg_logical_emit_message(true, 'vault', 'a transactional message');
         TRUNCATE it_repl;",
    )
    .unwrap();
    let file = format!("{}/repl.stream", s.dir);
    recvlogical(&s, &mut su, "it_repl_slot", &file);
    let wire = std::fs::read_to_string(&file).unwrap();
    for plain in [
        "4111-1111",
        "quoted",
        "12345.678",
        "updated",
        "a transactional message",
        "00ff10",
    ] {
        assert!(!wire.contains(plain), "{plain:?} travelled in clear");
    }
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    let changes: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ours: Vec<&serde_json::Value> = changes
        .iter()
        .filter(|c| c["table"] == "it_repl" || c["action"] == "M")
        .collect();
    let actions: Vec<&str> = ours.iter().map(|c| c["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["I", "I", "U", "D", "M", "T"]);
    let value = |c: &serde_json::Value, col: &str| -> serde_json::Value {
        c["columns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == col)
            .unwrap()["value"]
            .clone()
    };
    assert_eq!(value(ours[0], "note"), SECRET);
    assert_eq!(value(ours[0], "amount"), "12345.678");
    assert_eq!(value(ours[0], "raw"), "\\x00ff10");
    assert_eq!(value(ours[0], "doc"), "{\"k\": \"v\"}");
    assert_eq!(value(ours[0], "tags"), "{a,\"b c\"}");
    assert_eq!(value(ours[1], "note"), serde_json::Value::Null);
    assert_eq!(value(ours[2], "note"), "updated");
    assert_eq!(ours[3]["identity"][0]["value"], "2");
    assert_eq!(ours[4]["content"], "a transactional message");

    // A flipped character in a batch stops the consumer; nothing after it is emitted.
    let mut lines: Vec<String> = wire.lines().map(str::to_owned).collect();
    let batch = lines
        .iter()
        .position(|l| l.contains("\"type\":\"batch\""))
        .unwrap();
    let pos = lines[batch].find("\"ciphertext\":\"").unwrap() + 30;
    let c = lines[batch].as_bytes()[pos];
    lines[batch].replace_range(pos..pos + 1, if c == b'a' { "b" } else { "a" });
    let tampered = format!("{}/repl-tampered.stream", s.dir);
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let (code, out, err) = decrypt(&mut su, &kek, &tampered);
    assert_eq!(code, 1);
    assert!(err.contains("signature does not verify"), "{err}");
    assert!(out.is_empty(), "nothing after the fault: {out}");
    // A dropped batch is caught too.
    let mut lines: Vec<String> = wire.lines().map(str::to_owned).collect();
    lines.remove(batch);
    std::fs::write(&tampered, lines.join("\n") + "\n").unwrap();
    let (code, _, err) = decrypt(&mut su, &kek, &tampered);
    assert_eq!(code, 1);
    assert!(
        err.contains("where 1 was due") || err.contains("where"),
        "{err}"
    );
}

#[test]
fn kek_rotation_keeps_old_streams_readable_until_the_old_version_is_destroyed() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "6b"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_rot; CREATE TABLE it_rot (id int PRIMARY KEY, v text)",
    )
    .unwrap();
    fresh_slot(&mut su, "it_rot_slot");
    su.execute("INSERT INTO it_rot VALUES (1, 'under v1')", &[])
        .unwrap();
    let old_stream = format!("{}/rot-v1.stream", s.dir);
    recvlogical(&s, &mut su, "it_rot_slot", &old_stream);
    // Rotate: v2 becomes active for new sessions; v1 stays for old streams.
    set_kek(&s, &mut su, &(kek_line("v1", "6b") + &kek_line("v2", "7c")));
    su.execute("INSERT INTO it_rot VALUES (2, 'under v2')", &[])
        .unwrap();
    let new_stream = format!("{}/rot-v2.stream", s.dir);
    recvlogical(&s, &mut su, "it_rot_slot", &new_stream);
    assert!(std::fs::read_to_string(&new_stream)
        .unwrap()
        .contains("\"kek_id\":\"v2\""));
    let (code, out, err) = decrypt(&mut su, &kek, &old_stream);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("under v1"));
    // Crypto-shredding: destroy v1 and every stream sealed under it is gone for good.
    set_kek(&s, &mut su, &kek_line("v2", "7c"));
    let (code, out, err) = decrypt(&mut su, &kek, &old_stream);
    assert_eq!(code, 1);
    assert!(err.contains("no KEK version v1"), "{err}");
    assert!(out.is_empty());
    let (code, out, _) = decrypt(&mut su, &kek, &new_stream);
    assert_eq!(code, 0);
    assert!(out.contains("under v2"));
}

#[test]
fn unknown_options_and_unsafe_key_files_are_refused() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "8d"));
    fresh_slot(&mut su, "it_opt_slot");
    let e = su
        .query("SELECT data FROM pg_logical_slot_peek_changes('it_opt_slot', NULL, NULL, 'no-such-option', '1')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    Command::new("chmod").args(["644", &kek]).status().unwrap();
    let e = su
        .query(
            "SELECT data FROM pg_logical_slot_peek_changes('it_opt_slot', NULL, NULL)",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "F0000", "{e}");
    su.execute("SELECT pg_drop_replication_slot('it_opt_slot')", &[])
        .unwrap();
}

#[test]
fn consumer_options_choose_tables_and_fields() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "9e"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_keep, it_skip;
         CREATE TABLE it_keep (id int PRIMARY KEY, v text);
         CREATE TABLE it_skip (id int PRIMARY KEY, v text);",
    )
    .unwrap();
    fresh_slot(&mut su, "it_sel_slot");
    su.batch_execute(
        "INSERT INTO it_keep VALUES (1, 'kept'); INSERT INTO it_skip VALUES (1, 'skipped');",
    )
    .unwrap();
    let peek = |su: &mut Client, opts: &str| -> Result<String, postgres::Error> {
        let rows = su.query(
            &format!(
                "SELECT data FROM pg_logical_slot_peek_changes('it_sel_slot', NULL, NULL {opts})"
            ),
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n")
    };
    let file = format!("{}/sel.stream", s.dir);
    std::fs::write(
        &file,
        peek(
            &mut su,
            ", 'add-tables', 'public.it_keep', 'include-xids', '0', 'include-timestamp', '1'",
        )
        .unwrap(),
    )
    .unwrap();
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kept") && !out.contains("skipped"), "{out}");
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        first.get("xid").is_none() && first.get("commit_time").is_some(),
        "{first}"
    );
    std::fs::write(
        &file,
        peek(&mut su, ", 'filter-tables', '*.it_keep'").unwrap(),
    )
    .unwrap();
    let (code, out, _) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0);
    assert!(out.contains("skipped") && !out.contains("kept"), "{out}");
    for bad in [", 'include-xids', 'maybe'", ", 'add-tables', 'nodot'"] {
        assert_eq!(sqlstate(&peek(&mut su, bad).unwrap_err()), "22023", "{bad}");
    }
    su.execute("SELECT pg_drop_replication_slot('it_sel_slot')", &[])
        .unwrap();
}

#[test]
fn excluded_columns_never_leave_the_server_and_the_signed_scope_report_says_so() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "ab"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_pay;
         CREATE TABLE it_pay (id int PRIMARY KEY, pan text, amount numeric);",
    )
    .unwrap();
    fresh_slot(&mut su, "it_scope_slot");
    su.execute(
        "INSERT INTO it_pay VALUES (1, 'pan-before-exclusion', 10)",
        &[],
    )
    .unwrap();
    // Only an admin excludes; the change is audited.
    let mut a = s.connect("it_a");
    assert_eq!(
        sqlstate(
            &a.execute("SELECT vault_sync_exclude('it_pay', 'pan')", &[])
                .unwrap_err()
        ),
        "42501"
    );
    let mut admin = s.connect("it_admin");
    assert_eq!(
        sqlstate(
            &admin
                .execute("SELECT vault_sync_exclude('it_pay', 'nope')", &[])
                .unwrap_err()
        ),
        "42703"
    );
    admin
        .execute("SELECT vault_sync_exclude('it_pay', 'pan')", &[])
        .unwrap();
    su.execute(
        "INSERT INTO it_pay VALUES (2, 'pan-after-exclusion', 20)",
        &[],
    )
    .unwrap();
    su.execute("UPDATE it_pay SET amount = 21 WHERE id = 2", &[])
        .unwrap();
    let file = format!("{}/scope.stream", s.dir);
    recvlogical(&s, &mut su, "it_scope_slot", &file);
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    // The exclusion applies to changes committed after it, as read under each change's snapshot.
    assert!(out.contains("pan-before-exclusion"), "{out}");
    assert!(
        !out.contains("pan-after-exclusion"),
        "an excluded column left the server: {out}"
    );
    let after: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|c| {
            c["table"] == "it_pay"
                && c["columns"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["value"] == "2"))
        })
        .collect();
    assert_eq!(after.len(), 2);
    for c in &after {
        assert!(
            c["columns"]
                .as_array()
                .unwrap()
                .iter()
                .all(|x| x["name"] != "pan"),
            "{c}"
        );
    }
    let logged: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'sync_exclude' AND granted",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(logged >= 1);
    // The scope report lists the exclusion and the slot, and verifies offline.
    let mut auditor_like = s.connect("it_admin");
    let report: String = auditor_like
        .query_one("SELECT vault_scope_report()::text", &[])
        .unwrap()
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let pay = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.it_pay")
        .unwrap();
    assert_eq!(pay["excluded"][0]["column"], "pan");
    assert!(pay["published"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c != "pan"));
    assert!(v["slots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["slot"] == "it_scope_slot"));
    assert_eq!(v["kek_ids"], serde_json::json!(["v1"]));
    let path = format!("{}/scope.json", s.dir);
    let verify = |su: &mut Client, path: &str| -> i32 {
        let mut cmd = Command::new(std::env::var("VSQL_VAULT_CLI").unwrap());
        cmd.args(["verify-report", "--report", path]);
        for k in public_keys(su) {
            cmd.args(["--public-key", &k]);
        }
        cmd.status().unwrap().code().unwrap_or(-1)
    };
    std::fs::write(&path, &report).unwrap();
    assert_eq!(verify(&mut su, &path), 0);
    std::fs::write(&path, report.replace("\"pan\"", "\"card\"")).unwrap();
    assert_eq!(
        verify(&mut su, &path),
        1,
        "a changed report must not verify"
    );
    admin
        .execute("SELECT vault_sync_include('it_pay', 'pan')", &[])
        .unwrap();
    su.execute("SELECT pg_drop_replication_slot('it_scope_slot')", &[])
        .unwrap();
}

#[test]
fn unchanged_toast_is_marked_and_a_large_transaction_is_sent_in_bounded_batches() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "cd"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_big;
         CREATE TABLE it_big (id int PRIMARY KEY, counter int, blob text);
         ALTER TABLE it_big ALTER COLUMN blob SET STORAGE EXTERNAL;",
    )
    .unwrap();
    fresh_slot(&mut su, "it_big_slot");
    // A value stored out of line, then an update that does not touch it.
    su.batch_execute(
        "INSERT INTO it_big VALUES (0, 0, repeat('toasted-value-', 1000));
         UPDATE it_big SET counter = 1 WHERE id = 0;",
    )
    .unwrap();
    // About 200 MB in one transaction.
    su.batch_execute(
        "INSERT INTO it_big SELECT g, g, repeat(md5(g::text), 32) FROM generate_series(1, 200000) g",
    )
    .unwrap();
    let file = format!("{}/big.stream", s.dir);
    recvlogical(&s, &mut su, "it_big_slot", &file);
    let wire = std::fs::read_to_string(&file).unwrap();
    let batches: Vec<&str> = wire
        .lines()
        .filter(|l| l.contains("\"type\":\"batch\""))
        .collect();
    let longest = wire.lines().map(str::len).max().unwrap_or(0);
    // 4 MiB of records per batch at most, sealed and hex-encoded: bounded, whatever the size of
    // the transaction.
    assert!(longest < 12 * 1024 * 1024, "a line of {longest} bytes");
    assert!(
        batches.len() > 20,
        "the big transaction should arrive in many batches, got {}",
        batches.len()
    );
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    let mut inserts = 0;
    let mut unchanged = false;
    for l in out.lines() {
        let c: serde_json::Value = serde_json::from_str(l).unwrap();
        if c["table"] != "it_big" {
            continue;
        }
        if c["action"] == "I" {
            inserts += 1;
        }
        if c["action"] == "U" {
            let blob = c["columns"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["name"] == "blob")
                .unwrap()
                .clone();
            unchanged = blob["unchanged_toast"] == true;
        }
    }
    assert_eq!(inserts, 200_001);
    assert!(
        unchanged,
        "the unchanged TOAST value should be marked, not sent"
    );
    su.execute("SELECT pg_drop_replication_slot('it_big_slot')", &[])
        .unwrap();
}

#[test]
fn a_kms_command_can_wrap_the_data_keys() {
    let s = server();
    let mut su = setup(&s);
    // A stand-in KMS client: swaps hex digits (its own inverse). A real one calls the KMS.
    let kms = "read x; y=$(echo $x | tr 0123456789abcdef fedcba9876543210); \
               if [ \"$VSQL_VAULT_OP\" = wrap ]; then echo \"kms-1 $y\"; else echo $y; fi";
    su.batch_execute(&format!(
        "ALTER SYSTEM SET vsql_vault.kek_wrap_command = '{}'",
        kms.replace('\'', "''")
    ))
    .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    su.batch_execute(
        "DROP TABLE IF EXISTS it_kms; CREATE TABLE it_kms (id int PRIMARY KEY, v text)",
    )
    .unwrap();
    fresh_slot(&mut su, "it_kms_slot");
    su.execute("INSERT INTO it_kms VALUES (1, 'wrapped by the kms')", &[])
        .unwrap();
    let file = format!("{}/kms.stream", s.dir);
    recvlogical(&s, &mut su, "it_kms_slot", &file);
    su.batch_execute("ALTER SYSTEM RESET vsql_vault.kek_wrap_command")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    let wire = std::fs::read_to_string(&file).unwrap();
    assert!(wire.contains("\"kek_id\":\"kms-1\"") && !wire.contains("wrapped by the kms"));
    let mut cmd = Command::new(std::env::var("VSQL_VAULT_CLI").unwrap());
    cmd.args(["decrypt", "--kek-command", kms, "--input", &file]);
    for k in public_keys(&mut su) {
        cmd.args(["--public-key", &k]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrapped by the kms"));
    su.execute("SELECT pg_drop_replication_slot('it_kms_slot')", &[])
        .unwrap();
}

#[test]
fn schema_changes_between_transactions_are_followed() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "ef"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_alter; CREATE TABLE it_alter (id int PRIMARY KEY, a text)",
    )
    .unwrap();
    fresh_slot(&mut su, "it_alter_slot");
    su.batch_execute(
        "INSERT INTO it_alter VALUES (1, 'x');
         ALTER TABLE it_alter ADD COLUMN b int;
         INSERT INTO it_alter VALUES (2, 'y', 7);
         ALTER TABLE it_alter DROP COLUMN a;
         INSERT INTO it_alter VALUES (3, 9);",
    )
    .unwrap();
    let file = format!("{}/alter.stream", s.dir);
    recvlogical(&s, &mut su, "it_alter_slot", &file);
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    let names: Vec<Vec<String>> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|c| c["table"] == "it_alter")
        .map(|c| {
            c["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .collect();
    assert_eq!(
        names,
        vec![vec!["id", "a"], vec!["id", "a", "b"], vec!["id", "b"]]
    );
    su.execute("SELECT pg_drop_replication_slot('it_alter_slot')", &[])
        .unwrap();
}
