//! Source-side column exclusion (issue 16, items 1 and 2): an exclusion is bound to the column's
//! identity, so renames of the column, its table or schema keep it; it survives pg_dump and
//! pg_restore; and no value of an excluded column appears in any transaction that commits after
//! the exclusion commits, whatever the transaction's start time, spilled to disk or not.

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
    let mut src = s.connect_to("vault_excl_src", "postgres", "excl");
    src.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    // A dropped column before the excluded one: the restored table numbers its columns anew.
    src.batch_execute(
        "CREATE TABLE cards (id int PRIMARY KEY, gone text, pan text, note text);
         ALTER TABLE cards DROP COLUMN gone;
         SELECT vault_sync_exclude('cards', 'pan');
         ALTER TABLE cards RENAME COLUMN pan TO card_number;",
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
    let mut dst = s.connect_to("vault_excl_dst", "it_admin", "excl");
    let t = scope_of(&mut dst, "public.cards");
    assert_eq!(names(&t, "excluded"), ["card_number"], "{t}");
    assert_eq!(names(&t, "published"), ["id", "note"], "{t}");
    drop(dst);
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
