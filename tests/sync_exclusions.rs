//! Source-side column exclusion (issue 16, items 1 and 2): an exclusion is bound to the column's
//! identity, so renames of the column, its table or schema keep it; it survives pg_dump and
//! pg_restore; and no value of an excluded column appears in any transaction that commits after
//! the exclusion commits, whatever the transaction's start time, spilled to disk or not. The
//! vault's own tables leave only when published, and a superuser can require the allow-list for
//! every table (issue 16, item 6).

mod common;

use common::*;
use postgres::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The decrypted changes of a slot up to now.
fn decoded(s: &Server, su: &mut Client, kek: &str, slot: &str) -> String {
    let file = format!("{}/{slot}.stream", s.dir);
    recvlogical(s, su, slot, &file);
    let (code, out, err) = decrypt(su, kek, &file);
    assert_eq!(code, 0, "{err}");
    out
}

/// The scope report's entry for `table`.
fn scope_of(c: &mut Client, table: &str) -> serde_json::Value {
    let report: String = c
        .query_one("SELECT vault_scope_report()::text", &[])
        .unwrap()
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .unwrap_or_else(|| panic!("{table} not in the scope report: {v}"))
        .clone()
}

fn names(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            if key == "published" {
                c.as_str().unwrap().to_owned()
            } else {
                c["column"].as_str().unwrap().to_owned()
            }
        })
        .collect()
}

/// The names of the columns of every change to `table` whose `id` column is `id`.
fn columns_of(out: &str, table: &str, id: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|c| {
            c["table"] == table
                && c["columns"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x["name"] == "id" && x["value"] == id))
        })
        .map(|c| {
            c["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn an_exclusion_follows_its_column_through_renames_and_drops() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "c1"));
    su.batch_execute(
        "DROP SCHEMA IF EXISTS ex_s CASCADE; DROP SCHEMA IF EXISTS ex_s2 CASCADE;
         CREATE SCHEMA ex_s; GRANT USAGE ON SCHEMA ex_s TO PUBLIC;
         CREATE TABLE ex_s.cards (id int PRIMARY KEY, pan text, note text, cvv text);",
    )
    .unwrap();
    fresh_slot(&mut su, "ex_rename_slot");
    let mut admin = s.connect("it_admin");
    admin
        .batch_execute(
            "SELECT vault_sync_exclude('ex_s.cards', 'pan');
             SELECT vault_sync_exclude('ex_s.cards', 'cvv');",
        )
        .unwrap();

    // The column is renamed: it stays excluded, under its new name.
    su.batch_execute(
        "ALTER TABLE ex_s.cards RENAME COLUMN pan TO card_number;
         INSERT INTO ex_s.cards VALUES (1, 'pan-after-column-rename', 'n1', 'cvv-one');",
    )
    .unwrap();
    let t = scope_of(&mut admin, "ex_s.cards");
    assert_eq!(names(&t, "excluded"), ["card_number", "cvv"], "{t}");
    assert_eq!(names(&t, "published"), ["id", "note"], "{t}");
    // Include and exclude go by the current name: the old one is unknown, the new one is the
    // same exclusion (no second row).
    let e = admin
        .batch_execute("SELECT vault_sync_include('ex_s.cards', 'pan')")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42703", "{e}");
    admin
        .batch_execute("SELECT vault_sync_exclude('ex_s.cards', 'card_number')")
        .unwrap();
    let rows: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.sync_exclusions WHERE relid = 'ex_s.cards'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 2);

    // The table and its schema are renamed: still excluded.
    su.batch_execute(
        "ALTER TABLE ex_s.cards RENAME TO cards2; ALTER SCHEMA ex_s RENAME TO ex_s2;
         INSERT INTO ex_s2.cards2 VALUES (2, 'pan-after-table-rename', 'n2', 'cvv-two');",
    )
    .unwrap();
    let t = scope_of(&mut admin, "ex_s2.cards2");
    assert_eq!(names(&t, "excluded"), ["card_number", "cvv"], "{t}");

    // A dropped column stays excluded (harmless) and is reported as dropped.
    su.batch_execute(
        "ALTER TABLE ex_s2.cards2 DROP COLUMN cvv;
         INSERT INTO ex_s2.cards2 VALUES (3, 'pan-after-drop', 'n3');",
    )
    .unwrap();
    let t = scope_of(&mut admin, "ex_s2.cards2");
    assert_eq!(names(&t, "excluded"), ["card_number", "cvv"], "{t}");
    assert_eq!(t["excluded"][1]["dropped"], true, "{t}");
    assert_eq!(names(&t, "published"), ["id", "note"], "{t}");

    // Included again by its current name, the column is published again.
    admin
        .batch_execute("SELECT vault_sync_include('ex_s2.cards2', 'card_number')")
        .unwrap();
    su.batch_execute("INSERT INTO ex_s2.cards2 VALUES (4, 'pan-after-include', 'n4')")
        .unwrap();
    let t = scope_of(&mut admin, "ex_s2.cards2");
    assert_eq!(names(&t, "published"), ["id", "card_number", "note"], "{t}");

    // A table dropped and re-created under the same name does not inherit the exclusion: it is
    // another relation (another OID), and the scope report shows it published.
    admin
        .batch_execute("SELECT vault_sync_exclude('ex_s2.cards2', 'card_number')")
        .unwrap();
    su.batch_execute(
        "DROP TABLE ex_s2.cards2;
         CREATE TABLE ex_s2.cards2 (id int PRIMARY KEY, card_number text, note text);
         INSERT INTO ex_s2.cards2 VALUES (5, 'pan-in-recreated-table', 'n5');",
    )
    .unwrap();
    let t = scope_of(&mut admin, "ex_s2.cards2");
    assert_eq!(names(&t, "excluded"), Vec::<String>::new(), "{t}");

    let out = decoded(&s, &mut su, &kek, "ex_rename_slot");
    for leaked in [
        "pan-after-column-rename",
        "cvv-one",
        "pan-after-table-rename",
        "cvv-two",
        "pan-after-drop",
    ] {
        assert!(!out.contains(leaked), "{leaked} left the server: {out}");
    }
    assert_eq!(columns_of(&out, "cards", "1"), [["id", "note"]]);
    assert_eq!(columns_of(&out, "cards2", "2"), [["id", "note"]]);
    assert!(out.contains("pan-after-include"), "{out}");
    assert!(out.contains("pan-in-recreated-table"), "{out}");
    su.execute("SELECT pg_drop_replication_slot('ex_rename_slot')", &[])
        .unwrap();
}

#[test]
fn exclusions_survive_dump_and_restore_rebound_by_their_current_names() {
    let s = server();
    let mut su = setup(&s);
    for db in ["vault_excl_src", "vault_excl_dst"] {
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
        su.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
    // Only the source is served while the dump is restored: a writer in the target would sign a
    // checkpoint of its own (a key row) before the dumped key rows arrive.
    let mut src = s.connect_to("vault_excl_src", "postgres", "excl");
    src.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    serve(&s, &mut su, "vault_excl_src");
    // A dropped column before the excluded one: the restored table numbers its columns anew.
    src.batch_execute(
        "CREATE TABLE cards (id int PRIMARY KEY, gone text, pan text, note text);
         ALTER TABLE cards DROP COLUMN gone;
         SELECT vault_sync_exclude('cards', 'pan');
         ALTER TABLE cards RENAME COLUMN pan TO card_number;
         CREATE TABLE ledger (id int); SELECT vault_sync_publish('ledger');
         ALTER TABLE ledger RENAME TO ledger2;",
    )
    .unwrap();
    drop(src);
    let file = format!("{}/excl.dump", s.dir);
    let (ok, err) = client_program(&s, "pg_dump", &["-Fc", "-f", &file, "vault_excl_src"]);
    assert!(ok, "pg_dump: {err}");
    let (ok, err) = client_program(
        &s,
        "pg_restore",
        &["--exit-on-error", "-d", "vault_excl_dst", &file],
    );
    assert!(ok, "pg_restore: {err}");
    serve(&s, &mut su, "vault_excl_dst");
    let mut dst = s.connect_to("vault_excl_dst", "it_admin", "excl");
    let t = scope_of(&mut dst, "public.cards");
    assert_eq!(names(&t, "excluded"), ["card_number"], "{t}");
    assert_eq!(names(&t, "published"), ["id", "note"], "{t}");
    // The allow-list too, by the table's current name.
    let (_, allow) = report_tables(&mut dst);
    assert_eq!(allow["tables"][0]["table"], "public.ledger2", "{allow}");
    drop(dst);
    su.batch_execute("ALTER SYSTEM RESET vsql_vault.database")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.wait_for_writer(&s.db);
    for db in ["vault_excl_src", "vault_excl_dst"] {
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
    }
}

/// Session A opens a transaction; session B excludes a column and commits; A writes again and
/// commits. Whatever the interleaving, no transaction committing after the exclusion carries the
/// column's values, and A's transaction is spilled to disk on the way.
#[test]
fn no_excluded_value_in_a_transaction_committing_after_the_exclusion() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "c2"));
    su.batch_execute(
        "DROP TABLE IF EXISTS ex_il, ex_il2, ex_filler;
         CREATE TABLE ex_il (id int PRIMARY KEY, pan text);
         CREATE TABLE ex_il2 (id int PRIMARY KEY, pan text);
         CREATE TABLE ex_filler (id int, filler text);",
    )
    .unwrap();
    su.batch_execute("ALTER SYSTEM SET logical_decoding_work_mem = '64kB'")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    fresh_slot(&mut su, "ex_open_slot");
    let filler = "INSERT INTO ex_filler SELECT g, repeat('f', 400) FROM generate_series(1, 1000) g";

    // 1. A has written to the table before B excludes the column.
    let mut a = s.connect("postgres");
    a.batch_execute(&format!(
        "BEGIN; INSERT INTO ex_il VALUES (1, 'il-a-before'); {filler};"
    ))
    .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let b = {
        let done = done.clone();
        let s = server();
        std::thread::spawn(move || {
            let mut b = s.connect("it_admin");
            b.batch_execute("SELECT vault_sync_exclude('ex_il', 'pan')")
                .unwrap();
            done.store(true, Ordering::SeqCst);
        })
    };
    poll("the exclusion to commit or wait for A", 50, || {
        done.load(Ordering::SeqCst)
            || su
                .query_one(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'ex_il'::regclass",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                > 0
    });
    let excluded_before_a_committed = done.load(Ordering::SeqCst);
    a.batch_execute(&format!(
        "INSERT INTO ex_il VALUES (2, 'il-a-after'); {filler}; COMMIT;"
    ))
    .unwrap();
    b.join().unwrap();
    su.batch_execute("INSERT INTO ex_il VALUES (3, 'il-after-exclusion')")
        .unwrap();

    // 2. A is open (and spilling) before B excludes the column, and writes to the table only
    // after: neither of A's rows carries the value.
    a.batch_execute(&format!("BEGIN; {filler};")).unwrap();
    let mut admin = s.connect("it_admin");
    admin
        .batch_execute("SELECT vault_sync_exclude('ex_il2', 'pan')")
        .unwrap();
    a.batch_execute(&format!(
        "INSERT INTO ex_il2 VALUES (1, 'il2-a-first'); {filler};
         INSERT INTO ex_il2 VALUES (2, 'il2-a-second'); COMMIT;"
    ))
    .unwrap();

    let out = decoded(&s, &mut su, &kek, "ex_open_slot");
    su.batch_execute("ALTER SYSTEM RESET logical_decoding_work_mem")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    let spilled = |su: &mut Client| -> i64 {
        su.query_one(
            "SELECT coalesce(sum(spill_txns), 0)::bigint FROM pg_stat_replication_slots
              WHERE slot_name = 'ex_open_slot'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    poll("the slot's statistics", 25, || spilled(&mut su) > 0);
    // The promise, for whichever order the two transactions committed in.
    if excluded_before_a_committed {
        for v in ["il-a-before", "il-a-after"] {
            assert!(
                !out.contains(v),
                "{v} was published by a transaction that committed after the exclusion"
            );
        }
    }
    assert!(!out.contains("il-after-exclusion"), "{out}");
    assert!(!out.contains("il2-a-first") && !out.contains("il2-a-second"));
    // The exclusion waited for A, which had written to the table: A committed first, so its
    // rows were published (a transaction that commits before the exclusion does is not covered).
    assert!(
        !excluded_before_a_committed,
        "vault_sync_exclude did not wait for the open writer of the table"
    );
    assert!(out.contains("il-a-before") && out.contains("il-a-after"));
    su.execute("SELECT pg_drop_replication_slot('ex_open_slot')", &[])
        .unwrap();
}

/// The tables of every change in a decoded stream, as `schema.table`.
fn tables_in(out: &str) -> std::collections::BTreeSet<String> {
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|c| c["table"].is_string())
        .map(|c| {
            format!(
                "{}.{}",
                c["schema"].as_str().unwrap(),
                c["table"].as_str().unwrap()
            )
        })
        .collect()
}

/// Every table the signed scope report says leaves.
fn report_tables(c: &mut Client) -> (Vec<String>, serde_json::Value) {
    let report: String = c
        .query_one("SELECT vault_scope_report()::text", &[])
        .unwrap()
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    let tables = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap().to_owned())
        .collect();
    (tables, v["allow_list"].clone())
}

#[test]
fn the_vaults_own_tables_leave_only_when_published_and_an_allow_list_can_be_required() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "c3"));
    su.batch_execute(
        "DROP TABLE IF EXISTS ex_plain; CREATE TABLE ex_plain (id int PRIMARY KEY, note text);",
    )
    .unwrap();
    fresh_slot(&mut su, "ex_pub_slot");
    let mut admin = s.connect("it_admin");
    let mut a = s.connect("it_a");
    // Entries, access records and policies are written; none of them leaves by default.
    put(&mut a, "ex-pub-1", b"vault-entry-bytes").unwrap();
    get(&mut a, "ex-pub-1").unwrap();
    admin
        .batch_execute("SELECT vault_set_retention_policy('ex.before-publish', 30, 7)")
        .unwrap();
    su.batch_execute("INSERT INTO ex_plain VALUES (1, 'plain-1')")
        .unwrap();
    let out = decoded(&s, &mut su, &kek, "ex_pub_slot");
    let tables = tables_in(&out);
    assert!(
        tables.iter().all(|t| !t.starts_with("vault.")),
        "the vault's own tables left the server: {tables:?}"
    );
    assert!(tables.contains("public.ex_plain"), "{tables:?}");
    let (listed, allow) = report_tables(&mut admin);
    assert!(
        listed.iter().all(|t| !t.starts_with("vault.")),
        "{listed:?}"
    );
    assert!(listed.contains(&"public.ex_plain".to_owned()), "{listed:?}");
    assert_eq!(allow["required"], false, "{allow}");

    // Only an admin opts a table in; it is logged and reported.
    let e = a
        .batch_execute("SELECT vault_sync_publish('vault.retention_policies')")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    admin
        .batch_execute("SELECT vault_sync_publish('vault.retention_policies')")
        .unwrap();
    admin
        .batch_execute("SELECT vault_set_retention_policy('ex.after-publish', 30, 7)")
        .unwrap();
    let out = decoded(&s, &mut su, &kek, "ex_pub_slot");
    assert!(out.contains("ex.after-publish"), "{out}");
    assert!(!out.contains("ex.before-publish"), "{out}");
    let tables = tables_in(&out);
    assert!(
        tables
            .iter()
            .all(|t| !t.starts_with("vault.") || t == "vault.retention_policies"),
        "{tables:?}"
    );
    let (listed, allow) = report_tables(&mut admin);
    assert!(
        listed.contains(&"vault.retention_policies".to_owned()),
        "{listed:?}"
    );
    assert_eq!(
        allow["tables"][0]["table"], "vault.retention_policies",
        "{allow}"
    );
    let logged: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'sync_publish' AND granted
               AND details->>'table' = 'vault.retention_policies'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);

    // A superuser makes the allow-list mandatory: only listed tables leave.
    let e = admin
        .batch_execute("SET vsql_vault.sync_allow_list_required = on")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "55P02", "{e}");
    su.batch_execute("ALTER SYSTEM SET vsql_vault.sync_allow_list_required = on")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    poll("the setting to apply", 25, || {
        admin
            .query_one(
                "SELECT current_setting('vsql_vault.sync_allow_list_required')",
                &[],
            )
            .unwrap()
            .get::<_, String>(0)
            == "on"
    });
    su.batch_execute("INSERT INTO ex_plain VALUES (2, 'plain-2-unlisted')")
        .unwrap();
    admin
        .batch_execute("SELECT vault_sync_publish('ex_plain')")
        .unwrap();
    su.batch_execute("INSERT INTO ex_plain VALUES (3, 'plain-3-listed')")
        .unwrap();
    let out = decoded(&s, &mut su, &kek, "ex_pub_slot");
    let (listed, allow) = report_tables(&mut admin);
    su.batch_execute("ALTER SYSTEM RESET vsql_vault.sync_allow_list_required")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(!out.contains("plain-2-unlisted"), "{out}");
    assert!(out.contains("plain-3-listed"), "{out}");
    assert!(
        tables_in(&out)
            .iter()
            .all(|t| t == "public.ex_plain" || t == "vault.retention_policies"),
        "{out}"
    );
    // The report covers exactly the tables that leave.
    assert_eq!(
        listed,
        ["public.ex_plain", "vault.retention_policies"],
        "{listed:?}"
    );
    assert_eq!(allow["required"], true, "{allow}");
    assert_eq!(allow["tables"].as_array().unwrap().len(), 2, "{allow}");
    admin
        .batch_execute(
            "SELECT vault_sync_unpublish('ex_plain');
             SELECT vault_sync_unpublish('vault.retention_policies');",
        )
        .unwrap();
    su.execute("SELECT pg_drop_replication_slot('ex_pub_slot')", &[])
        .unwrap();
}
