//! Integration tests against a real, preloaded PostgreSQL server started by `tests/run.sh`
//! (socket directory, port and database come from VSQL_VAULT_TEST_*). They check what needs
//! commits, several sessions or the server itself: durability of the access log across ROLLBACK
//! and errors, failing closed, concurrency, restart, and pg_dump / pg_restore.

mod common;

use common::*;
use postgres::{Client, Config, NoTls};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

#[test]
fn rolled_back_get_keeps_its_granted_row() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "rb1", b"\x01\x02").unwrap();
    let before = log_count(&mut su, "get", "rb1", true);
    let mut tx = a.transaction().unwrap();
    let row = tx
        .query_one(
            "SELECT encrypted_value FROM vault_get('it.card', 'rb1')",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), b"\x01\x02");
    tx.rollback().unwrap();
    assert_eq!(log_count(&mut su, "get", "rb1", true), before + 1);
}

#[test]
fn a_rolled_back_put_leaves_neither_entry_nor_record() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    // Ids of this run (the test may run again on the same cluster).
    let run: i32 = su.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let (id1, id2) = (format!("rb-put-{run}-1"), format!("rb-put-{run}-2"));
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT vault_put('it.card', $1, '\\x01'::bytea)", &[&id1])
        .unwrap();
    tx.rollback().unwrap();
    let entries: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.entries WHERE purpose = 'it.card' AND external_id = $1",
            &[&id1],
        )
        .unwrap()
        .get(0);
    assert_eq!(entries, 0);
    assert_eq!(log_count(&mut su, "put", &id1, true), 0);
    // Committed: entry and record together, the record on a caller chain of the access log
    // and in its transaction.
    put(&mut a, &id1, b"\x02").unwrap();
    let row = su
        .query_one(
            "SELECT l.chain_id, pg_xact_status(l.caller_xid), l.entry_id = e.id
               FROM vault.access_log l JOIN vault.entries e
                 ON e.purpose = l.purpose AND e.external_id = l.external_id
              WHERE l.operation = 'put' AND l.purpose = 'it.card' AND l.external_id = $1
                AND l.granted",
            &[&id1],
        )
        .unwrap();
    assert!(
        row.get::<_, i32>(0) >= 1,
        "a caller chain, not the writer's"
    );
    assert_eq!(row.get::<_, String>(1), "committed");
    assert!(row.get::<_, bool>(2), "the record names the stored entry");
    // A put that fails later in its transaction: no entry, no granted record.
    let mut tx = a.transaction().unwrap();
    tx.execute("SELECT vault_put('it.card', $1, '\\x01'::bytea)", &[&id2])
        .unwrap();
    assert!(tx.execute("SELECT 1 / 0", &[]).is_err());
    drop(tx);
    assert_eq!(log_count(&mut su, "put", &id2, true), 0);
    // A refused put is recorded through the writer and stays after the caller's rollback.
    let mut b = s.connect("it_b");
    let mut tx = b.transaction().unwrap();
    assert!(tx
        .execute("SELECT vault_put('it.card', $1, '\\x03'::bytea)", &[&id1])
        .is_err());
    drop(tx);
    assert_eq!(log_count(&mut su, "put", &id1, false), 1);
    assert_chains_verify(&mut su, Some("vault.access_log"));
}

#[test]
fn concurrent_puts_are_each_recorded_once_on_caller_chains() {
    let s = server();
    let mut su = setup(&s);
    let before: i64 = su
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM vault.access_daily
              WHERE operation = 'put' AND granted AND purpose = 'it.card'",
            &[],
        )
        .unwrap()
        .get(0);
    let run: i32 = su.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let prefix = format!("cput-{run}-");
    let (threads, puts) = (8, 25);
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            let mut c = s.connect("it_a");
            let prefix = prefix.clone();
            thread::spawn(move || {
                barrier.wait();
                for i in 0..puts {
                    // Each thread re-puts its own ids too: superseded-version proofs on the
                    // purge log's caller chains.
                    let id = format!("{prefix}{t}-{}", i % 10);
                    put(&mut c, &id, format!("v{i}").as_bytes()).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let row = su
        .query_one(
            "SELECT count(*), count(DISTINCT chain_id), bool_and(chain_id >= 1)
               FROM vault.access_log
              WHERE operation = 'put' AND granted AND purpose = 'it.card'
                AND starts_with(external_id, $1)",
            &[&prefix],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), (threads * puts) as i64);
    assert!(row.get::<_, bool>(2));
    let after: i64 = su
        .query_one(
            "SELECT coalesce(sum(calls), 0)::int8 FROM vault.access_daily
              WHERE operation = 'put' AND granted AND purpose = 'it.card'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        after - before,
        (threads * puts) as i64,
        "the daily counters count each put once"
    );
    assert_chains_verify(&mut su, Some("vault.access_log"));
    let superseded: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.purge_log
              WHERE purpose = 'it.card' AND starts_with(external_id, $1) AND reason = 'superseded'",
            &[&prefix],
        )
        .unwrap()
        .get(0);
    assert_eq!(superseded, (threads * (puts - 10)) as i64);
}

#[test]
fn identity_over_tcp_records_client_address_and_pid() {
    let s = server();
    let mut su = setup(&s);
    let mut a = Config::new()
        .host("127.0.0.1")
        .port(s.port)
        .dbname(&s.db)
        .user("it_a")
        .application_name("it-tcp")
        .connect(NoTls)
        .expect("tcp connection");
    put(&mut a, "tcp1", b"t").unwrap();
    let pid: i32 = a.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    get(&mut a, "tcp1").unwrap();
    let row = su
        .query_one(
            "SELECT role_name::text, session_user_name::text, host(client_addr), backend_pid
             FROM vault.access_log WHERE application_name = 'it-tcp' AND operation = 'get'
             ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "it_a");
    assert_eq!(row.get::<_, String>(1), "it_a");
    assert_eq!(row.get::<_, String>(2), "127.0.0.1");
    assert_eq!(row.get::<_, i32>(3), pid);
}

#[test]
fn denied_call_row_survives_the_error_and_rollback() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "den1", b"secret").unwrap();
    let mut b = s.connect("it_b");
    let before = log_count(&mut su, "get", "den1", false);
    let mut tx = b.transaction().unwrap();
    let err = tx
        .query_one(
            "SELECT encrypted_value FROM vault_get('it.card', 'den1')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&err), "42501");
    tx.rollback().unwrap();
    assert_eq!(log_count(&mut su, "get", "den1", false), before + 1);
    let row = su
        .query_one(
            "SELECT role_name::text, sqlstate FROM vault.access_log WHERE external_id = 'den1' AND NOT granted ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "it_b");
    assert_eq!(row.get::<_, String>(1), "42501");
}

#[test]
fn a_database_error_inside_a_get_is_recorded_as_a_failed_call_with_its_sqlstate() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "db-error-1", b"\x01").unwrap();
    // Another session holds vault.entries; the get's read of it times out inside the call.
    let mut holder = s.connect("postgres");
    holder
        .batch_execute("BEGIN; LOCK TABLE vault.entries IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    a.batch_execute("SET lock_timeout = '200ms'").unwrap();
    let before = log_count(&mut su, "get", "db-error-1", false);
    let e = get(&mut a, "db-error-1").unwrap_err();
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(sqlstate(&e), "55P03", "{e:?}");
    assert_eq!(log_count(&mut su, "get", "db-error-1", false), before + 1);
    let (code, reason): (String, String) = su
        .query_one(
            "SELECT sqlstate, reason FROM vault.access_log
              WHERE operation = 'get' AND external_id = 'db-error-1' AND NOT granted
              ORDER BY id DESC LIMIT 1",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(code, "55P03");
    assert!(reason.contains("lock timeout"), "{reason}");
    // The session goes on: the failed call left no aborted state behind.
    a.batch_execute("RESET lock_timeout").unwrap();
    assert_eq!(get(&mut a, "db-error-1").unwrap(), b"\x01");
}

#[test]
fn fails_closed_when_the_record_cannot_be_written() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "fc1", b"blob").unwrap();
    let granted_before = log_count(&mut su, "get", "fc1", true);

    // Someone holds the access log: the writer cannot insert, so no caller may get data.
    let mut locker = s.connect("postgres");
    locker
        .batch_execute("BEGIN; LOCK TABLE vault.access_log IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let err = get(&mut a, "fc1").unwrap_err();
    assert_eq!(sqlstate(&err), "VV503", "{err:?}");
    let err = put(&mut a, "fc-new", b"x").unwrap_err();
    assert_eq!(sqlstate(&err), "VV503", "{err:?}");
    locker.batch_execute("COMMIT").unwrap();

    // The writer comes back by itself; the failed calls left neither data nor a granted row.
    s.wait_for_writer(&s.db);
    let mut value = Vec::new();
    poll("vault_get to recover", 150, || match get(&mut a, "fc1") {
        Ok(v) => {
            value = v;
            true
        }
        Err(e) => {
            assert_eq!(sqlstate(&e), "VV503");
            false
        }
    });
    assert_eq!(value, b"blob");
    assert_eq!(log_count(&mut su, "get", "fc1", true), granted_before + 1);
    let stored: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.entries WHERE external_id = 'fc-new'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "a put whose record failed must not be stored");
}

#[test]
fn purpose_grants_decide_same_purpose_retrieval_across_sessions() {
    let s = server();
    let _su = setup(&s);
    let mut a = s.connect("it_a");
    a.execute(
        "SELECT vault_put('it.card', 'sp1', '\\x5301', access_policy => 'same-purpose')",
        &[],
    )
    .unwrap();
    let mut b = s.connect("it_b");
    assert_eq!(sqlstate(&get(&mut b, "sp1").unwrap_err()), "42501");
    let mut admin = s.connect("it_admin");
    admin
        .execute("SELECT vault_grant_purpose('it.card', 'it_b')", &[])
        .unwrap();
    assert_eq!(get(&mut b, "sp1").unwrap(), b"\x53\x01");
    admin
        .execute("SELECT vault_revoke_purpose('it.card', 'it_b')", &[])
        .unwrap();
    assert_eq!(sqlstate(&get(&mut b, "sp1").unwrap_err()), "42501");
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
struct Tally {
    put_ok: i64,
    get_ok: i64,
    get_denied: i64,
}

#[test]
fn sixteen_clients_leave_exactly_one_row_per_call() {
    let s = Arc::new(server());
    let mut su = setup(&s);
    let run = format!("{}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    // Every client stores its first entry before any client reads another's.
    let ready = Arc::new(Barrier::new(16));
    let mut handles = Vec::new();
    for i in 0..16 {
        let s = Arc::clone(&s);
        let stop = Arc::clone(&stop);
        let ready = Arc::clone(&ready);
        let run = run.clone();
        handles.push(thread::spawn(move || {
            let user = if i % 2 == 0 { "it_a" } else { "it_b" };
            let mut c = s.connect_to(&s.db, user, &format!("it-conc-{run}-{i}"));
            let mut t = Tally::default();
            put(&mut c, &format!("conc-{run}-{i}-0"), b"first").expect("first put");
            t.put_ok += 1;
            ready.wait();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("conc-{run}-{i}-{}", n % 8);
                put(&mut c, &id, format!("v{n}").as_bytes()).expect("put");
                t.put_ok += 1;
                assert_eq!(get(&mut c, &id).expect("get"), format!("v{n}").as_bytes());
                t.get_ok += 1;
                // An entry of the other role: owner-only, so denied.
                let other = format!("conc-{run}-{}-0", (i + 1) % 16);
                {
                    match get(&mut c, &other) {
                        Err(e) => {
                            assert_eq!(sqlstate(&e), "42501", "{e:?}");
                            t.get_denied += 1;
                        }
                        Ok(_) => panic!("{user} read another role's owner-only entry"),
                    }
                }
                n += 1;
            }
            t
        }));
    }
    thread::sleep(Duration::from_secs(6));
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for h in handles {
        let t = h.join().expect("client thread");
        total.put_ok += t.put_ok;
        total.get_ok += t.get_ok;
        total.get_denied += t.get_denied;
    }
    assert!(
        total.get_ok > 16,
        "too few calls to mean anything: {total:?}"
    );
    let pattern = format!("it-conc-{run}-%");
    let count = |su: &mut Client, op: &str, granted: bool| -> i64 {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE application_name LIKE $1 AND operation = $2 AND granted = $3",
            &[&pattern, &op, &granted],
        )
        .unwrap()
        .get(0)
    };
    let logged = Tally {
        put_ok: count(&mut su, "put", true),
        get_ok: count(&mut su, "get", true),
        get_denied: count(&mut su, "get", false),
    };
    assert_eq!(
        logged, total,
        "access log rows versus calls the clients saw"
    );
    assert_eq!(count(&mut su, "put", false), 0);
}

#[test]
fn zz_restart_changes_nothing() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "rs1", b"survives").unwrap();
    let counts = |c: &mut Client| -> (i64, i64, i64) {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM vault.entries), (SELECT count(*) FROM vault.access_log),
                        (SELECT count(*) FROM vault.retention_policies)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let before = counts(&mut su);
    drop(a);
    drop(su);
    s.pg_ctl(&[
        "-m",
        "fast",
        "restart",
        "-l",
        &format!("{}/server.log", s.dir),
    ]);
    s.wait_for_writer(&s.db);
    let mut su = s.connect("postgres");
    assert_eq!(counts(&mut su), before);
    let mut a = s.connect("it_a");
    assert_eq!(get(&mut a, "rs1").unwrap(), b"survives");
    let mut b = s.connect("it_b");
    assert_eq!(sqlstate(&get(&mut b, "rs1").unwrap_err()), "42501");
}

#[test]
fn zz_dump_and_restore_keep_the_vault() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "dr1", b"dumped").unwrap();
    get(&mut a, "dr1").unwrap();
    let mut admin = s.connect("it_admin");
    admin
        .execute(
            "SELECT vault_set_access_policy('it-custom', '{vault_app}', '{@owner}', '{@owner}', 5)",
            &[],
        )
        .unwrap();
    admin
        .execute("SELECT vault_grant_purpose('it.card', 'it_a')", &[])
        .unwrap();
    // A protected team table, to be written to again after the restore.
    su.batch_execute(
        "SET vsql_vault.break_glass = on; DROP TABLE IF EXISTS it_dump_team; RESET vsql_vault.break_glass;
         CREATE TABLE it_dump_team (id serial PRIMARY KEY, event text NOT NULL);",
    )
    .unwrap();
    su.execute("SELECT vault_protect_table('it_dump_team', 2)", &[])
        .unwrap();
    su.batch_execute(
        "INSERT INTO it_dump_team (event) SELECT 'before ' || g FROM generate_series(1, 3) g",
    )
    .unwrap();
    let snapshot = |c: &mut Client| -> Vec<String> {
        [
            "SELECT string_agg(format('%s/%s/%s/%s/%s', purpose, external_id, encode(encrypted_value, 'hex'), owner, expires_at), ',' ORDER BY purpose, external_id) FROM vault.entries",
            "SELECT string_agg(format('%s/%s/%s', purpose, max_retention_days, default_ttl_days), ',' ORDER BY purpose) FROM vault.retention_policies",
            "SELECT string_agg(format('%s/%s/%s', name, retrieve_roles, max_retrievals), ',' ORDER BY name) FROM vault.access_policies",
            "SELECT string_agg(format('%s/%s', purpose, role_name), ',' ORDER BY purpose, role_name) FROM vault.purpose_grants",
            "SELECT format('%s/%s', count(*), max(id)) FROM vault.access_log",
        ]
        .iter()
        .map(|q| c.query_one(*q, &[]).unwrap().get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
    };
    // The verdict on every chain (intact or not: earlier tests tamper on purpose) must survive.
    let verdicts = |c: &mut Client| -> Vec<String> {
        c.query(
            "SELECT format('%s/%s/%s/%s', table_name, chain, ok, first_bad_seq) FROM vault_verify_audit() ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let verdicts_before = verdicts(&mut su);
    let before = snapshot(&mut su);
    drop((a, admin));

    let file = format!("{}/vault.dump", s.dir);
    let port = s.port.to_string();
    let ok = Command::new("pg_dump")
        .args([
            "-h", &s.dir, "-p", &port, "-U", "postgres", "-Fc", "-f", &file, &s.db,
        ])
        .status()
        .unwrap();
    assert!(ok.success(), "pg_dump");
    su.batch_execute("DROP DATABASE IF EXISTS vault_restored WITH (FORCE)")
        .unwrap();
    su.batch_execute("CREATE DATABASE vault_restored").unwrap();
    // Restore mode keeps the chain fields the rows were exported with (superuser-only).
    let out = Command::new("pg_restore")
        .env("PGOPTIONS", "-c vsql_vault.restore_mode=on")
        .args([
            "-h",
            &s.dir,
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            "vault_restored",
            &file,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut restored = s.connect_to("vault_restored", "postgres", "it");
    assert_eq!(snapshot(&mut restored), before, "restored tables differ");

    // The restored vault behaves the same once the writer serves it.
    su.batch_execute("ALTER SYSTEM SET vsql_vault.database = 'vault_restored'")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.wait_for_writer("vault_restored");
    let mut a = s.connect_to("vault_restored", "it_a", "it-restored");
    assert_eq!(get(&mut a, "dr1").unwrap(), b"dumped");
    let mut b = s.connect_to("vault_restored", "it_b", "it-restored");
    assert_eq!(sqlstate(&get(&mut b, "dr1").unwrap_err()), "42501");
    let logged: i64 = restored
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE application_name = 'it-restored'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 2);
    // The restored evidence verifies exactly as the original did, against the restored checkpoints
    // and keys (the rows keep the chain fields they were signed with).
    let after: Vec<String> = verdicts(&mut restored)
        .into_iter()
        .filter(|v| !v.starts_with("vault.access_log/"))
        .collect();
    let expected: Vec<String> = verdicts_before
        .iter()
        .filter(|v| !v.starts_with("vault.access_log/"))
        .cloned()
        .collect();
    assert_eq!(after, expected);
    assert!(verdicts(&mut restored)
        .iter()
        .any(|v| v.starts_with("vault.access_log/1/0/t")));
    // The restored protected table keeps chaining where it left off, and stays append-only.
    restored
        .batch_execute(
            "INSERT INTO it_dump_team (event) VALUES ('after restore 1'), ('after restore 2')",
        )
        .unwrap();
    let team: Vec<(bool, i64)> = restored
        .query(
            "SELECT ok, rows_checked FROM vault_verify_audit('it_dump_team')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(team.iter().all(|(ok, _)| *ok), "{team:?}");
    assert_eq!(team.iter().map(|(_, n)| n).sum::<i64>(), 5);
    assert_eq!(
        sqlstate(
            &restored
                .batch_execute("DELETE FROM it_dump_team")
                .unwrap_err()
        ),
        "VV403"
    );
    // Calls in the database the writer no longer serves are refused, not silently unlogged.
    let mut old = s.connect("it_a");
    assert_eq!(sqlstate(&get(&mut old, "dr1").unwrap_err()), "55000");

    su.batch_execute("ALTER SYSTEM RESET vsql_vault.database")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.wait_for_writer(&s.db);
}

/// A standard pg_dump / pg_restore of an intact vault database needs no setting: the evidence
/// rows arrive in chain order and are kept because they continue their chains, and the DDL guard
/// lets pg_restore rebuild a protected table's constraints and triggers. (Before, COPY into the
/// evidence tables was refused and the guard refused the constraints and triggers, leaving a
/// partly restored vault.) A row that does not continue its chain is still refused.
#[test]
fn a_plain_restore_of_an_intact_vault_needs_no_setting_and_everything_chains_on() {
    let s = server();
    let mut su = setup(&s);
    for db in ["vault_plain_src", "vault_plain_dst"] {
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
        su.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    }
    let outcome = std::panic::catch_unwind(|| {
        let mut src = s.connect_to("vault_plain_src", "postgres", "plain");
        // Its own statement: no audited call can be made in the transaction that creates it.
        src.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
        // Every database with the extension gets its own writer (the launcher starts it).
        s.wait_for_writer("vault_plain_src");
        src.batch_execute(
            "CREATE TABLE team_log (id bigserial PRIMARY KEY, event text UNIQUE NOT NULL);
             SELECT vault_protect_table('team_log', 2);
             INSERT INTO team_log (event) SELECT 'before ' || g FROM generate_series(1, 5) g;",
        )
        .unwrap();
        let mut admin = s.connect_to("vault_plain_src", "it_admin", "plain");
        admin
            .batch_execute("SELECT vault_set_retention_policy('it.card', 30, 7)")
            .unwrap();
        let mut a = s.connect_to("vault_plain_src", "it_a", "plain");
        put(&mut a, "pr1", b"kept").unwrap();
        put(&mut a, "pr2", b"deleted").unwrap();
        get(&mut a, "pr1").unwrap();
        a.batch_execute("SELECT vault_delete('it.card', 'pr2')")
            .unwrap();
        let mut b = s.connect_to("vault_plain_src", "it_b", "plain");
        assert_eq!(sqlstate(&get(&mut b, "pr1").unwrap_err()), "42501");
        // A break-glass record: a row on the access log's second chain.
        src.batch_execute(
            "SET vsql_vault.break_glass = on; ALTER TABLE team_log ADD COLUMN note text;
             RESET vsql_vault.break_glass;",
        )
        .unwrap();
        src.batch_execute("SELECT vault_checkpoint()").unwrap();
        assert_chains_verify(&mut src, None);
        drop((src, admin, a, b));

        let file = format!("{}/plain.dump", s.dir);
        let (ok, err) = client_program(&s, "pg_dump", &["-Fc", "-f", &file, "vault_plain_src"]);
        assert!(ok, "pg_dump: {err}");
        let (ok, err) = client_program(
            &s,
            "pg_restore",
            &["--exit-on-error", "-d", "vault_plain_dst", &file],
        );
        assert!(ok, "a plain pg_restore: {err}");

        s.wait_for_writer("vault_plain_dst");
        let mut dst = s.connect_to("vault_plain_dst", "postgres", "plain");
        assert_chains_verify(&mut dst, None);
        let protected: i64 = dst
            .query_one(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'team_log'::regclass
                   AND tgname LIKE 'vault\\_%' AND tgenabled = 'A'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(protected, 4, "the protection is rebuilt whole");
        let mut a = s.connect_to("vault_plain_dst", "it_a", "plain");
        assert_eq!(get(&mut a, "pr1").unwrap(), b"kept".to_vec());
        assert_eq!(sqlstate(&get(&mut a, "pr2").unwrap_err()), "VV410");
        let mut b = s.connect_to("vault_plain_dst", "it_b", "plain");
        assert_eq!(sqlstate(&get(&mut b, "pr1").unwrap_err()), "42501");
        // New writes chain on from the restored heads, and everything still verifies.
        put(&mut a, "pr3", b"after").unwrap();
        dst.batch_execute("INSERT INTO team_log (event) VALUES ('after 1'), ('after 2')")
            .unwrap();
        assert_eq!(
            sqlstate(&dst.batch_execute("DELETE FROM team_log").unwrap_err()),
            "VV403"
        );
        dst.batch_execute("SELECT vault_checkpoint()").unwrap();
        assert_chains_verify(&mut dst, None);
        // A row that does not continue its chain is refused, whoever inserts it.
        let e = dst
            .batch_execute(
                "INSERT INTO vault.access_log (logged_at, role_name, session_user_name, backend_pid,
                    operation, granted, chain_id, chain_seq, prev_hash, row_hash)
                 SELECT now(), 'x', 'x', 1, 'get', true, chain_id, chain_seq, prev_hash, row_hash
                   FROM vault.access_log ORDER BY chain_seq DESC LIMIT 1",
            )
            .unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{e:?}");
        // Without break-glass the rebuilt protection holds like any other.
        assert_eq!(
            sqlstate(
                &dst.batch_execute("ALTER TABLE team_log ADD CONSTRAINT c CHECK (id > 0)")
                    .unwrap_err()
            ),
            "VV403"
        );
    });
    for db in ["vault_plain_src", "vault_plain_dst"] {
        su.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .unwrap();
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
