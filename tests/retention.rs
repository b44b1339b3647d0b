//! Retention enforcement against a real server: the worker on schedule, SIGHUP and SIGTERM,
//! proofs checked in SQL and offline, and a crash in the middle of a sweep.

mod common;

use common::*;
use postgres::Client;
use std::thread;
use std::time::Duration;

fn set_and_reload(su: &mut Client, setting: &str, value: Option<&str>) {
    match value {
        Some(v) => su
            .batch_execute(&format!("ALTER SYSTEM SET {setting} = '{v}'"))
            .unwrap(),
        None => su
            .batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
            .unwrap(),
    }
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
}

fn wait_until(what: &str, secs: u32, done: impl FnMut() -> bool) {
    poll(what, secs * 5, done);
}

fn live(su: &mut Client, purpose: &str) -> i64 {
    su.query_one(
        "SELECT count(*) FROM vault.entries WHERE purpose = $1 AND purged_at IS NULL",
        &[&purpose],
    )
    .unwrap()
    .get(0)
}

/// Entries of `purpose`, already expired, written directly (the sweep is what is under test).
fn expired_entries(su: &mut Client, purpose: &str, method: &str, n: i32) {
    let mut admin = server().connect("it_admin");
    admin
        .execute(
            "SELECT vault_set_retention_policy($1, 30, 1, $2)",
            &[&purpose, &method],
        )
        .unwrap();
    su.execute(
        "INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner, created_at,
                                    updated_at, expires_at)
         SELECT $1, 'e' || g, '\\xdeadbeef', 'owner-only', 'it_a', now() - interval '2 days',
                now() - interval '2 days', now() - interval '1 second'
         FROM generate_series(1, $2) g
         ON CONFLICT (purpose, external_id) DO NOTHING",
        &[&purpose, &n],
    )
    .unwrap();
}

/// VACUUMs of vault.entries so far (the retention worker's count here, not autovacuum's).
fn vacuums(su: &mut Client) -> i64 {
    su.query_one(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'vault.entries'::regclass",
        &[],
    )
    .unwrap()
    .get(0)
}

fn worker_pid(su: &mut Client) -> Option<i32> {
    su.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'vsql_vault retention worker' AND datname = current_database()",
        &[],
    )
    .unwrap()
    .map(|r| r.get(0))
}

/// Exports the proofs from `from_id` on and checks them with the offline tool.
fn offline_purge_check(s: &Server, su: &mut Client, tag: &str, from_id: i64) -> (i32, String) {
    let file = format!("{}/{tag}.proofs.jsonl", s.dir);
    let lines: Vec<String> = su
        .query("SELECT vault_export_purge_proofs($1)", &[&from_id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let mut args = vec!["verify-purge".to_string(), "--proofs".into(), file];
    for k in common::public_keys(su) {
        args.push("--public-key".into());
        args.push(k);
    }
    common::offline_tools(&args)
}

#[test]
fn killed_mid_sweep_every_entry_is_present_or_has_exactly_one_proof() {
    let s = server();
    let mut su = setup(&s);
    // The long variant (VSQL_VAULT_LONG_TESTS=1) crashes a sweep of 1,000,000 entries.
    let long = std::env::var("VSQL_VAULT_LONG_TESTS").is_ok_and(|v| v == "1");
    let n: i32 = if long { 1_000_000 } else { 5_000 };
    expired_entries(&mut su, "it.crash", "physical-delete", n);
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", Some("250"));
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("1"));
    // Kill the server as soon as the first batches have committed.
    wait_until("the first sweep batch", 60, || {
        su.query_one(
            "SELECT count(*) FROM vault.purge_log WHERE purpose = 'it.crash'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            > 0
    });
    drop(su);
    s.pg_ctl(&["-m", "immediate", "stop"]);
    s.pg_ctl(&["start", "-l", &format!("{}/server.log", s.dir)]);
    s.wait_for_writer(&s.db);
    let mut su = s.connect("postgres");
    let broken: i64 = su
        .query_one(
            "SELECT count(*) FROM generate_series(1, $1) g
             WHERE (SELECT count(*) FROM vault.entries WHERE purpose = 'it.crash' AND external_id = 'e' || g)
                 + (SELECT count(*) FROM vault.purge_log WHERE purpose = 'it.crash' AND external_id = 'e' || g) <> 1",
            &[&n],
        )
        .unwrap()
        .get(0);
    assert_eq!(broken, 0, "entries neither present nor proven exactly once");
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", None);
    wait_until(
        "the sweep to finish after the restart",
        if long { 900 } else { 120 },
        || live(&mut su, "it.crash") == 0,
    );
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
    let proofs: i64 = su
        .query_one(
            "SELECT count(DISTINCT external_id) FROM vault.purge_log WHERE purpose = 'it.crash'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(proofs, i64::from(n));
}

#[test]
fn sighup_changes_the_interval() {
    let s = server();
    let mut su = setup(&s);
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("3600"));
    // Let the worker take the long interval and finish any sweep it was in.
    thread::sleep(Duration::from_secs(2));
    expired_entries(&mut su, "it.hup", "physical-delete", 3);
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        live(&mut su, "it.hup"),
        3,
        "no sweep while the interval is an hour"
    );
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("1"));
    wait_until("a sweep after the reload", 30, || {
        live(&mut su, "it.hup") == 0
    });
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
}

#[test]
fn sigterm_stops_the_worker_and_the_launcher_starts_a_new_one() {
    let s = server();
    let mut su = setup(&s);
    wait_until("the retention worker", 30, || worker_pid(&mut su).is_some());
    let pid = worker_pid(&mut su).unwrap();
    su.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    wait_until("the worker to stop on SIGTERM", 10, || {
        worker_pid(&mut su) != Some(pid)
    });
    wait_until("a new retention worker", 30, || {
        worker_pid(&mut su).is_some_and(|p| p != pid)
    });
}

#[test]
fn worker_sweeps_on_schedule_and_its_proofs_verify_in_sql_and_offline() {
    let s = server();
    let mut su = setup(&s);
    let vacuums_before = vacuums(&mut su);
    // Only this run's proofs count: earlier runs and other tests tamper with theirs on purpose.
    let first: i64 = su
        .query_one("SELECT COALESCE(max(id), 0) + 1 FROM vault.purge_log", &[])
        .unwrap()
        .get(0);
    expired_entries(&mut su, "it.sched", "physical-delete", 5);
    expired_entries(&mut su, "it.shred", "crypto-shred", 2);
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("1"));
    wait_until("the scheduled sweep", 30, || {
        live(&mut su, "it.sched") + live(&mut su, "it.shred") == 0
    });
    // The worker vacuums afterwards, so destroyed values do not stay in dead tuples.
    wait_until("the vacuum after the sweep", 30, || {
        vacuums(&mut su) > vacuums_before
    });
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
    let run: (i64, Option<String>) = su
        .query_one(
            "SELECT entries_purged, errors FROM vault.sweep_runs WHERE started_by = 'schedule' AND entries_purged > 0
             ORDER BY id DESC LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(run.0 > 0 && run.1.is_none(), "{run:?}");
    // crypto-shred keeps a tombstone without the ciphertext; physical-delete leaves nothing.
    let shredded: Vec<(i32, bool)> = su
        .query("SELECT length(encrypted_value), purged_at IS NOT NULL FROM vault.entries WHERE purpose = 'it.shred'", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(shredded, vec![(0, true), (0, true)]);
    let mut a = s.connect("it_a");
    assert_eq!(
        sqlstate(
            &a.query_one("SELECT * FROM vault_get('it.sched', 'e1')", &[])
                .unwrap_err()
        ),
        "VV410"
    );
    assert_eq!(
        sqlstate(
            &a.query_one("SELECT * FROM vault_get('it.shred', 'e1')", &[])
                .unwrap_err()
        ),
        "VV410"
    );
    let all_ok: bool = su
        .query_one(
            "SELECT bool_and(vault_verify_purge_proof(id)) FROM vault.purge_log
             WHERE purpose IN ('it.sched', 'it.shred') AND id >= $1",
            &[&first],
        )
        .unwrap()
        .get(0);
    assert!(all_ok);
    let (code, out) = offline_purge_check(&s, &mut su, "sched", first);
    assert_eq!(code, 0, "{out}");
    // A proof altered behind the triggers fails in SQL and offline, and is named.
    let id: i64 = su
        .query_one(
            "SELECT max(id) FROM vault.purge_log WHERE purpose = 'it.sched' AND id >= $1",
            &[&first],
        )
        .unwrap()
        .get(0);
    su.batch_execute(&format!(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE vault.purge_log DISABLE TRIGGER vault_append_only;
         UPDATE vault.purge_log SET expires_at_us = expires_at_us + 86400000000 WHERE id = {id};
         ALTER TABLE vault.purge_log ENABLE ALWAYS TRIGGER vault_append_only;
         RESET vsql_vault.break_glass;"
    ))
    .unwrap();
    let ok: bool = su
        .query_one("SELECT vault_verify_purge_proof($1)", &[&id])
        .unwrap()
        .get(0);
    assert!(!ok);
    let (code, out) = offline_purge_check(&s, &mut su, "sched-tampered", first);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("FAILED  purge proof {id} (it.sched / ")),
        "{out}"
    );
}

#[test]
fn the_retention_clock_starts_at_first_storage_and_a_re_put_cannot_extend_it() {
    let s = server();
    let mut su = setup(&s); // it.card: at most 30 days, 7 by default
    let mut a = s.connect("it_a");
    let id = format!(
        "rc-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    put(&mut a, &id, b"\x01").unwrap();
    let age = |su: &mut Client, days: i32| {
        su.execute(
            "UPDATE vault.entries SET created_at = now() - make_interval(days => $2)
              WHERE purpose = 'it.card' AND external_id = $1",
            &[&id, &days],
        )
        .unwrap();
    };
    // 29 days after its first storage, a re-put cannot push the entry past day 30.
    age(&mut su, 29);
    let e = a
        .execute(
            "SELECT vault_put('it.card', $1, '\\x02', expires_at => now() + interval '5 days')",
            &[&id],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV422", "{e}");
    let message = e.as_db_error().unwrap().message().to_owned();
    assert!(message.contains("first storage"), "{message}");
    // Without an expiry, the default is cut at the limit; the first storage stays the clock.
    let capped: bool = a
        .query_one(
            "SELECT vault_put('it.card', $1, '\\x02') <= now() + interval '1 day 1 minute'",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(capped);
    let kept: bool = su
        .query_one(
            "SELECT created_at < now() - interval '28 days' FROM vault.entries
              WHERE purpose = 'it.card' AND external_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(kept);
    // Past the limit, no re-put keeps the data at all.
    age(&mut su, 31);
    let e = put(&mut a, &id, b"\x03").unwrap_err();
    assert_eq!(sqlstate(&e), "VV422", "{e}");
}

/// Stops the retention worker and waits for the postmaster's replacement.
fn restart_worker(su: &mut Client) {
    wait_until("the retention worker", 30, || worker_pid(su).is_some());
    let pid = worker_pid(su).unwrap();
    su.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    wait_until("a new retention worker", 30, || {
        worker_pid(su).is_some_and(|p| p != pid)
    });
}

fn finished_runs(su: &mut Client) -> i64 {
    su.query_one(
        "SELECT count(*) FROM vault.sweep_runs WHERE finished_at IS NOT NULL",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_worker_restarted_more_often_than_its_interval_still_sweeps() {
    let s = server();
    let mut su = setup(&s);
    // A run finishes now, so the next is due 30 s after it.
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("1"));
    let runs = finished_runs(&mut su);
    wait_until("a scheduled run", 30, || finished_runs(&mut su) > runs);
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("30"));
    thread::sleep(Duration::from_secs(2));
    expired_entries(&mut su, "it.restarts", "physical-delete", 3);
    // Restarted every 8 s, a worker that counted its interval from its own start never swept
    // (the entries stayed); the schedule now counts from the last finished run.
    let mut swept = false;
    for _ in 0..8 {
        restart_worker(&mut su);
        thread::sleep(Duration::from_secs(8));
        if live(&mut su, "it.restarts") == 0 {
            swept = true;
            break;
        }
    }
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
    assert!(swept, "no sweep while the worker kept restarting");
}

#[test]
fn sweep_at_runs_the_scheduled_sweep_at_its_time_of_day() {
    let s = server();
    let mut su = setup(&s);
    // An hour's interval would not sweep during this test; the next minute (UTC) will.
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("3600"));
    let next_minute: String = su
        .query_one(
            "SELECT to_char((now() AT TIME ZONE 'UTC') + interval '1 minute', 'HH24:MI')",
            &[],
        )
        .unwrap()
        .get(0);
    thread::sleep(Duration::from_secs(2));
    expired_entries(&mut su, "it.sweep-at", "physical-delete", 2);
    set_and_reload(&mut su, "vsql_vault.sweep_at", Some(&next_minute));
    wait_until("the sweep at its time of day", 90, || {
        live(&mut su, "it.sweep-at") == 0
    });
    // An invalid time is reported and the interval used: nothing breaks.
    set_and_reload(&mut su, "vsql_vault.sweep_at", Some("25:00"));
    set_and_reload(&mut su, "vsql_vault.sweep_at", None);
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
    wait_until("the retention worker", 30, || worker_pid(&mut su).is_some());
}

/// A fresh entry of it.card destroyed by vault_delete; returns its proof's id.
fn deleted_entry(s: &Server, tag: &str) -> i64 {
    let mut a = s.connect("it_a");
    let id = format!("{tag}-{}", std::process::id());
    put(&mut a, &id, b"\x0a\x0b").unwrap();
    a.query_one("SELECT vault_delete('it.card', $1)", &[&id])
        .unwrap()
        .get(0)
}

/// Runs `sql` on vault.purge_log with its append-only trigger disabled, as a superuser can.
fn edit_purge_log(su: &mut Client, sql: &str) {
    su.batch_execute(&format!(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE vault.purge_log DISABLE TRIGGER vault_append_only;
         {sql};
         ALTER TABLE vault.purge_log ENABLE ALWAYS TRIGGER vault_append_only;
         RESET vsql_vault.break_glass;"
    ))
    .unwrap();
}

#[test]
fn every_column_an_auditor_reads_of_a_proof_is_checked_in_sql_and_offline() {
    let s = server();
    let mut su = setup(&s);
    let first: i64 = su
        .query_one("SELECT COALESCE(max(id), 0) + 1 FROM vault.purge_log", &[])
        .unwrap()
        .get(0);
    // Each edit as a superuser could make it behind the triggers; the timestamptz columns and
    // sweep_id are not part of the signed statement, the others are.
    let edits = [
        ("purged_at", "purged_at - interval '1 day'"),
        ("created_at", "created_at - interval '400 days'"),
        ("expires_at", "expires_at + interval '1 day'"),
        ("sweep_id", "-7"),
        ("purpose", "'it.other'"),
        ("external_id", "external_id || '-x'"),
        ("owner", "'it_b'"),
        ("entry_id", "entry_id + 1000"),
        ("max_retention_days", "max_retention_days + 1"),
        ("default_ttl_days", "default_ttl_days + 1"),
        ("purge_method", "'crypto-shred'"),
        ("access_policy", "'open-retrieve'"),
        ("reason", "'expired'"),
        ("purged_by", "'vsql_vault retention worker'"),
        ("entry_hash", "sha256(entry_hash)"),
    ];
    let mut edited = Vec::new();
    for (column, value) in edits {
        let id = deleted_entry(&s, &format!("shown-{column}"));
        let ok: bool = su
            .query_one("SELECT vault_verify_purge_proof($1)", &[&id])
            .unwrap()
            .get(0);
        assert!(ok, "proof {id} verifies before the edit of {column}");
        edit_purge_log(
            &mut su,
            &format!("UPDATE vault.purge_log SET {column} = {value} WHERE id = {id}"),
        );
        edited.push((column, id));
    }
    // The evidence view shows the signed times, whatever the timestamptz columns now say.
    let (shown, signed): (String, String) = su
        .query_one(
            "SELECT e.created_at::text, ('2000-01-01 00:00:00+00'::timestamptz
                                         + g.created_at_us * interval '1 microsecond')::text
               FROM vault.purge_evidence e JOIN vault.purge_log g ON g.id = e.proof_id
              WHERE e.proof_id = $1",
            &[&edited[1].1],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(shown, signed);
    let (code, out) = offline_purge_check(&s, &mut su, "shown", first);
    assert_eq!(code, 1, "{out}");
    for (column, id) in edited {
        let ok: bool = su
            .query_one("SELECT vault_verify_purge_proof($1)", &[&id])
            .unwrap()
            .get(0);
        assert!(
            !ok,
            "a proof whose {column} was edited still verifies in SQL"
        );
        // sweep_id is not in the export: the offline check of it is the purge log's chain.
        if column != "sweep_id" {
            assert!(
                out.contains(&format!("FAILED  purge proof {id} (")),
                "an edit of {column} (proof {id}) passes offline: {out}"
            );
        }
    }
}

#[test]
fn a_policy_cannot_turn_purge_proofs_off() {
    let s = server();
    let mut su = setup(&s);
    let mut admin = s.connect("it_admin");
    let e = admin
        .execute(
            "SELECT vault_set_retention_policy('it.noproof', 30, 7, 'physical-delete', false)",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    let stored: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.retention_policies WHERE purpose = 'it.noproof'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    let refused: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'set_retention_policy'
                AND purpose = 'it.noproof' AND NOT granted AND sqlstate = '22023'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(refused >= 1);
    // Not even a superuser stores false behind the API.
    let e = su
        .execute(
            "UPDATE vault.retention_policies SET require_purge_proof = false WHERE purpose = 'it.card'",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "23514", "{e}");
}

/// Points the vault at `path` as its signing key file (None: back to the generated key), from
/// the configuration file, and waits until sessions see it.
fn signing_key_file(su: &mut Client, path: Option<&str>) {
    set_and_reload(su, "vsql_vault.signing_key_file", path);
    let want = path.unwrap_or("").to_owned();
    poll("the key file setting to reach the session", 100, || {
        su.query_one("SHOW vsql_vault.signing_key_file", &[])
            .is_ok_and(|r| r.get::<_, String>(0) == want)
    });
}

#[test]
fn a_re_put_leaves_a_signed_superseded_proof_and_fails_closed_without_a_key() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    let id = format!(
        "sup-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    let proofs_of = |su: &mut Client| -> Vec<(i64, i64, String, String)> {
        su.query(
            "SELECT id, entry_id, reason, purged_by FROM vault.purge_log
              WHERE purpose = 'it.card' AND external_id = $1 ORDER BY id",
            &[&id],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
    };
    put(&mut a, &id, b"\x01").unwrap();
    assert_eq!(proofs_of(&mut su), vec![], "a first put destroys nothing");
    let old: i64 = su
        .query_one(
            "SELECT id FROM vault.entries WHERE purpose = 'it.card' AND external_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    put(&mut a, &id, b"\x02").unwrap();
    let proofs = proofs_of(&mut su);
    assert_eq!(proofs.len(), 1, "{proofs:?}");
    let (proof, entry, reason, by) = proofs[0].clone();
    assert_eq!(
        (entry, reason.as_str(), by.as_str()),
        (old, "superseded", "it_a")
    );
    let ok: bool = su
        .query_one("SELECT vault_verify_purge_proof($1)", &[&proof])
        .unwrap()
        .get(0);
    assert!(ok);
    let (code, out) = offline_purge_check(&s, &mut su, "superseded", proof);
    assert_eq!(code, 0, "{out}");
    // The put's record names the proof of the version it replaced.
    let named: Option<i64> = su
        .query_one(
            "SELECT (details->'superseded'->>'proof_id')::int8 FROM vault.access_log
              WHERE operation = 'put' AND external_id = $1 AND granted ORDER BY id DESC LIMIT 1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(named, Some(proof));
    assert_eq!(get(&mut a, &id).unwrap(), b"\x02");

    // An unusable signing key (readable by others: F0000): the re-put fails and nothing is half-stored.
    let path = format!("{}/unsafe.key", s.dir);
    std::fs::write(&path, format!("{}\n", "5a".repeat(32))).unwrap();
    std::process::Command::new("chown")
        .args(["postgres", &path])
        .status()
        .unwrap();
    std::process::Command::new("chmod")
        .args(["644", &path])
        .status()
        .unwrap();
    signing_key_file(&mut su, Some(&path));
    let mut a2 = s.connect("it_a");
    let refused = put(&mut a2, &id, b"\x03").map_err(|e| sqlstate(&e));
    signing_key_file(&mut su, None);
    assert_eq!(refused, Err("F0000".to_owned()));
    assert_eq!(get(&mut a, &id).unwrap(), b"\x02");
    assert_eq!(proofs_of(&mut su).len(), 1);
    assert!(log_count(&mut su, "put", &id, false) >= 1);
}

/// How many heap tuples of vault.entries (live or dead) still hold `value`. The lock keeps the
/// worker's VACUUM (and its truncation of empty tail pages) out while the pages are read.
fn tuples_holding(su: &mut Client, value: &[u8]) -> i64 {
    let mut tx = su.transaction().unwrap();
    tx.batch_execute("LOCK TABLE vault.entries IN SHARE UPDATE EXCLUSIVE MODE")
        .unwrap();
    let n = tx
        .query_one(
            "SELECT count(*) FROM generate_series(0, (pg_relation_size('vault.entries') / 8192)::int - 1) AS p,
                    LATERAL heap_page_items(get_raw_page('vault.entries', p)) AS t
              WHERE t.t_data IS NOT NULL AND position($1::bytea IN t.t_data) > 0",
            &[&value],
        )
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    n
}

#[test]
fn re_puts_share_one_vacuum_per_vacuum_delay_and_leave_no_replaced_value_in_dead_tuples() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        .unwrap();
    let mut a = s.connect("it_a");
    let id = format!(
        "vac-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    // Distinct 24-byte values, each findable in a page.
    let value = |i: u32| -> Vec<u8> { format!("{id}/value/{i:06}").into_bytes() };
    put(&mut a, &id, &value(0)).unwrap();
    let before = vacuums(&mut su);
    let started = std::time::Instant::now();
    let re_puts = 30;
    for i in 1..=re_puts {
        put(&mut a, &id, &value(i)).unwrap();
    }
    let burst = started.elapsed();
    // Every replaced value is vacuumed out of the table (within vsql_vault.vacuum_delay, 5 s by
    // default, of the commit that replaced it); the current one stays.
    wait_until("the replaced values to be vacuumed away", 60, || {
        (0..re_puts).all(|i| tuples_holding(&mut su, &value(i)) == 0)
    });
    assert!(tuples_holding(&mut su, &value(re_puts)) >= 1);
    // The re-puts shared their VACUUMs: one at once, then at most one per vacuum_delay (one per
    // re-put before, each invalidating every backend's plans on vault.entries).
    let delay_s = 5.0;
    let allowed = 2 + (burst.as_secs_f64() / delay_s).ceil() as i64 + 1;
    let ran = vacuums(&mut su) - before;
    assert!(
        ran >= 1 && ran <= allowed,
        "{ran} VACUUMs for {re_puts} re-puts in {burst:?} (at most {allowed} expected)"
    );
}

#[test]
fn every_batch_the_worker_destroys_is_in_the_access_log() {
    let s = server();
    let mut su = setup(&s);
    let since: i64 = su
        .query_one("SELECT COALESCE(max(id), 0) FROM vault.access_log", &[])
        .unwrap()
        .get(0);
    expired_entries(&mut su, "it.logged", "physical-delete", 7);
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", Some("3"));
    set_and_reload(&mut su, "vsql_vault.sweep_interval", Some("1"));
    wait_until("the scheduled sweep", 30, || {
        live(&mut su, "it.logged") == 0
    });
    set_and_reload(&mut su, "vsql_vault.sweep_interval", None);
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", None);
    // Each batch with an entry of it.logged has its record: who (the worker), what (entries,
    // count, the signed batch, its proofs) and the batch's transaction.
    let records: Vec<(String, bool, bool, serde_json::Value)> = su
        .query(
            "SELECT application_name, granted, caller_xid IS NOT NULL, details::text
               FROM vault.access_log
              WHERE id > $1 AND operation = 'retention_sweep' AND details->'purposes' ? 'it.logged'
              ORDER BY id",
            &[&since],
        )
        .unwrap()
        .iter()
        .map(|r| {
            let details: String = r.get(3);
            (
                r.get(0),
                r.get(1),
                r.get(2),
                serde_json::from_str(&details).unwrap(),
            )
        })
        .collect();
    assert!(records.len() >= 3, "7 entries in batches of 3: {records:?}");
    let mut recorded_entries = 0;
    for (app, granted, xid, d) in &records {
        assert_eq!(app, "vsql_vault retention worker");
        assert!(*granted && *xid, "{d}");
        let batch = d["batch_id"].as_i64().unwrap();
        let (first, last) = (
            d["first_proof_id"].as_i64().unwrap(),
            d["last_proof_id"].as_i64().unwrap(),
        );
        // The proofs the record names are exactly its batch's, and their entries its entries.
        let (proofs, entries, same_batch, sweep): (i64, Vec<i64>, bool, Option<i64>) = su
            .query_one(
                "SELECT count(*), array_agg(entry_id ORDER BY id), bool_and(batch_id = $3), min(sweep_id)
                   FROM vault.purge_log WHERE id BETWEEN $1 AND $2",
                &[&first, &last, &batch],
            )
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .unwrap();
        assert!(same_batch, "{d}");
        assert_eq!(proofs, d["purged"].as_i64().unwrap(), "{d}");
        assert_eq!(sweep, d["sweep_id"].as_i64(), "{d}");
        let named: Vec<i64> = d["entry_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(entries, named, "{d}");
        recorded_entries += d["purposes"]["it.logged"].as_i64().unwrap();
    }
    assert_eq!(recorded_entries, 7);
    // The records are chained like every access record, and the auditor's summary counts them.
    assert_chains_verify(&mut su, Some("vault.access_log"));
    let summarized: i64 = su
        .query_one(
            "SELECT COALESCE(sum(granted), 0)::int8 FROM vault.access_summary
              WHERE operation = 'retention_sweep' AND role_name = current_user",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(summarized >= records.len() as i64, "{summarized}");
}

/// `vault_purge_sweep` runs its batches in one transaction, each resuming after the last
/// `(expires_at, id)` of the one before. Entries that all expired at the same instant, in batches
/// of 7, a sweep stopped half-way by `max_entries` and run again: every entry is proven exactly
/// once. The proofs' inclusion paths (written from their bytes by the chain trigger) hash as
/// PostgreSQL prints them; the purge log's chain verifies through them, and both verifiers
/// accept the proofs.
#[test]
fn a_sweep_resumed_half_way_proves_each_entry_exactly_once() {
    let s = server();
    let mut su = setup(&s);
    let n: i32 = 200;
    // Entries that earlier tests left to expire would be swept first (the sweep goes in
    // (expires_at, id) order), so the shared database is swept clean before this test's entries
    // are made.
    s.connect("it_admin")
        .query_one("SELECT vault_purge_sweep()", &[])
        .unwrap();
    expired_entries(&mut su, "it.resume", "physical-delete", n);
    let first_proof: i64 = su
        .query_one("SELECT coalesce(max(id), 0) + 1 FROM vault.purge_log", &[])
        .unwrap()
        .get(0);
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", Some("7"));
    let mut admin = s.connect("it_admin");
    let first: i64 = admin
        .query_one("SELECT vault_purge_sweep(100)", &[])
        .unwrap()
        .get(0);
    assert_eq!(first, 100);
    assert_eq!(live(&mut su, "it.resume"), i64::from(n) - 100);
    let rest: i64 = admin
        .query_one("SELECT vault_purge_sweep()", &[])
        .unwrap()
        .get(0);
    set_and_reload(&mut su, "vsql_vault.sweep_batch_size", None);
    assert!(rest >= i64::from(n) - 100, "the second sweep purged {rest}");
    assert_eq!(live(&mut su, "it.resume"), 0);
    let (proofs, entries): (i64, i64) = {
        let r = su
            .query_one(
                "SELECT count(*), count(DISTINCT external_id) FROM vault.purge_log WHERE purpose = 'it.resume'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((proofs, entries), (i64::from(n), i64::from(n)));
    // Batches of 7 leaves: paths of up to 3 nodes, shorter for the last leaves of a batch.
    let longest: i32 = su
        .query_one(
            "SELECT max(cardinality(inclusion_path)) FROM vault.purge_log WHERE purpose = 'it.resume'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(longest, 3);
    // The hashed text of each path is PostgreSQL's own output of the bytea[].
    su.batch_execute("SET bytea_output = 'hex'").unwrap();
    let printed: std::collections::BTreeMap<i64, String> = su
        .query(
            "SELECT id, inclusion_path::text FROM vault.purge_log WHERE purpose = 'it.resume'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut compared = 0;
    for line in su
        .query("SELECT vault_export_audit('vault.purge_log')", &[])
        .unwrap()
    {
        let row: vsql_vault_core::chain::ExportRow =
            serde_json::from_str(line.get::<_, &str>(0)).unwrap();
        let value = |name: &str| {
            row.columns
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let Some(vsql_vault_core::canonical::Value::Int(id)) = value("id") else {
            continue;
        };
        if let Some(text) = printed.get(&id) {
            assert_eq!(
                value("inclusion_path"),
                Some(vsql_vault_core::canonical::Value::Text(text.clone())),
                "proof {id}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, n);
    // The purge log's chain verifies through these proofs (other tests of the same cluster may
    // have tampered with earlier rows on purpose: a break before them is theirs).
    let broken: Vec<String> = su
        .query(
            "SELECT coalesce(v.chain::text, '-') || ': ' || v.detail FROM vault_verify_audit('vault.purge_log') v
              WHERE NOT v.ok AND (v.first_bad_seq IS NULL OR v.first_bad_seq >= (
                    SELECT min(p.chain_seq) FROM vault.purge_log p
                     WHERE p.purpose = 'it.resume' AND p.chain_id = v.chain))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(broken.is_empty(), "{broken:?}");
    let bad: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.purge_log WHERE purpose = 'it.resume' AND NOT vault_verify_purge_proof(id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(bad, 0);
    let (code, out) = offline_purge_check(&s, &mut su, "resume", first_proof);
    assert_eq!(code, 0, "{out}");
}
