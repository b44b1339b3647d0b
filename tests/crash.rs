//! Crashes: the server is stopped with `pg_ctl stop -m immediate` (no shutdown checkpoint, every
//! backend and worker killed) in the middle of work, restarted, and the evidence is checked.
//! (The crash in the middle of a retention sweep is in retention.rs.)

mod common;

use common::*;
use postgres::Client;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

fn crash_and_restart(s: &Server) {
    s.pg_ctl(&["-m", "immediate", "stop"]);
    s.pg_ctl(&["start", "-l", &format!("{}/server.log", s.dir)]);
    s.wait_for_writer(&s.db);
}

/// Chains that do not verify (earlier test files tamper on purpose; a crash must add none).
fn broken_chains(su: &mut Client) -> std::collections::BTreeSet<String> {
    su.query(
        "SELECT table_name || ' chain ' || coalesce(chain::text, '-') FROM vault_verify_audit() WHERE NOT ok",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn no_new_breaks(before: &std::collections::BTreeSet<String>, su: &mut Client) {
    let after = broken_chains(su);
    let new: Vec<&String> = after.difference(before).collect();
    assert!(new.is_empty(), "chains broken by the crash: {new:?}");
}

#[test]
fn crash_under_sixteen_clients_loses_no_access_record_of_data_returned() {
    let s = server();
    let mut su = setup(&s);
    let before = broken_chains(&mut su);
    login_roles(&mut su, &[("cr_app", Some("vault_app"))]);
    let stop = Arc::new(AtomicBool::new(false));
    // What the clients saw: puts acknowledged, and data returned per entry.
    let puts_acked: Arc<Mutex<Vec<String>>> = Default::default();
    let gets_returned: Arc<Mutex<HashMap<String, i64>>> = Default::default();
    let mut workers = Vec::new();
    for w in 0..16 {
        let (stop, puts, gets) = (stop.clone(), puts_acked.clone(), gets_returned.clone());
        let (dir, port, db) = (s.dir.clone(), s.port, s.db.clone());
        workers.push(thread::spawn(move || {
            let s = Server { dir, port, db };
            let mut c = s.connect("cr_app");
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("cr-{w}-{}", i % 8);
                if i % 3 == 0 || i <= 8 {
                    match c.execute("SELECT vault_put('it.card', $1, '\\x0102')", &[&id]) {
                        Ok(_) => puts.lock().unwrap().push(id),
                        Err(e) if e.is_closed() || e.code().is_none() => return,
                        Err(_) => {}
                    }
                } else {
                    match c.query(
                        "SELECT encrypted_value FROM vault_get('it.card', $1)",
                        &[&id],
                    ) {
                        Ok(rows) if !rows.is_empty() => {
                            *gets.lock().unwrap().entry(id).or_default() += 1;
                        }
                        Ok(_) => {}
                        Err(e) if e.is_closed() || e.code().is_none() => return,
                        Err(_) => {}
                    }
                }
            }
        }));
    }
    // Crash once the clients are well under way.
    poll("the clients to get going", 300, || {
        gets_returned.lock().unwrap().values().sum::<i64>() > 200
    });
    drop(su);
    s.pg_ctl(&["-m", "immediate", "stop"]);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    s.pg_ctl(&["start", "-l", &format!("{}/server.log", s.dir)]);
    s.wait_for_writer(&s.db);
    let mut su = s.connect("postgres");
    no_new_breaks(&before, &mut su);
    // Every get that returned data has its granted access row.
    let returned = gets_returned.lock().unwrap().clone();
    assert!(!returned.is_empty());
    for (id, n) in &returned {
        let logged: i64 = su
            .query_one(
                "SELECT count(*) FROM vault.access_log WHERE role_name = 'cr_app' AND operation = 'get'
                   AND purpose = 'it.card' AND external_id = $1 AND granted",
                &[id],
            )
            .unwrap()
            .get(0);
        assert!(
            logged >= *n,
            "{id}: data returned {n} times, {logged} granted records"
        );
    }
    // Every acknowledged put is stored, and has its record.
    let acked = puts_acked.lock().unwrap().clone();
    for id in &acked {
        let (stored, logged): (i64, i64) = {
            let r = su
                .query_one(
                    "SELECT (SELECT count(*) FROM vault.entries WHERE purpose = 'it.card' AND external_id = $1),
                            (SELECT count(*) FROM vault.access_log WHERE role_name = 'cr_app' AND operation = 'put'
                               AND external_id = $1 AND granted)",
                    &[id],
                )
                .unwrap();
            (r.get(0), r.get(1))
        };
        assert_eq!(stored, 1, "{id} was acknowledged but is not stored");
        assert!(logged >= 1, "{id} stored without a record");
    }
    // And the vault works on.
    let mut app = s.connect("cr_app");
    app.execute("SELECT vault_put('it.card', 'cr-after', '\\x01')", &[])
        .unwrap();
    let rows = app
        .query("SELECT 1 FROM vault_get('it.card', 'cr-after')", &[])
        .unwrap();
    assert_eq!(rows.len(), 1);
}

#[test]
fn crash_while_checkpointing_leaves_verifiable_chains_and_signatures() {
    let s = server();
    let mut su = setup(&s);
    let before = broken_chains(&mut su);
    su.batch_execute(
        "CREATE TABLE IF NOT EXISTS cr_events (id bigserial PRIMARY KEY, what text);
         SELECT vault_protect_table('cr_events', 4)
          WHERE NOT EXISTS (SELECT 1 FROM vault.protected_tables WHERE table_name = 'public.cr_events');",
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let checkpoints = Arc::new(Mutex::new(0i64));
    let mut workers = Vec::new();
    for w in 0..3 {
        let (stop, checkpoints) = (stop.clone(), checkpoints.clone());
        let (dir, port, db) = (s.dir.clone(), s.port, s.db.clone());
        workers.push(thread::spawn(move || {
            let s = Server { dir, port, db };
            let mut c = s.connect("postgres");
            while !stop.load(Ordering::Relaxed) {
                let r = if w == 0 {
                    c.execute("SELECT vault_checkpoint()", &[])
                } else {
                    c.execute(
                        "INSERT INTO cr_events (what) SELECT 'e' FROM generate_series(1, 50)",
                        &[],
                    )
                };
                match r {
                    Ok(_) if w == 0 => *checkpoints.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        }));
    }
    poll("a few checkpoints", 300, || {
        *checkpoints.lock().unwrap() >= 5
    });
    drop(su);
    crash_and_restart(&s);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let mut su = s.connect("postgres");
    no_new_breaks(&before, &mut su);
    // Checkpoints written before the crash still verify offline with the export.
    let signed: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.audit_checkpoints WHERE table_identity LIKE 'public.cr_events/%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(signed >= 4);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    no_new_breaks(&before, &mut su);
}

#[test]
fn crash_while_decoding_the_consumer_resumes_without_unexplained_gaps_or_duplicates() {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", "c3"));
    poll("the KEK setting", 100, || {
        su.query_one("SHOW vsql_vault.kek_file", &[])
            .is_ok_and(|r| r.get::<_, String>(0) == kek)
    });
    su.batch_execute("DROP TABLE IF EXISTS cr_rows; CREATE TABLE cr_rows (id int PRIMARY KEY)")
        .unwrap();
    fresh_slot(&mut su, "cr_slot");
    for b in 0..50 {
        su.execute(
            "INSERT INTO cr_rows SELECT g FROM generate_series($1 * 20 + 1, $1 * 20 + 20) g",
            &[&b],
        )
        .unwrap();
    }
    // A consumer is receiving when the server goes down.
    let first = format!("{}/cr-first.stream", s.dir);
    let _ = std::fs::remove_file(&first);
    let port = s.port.to_string();
    let mut receiver = std::process::Command::new("pg_recvlogical")
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
            "cr_slot",
            "--start",
            "--no-loop",
            "-f",
            &first,
            "-F",
            "0",
            "-s",
            "1",
        ])
        .spawn()
        .unwrap();
    poll("the first batches to arrive", 300, || {
        std::fs::read_to_string(&first).is_ok_and(|t| t.matches("\"type\":\"batch\"").count() >= 5)
    });
    thread::sleep(Duration::from_millis(200));
    drop(su);
    crash_and_restart(&s);
    let _ = receiver.wait();
    let mut su = s.connect("postgres");
    for b in 50..60 {
        su.execute(
            "INSERT INTO cr_rows SELECT g FROM generate_series($1 * 20 + 1, $1 * 20 + 20) g",
            &[&b],
        )
        .unwrap();
    }
    let second = format!("{}/cr-second.stream", s.dir);
    recvlogical(&s, &mut su, "cr_slot", &second);
    su.execute("SELECT pg_drop_replication_slot('cr_slot')", &[])
        .unwrap();
    // Each capture verifies on its own (the restart began a new session).
    let mut seen: HashMap<i64, String> = HashMap::new();
    let mut duplicates = 0;
    for file in [&first, &second] {
        // A capture cut by the crash may end in a partial line: the consumer stops there, and
        // everything it printed before is trusted.
        let (code, out, err) = decrypt(&mut su, &kek, file);
        if file == &second {
            assert_eq!(code, 0, "{err}");
        }
        for line in out.lines() {
            let c: serde_json::Value = serde_json::from_str(line).unwrap();
            if c["table"] != "cr_rows" {
                continue;
            }
            let id: i64 = c["columns"][0]["value"].as_str().unwrap().parse().unwrap();
            let lsn = c["lsn"].as_str().unwrap().to_owned();
            if let Some(prev) = seen.insert(id, lsn.clone()) {
                // Re-sent after the restart: the same change at the same LSN, which the consumer
                // can recognise (it was not confirmed before the crash).
                assert_eq!(prev, lsn, "row {id} delivered twice at different LSNs");
                duplicates += 1;
            }
        }
    }
    let committed: i64 = su
        .query_one("SELECT count(*) FROM cr_rows", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        seen.len() as i64,
        committed,
        "a committed row never arrived"
    );
    eprintln!("{duplicates} rows re-sent after the restart at their original LSN");

    // A consumer that keeps its position (`--state`) across the crash: the session after the
    // restart resumes at or before what it processed, so nothing is missing (no gap refused) and
    // what was re-sent is skipped, not printed twice.
    let state = format!("{}/cr.state", s.dir);
    let _ = std::fs::remove_file(&state);
    let keys = public_keys(&mut su);
    let mut printed: HashMap<i64, usize> = HashMap::new();
    for file in [&first, &second] {
        let (code, out, err) = decrypt_with(&keys, &kek, file, &["--state", &state]);
        assert_eq!(code, 0, "{file}: {err}");
        for line in out.lines() {
            let c: serde_json::Value = serde_json::from_str(line).unwrap();
            if c["table"] == "cr_rows" {
                let id = c["columns"][0]["value"].as_str().unwrap().parse().unwrap();
                *printed.entry(id).or_default() += 1;
            }
        }
    }
    assert_eq!(
        printed.len() as i64,
        committed,
        "a committed row never printed"
    );
    assert!(printed.values().all(|n| *n == 1), "a row printed twice");
}
