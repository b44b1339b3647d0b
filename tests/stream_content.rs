//! What a decrypted change says (issue 16 items 3-5): a REPLICA IDENTITY FULL old key keeps its
//! NULL columns and every change names its key columns; `add-tables`/`filter-tables` follow
//! wal2json's escaping; binary logical-message content arrives byte for byte.

mod common;

use common::*;
use postgres::Client;

/// The decrypted changes a slot holds (peeked, not consumed), with the given options.
fn peek_changes(
    s: &Server,
    su: &mut Client,
    kek: &str,
    slot: &str,
    opts: &str,
) -> Result<Vec<serde_json::Value>, postgres::Error> {
    let rows = su.query(
        &format!("SELECT data FROM pg_logical_slot_peek_changes('{slot}', NULL, NULL {opts})"),
        &[],
    )?;
    let text: String = rows.iter().map(|r| r.get::<_, String>(0) + "\n").collect();
    let file = format!("{}/{slot}.stream", s.dir);
    std::fs::write(&file, text).unwrap();
    let (code, out, err) = decrypt(su, kek, &file);
    assert_eq!(code, 0, "{err}");
    Ok(out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

/// pg_recvlogical receiving the slot live into `file` until killed, with PGOPTIONS `options`.
fn live_receiver(s: &Server, slot: &str, file: &str, options: &str) -> std::process::Child {
    let port = s.port.to_string();
    std::process::Command::new("pg_recvlogical")
        .env("PGOPTIONS", options)
        .args([
            "-h",
            &s.dir,
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            &s.db,
            "--slot",
            slot,
            "--start",
            "--no-loop",
            "-f",
            file,
        ])
        .spawn()
        .unwrap()
}

fn names(cols: &serde_json::Value) -> Vec<String> {
    cols.as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_full_identity_old_key_keeps_nulls_and_every_change_names_its_key() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "3c"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_full, it_pk;
         CREATE TABLE it_full (a int, b text);
         ALTER TABLE it_full REPLICA IDENTITY FULL;
         CREATE TABLE it_pk (id int PRIMARY KEY, v text);",
    )
    .unwrap();
    fresh_slot(&mut su, "it_key_slot");
    su.batch_execute(
        "INSERT INTO it_full VALUES (1, NULL);
         DELETE FROM it_full WHERE a = 1;
         INSERT INTO it_pk VALUES (1, 'x');
         UPDATE it_pk SET v = 'y' WHERE id = 1;
         DELETE FROM it_pk WHERE id = 1;",
    )
    .unwrap();
    let changes = peek_changes(&s, &mut su, &kek, "it_key_slot", "").unwrap();
    let of = |t: &str| -> Vec<&serde_json::Value> {
        changes.iter().filter(|c| c["table"] == t).collect()
    };
    let full = of("it_full");
    let delete = full.iter().find(|c| c["action"] == "D").unwrap();
    assert_eq!(names(&delete["identity"]), ["a", "b"], "{delete}");
    assert_eq!(delete["identity"][0]["value"], "1");
    assert!(delete["identity"][1]["value"].is_null(), "{delete}");
    assert_eq!(delete["key"], serde_json::json!(["a", "b"]), "{delete}");
    let pk = of("it_pk");
    assert_eq!(pk.len(), 3);
    for c in &pk {
        assert_eq!(c["key"], serde_json::json!(["id"]), "{c}");
    }
    // The update did not change the key: no old key is sent, yet the key is named.
    assert_eq!(pk[1]["action"], "U");
    assert_eq!(pk[1]["identity"], serde_json::json!([]));
    assert_eq!(names(&pk[2]["identity"]), ["id"]);
    su.execute("SELECT pg_drop_replication_slot('it_key_slot')", &[])
        .unwrap();
}

#[test]
fn table_options_follow_wal2json_escaping() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "4d"));
    su.batch_execute(
        "DROP TABLE IF EXISTS \"filter table_6\", \"a,b\", it_plain;
         CREATE TABLE \"filter table_6\" (id int PRIMARY KEY);
         CREATE TABLE \"a,b\" (id int PRIMARY KEY);
         CREATE TABLE it_plain (id int PRIMARY KEY);",
    )
    .unwrap();
    fresh_slot(&mut su, "it_esc_slot");
    su.batch_execute(
        "INSERT INTO \"filter table_6\" VALUES (1); INSERT INTO \"a,b\" VALUES (1);
         INSERT INTO it_plain VALUES (1);",
    )
    .unwrap();
    let tables = |su: &mut Client, opts: &str| -> Vec<String> {
        let mut t: Vec<String> = peek_changes(&s, su, &kek, "it_esc_slot", opts)
            .unwrap()
            .iter()
            .filter(|c| c["action"] == "I")
            .map(|c| c["table"].as_str().unwrap().to_owned())
            .collect();
        t.sort();
        t
    };
    assert_eq!(
        tables(&mut su, r", 'add-tables', 'public.filter\ table_6'"),
        ["filter table_6"]
    );
    assert_eq!(tables(&mut su, r", 'add-tables', 'public.a\,b'"), ["a,b"]);
    assert_eq!(
        tables(
            &mut su,
            r", 'filter-tables', ' public.a\,b , *.filter\ table_6 '"
        ),
        ["it_plain"]
    );
    assert_eq!(
        tables(&mut su, ", 'add-tables', 'public.*'"),
        ["a,b", "filter table_6", "it_plain"]
    );
    // `\*` is a table named "*", not a wildcard.
    assert!(tables(&mut su, r", 'add-tables', 'public.\*'").is_empty());
    // What wal2json refuses, and what it would silently match nothing with, is refused.
    for bad in [
        r"public.filter table_6",
        r"nodot",
        r"public.it_plain\",
        r".it_plain",
        r"public.",
    ] {
        let e = peek_changes(
            &s,
            &mut su,
            &kek,
            "it_esc_slot",
            &format!(", 'add-tables', '{bad}'"),
        )
        .unwrap_err();
        assert_eq!(sqlstate(&e), "22023", "{bad}: {e}");
    }
    su.execute("SELECT pg_drop_replication_slot('it_esc_slot')", &[])
        .unwrap();
}

#[test]
fn binary_message_content_arrives_byte_for_byte() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "5e"));
    fresh_slot(&mut su, "it_msg_slot");
    su.batch_execute(
        "SELECT pg_logical_emit_message(true, 'bin', '\\xff00fe'::bytea);
         SELECT pg_logical_emit_message(false, 'nul', '\\x00'::bytea);
         SELECT pg_logical_emit_message(true, 'txt', 'plain ü');",
    )
    .unwrap();
    let changes = peek_changes(&s, &mut su, &kek, "it_msg_slot", "").unwrap();
    let msg = |prefix: &str| -> &serde_json::Value {
        changes
            .iter()
            .find(|c| c["action"] == "M" && c["prefix"] == prefix)
            .unwrap_or_else(|| panic!("no message {prefix}: {changes:?}"))
    };
    let bin = msg("bin");
    assert_eq!(bin["content"], "/wD+", "{bin}");
    assert_eq!(bin["content_encoding"], "base64", "{bin}");
    // NUL is valid UTF-8 and arrives as text.
    let nul = msg("nul");
    assert_eq!(nul["content"], "\u{0}", "{nul}");
    assert!(nul.get("content_encoding").is_none(), "{nul}");
    let txt = msg("txt");
    assert_eq!(txt["content"], "plain ü", "{txt}");
    assert!(txt.get("content_encoding").is_none(), "{txt}");
    su.execute("SELECT pg_drop_replication_slot('it_msg_slot')", &[])
        .unwrap();
}

#[test]
fn a_data_key_seals_at_most_data_key_max_bytes() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "8f"));
    su.batch_execute(
        "DROP TABLE IF EXISTS it_dek; CREATE TABLE it_dek (id int PRIMARY KEY, v text)",
    )
    .unwrap();
    fresh_slot(&mut su, "it_dek_slot");
    for i in 0..3 {
        su.execute("INSERT INTO it_dek VALUES ($1, repeat('x', 2000))", &[&i])
            .unwrap();
    }
    let sessions = |su: &mut Client| -> usize {
        let rows = su
            .query(
                "SELECT data FROM pg_logical_slot_peek_changes('it_dek_slot', NULL, NULL)",
                &[],
            )
            .unwrap();
        rows.iter()
            .filter(|r| r.get::<_, String>(0).contains("\"type\":\"session\""))
            .count()
    };
    assert_eq!(sessions(&mut su), 1);
    su.batch_execute("SET vsql_vault.data_key_max_bytes = '1kB'")
        .unwrap();
    // Each 2 kB transaction needs a key of its own; the stream still decrypts whole.
    assert_eq!(sessions(&mut su), 3);
    let changes = peek_changes(&s, &mut su, &kek, "it_dek_slot", "").unwrap();
    assert_eq!(changes.iter().filter(|c| c["table"] == "it_dek").count(), 3);
    su.batch_execute("RESET vsql_vault.data_key_max_bytes")
        .unwrap();
    su.execute("SELECT pg_drop_replication_slot('it_dek_slot')", &[])
        .unwrap();
}

#[test]
fn a_kek_rotation_or_revocation_reaches_a_running_walsender() {
    let s = server();
    let mut su = setup(&s);
    let v1 = kek_line("v1", "a1");
    let v2 = kek_line("v2", "b2");
    let kek = set_kek(&s, &mut su, &v1);
    su.batch_execute("DROP TABLE IF EXISTS it_live; CREATE TABLE it_live (id int PRIMARY KEY)")
        .unwrap();
    fresh_slot(&mut su, "it_live_slot");
    let file = format!("{}/live.stream", s.dir);
    let _ = std::fs::remove_file(&file);
    let mut child = live_receiver(&s, "it_live_slot", &file, "");
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let batches = |n: usize| {
        poll("batches", 100, || {
            lines().iter().filter(|l| l["type"] == "batch").count() >= n
        })
    };
    su.batch_execute("INSERT INTO it_live VALUES (1)").unwrap();
    batches(1);
    // Rotation: v2 becomes active while the walsender runs.
    set_kek(&s, &mut su, &format!("{v1}{v2}"));
    su.batch_execute("INSERT INTO it_live VALUES (2)").unwrap();
    batches(2);
    // Revocation of v1: its line is gone; nothing more is wrapped under it.
    set_kek(&s, &mut su, &v2);
    su.batch_execute("INSERT INTO it_live VALUES (3)").unwrap();
    batches(3);
    let _ = child.kill();
    let _ = child.wait();
    let kek_ids: Vec<String> = lines()
        .iter()
        .filter(|l| l["type"] == "session")
        .map(|l| l["kek_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        kek_ids,
        ["v1", "v2", "v2"],
        "one walsender session throughout"
    );
    std::fs::write(&kek, format!("{v1}{v2}")).unwrap();
    let (code, out, err) = decrypt(&mut su, &kek, &file);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.contains("it_live")).count(), 3);
    su.execute("SELECT pg_drop_replication_slot('it_live_slot')", &[])
        .unwrap();
}

#[test]
fn a_data_key_is_replaced_at_data_key_max_age() {
    let s = server();
    let mut su = setup(&s);
    set_kek(&s, &mut su, &kek_line("v1", "c3"));
    su.batch_execute("DROP TABLE IF EXISTS it_age; CREATE TABLE it_age (id int PRIMARY KEY)")
        .unwrap();
    fresh_slot(&mut su, "it_age_slot");
    let file = format!("{}/age.stream", s.dir);
    let _ = std::fs::remove_file(&file);
    let mut child = live_receiver(&s, "it_age_slot", &file, "-c vsql_vault.data_key_max_age=1");
    let count = |kind: &str| -> usize {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("\"type\":\"{kind}\"")))
            .count()
    };
    su.batch_execute("INSERT INTO it_age VALUES (1)").unwrap();
    poll("first batch", 100, || count("batch") >= 1);
    su.batch_execute("INSERT INTO it_age VALUES (2)").unwrap();
    poll("second batch", 100, || count("batch") >= 2);
    // Within the second, both batches may share a key; past it, the next one gets a new key.
    let before = count("session");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    su.batch_execute("INSERT INTO it_age VALUES (3)").unwrap();
    poll("third batch", 100, || count("batch") >= 3);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(count("session"), before + 1);
    // The killed pg_recvlogical's walsender may still hold the slot for a moment.
    poll("slot released", 100, || {
        su.execute("SELECT pg_drop_replication_slot('it_age_slot')", &[])
            .is_ok()
    });
}
