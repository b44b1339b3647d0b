//! Continuity of the encrypted stream across sessions, and the source it comes from (issue 16,
//! items 7 and 8), against a real server: streams made by real decoding sessions
//! (`pg_logical_slot_get_changes`, which confirms what it returns, and `..._peek_changes`, which
//! does not), consumed by `vsql-vault decrypt --state` over several runs, with batches or whole
//! sessions taken out the way a broker could lose them after the slot confirmed them.

mod common;

use common::cluster::OwnCluster;
use common::*;
use postgres::Client;

/// A slot of the test, dropped when the test ends, passed or failed (the shared cluster has few).
struct Slot {
    dir: String,
    port: u16,
    db: String,
    name: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let s = Server {
            dir: self.dir.clone(),
            port: self.port,
            db: self.db.clone(),
        };
        let _ = s
            .connect("postgres")
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.name]);
    }
}

/// The KEK, the table and a fresh slot `slot`: (KEK file, the slot's guard).
fn prepare(s: &Server, su: &mut Client, slot: &str) -> (String, Slot) {
    let kek = use_kek(s, su, &kek_line("v1", "5c"));
    su.batch_execute("CREATE TABLE IF NOT EXISTS sc_t (id serial PRIMARY KEY, note text)")
        .unwrap();
    fresh_slot(su, slot);
    let guard = Slot {
        dir: s.dir.clone(),
        port: s.port,
        db: s.db.clone(),
        name: slot.to_owned(),
    };
    (kek, guard)
}

/// Commits `n` transactions of one row each.
fn commit_rows(su: &mut Client, n: usize) {
    for _ in 0..n {
        su.execute("INSERT INTO sc_t (note) VALUES ('secret')", &[])
            .unwrap();
    }
}

/// One decoding session through SQL: `get` confirms what it returns to the slot, `peek` does not.
fn session(su: &mut Client, slot: &str, confirm: bool) -> Vec<String> {
    let f = if confirm {
        "pg_logical_slot_get_changes"
    } else {
        "pg_logical_slot_peek_changes"
    };
    su.query(&format!("SELECT data FROM {f}($1, NULL, NULL)"), &[&slot])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn field(line: &str, name: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v[name].clone()
}

/// A consumer with a state file of its own, run once per stream.
struct Consumer {
    keys: Vec<String>,
    kek: String,
    dir: String,
    tag: String,
    runs: usize,
}

impl Consumer {
    fn new(s: &Server, su: &mut Client, kek: &str, tag: &str) -> Consumer {
        let c = Consumer {
            keys: public_keys(su),
            kek: kek.to_owned(),
            dir: s.dir.clone(),
            tag: tag.to_owned(),
            runs: 0,
        };
        let _ = std::fs::remove_file(c.state());
        c
    }

    fn state(&self) -> String {
        format!("{}/sc-{}.state", self.dir, self.tag)
    }

    /// (exit status, changes printed, standard error) of one run with the state file.
    fn run(&mut self, lines: &[String], extra: &[&str]) -> (i32, Vec<String>, String) {
        self.runs += 1;
        let file = format!("{}/sc-{}-{}.stream", self.dir, self.tag, self.runs);
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let state = self.state();
        let mut args = vec!["--state", state.as_str()];
        args.extend(extra);
        let (code, out, err) = decrypt_with(&self.keys, &self.kek, &file, &args);
        (code, out.lines().map(str::to_owned).collect(), err)
    }
}

#[test]
fn two_sessions_over_two_runs_continue_and_nothing_is_printed_twice() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_two");
    commit_rows(&mut su, 2);
    let one = session(&mut su, "sc_two", true);
    commit_rows(&mut su, 3);
    let two = session(&mut su, "sc_two", true);

    // The session line names the source, and where the server resumed.
    let system_id: String = su
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .unwrap()
        .get(0);
    let oid: i64 = su
        .query_one(
            "SELECT oid::int8 FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .unwrap()
        .get(0);
    let header = &one[0];
    assert_eq!(field(header, "type"), "session");
    assert_eq!(field(header, "version"), 2);
    assert_eq!(field(header, "system_id"), system_id.as_str());
    assert_eq!(field(header, "database"), s.db.as_str());
    assert_eq!(field(header, "database_oid"), oid);
    assert_eq!(
        field(header, "prev_lsn"),
        "0/0",
        "a new slot sent nothing before"
    );
    let last_of_one = field(&one[*batch_lines(&one).last().unwrap()], "commit_lsn");
    assert_eq!(field(&two[0], "prev_lsn"), last_of_one);

    let mut c = Consumer::new(&s, &mut su, &kek, "two");
    let (code, out, err) = c.run(&one, &[]);
    assert_eq!((code, out.len()), (0, 2), "{err}");
    assert!(err.is_empty(), "nothing to report: {err}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(c.state()).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the state file is owner-only");
    let (code, out, err) = c.run(&two, &[]);
    assert_eq!((code, out.len()), (0, 3), "{err}");
    assert!(err.is_empty(), "nothing to report: {err}");
    // The same session fed again: every batch already processed.
    let (code, out, err) = c.run(&two, &[]);
    assert_eq!((code, out.len()), (0, 0), "{err}");
    assert!(err.contains("already processed, skipped"), "{err}");

    // The signature covers the new fields.
    let mut forged = one.clone();
    forged[0] = forged[0].replace(&system_id, "1234567890");
    let mut fresh = Consumer::new(&s, &mut su, &kek, "two-forged");
    let (code, out, err) = fresh.run(&forged, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(err.contains("signature does not verify"), "{err}");
}

#[test]
fn the_last_batch_of_a_session_dropped_is_detected_when_the_next_session_arrives() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_tail");
    commit_rows(&mut su, 2);
    let mut one = session(&mut su, "sc_tail", true);
    // The slot confirmed both transactions; the consumer never sees the second.
    let dropped = one.remove(*batch_lines(&one).last().unwrap());
    let missing = field(&dropped, "commit_lsn").as_str().unwrap().to_owned();
    commit_rows(&mut su, 1);
    let two = session(&mut su, "sc_tail", true);

    let mut c = Consumer::new(&s, &mut su, &kek, "tail");
    let (code, out, err) = c.run(&one, &[]);
    assert_eq!((code, out.len()), (0, 1), "undetectable yet: {err}");
    let (code, out, err) = c.run(&two, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(
        err.contains("gap") && err.contains(&missing),
        "names the range: {err}"
    );

    // The same within one run, without a state file.
    let file = format!("{}/sc-tail-one-run.stream", s.dir);
    std::fs::write(&file, [one, two].concat().join("\n") + "\n").unwrap();
    let (code, out, err) = decrypt_with(&public_keys(&mut su), &kek, &file, &[]);
    assert_eq!((code, out.lines().count()), (1, 1), "{err}");
    assert!(err.contains("gap") && err.contains(&missing), "{err}");
}

#[test]
fn a_whole_session_dropped_is_detected() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_whole");
    commit_rows(&mut su, 1);
    let one = session(&mut su, "sc_whole", true);
    commit_rows(&mut su, 2);
    let two = session(&mut su, "sc_whole", true);
    let missing = field(&two[*batch_lines(&two).last().unwrap()], "commit_lsn");
    commit_rows(&mut su, 1);
    let three = session(&mut su, "sc_whole", true);

    let mut c = Consumer::new(&s, &mut su, &kek, "whole");
    let (code, out, err) = c.run(&one, &[]);
    assert_eq!((code, out.len()), (0, 1), "{err}");
    let (code, out, err) = c.run(&three, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(
        err.contains("gap") && err.contains(missing.as_str().unwrap()),
        "{err}"
    );

    // The slot dropped and re-created under the same name: a new slot, whose first session
    // cannot continue what this consumer processed from the old one.
    let mut c = Consumer::new(&s, &mut su, &kek, "recreated");
    let (code, _, err) = c.run(&one, &[]);
    assert_eq!(code, 0, "{err}");
    fresh_slot(&mut su, "sc_whole");
    commit_rows(&mut su, 1);
    let renewed = session(&mut su, "sc_whole", true);
    assert_eq!(field(&renewed[0], "prev_lsn"), "0/0");
    let (code, out, err) = c.run(&renewed, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(err.contains("re-created"), "{err}");
}

#[test]
fn a_replay_of_processed_transactions_is_skipped_not_printed_twice() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_replay");
    commit_rows(&mut su, 2);
    // peek: the slot is not advanced, so the next session sends the same transactions again.
    let first = session(&mut su, "sc_replay", false);
    commit_rows(&mut su, 1);
    let again = session(&mut su, "sc_replay", false);
    assert_eq!(batch_lines(&again).len(), 3);

    let mut c = Consumer::new(&s, &mut su, &kek, "replay");
    let (code, out, err) = c.run(&first, &[]);
    assert_eq!((code, out.len()), (0, 2), "{err}");
    let (code, out, err) = c.run(&again, &[]);
    assert_eq!((code, out.len()), (0, 1), "only the new transaction: {err}");
    assert!(err.contains("already processed, skipped"), "{err}");
    let ids = |out: &[String]| -> Vec<String> {
        out.iter()
            .map(|l| field(l, "columns")[0]["value"].as_str().unwrap().to_owned())
            .collect()
    };
    let all_ids = {
        let mut fresh = Consumer::new(&s, &mut su, &kek, "replay-fresh");
        ids(&fresh.run(&again, &[]).1)
    };
    assert_eq!(ids(&out), all_ids[2..].to_vec());

    // Confirmed at last: everything replayed once more and skipped; what follows continues.
    let confirmed = session(&mut su, "sc_replay", true);
    let (code, out, err) = c.run(&confirmed, &[]);
    assert_eq!((code, out.len()), (0, 0), "{err}");
    commit_rows(&mut su, 1);
    let next = session(&mut su, "sc_replay", true);
    let (code, out, err) = c.run(&next, &[]);
    assert_eq!((code, out.len()), (0, 1), "{err}");
    assert!(err.is_empty(), "{err}");

    // A temporary slot works the same (it has its directory, and so its log, while it lives).
    su.execute(
        "SELECT pg_create_logical_replication_slot('sc_temp', 'vsql_vault', true)",
        &[],
    )
    .unwrap();
    commit_rows(&mut su, 1);
    let temp = session(&mut su, "sc_temp", true);
    assert_eq!(field(&temp[0], "prev_lsn"), "0/0");
    let mut t = Consumer::new(&s, &mut su, &kek, "temp");
    let (code, out, err) = t.run(&temp, &[]);
    assert_eq!((code, out.len()), (0, 1), "{err}");
}

#[test]
fn a_stream_from_another_cluster_is_refused_once_bound_and_expectations_are_checked() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_bound");
    commit_rows(&mut su, 1);
    let mine = session(&mut su, "sc_bound", true);
    let my_id = field(&mine[0], "system_id");
    let my_id = my_id.as_str().unwrap();

    // Another cluster: same database name, same slot name, same KEK; its own system identifier.
    let other = OwnCluster::start(&format!("{}/sc-other", s.dir), s.port + 34, &s.db, "");
    let mut osu = setup(&other.server);
    let _their_slot = prepare(&other.server, &mut osu, "sc_bound");
    commit_rows(&mut osu, 1);
    let theirs = session(&mut osu, "sc_bound", true);
    let their_id = field(&theirs[0], "system_id");
    assert_ne!(their_id.as_str().unwrap(), my_id);

    let mut c = Consumer::new(&s, &mut su, &kek, "bound");
    c.keys.extend(public_keys(&mut osu));
    let (code, out, err) = c.run(&mine, &[]);
    assert_eq!((code, out.len()), (0, 1), "{err}");
    let (code, out, err) = c.run(&theirs, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(
        err.contains("bound to") && err.contains(their_id.as_str().unwrap()),
        "{err}"
    );

    // Without a state, the expectations given on the command line.
    let file = format!("{}/sc-bound-theirs.stream", s.dir);
    std::fs::write(&file, theirs.join("\n") + "\n").unwrap();
    let (code, out, err) = decrypt_with(&c.keys, &kek, &file, &["--expect-system-id", my_id]);
    assert_eq!((code, out.lines().count()), (1, 0), "{err}");
    assert!(err.contains("expected system identifier"), "{err}");
    let (code, _, err) = decrypt_with(
        &c.keys,
        &kek,
        &file,
        &[
            "--expect-system-id",
            their_id.as_str().unwrap(),
            "--expect-database",
            &s.db,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = decrypt_with(&c.keys, &kek, &file, &["--expect-database", "postgres"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("expected database"), "{err}");
}

#[test]
fn a_start_past_the_slots_confirmed_position_is_refused() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_skip");
    commit_rows(&mut su, 1);
    let one = session(&mut su, "sc_skip", true);
    // Committed after the confirmed position, before the position the client asks to start at.
    commit_rows(&mut su, 1);
    let start: String = su
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    commit_rows(&mut su, 1);
    let end: String = su
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let file = format!("{}/sc-skip-two.stream", s.dir);
    let _ = std::fs::remove_file(&file);
    let (ok, err) = client_program(
        &s,
        "pg_recvlogical",
        &[
            "-d",
            &s.db,
            "--slot",
            "sc_skip",
            "--start",
            "-I",
            &start,
            "--endpos",
            &end,
            "--no-loop",
            "-f",
            &file,
        ],
    );
    assert!(ok, "pg_recvlogical: {err}");
    let two: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(field(&two[0], "resume_lsn"), start.as_str());
    // Through a walsender too, the session line names the database it decodes.
    assert_eq!(field(&two[0], "database"), s.db.as_str());

    let mut c = Consumer::new(&s, &mut su, &kek, "skip");
    let (code, _, err) = c.run(&one, &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = c.run(&two, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(err.contains("at the client's request"), "{err}");
}

#[test]
fn a_format_1_stream_is_accepted_with_a_note_and_refused_once_bound() {
    use vsql_vault_core::envelope::{Kek, KekRing};
    use vsql_vault_core::keys;
    use vsql_vault_core::stream::Sealer;
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_old");
    // A stream as 0.1.0 and earlier 0.2.0 servers wrote it (session line of format 1), sealed
    // under the same KEK by a signing key of its own.
    let old_key = keys::generate().unwrap();
    let ring = KekRing::parse("k", &kek_line("v1", "5c")).unwrap();
    let (mut sealer, header) =
        Sealer::start("sc_old", &Kek::File(ring), old_key.clone(), 1).unwrap();
    let mut old = vec![header];
    for i in 0..2 {
        let change = format!("{{\"action\":\"I\",\"table\":\"t\",\"n\":{i}}}");
        old.push(
            sealer
                .batch(&[change], "0/10", "0/20", 1, 5, vec![])
                .unwrap(),
        );
    }
    assert!(field(&old[0], "version").is_null());
    let mut c = Consumer::new(&s, &mut su, &kek, "old");
    c.keys.push(hex::encode(old_key.verifying_key().as_bytes()));
    let (code, out, err) = c.run(&old, &[]);
    assert_eq!((code, out.len()), (0, 2), "{err}");
    assert!(
        err.contains("format 1") && err.contains("cannot be checked"),
        "{err}"
    );
    let (code, _, err) = c.run(&old, &["--expect-system-id", "1"]);
    assert_eq!(
        code, 1,
        "an expectation cannot be checked on format 1: {err}"
    );

    // Once bound to a source that writes format 2, a format-1 session is a downgrade.
    commit_rows(&mut su, 1);
    let new = session(&mut su, "sc_old", true);
    let (code, _, err) = c.run(&new, &[]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = c.run(&old, &[]);
    assert_eq!((code, out.len()), (1, 0), "{err}");
    assert!(err.contains("format 1"), "{err}");
}

#[test]
fn a_new_data_key_in_the_middle_of_a_large_transaction_continues_it() {
    let s = server();
    let mut su = setup(&s);
    let (kek, _slot) = prepare(&s, &mut su, "sc_large");
    // One transaction of about 6 MB: sent in 4 MiB chunks, each under a new data key (a new
    // session line between two chunks of the same transaction).
    su.execute(
        "INSERT INTO sc_t (note) SELECT repeat('y', 2000) FROM generate_series(1, 3000)",
        &[],
    )
    .unwrap();
    su.batch_execute("SET vsql_vault.data_key_max_bytes = '1kB'")
        .unwrap();
    let lines = session(&mut su, "sc_large", false);
    su.batch_execute("RESET vsql_vault.data_key_max_bytes")
        .unwrap();
    let sessions = lines
        .iter()
        .filter(|l| l.contains("\"type\":\"session\""))
        .count();
    assert!(sessions >= 2, "{sessions} session lines");
    let later = lines
        .iter()
        .skip(1)
        .find(|l| l.contains("\"type\":\"session\""))
        .unwrap();
    assert!(
        field(later, "prev_records").as_i64().unwrap() > 0,
        "{later}"
    );

    let mut c = Consumer::new(&s, &mut su, &kek, "large");
    let (code, out, err) = c.run(&lines, &[]);
    assert_eq!((code, out.len()), (0, 3000), "{err}");
    assert!(err.is_empty(), "{err}");
}
