//! Tamper-evidence against a real server: a superuser who goes around the rules is caught by
//! `vault_verify_audit` and by the offline tool alike, which must agree row for row.

mod common;

use common::*;
use postgres::Client;
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::thread;

/// A fresh protected table with `rows` rows on one chain (so sequence numbers are predictable).
fn protected_table(su: &mut Client, name: &str, rows: i32, chains: i32) {
    su.batch_execute(&format!(
        "SET vsql_vault.break_glass = on;
         DROP TABLE IF EXISTS {name};
         RESET vsql_vault.break_glass;
         CREATE TABLE {name} (id bigserial PRIMARY KEY, tenant text NOT NULL, event text, at timestamptz DEFAULT now());"
    ))
    .unwrap();
    su.execute(
        &format!("SELECT vault_protect_table('{name}', {chains})"),
        &[],
    )
    .unwrap();
    su.execute(
        &format!("INSERT INTO {name} (tenant, event) SELECT 'acme', 'event ' || g FROM generate_series(1, $1) g"),
        &[&rows],
    )
    .unwrap();
}

/// (chain, first_bad_seq, ok, detail) of each chain of `table`, as the database sees it.
fn db_verdict(su: &mut Client, table: &str) -> Vec<(i32, Option<i64>, bool, String)> {
    su.query(
        &format!("SELECT chain, first_bad_seq, ok, detail FROM vault_verify_audit('{table}') ORDER BY chain"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Runs `sql` the way a superuser goes around the rules: the refusing triggers disabled.
fn behind_the_triggers(su: &mut Client, table: &str, sql: &str) {
    // Without the break-glass setting even a superuser cannot disable the trigger.
    let e = su
        .batch_execute(&format!(
            "ALTER TABLE {table} DISABLE TRIGGER vault_append_only"
        ))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV403", "{e}");
    su.batch_execute(&format!(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE {table} DISABLE TRIGGER vault_append_only;
         SET session_replication_role = replica;
         {sql};
         RESET session_replication_role;
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER vault_append_only;
         RESET vsql_vault.break_glass;"
    ))
    .unwrap();
}

#[test]
fn intact_table_verifies_in_the_database_and_offline() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_intact", 25, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let v = db_verdict(&mut su, "it_intact");
    assert_eq!(v.len(), 1);
    assert!(v[0].2, "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "it_intact", "intact");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok      public.it_intact/"), "{out}");
}

#[test]
fn modifications_are_refused_for_owner_and_superuser_alike() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "SET vsql_vault.break_glass = on; DROP TABLE IF EXISTS it_owned; RESET vsql_vault.break_glass;
         CREATE TABLE it_owned (id int, note text);
         ALTER TABLE it_owned OWNER TO it_a; GRANT SELECT ON it_owned TO it_b;",
    )
    .unwrap();
    let mut a = s.connect("it_a");
    a.execute("SELECT vault_protect_table('it_owned')", &[])
        .unwrap();
    a.execute("INSERT INTO it_owned VALUES (1, 'one'), (2, 'two')", &[])
        .unwrap();
    let before: Vec<String> = su
        .query("SELECT note FROM it_owned ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for c in [&mut a, &mut su] {
        for sql in [
            "UPDATE it_owned SET note = 'x'",
            "DELETE FROM it_owned",
            "TRUNCATE it_owned",
        ] {
            let e = c.batch_execute(sql).unwrap_err();
            assert_eq!(sqlstate(&e), "VV403", "{sql}");
        }
        c.batch_execute("SET session_replication_role = replica")
            .unwrap_or(());
        let e = c
            .batch_execute("UPDATE it_owned SET note = 'x'")
            .unwrap_err();
        assert!(["VV403", "42501"].contains(&sqlstate(&e).as_str()), "{e}");
        c.batch_execute("RESET session_replication_role")
            .unwrap_or(());
    }
    let after: Vec<String> = su
        .query("SELECT note FROM it_owned ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(before, after);
    // A role that neither owns the table nor administers the vault cannot protect tables.
    su.batch_execute("DROP TABLE IF EXISTS it_foreign; CREATE TABLE it_foreign (id int)")
        .unwrap();
    let mut b = s.connect("it_b");
    assert_eq!(
        sqlstate(
            &b.execute("SELECT vault_protect_table('it_foreign')", &[])
                .unwrap_err()
        ),
        "42501"
    );
}

#[test]
fn edited_row_is_named_by_both_verifiers() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_edit", 10, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    behind_the_triggers(
        &mut su,
        "it_edit",
        "UPDATE it_edit SET event = 'forged' WHERE chain_seq = 4",
    );
    let v = db_verdict(&mut su, "it_edit");
    assert_eq!((v[0].1, v[0].2), (Some(4), false), "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "it_edit", "edit");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("chain 0 at seq 4: row hash does not match"),
        "{out}"
    );
}

#[test]
fn deleted_middle_row_is_named_by_both_verifiers() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_hole", 10, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    behind_the_triggers(
        &mut su,
        "it_hole",
        "DELETE FROM it_hole WHERE chain_seq = 6",
    );
    let v = db_verdict(&mut su, "it_hole");
    assert_eq!((v[0].1, v[0].2), (Some(6), false), "{v:?}");
    assert!(v[0].3.contains("rows 6..6 are missing"), "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "it_hole", "hole");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("at seq 6: rows 6..6 are missing"), "{out}");
}

#[test]
fn newest_rows_deleted_after_a_checkpoint_are_named_by_both_verifiers() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_tail", 10, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    behind_the_triggers(
        &mut su,
        "it_tail",
        "DELETE FROM it_tail WHERE chain_seq >= 9",
    );
    let v = db_verdict(&mut su, "it_tail");
    assert_eq!((v[0].1, v[0].2), (Some(9), false), "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "it_tail", "tail");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("at seq 9: rows 9..10 are missing, yet a checkpoint signed row 10"),
        "{out}"
    );
}

#[test]
fn recomputed_hashes_do_not_fool_the_signed_checkpoint() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_rehash", 5, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    // A superuser who knows the format re-chains the table after editing row 2: links and hashes
    // all check out again, but row 5 no longer matches what the key signed.
    let mut export: Vec<vsql_vault_core::chain::ExportRow> = su
        .query("SELECT vault_export_audit('it_rehash')", &[])
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    let mut prev = vsql_vault_core::chain::GENESIS;
    for row in export.iter_mut() {
        if row.seq == 2 {
            for (name, value) in row.columns.iter_mut() {
                if name == "event" {
                    *value = vsql_vault_core::canonical::Value::Text("forged".into());
                }
            }
        }
        row.prev_hash = prev;
        row.row_hash = vsql_vault_core::chain::row_hash(
            &row.table,
            row.chain,
            row.seq,
            &row.prev_hash,
            &row.columns,
        );
        prev = row.row_hash;
    }
    let mut sql = String::from("UPDATE it_rehash SET event = 'forged' WHERE chain_seq = 2;");
    for row in &export {
        sql.push_str(&format!(
            "UPDATE it_rehash SET prev_hash = '\\x{}', row_hash = '\\x{}' WHERE chain_seq = {};",
            hex::encode(row.prev_hash),
            hex::encode(row.row_hash),
            row.seq
        ));
    }
    behind_the_triggers(&mut su, "it_rehash", &sql);
    let v = db_verdict(&mut su, "it_rehash");
    assert_eq!((v[0].1, v[0].2), (Some(5), false), "{v:?}");
    assert!(
        v[0].3.contains("differs from its signed checkpoint"),
        "{v:?}"
    );
    let (code, out) = offline_verdict(&s, &mut su, "it_rehash", "rehash");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("at seq 5: row 5 differs from its signed checkpoint"),
        "{out}"
    );
}

#[test]
fn sixteen_concurrent_writers_never_fork_a_chain() {
    let s = Arc::new(server());
    let mut su = setup(&s);
    protected_table(&mut su, "it_busy", 0, 16);
    su.batch_execute(
        "GRANT INSERT, SELECT ON it_busy TO it_a; GRANT USAGE ON SEQUENCE it_busy_id_seq TO it_a",
    )
    .unwrap();
    let start = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let s = Arc::clone(&s);
            let start = Arc::clone(&start);
            thread::spawn(move || {
                let mut c = s.connect("it_a");
                start.wait();
                let mut inserted = 0i64;
                for n in 0..150 {
                    if n % 10 == 0 {
                        // Several rows in one transaction stay on one chain.
                        c.execute(
                            "INSERT INTO it_busy (tenant, event) SELECT $1, 'batch' FROM generate_series(1, 5)",
                            &[&format!("w{i}")],
                        )
                        .expect("batch insert");
                        inserted += 5;
                    } else {
                        c.execute("INSERT INTO it_busy (tenant, event) VALUES ($1, 'one')", &[&format!("w{i}")])
                            .expect("insert");
                        inserted += 1;
                    }
                }
                inserted
            })
        })
        .collect();
    let total: i64 = handles.into_iter().map(|h| h.join().expect("writer")).sum();
    let rows: i64 = su
        .query_one("SELECT count(*) FROM it_busy", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, total);
    let v = db_verdict(&mut su, "it_busy");
    assert!(v.iter().all(|c| c.2), "{v:?}");
    let checked: i64 = su
        .query_one(
            "SELECT sum(rows_checked)::bigint FROM vault_verify_audit('it_busy')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(checked, total);
    assert!(
        v.len() > 1,
        "writers should spread over several chains: {v:?}"
    );
}

#[test]
fn the_access_log_itself_is_chained_and_verifies() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "chained1", b"x").unwrap();
    get(&mut a, "chained1").unwrap();
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let v = db_verdict(&mut su, "vault.access_log");
    assert!(v.iter().all(|c| c.2), "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "vault.access_log", "access_log");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn break_glass_is_recorded_in_the_chained_log() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_glass", 3, 1);
    let before: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'break_glass'",
            &[],
        )
        .unwrap()
        .get(0);
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE it_glass DISABLE TRIGGER vault_append_only;
         ALTER TABLE it_glass ENABLE ALWAYS TRIGGER vault_append_only;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    let rows = su
        .query(
            "SELECT granted, details->>'command', details->>'object' FROM vault.access_log
             WHERE operation = 'break_glass' ORDER BY id OFFSET $1",
            &[&before],
        )
        .unwrap();
    assert_eq!(rows.len(), 2, "both commands recorded");
    assert!(rows.iter().all(|r| r.get::<_, bool>(0)));
    assert_eq!(rows[0].get::<_, String>(1), "ALTER TABLE");
    assert_eq!(rows[0].get::<_, String>(2), "public.it_glass");
    // Only a superuser may turn it on.
    let mut a = s.connect("it_a");
    assert_eq!(
        sqlstate(
            &a.batch_execute("SET vsql_vault.break_glass = on")
                .unwrap_err()
        ),
        "42501"
    );
}

/// Runs as postgres, like the server, so files it makes belong to the server's user.
fn as_postgres(args: &[&str]) {
    let ok = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .status()
        .unwrap();
    assert!(ok.success(), "{args:?}");
}

#[test]
fn a_key_file_readable_by_others_is_refused_and_an_owner_only_one_signs() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_keyfile", 2, 1);
    let path = format!("{}/external.key", s.dir);
    let _ = std::fs::remove_file(&path);
    // 32-byte seed in hex, as the key file format says.
    let seed = "4f".repeat(32);
    as_postgres(&[
        "sh",
        "-c",
        &format!("printf '%s\\n' {seed} > {path} && chmod 644 {path}"),
    ]);
    // From the configuration file only (a session cannot point the vault at a key of its own).
    let configure = |su: &mut Client, value: Option<&str>| {
        match value {
            Some(v) => su.batch_execute(&format!(
                "ALTER SYSTEM SET vsql_vault.signing_key_file = '{v}'"
            )),
            None => su.batch_execute("ALTER SYSTEM RESET vsql_vault.signing_key_file"),
        }
        .unwrap();
        su.batch_execute("SELECT pg_reload_conf()").unwrap();
        let want = value.unwrap_or("").to_owned();
        poll("the key file setting to reach the session", 100, || {
            su.query_one("SHOW vsql_vault.signing_key_file", &[])
                .is_ok_and(|r| r.get::<_, String>(0) == want)
        });
    };
    configure(&mut su, Some(&path));
    let e = su.query_one("SELECT vault_checkpoint()", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "F0000", "{e}");
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("owner-only"), "{msg}");
    assert!(
        !msg.contains(&seed),
        "the key must never appear in an error"
    );
    as_postgres(&["chmod", "600", &path]);
    let n: i64 = su
        .query_one("SELECT vault_checkpoint()", &[])
        .unwrap()
        .get(0);
    assert!(n >= 1);
    let source: String = su
        .query_one(
            "SELECT k.source FROM vault.audit_checkpoints c JOIN vault.signing_keys k USING (key_id)
             ORDER BY c.id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(source, "signing_key_file");
    // Rotation is for the generated key only.
    assert_eq!(
        sqlstate(
            &su.query_one("SELECT vault_rotate_signing_key()", &[])
                .unwrap_err()
        ),
        "55000"
    );
    configure(&mut su, None);
    // Not even a superuser's session can point the vault at a key file of its own.
    for who in ["postgres", "it_admin"] {
        let e = s
            .connect(who)
            .batch_execute(&format!("SET vsql_vault.signing_key_file = '{path}'"))
            .unwrap_err();
        assert_eq!(sqlstate(&e), "55P02", "{who}");
    }
    let mut admin = s.connect("it_admin");
    // No role reads a private key through SQL: the generated key lives in the data directory.
    let e = admin
        .query_one("SELECT pg_read_file('vsql_vault_signing.key')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let v = db_verdict(&mut su, "it_keyfile");
    assert!(v.iter().all(|c| c.2), "{v:?}");
}

#[test]
fn rotation_keeps_old_checkpoints_verifiable() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_rotate", 3, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let old: String = su
        .query_one(
            "SELECT key_id FROM vault.audit_checkpoints ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let new: String = su
        .query_one("SELECT vault_rotate_signing_key()", &[])
        .unwrap()
        .get(0);
    assert_ne!(old, new);
    // The new key's registration is vouched for by the old key (a rotation statement).
    let (previous, signature_len): (Option<String>, Option<i32>) = su
        .query_one(
            "SELECT previous_key_id, length(rotation_signature) FROM vault.signing_keys WHERE key_id = $1",
            &[&new],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (previous.as_deref(), signature_len),
        (Some(old.as_str()), Some(64))
    );
    su.execute(
        "INSERT INTO it_rotate (tenant, event) VALUES ('acme', 'after rotation')",
        &[],
    )
    .unwrap();
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let identity: String = su
        .query_one(
            "SELECT identity FROM vault.protected_tables WHERE table_name = 'public.it_rotate'",
            &[],
        )
        .unwrap()
        .get(0);
    let keys: Vec<String> = su
        .query(
            "SELECT DISTINCT key_id FROM vault.audit_checkpoints WHERE table_identity = $1",
            &[&identity],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys.len(), 2, "checkpoints signed by both keys: {keys:?}");
    assert!(db_verdict(&mut su, "it_rotate").iter().all(|c| c.2));
    let (code, out) = offline_verdict(&s, &mut su, "it_rotate", "rotate");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn the_writer_checkpoints_on_schedule_and_exports_each_checkpoint_to_a_file() {
    let s = server();
    let mut su = setup(&s);
    let file = format!("{}/checkpoints-export.jsonl", s.dir);
    let _ = std::fs::remove_file(&file);
    su.batch_execute(&format!(
        "ALTER SYSTEM SET vsql_vault.checkpoint_export_path = '{file}'"
    ))
    .unwrap();
    su.batch_execute("ALTER SYSTEM SET vsql_vault.checkpoint_interval = 1")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    protected_table(&mut su, "it_scheduled", 4, 1);
    let identity: String = su
        .query_one(
            "SELECT identity FROM vault.protected_tables WHERE table_name = 'public.it_scheduled'",
            &[],
        )
        .unwrap()
        .get(0);
    poll("a scheduled checkpoint", 150, || {
        su.query_one(
            "SELECT count(*) FROM vault.audit_checkpoints WHERE table_identity = $1 AND seq = 4",
            &[&identity],
        )
        .unwrap()
        .get::<_, i64>(0)
            > 0
    });
    su.batch_execute("ALTER SYSTEM RESET vsql_vault.checkpoint_export_path")
        .unwrap();
    su.batch_execute("ALTER SYSTEM RESET vsql_vault.checkpoint_interval")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The file outside the database holds the signed head, and the offline tool accepts it.
    let text = std::fs::read_to_string(&file).expect("checkpoint export file");
    assert!(
        text.lines()
            .any(|l| l.contains(&identity) && l.contains("\"seq\":4")),
        "{text}"
    );
    let export = format!("{}/scheduled.export.jsonl", s.dir);
    let lines: Vec<String> = su
        .query("SELECT vault_export_audit('it_scheduled')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    // The file holds other tables' checkpoints too: this run is about it_scheduled.
    let (code, out) = run_verify(&mut su, &export, &file, &["--table", &identity]);
    assert_eq!(code, 0, "{out}");
    // Deleting the newest row is now caught offline with the file alone.
    behind_the_triggers(
        &mut su,
        "it_scheduled",
        "DELETE FROM it_scheduled WHERE chain_seq = 4",
    );
    let lines: Vec<String> = su
        .query("SELECT vault_export_audit('it_scheduled')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    let (code, out) = run_verify(&mut su, &export, &file, &["--table", &identity]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("at seq 4"), "{out}");
}

#[test]
fn an_export_emptied_before_it_was_taken_does_not_verify_offline() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_emptied", 5, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let identity = identity_of(&mut su, "it_emptied");
    let (code, out) = offline_verdict(&s, &mut su, "it_emptied", "emptied");
    assert_eq!(code, 0, "{out}");
    // Every row deleted around the triggers, then exported: an empty export.
    behind_the_triggers(&mut su, "it_emptied", "DELETE FROM it_emptied");
    let (code, out) = offline_verdict(&s, &mut su, "it_emptied", "emptied");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("FAILED  {identity} chain 0 at seq 1")),
        "{out}"
    );
    // Without --table, every checkpointed table must be there: one export alone fails.
    let export = format!("{}/emptied.export.jsonl", s.dir);
    let checkpoints = format!("{}/emptied.checkpoints.jsonl", s.dir);
    let (code, out) = run_verify(&mut su, &export, &checkpoints, &[]);
    assert_eq!(code, 1, "{out}");
    // Leaving tables out by name says so.
    let (_, out) = run_verify(&mut su, &export, &checkpoints, &["--table", &identity]);
    assert!(out.contains("skipped vault.access_log/"), "{out}");
    // Nothing at all is not a pass.
    let nothing = format!("{}/nothing.jsonl", s.dir);
    std::fs::write(&nothing, "").unwrap();
    let (code, out) = run_verify(&mut su, &nothing, &nothing, &[]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn ddl_on_the_access_log_itself_is_refused_or_recorded_without_stalling() {
    let s = server();
    let mut su = setup(&s);
    let count = |su: &mut Client, granted: bool| -> i64 {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'break_glass'
               AND details->>'object' = 'vault.access_log' AND granted = $1",
            &[&granted],
        )
        .unwrap()
        .get(0)
    };
    let (refused_before, granted_before) = (count(&mut su, false), count(&mut su, true));
    // Refused: the caller holds the log's lock when the guard runs, so the refusal is handed to
    // the writer without waiting and written once the caller has rolled back.
    let e = su
        .batch_execute("ALTER TABLE vault.access_log DISABLE TRIGGER vault_append_only")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV403");
    poll("the refusal to be recorded", 50, || {
        count(&mut su, false) > refused_before
    });
    // Break-glass: recorded in the same transaction as the command itself.
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE vault.access_log DISABLE TRIGGER vault_append_only;
         ALTER TABLE vault.access_log ENABLE ALWAYS TRIGGER vault_append_only;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    assert_eq!(count(&mut su, true), granted_before + 2);
    let v = db_verdict(&mut su, "vault.access_log");
    assert!(v.iter().all(|c| c.2), "{v:?}");
}

#[test]
fn evidence_tables_refuse_direct_inserts_even_from_a_superuser() {
    let s = server();
    let mut su = setup(&s);
    for sql in [
        "INSERT INTO vault.access_log (logged_at, role_name, session_user_name, backend_pid, operation, granted, details)
         VALUES (now(), 'postgres', 'postgres', 1, 'verify_audit', true, '{\"ok\": true, \"scope\": \"all\"}')",
        "INSERT INTO vault.audit_checkpoints (checkpointed_at, table_identity, chain, seq, head_hash, signed_at_us, key_id, signature)
         VALUES (now(), 'vault.access_log/1', 0, 1, '\\x00', 0, 'k', '\\x00')",
        "INSERT INTO vault.purge_log (purpose, external_id) VALUES ('forged', 'proof')",
    ] {
        let e = su.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
        assert!(
            e.as_db_error().unwrap().message().contains("written by vsql_vault only"),
            "{e}"
        );
    }
    // Restore mode keeps the chain fields a dump carries; it does not open a door for new rows.
    let e = su
        .batch_execute(
            "SET vsql_vault.restore_mode = on;
             INSERT INTO vault.access_log (logged_at, role_name, session_user_name, backend_pid, operation, granted)
             VALUES (now(), 'postgres', 'postgres', 1, 'get', true)",
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    su.batch_execute("RESET vsql_vault.restore_mode").unwrap();
    // The vault's own writes go on.
    let mut a = s.connect("it_a");
    let id = format!("ev-{}", std::process::id());
    put(&mut a, &id, b"x").unwrap();
    assert_eq!(log_count(&mut su, "put", &id, true), 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
}

#[test]
fn triggers_rules_policies_and_the_vaults_functions_are_guarded_too() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_guarded", 3, 1);
    su.batch_execute(
        "CREATE OR REPLACE FUNCTION it_swallow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;",
    )
    .unwrap();
    for sql in [
        // A BEFORE INSERT trigger returning NULL would silently drop access records.
        "CREATE TRIGGER it_drop BEFORE INSERT ON vault.access_log FOR EACH ROW EXECUTE FUNCTION it_swallow()",
        "CREATE TRIGGER it_drop BEFORE INSERT ON it_guarded FOR EACH ROW EXECUTE FUNCTION it_swallow()",
        "CREATE RULE it_nothing AS ON INSERT TO vault.access_log DO INSTEAD NOTHING",
        "CREATE RULE it_nothing AS ON INSERT TO it_guarded DO INSTEAD NOTHING",
        "CREATE POLICY it_pol ON it_guarded USING (true)",
        "ALTER TRIGGER vault_append_only ON it_guarded RENAME TO it_renamed",
        "CREATE OR REPLACE FUNCTION vault.refuse_modification() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
        "ALTER FUNCTION vault.refuse_modification() SECURITY DEFINER",
        "ALTER EXTENSION vsql_vault DROP FUNCTION vault.refuse_modification()",
    ] {
        let e = su.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "VV403", "{sql}: {e}");
    }
    // Still append-only, still intact, and the refusals are on record.
    let e = su
        .batch_execute("UPDATE it_guarded SET event = 'x'")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV403");
    assert!(db_verdict(&mut su, "it_guarded").iter().all(|c| c.2));
    poll("the refusals to be logged", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'break_glass' AND NOT granted
               AND details->>'command' IN ('CREATE TRIGGER', 'CREATE RULE', 'ALTER TRIGGER', 'CREATE FUNCTION')",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= 4
    });
    // Other functions and other tables' triggers are nobody's business of the vault.
    su.batch_execute(
        "CREATE TABLE IF NOT EXISTS it_free (id int);
         CREATE OR REPLACE TRIGGER it_free_t BEFORE INSERT ON it_free FOR EACH ROW EXECUTE FUNCTION it_swallow();
         CREATE OR REPLACE FUNCTION it_other() RETURNS int LANGUAGE sql AS 'SELECT 1';",
    )
    .unwrap();
}

#[test]
fn a_table_whose_name_needs_quotes_is_protected_and_verified() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "SET vsql_vault.break_glass = on; DROP TABLE IF EXISTS \"It Audit\"; RESET vsql_vault.break_glass;
         CREATE TABLE \"It Audit\" (id int, what text);",
    )
    .unwrap();
    su.batch_execute(
        "SELECT vault_protect_table('\"It Audit\"', 2);
         INSERT INTO \"It Audit\" VALUES (1, 'a'), (2, 'b');",
    )
    .unwrap();
    let v = db_verdict(&mut su, "\"It Audit\"");
    assert!(!v.is_empty());
    assert!(v.iter().all(|c| c.2), "{v:?}");
    let checked: i64 = su
        .query_one(
            "SELECT sum(rows_checked)::bigint FROM vault_verify_audit('\"It Audit\"')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(checked, 2);
    let e = su.batch_execute("DELETE FROM \"It Audit\"").unwrap_err();
    assert_eq!(sqlstate(&e), "VV403");
    // And it does not make the guard refuse DDL on unrelated tables.
    su.batch_execute("CREATE TABLE IF NOT EXISTS it_unrelated (id int); ALTER TABLE it_unrelated ADD COLUMN IF NOT EXISTS x int;")
        .unwrap();
}

#[test]
fn the_extensions_own_tables_cannot_be_given_to_vault_protect_table() {
    let s = server();
    let mut su = setup(&s);
    let mut admin = s.connect("it_admin");
    let e = admin
        .query_one("SELECT vault_protect_table('vault.entries')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let protected: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.protected_tables WHERE table_name = 'vault.entries'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(protected, 0);
}

/// Both verifiers accept every chain of `table`, and the database's checked `rows` rows.
fn both_verifiers_accept_all_rows(s: &Server, su: &mut Client, table: &str, tag: &str, rows: i64) {
    let v = db_verdict(su, table);
    assert!(v.iter().all(|c| c.2), "{v:?}");
    let checked: i64 = v
        .iter()
        .map(|c| c.3.split(' ').next().unwrap().parse::<i64>().unwrap_or(0))
        .sum();
    assert_eq!(checked, rows);
    let (code, out) = offline_verdict(s, su, table, tag);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn bulk_statements_savepoints_and_rollbacks_keep_the_chain_whole() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_bulk", 0, 4);
    su.batch_execute(
        "BEGIN;
         INSERT INTO it_bulk (tenant, event) SELECT 'acme', 'bulk ' || g FROM generate_series(1, 5000) g;
         INSERT INTO it_bulk (tenant, event) VALUES ('acme', 'single');
         SAVEPOINT s1;
         INSERT INTO it_bulk (tenant, event) SELECT 'acme', 'rolled back ' || g FROM generate_series(1, 100) g;
         ROLLBACK TO SAVEPOINT s1;
         INSERT INTO it_bulk (tenant, event) SELECT 'acme', 'after savepoint ' || g FROM generate_series(1, 100) g;
         COMMIT;",
    )
    .unwrap();
    // A statement that fails half-way leaves nothing behind to confuse the next one.
    let e = su
        .batch_execute(
            "INSERT INTO it_bulk (tenant, event) SELECT CASE WHEN g = 50 THEN NULL ELSE 'acme' END, 'x' FROM generate_series(1, 100) g",
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23502");
    su.batch_execute(
        "INSERT INTO it_bulk (tenant, event) SELECT 'acme', 'last ' || g FROM generate_series(1, 10) g",
    )
    .unwrap();
    let rows: i64 = su
        .query_one("SELECT count(*) FROM it_bulk", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 5000 + 1 + 100 + 10);
    both_verifiers_accept_all_rows(&s, &mut su, "it_bulk", "bulk", rows);
}

/// Updates of `vault.chain_heads` made so far by the open transaction of `c`.
/// Updates of vault.chain_heads counted by this backend and not yet reported: PostgreSQL 15's
/// `pg_stat_xact_*` views include earlier transactions whose counts are still pending, so a test
/// compares two readings inside one transaction.
fn head_writes_in_this_transaction(c: &mut postgres::Transaction) -> i64 {
    c.query_one(
        "SELECT COALESCE((SELECT n_tup_upd FROM pg_stat_xact_user_tables
                           WHERE relid = 'vault.chain_heads'::regclass), 0)",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn many_statements_in_one_transaction_write_each_head_once_at_commit_and_savepoints_take_links_back(
) {
    let s = server();
    let mut su = setup(&s);
    let tag = format!(
        "many-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    let put_calls = |su: &mut Client| -> i64 {
        su.query_one(
            "SELECT COALESCE(sum(calls), 0)::int8 FROM vault.access_daily
              WHERE role_name = 'it_a' AND operation = 'put' AND granted",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let calls_before = put_calls(&mut su);
    // Puts: each one's record is linked in its own statement (and subtransaction). The session
    // has held a chain in an earlier transaction: a subtransaction's links must still be taken
    // back in this one (they were not, when the callback was registered once per backend).
    let mut a = s.connect("it_a");
    a.execute(
        "SELECT vault_put('it.card', $1, '\\x01'::bytea)",
        &[&format!("{tag}-earlier")],
    )
    .unwrap();
    let mut tx = a.transaction().unwrap();
    let writes_before = head_writes_in_this_transaction(&mut tx);
    fn put_in(tx: &mut postgres::Transaction, id: String) {
        tx.execute("SELECT vault_put('it.card', $1, '\\x01'::bytea)", &[&id])
            .unwrap();
    }
    for i in 0..300 {
        put_in(&mut tx, format!("{tag}-{i}"));
    }
    tx.batch_execute("SAVEPOINT s1").unwrap();
    for i in 0..5 {
        put_in(&mut tx, format!("{tag}-rolled-back-{i}"));
    }
    tx.batch_execute("ROLLBACK TO SAVEPOINT s1").unwrap();
    for i in 300..303 {
        put_in(&mut tx, format!("{tag}-{i}"));
    }
    // The head row is written once, at commit, not once per statement (each write lengthened the
    // row's version chain, which made a transaction of many puts quadratic).
    assert_eq!(head_writes_in_this_transaction(&mut tx), writes_before);
    tx.commit().unwrap();
    let records: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'put' AND granted
              AND external_id LIKE $1 || '-%'",
            &[&tag],
        )
        .unwrap()
        .get(0);
    assert_eq!(records, 1 + 303, "the rolled-back puts left no record");
    // The daily counters count each record once, the rolled-back ones not at all.
    assert_eq!(put_calls(&mut su) - calls_before, 1 + 303);
    let v = db_verdict(&mut su, "vault.access_log");
    assert!(v.iter().all(|c| c.2), "{v:?}");
    let (code, out) = offline_verdict(&s, &mut su, "vault.access_log", "many_log");
    assert_eq!(code, 0, "{out}");

    // A protected table, one row per statement, after a transaction that chained a row.
    protected_table(&mut su, "it_many", 0, 2);
    su.execute(
        "INSERT INTO it_many (tenant, event) VALUES ('acme', 'an earlier transaction')",
        &[],
    )
    .unwrap();
    let mut tx = su.transaction().unwrap();
    let writes_before = head_writes_in_this_transaction(&mut tx);
    for i in 0..200 {
        tx.execute(
            "INSERT INTO it_many (tenant, event) VALUES ('acme', $1)",
            &[&format!("row {i}")],
        )
        .unwrap();
    }
    tx.batch_execute(
        "SAVEPOINT s1;
         INSERT INTO it_many (tenant, event) VALUES ('acme', 'rolled back 1');
         INSERT INTO it_many (tenant, event) VALUES ('acme', 'rolled back 2');
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s2;
         INSERT INTO it_many (tenant, event) VALUES ('acme', 'kept in a released savepoint');
         RELEASE SAVEPOINT s2;
         INSERT INTO it_many (tenant, event) VALUES ('acme', 'last');",
    )
    .unwrap();
    assert_eq!(head_writes_in_this_transaction(&mut tx), writes_before);
    tx.commit().unwrap();
    let rows: i64 = su
        .query_one("SELECT count(*) FROM it_many", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 1 + 202);
    both_verifiers_accept_all_rows(&s, &mut su, "it_many", "many", rows);
    // The next transaction continues the chains from the heads written at commit.
    su.batch_execute("INSERT INTO it_many (tenant, event) VALUES ('acme', 'next transaction')")
        .unwrap();
    let v = db_verdict(&mut su, "it_many");
    assert!(v.iter().all(|c| c.2), "{v:?}");
}

#[test]
fn a_forged_checkpoint_row_rehashed_to_fit_its_chain_fails_offline() {
    use vsql_vault_core::canonical::Value;
    use vsql_vault_core::chain::{row_hash, ExportRow};
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_cprow", 2, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let identity = identity_of(&mut su, "vault.audit_checkpoints");
    let mut rows: Vec<ExportRow> = su
        .query("SELECT vault_export_audit('vault.audit_checkpoints')", &[])
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).unwrap())
        .collect();
    let export = format!("{}/cprow.export.jsonl", s.dir);
    let checkpoints = format!("{}/cprow.checkpoints.jsonl", s.dir);
    let write = |rows: &[ExportRow]| {
        let text: Vec<String> = rows
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        std::fs::write(&export, text.join("\n") + "\n").unwrap();
    };
    write(&rows);
    std::fs::write(&checkpoints, "").unwrap();
    let (code, out) = run_verify(&mut su, &export, &checkpoints, &["--table", &identity]);
    assert_eq!(code, 0, "{out}");
    // The newest checkpoint row's signature forged and its row hash recomputed: every link holds.
    let last = rows.last_mut().unwrap();
    let signature = last
        .columns
        .iter_mut()
        .find(|(name, _)| name == "signature")
        .unwrap();
    signature.1 = Value::Bytes(vec![7u8; 64]);
    last.row_hash = row_hash(
        &last.table,
        last.chain,
        last.seq,
        &last.prev_hash,
        &last.columns,
    );
    write(&rows);
    let (code, out) = run_verify(&mut su, &export, &checkpoints, &["--table", &identity]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("checkpoint row has no valid signature"),
        "{out}"
    );
}

#[test]
fn a_row_inserted_with_the_chain_trigger_disabled_is_named_by_both_verifiers() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_unchained", 5, 1);
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE it_unchained DISABLE TRIGGER vault_chain;
         INSERT INTO it_unchained (tenant, event) VALUES ('acme', 'slipped in');
         ALTER TABLE it_unchained ENABLE ALWAYS TRIGGER vault_chain;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    // The database: the chain itself is whole, the stray row is reported on a line of its own.
    let rows = su
        .query(
            "SELECT chain, first_bad_seq, ok, detail FROM vault_verify_audit('it_unchained') ORDER BY chain NULLS LAST",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    let (chain, ok): (Option<i32>, bool) = (rows[0].get(0), rows[0].get(2));
    assert_eq!((chain, ok), (Some(0), true));
    let (chain, bad_seq, ok, detail): (Option<i32>, Option<i64>, bool, String) = (
        rows[1].get(0),
        rows[1].get(1),
        rows[1].get(2),
        rows[1].get(3),
    );
    assert_eq!((chain, bad_seq, ok), (None, None, false));
    assert!(detail.contains("1 row carries no chain fields"), "{detail}");
    // The export states it with null chain keys; the offline tool names it the same way.
    let line: String = su
        .query_one(
            "SELECT l FROM vault_export_audit('it_unchained') l WHERE l LIKE '%slipped in%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        line.contains(r#""chain":null,"seq":null,"prev_hash":null,"row_hash":null"#),
        "{line}"
    );
    let (code, out) = offline_verdict(&s, &mut su, "it_unchained", "unchained");
    assert_eq!(code, 1, "{out}");
    let identity = identity_of(&mut su, "it_unchained");
    assert!(
        out.contains(&format!(
            "FAILED  {identity}: 1 row carries no chain fields"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("ok      {identity} chain 0: 5 rows intact")),
        "{out}"
    );
}

#[test]
fn a_duplicated_row_is_named_at_its_sequence_number_and_order_does_not_matter() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_duplicate", 5, 1);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let identity = identity_of(&mut su, "it_duplicate");
    let lines: Vec<String> = su
        .query("SELECT vault_export_audit('it_duplicate')", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let checkpoints = format!("{}/duplicate.checkpoints.jsonl", s.dir);
    std::fs::write(&checkpoints, "").unwrap();
    let check = |tag: &str, lines: &[String]| {
        let export = format!("{}/duplicate.{tag}.jsonl", s.dir);
        std::fs::write(&export, lines.join("\n") + "\n").unwrap();
        run_verify(&mut s.connect("postgres"), &export, &checkpoints, &[])
    };
    // Rows in any order verify: the tool sorts them by chain and sequence number first.
    let mut shuffled = lines.clone();
    shuffled.reverse();
    let (code, out) = check("shuffled", &shuffled);
    assert_eq!(code, 0, "{out}");
    // A row given twice is a duplicate at its own sequence number, not a gap.
    let mut doubled = lines.clone();
    doubled.push(lines[2].clone());
    let (code, out) = check("doubled", &doubled);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "FAILED  {identity} chain 0 at seq 3: row 3 appears more than once"
        )),
        "{out}"
    );
}

#[test]
fn values_hash_the_same_under_any_session_settings() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         DROP TABLE IF EXISTS it_settings;
         DROP DOMAIN IF EXISTS it_moment;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    // A vault call of its own: the break-glass record above holds the access log's chain head
    // until that transaction ends.
    su.batch_execute(
        "CREATE DOMAIN it_moment AS timestamptz;
         CREATE TABLE it_settings (id int PRIMARY KEY, f8 float8, f4 real, span interval,
             moments timestamptz[], period tstzrange, price money, blobs bytea[], days date[],
             moment it_moment, spot point, amount numeric, doc jsonb, rel regclass, t time, tz timetz);
         SELECT vault_protect_table('it_settings', 2);",
    )
    .unwrap();
    // Written under settings that change the text of nearly every type above.
    let mut odd = s.connect("postgres");
    odd.batch_execute(
        "SET extra_float_digits = -3; SET IntervalStyle = 'sql_standard'; SET TimeZone = 'Asia/Kolkata';
         SET DateStyle = 'SQL, DMY'; SET bytea_output = 'escape'; SET search_path = vault, public;
         INSERT INTO it_settings VALUES
           (1, pi(), 1.0/3, '1 day 2 hours 3.5 seconds', ARRAY['2026-01-02 03:04:05+00'::timestamptz, now()],
            tstzrange('2026-01-01', '2026-02-01'), 12.34, ARRAY['\\x00ff'::bytea, 'abc'], ARRAY['2026-03-04'::date],
            '2026-05-06 07:08:09.123456+02', point(1.0/3, 2e-20), 1.5, '{\"a\": 0.1}', 'vault.entries', '12:34:56.789', '12:34:56+05:30');
         INSERT INTO it_settings (id, f8, moments) VALUES (2, 1e300, '{}'), (3, 'NaN', NULL);",
    )
    .unwrap();
    // The pinned settings are the hashing's alone: the session keeps its own.
    let kept: (String, String) = odd
        .query_one(
            "SELECT current_setting('TimeZone'), current_setting('extra_float_digits')",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(kept, ("Asia/Kolkata".to_string(), "-3".to_string()));
    // Verified under the defaults, and under another set of odd settings.
    assert_chains_verify(&mut su, Some("it_settings"));
    odd.batch_execute(
        "SET extra_float_digits = 0; SET IntervalStyle = 'iso_8601'; SET TimeZone = 'America/New_York';
         SET DateStyle = 'German'; SET search_path = public;",
    )
    .unwrap();
    assert_chains_verify(&mut odd, Some("it_settings"));
    // The export holds the text forms made under the pinned settings, whoever exports.
    let exported: String = odd
        .query_one(
            "SELECT string_agg(l, E'\\n') FROM vault_export_audit('it_settings') l",
            &[],
        )
        .unwrap()
        .get(0);
    for text in [
        "\"1 day 02:00:03.5\"",
        "\"{\\\"\\\\\\\\x00ff\\\",\\\"\\\\\\\\x616263\\\"}\"",
        "\"vault.entries\"",
        "\"3.141592653589793\"",
    ] {
        assert!(exported.contains(text), "{text} not in {exported}");
    }
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let (code, out) = offline_verdict(&s, &mut odd, "it_settings", "settings");
    assert_eq!(code, 0, "{out}");
    // The purge log holds a bytea[] (the inclusion path): a delete made under escape output
    // still verifies.
    let mut a = s.connect("it_a");
    put(&mut a, "settings-1", b"x").unwrap();
    a.batch_execute(
        "SET bytea_output = 'escape'; SELECT vault_delete('it.card', 'settings-1', 'test')",
    )
    .unwrap();
    // Checked from its own row on, in its own chain (other tests leave deliberately broken
    // purge-log rows in a shared cluster, on whichever caller chain their session took).
    let row = su
        .query_one(
            "SELECT chain_id, chain_seq FROM vault.purge_log WHERE external_id = 'settings-1' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    let (chain, seq): (i32, i64) = (row.get(0), row.get(1));
    let lines: Vec<String> = su
        .query(
            "SELECT l FROM vault_export_audit('vault.purge_log', $1) l
              WHERE (l::jsonb->>'chain')::int = $2",
            &[&seq, &chain],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let export = format!("{}/settings.purge_log.jsonl", s.dir);
    let no_checkpoints = format!("{}/settings.no_checkpoints.jsonl", s.dir);
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    std::fs::write(&no_checkpoints, "").unwrap();
    let (code, out) = run_verify(&mut su, &export, &no_checkpoints, &["--partial"]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_generated_column_is_left_out_of_hash_export_and_check_alike() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         DROP TABLE IF EXISTS it_generated;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    su.batch_execute(
        "CREATE TABLE it_generated (id int PRIMARY KEY, amount int,
                                    doubled int GENERATED ALWAYS AS (amount * 2) STORED);
         INSERT INTO it_generated (id, amount) VALUES (1, 5);
         SELECT vault_protect_table('it_generated', 1);",
    )
    .unwrap();
    su.batch_execute("INSERT INTO it_generated (id, amount) VALUES (2, 7), (3, NULL)")
        .unwrap();
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    // Rows chained at protection and rows chained on insert verify in the database...
    assert_chains_verify(&mut su, Some("it_generated"));
    // ...the export does not carry the derived column...
    let exported: String = su
        .query_one(
            "SELECT string_agg(l, E'\\n') FROM vault_export_audit('it_generated') l",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!exported.contains("doubled"), "{exported}");
    assert!(exported.contains("\"amount\""), "{exported}");
    // ...and the offline tool agrees.
    let (code, out) = offline_verdict(&s, &mut su, "it_generated", "generated");
    assert_eq!(code, 0, "{out}");
}

/// A break-glass command is recorded in its own transaction (so the record commits exactly when
/// the command does); audited calls later in that transaction must not wait for the audit writer
/// behind that record (they timed out with VV503), and everything chains on afterwards.
#[test]
fn audited_calls_work_in_the_transaction_of_a_break_glass_command() {
    let s = server();
    let mut su = setup(&s);
    protected_table(&mut su, "it_glass_same_txn", 3, 1);
    let mut a = s.connect("it_a");
    put(&mut a, "glass-1", b"one").unwrap();
    let mut tx = su.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL vsql_vault.break_glass = on;
         ALTER TABLE it_glass_same_txn ADD COLUMN note text;
         SET LOCAL vsql_vault.audit_timeout = '3s';",
    )
    .unwrap();
    // The superuser stores and reads in the same transaction.
    tx.execute(
        "SELECT vault_put('it.card', 'glass-2', '\\x0102'::bytea)",
        &[],
    )
    .unwrap();
    let got: Vec<u8> = tx
        .query_one(
            "SELECT encrypted_value FROM vault_get('it.card', 'glass-2')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(got, vec![1, 2]);
    tx.commit().unwrap();
    // The break-glass record and both calls' records are in the log, and every chain verifies.
    let n: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'break_glass'
               AND details->>'object' LIKE '%it_glass_same_txn%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(n >= 1, "the break-glass command is recorded");
    assert_eq!(log_count(&mut su, "put", "glass-2", true), 1);
    assert_eq!(log_count(&mut su, "get", "glass-2", true), 1);
    // Other sessions' calls go on being recorded while a break-glass transaction is open.
    let mut tx = su.transaction().unwrap();
    tx.batch_execute(
        "SET LOCAL vsql_vault.break_glass = on;
         ALTER TABLE it_glass_same_txn ADD COLUMN note2 text;",
    )
    .unwrap();
    assert_eq!(get(&mut a, "glass-1").unwrap(), b"one".to_vec());
    tx.commit().unwrap();
    // A transaction that locks the log itself against the writer is refused at once (55P03).
    let mut tx = su.transaction().unwrap();
    tx.batch_execute("LOCK TABLE vault.access_log IN SHARE MODE")
        .unwrap();
    // 55P03, not VV503: refused before waiting for the writer (the wait ends in VV503).
    let e = tx
        .query_one(
            "SELECT encrypted_value FROM vault_get('it.card', 'glass-2')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "55P03", "{e:?}");
    drop(tx);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    assert_chains_verify(&mut su, Some("vault.access_log"));
}

/// A row skipped by ON CONFLICT DO NOTHING had already been given its place in the chain by the
/// chain trigger, leaving a gap that verification reported as tampering. Such statements are
/// refused before any row is chained (0A000); plain inserts, and ON CONFLICT on tables that are
/// not protected, work as before.
#[test]
fn on_conflict_that_can_skip_rows_is_refused_on_a_protected_table_and_leaves_no_gap() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         DROP TABLE IF EXISTS it_upsert;
         RESET vsql_vault.break_glass;
         DROP TABLE IF EXISTS it_upsert_plain;
         CREATE TABLE it_upsert (id bigserial PRIMARY KEY, k text UNIQUE NOT NULL, v text);
         CREATE TABLE it_upsert_plain (k text PRIMARY KEY);
         SELECT vault_protect_table('it_upsert', 1);
         INSERT INTO it_upsert (k, v) VALUES ('a', 'first');",
    )
    .unwrap();
    for sql in [
        "INSERT INTO it_upsert (k, v) VALUES ('a', 'again'), ('b', 'new') ON CONFLICT DO NOTHING",
        "INSERT INTO it_upsert (k, v) VALUES ('a', 'again') ON CONFLICT (k) DO UPDATE SET v = 'x' WHERE false",
        "WITH ins AS (INSERT INTO it_upsert (k, v) VALUES ('a', 'cte') ON CONFLICT DO NOTHING RETURNING id)
         SELECT count(*) FROM ins",
        "DO $$ BEGIN INSERT INTO it_upsert (k) VALUES ('a') ON CONFLICT DO NOTHING; END $$",
    ] {
        let e = su.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "0A000", "{sql}: {e:?}");
        let message = e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_default();
        assert!(message.contains("public.it_upsert"), "{message}");
    }
    // What an application does instead: insert only the new rows.
    su.batch_execute(
        "INSERT INTO it_upsert (k, v) SELECT k, 'new' FROM (VALUES ('a'), ('b')) n(k)
          WHERE NOT EXISTS (SELECT 1 FROM it_upsert u WHERE u.k = n.k)",
    )
    .unwrap();
    let rows: i64 = su
        .query_one("SELECT count(*) FROM it_upsert", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);
    assert_chains_verify(&mut su, Some("it_upsert"));
    // Unprotected tables keep their ON CONFLICT, and EXPLAIN of a refused statement still works.
    su.batch_execute(
        "INSERT INTO it_upsert_plain VALUES ('a') ON CONFLICT DO NOTHING;
         INSERT INTO it_upsert_plain VALUES ('a') ON CONFLICT DO NOTHING;
         EXPLAIN INSERT INTO it_upsert (k) VALUES ('a') ON CONFLICT DO NOTHING;",
    )
    .unwrap();
}
