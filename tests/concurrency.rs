//! 32 clients for 60 seconds (VSQL_VAULT_CONCURRENCY_SECONDS to change it) of mixed operations —
//! puts, gets, heads, lists, deletes, policy changes, sweeps and verification at once: no
//! deadlock, no forked chain, exactly one access record per call, and no error but the expected.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

#[derive(Default)]
struct Tally {
    calls: BTreeMap<String, i64>,
    errors: BTreeMap<String, i64>,
    unexpected: Vec<String>,
}

fn record(t: &Mutex<Tally>, role: &str, r: Result<(), postgres::Error>, expected: &[&str]) {
    let mut t = t.lock().unwrap();
    *t.calls.entry(role.to_owned()).or_default() += 1;
    if let Err(e) = r {
        let code = e.code().map(|c| c.code().to_owned()).unwrap_or_default();
        *t.errors.entry(code.clone()).or_default() += 1;
        let message = e.as_db_error().map(|d| d.message().to_owned());
        // A put that waited longer than vsql_vault.put_lock_timeout for another transaction's
        // uncommitted write of the same entry is refused, as documented: on a loaded machine
        // that transaction can take that long to make its own record durable.
        let put_lock_timeout = code == "55P03"
            && message
                .as_deref()
                .is_some_and(|m| m.contains("vsql_vault.put_lock_timeout"));
        if !expected.contains(&code.as_str()) && !put_lock_timeout {
            t.unexpected.push(format!("{role}: {code} {e} {message:?}"));
        }
    }
}

#[test]
fn thirty_two_clients_of_mixed_operations() {
    let s = server();
    let mut su = setup(&s);
    login_roles(
        &mut su,
        &[
            ("cc_app", Some("vault_app")),
            ("cc_admin", Some("vault_admin")),
            ("cc_auditor", Some("vault_auditor")),
        ],
    );
    let mut admin = s.connect("cc_admin");
    admin
        .batch_execute(
            "SELECT vault_set_retention_policy('cc.p', 30, 7);
             SELECT vault_set_access_policy('cc-shared', '{vault_app}', '{vault_app}', '{vault_app}');",
        )
        .unwrap();
    let broken_before: Vec<String> = su
        .query(
            "SELECT table_name || ' ' || coalesce(chain::text, '-') FROM vault_verify_audit() WHERE NOT ok ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let start_id: i64 = su
        .query_one("SELECT coalesce(max(id), 0) FROM vault.access_log", &[])
        .unwrap()
        .get(0);
    let seconds: u64 = std::env::var("VSQL_VAULT_CONCURRENCY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let stop = Arc::new(AtomicBool::new(false));
    let tally: Arc<Mutex<Tally>> = Default::default();
    let mut threads = Vec::new();
    for w in 0..32 {
        let (stop, tally) = (stop.clone(), tally.clone());
        let (dir, port, db) = (s.dir.clone(), s.port, s.db.clone());
        threads.push(thread::spawn(move || {
            let s = Server { dir, port, db };
            let role = match w {
                0 | 1 => "cc_admin",
                2 => "cc_auditor",
                _ => "cc_app",
            };
            let mut c = s.connect(role);
            let mut i: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("cc-{}", (i * 7 + w) % 50);
                let (r, expected): (Result<(), postgres::Error>, &[&str]) = match (w, i % 6) {
                    // Policy changes racing the puts that depend on them.
                    (0, _) => (
                        c.batch_execute(&format!(
                            "SELECT vault_set_retention_policy('cc.p', {}, 7)",
                            30 + i % 2
                        )),
                        &[],
                    ),
                    (1, 0) => (c.batch_execute("SELECT vault_purge_sweep(100)"), &[]),
                    (1, _) => (
                        c.batch_execute(&format!(
                            "SELECT vault_set_access_policy('cc-shared', '{{vault_app}}', '{{vault_app}}', '{{vault_app}}', {})",
                            if i % 2 == 0 { "NULL" } else { "1000000" }
                        )),
                        &[],
                    ),
                    (2, _) => (
                        c.batch_execute("SELECT count(*) FROM vault_verify_audit('vault.access_log')"),
                        &[],
                    ),
                    // A re-put proves the version it replaces, holding the purge log's chain
                    // until it commits, so puts of one of these 50 ids can wait on each other past
                    // vsql_vault.put_lock_timeout: 55P03, recorded, as README documents.
                    (_, 0) => (
                        // Short-lived entries, so the sweeps have work.
                        c.batch_execute(&format!(
                            "SELECT vault_put('cc.p', '{id}', '\\x01', access_policy => 'cc-shared', expires_at => now() + interval '1 second')"
                        )),
                        &["55P03"],
                    ),
                    (_, 1) => (
                        c.batch_execute(&format!(
                            "SELECT vault_put('cc.p', '{id}', '\\x02', access_policy => 'cc-shared')"
                        )),
                        &["55P03"],
                    ),
                    (_, 2) | (_, 3) => (
                        c.batch_execute(&format!("SELECT * FROM vault_get('cc.p', '{id}')")),
                        // Not stored yet, expired, or destroyed by a sweep or a delete.
                        &["P0002", "VV410"],
                    ),
                    (_, 4) => (
                        c.batch_execute(&format!("SELECT * FROM vault_head('cc.p', '{id}')")),
                        &[],
                    ),
                    _ if i % 12 == 5 => (
                        c.batch_execute(&format!("SELECT vault_delete('cc.p', '{id}', 'test')")),
                        &["P0002", "VV410"],
                    ),
                    _ => (c.batch_execute("SELECT count(*) FROM vault_list('cc.p')"), &[]),
                };
                record(&tally, role, r, expected);
            }
        }));
    }
    thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let t = tally.lock().unwrap();
    assert!(
        t.unexpected.is_empty(),
        "{} unexpected errors, first: {:?}",
        t.unexpected.len(),
        t.unexpected.iter().take(5).collect::<Vec<_>>()
    );
    eprintln!("calls {:?}, errors {:?}", t.calls, t.errors);
    // Exactly one access record per call, for every role.
    for (role, calls) in &t.calls {
        let logged: i64 = su
            .query_one(
                "SELECT count(*) FROM vault.access_log WHERE id > $1 AND role_name = $2",
                &[&start_id, role],
            )
            .unwrap()
            .get(0);
        assert_eq!(logged, *calls, "{role}: {calls} calls, {logged} records");
    }
    // No chain forked or broken by the load.
    let broken_after: Vec<String> = su
        .query(
            "SELECT table_name || ' ' || coalesce(chain::text, '-') FROM vault_verify_audit() WHERE NOT ok ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(broken_after, broken_before);
    let forks: i64 = su
        .query_one(
            "SELECT count(*) FROM (SELECT chain_id, chain_seq FROM vault.access_log
                                    GROUP BY 1, 2 HAVING count(*) > 1) f",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(forks, 0);
    // Every destroyed entry has exactly one proof per destruction, and no entry is both live and
    // proven destroyed after its last put.
    let orphans: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.entries e
              WHERE e.purpose = 'cc.p' AND e.purged_at IS NULL
                AND EXISTS (SELECT 1 FROM vault.purge_log p WHERE p.purpose = e.purpose
                              AND p.external_id = e.external_id AND p.entry_id = e.id
                              AND p.purged_at >= e.updated_at)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(orphans, 0, "entries both live and proven destroyed");
}
