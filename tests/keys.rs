//! Keys fail closed and loudly (issue 15, item 6): once a signing key is registered, a missing or
//! exposed key file stops signing with a SQLSTATE naming the file, is never quietly regenerated,
//! and shows in vault_health() and vault_metrics(); a dead worker shows there too.

mod common;

use common::*;
use postgres::Client;
use std::process::Command;

fn as_postgres(args: &[&str]) {
    let ok = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .status()
        .unwrap();
    assert!(ok.success(), "{args:?}");
}

fn key_path(s: &Server) -> String {
    format!("{}/data/vsql_vault_signing.key", s.dir)
}

/// (status, detail) of one vault_health() component.
fn health(c: &mut Client, component: &str) -> (String, String) {
    let row = c
        .query_one(
            "SELECT status, detail FROM vault_health() WHERE component = $1",
            &[&component],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

fn metric(c: &mut Client, component: &str) -> f64 {
    let text: String = c.query_one("SELECT vault_metrics()", &[]).unwrap().get(0);
    let line = format!("vsql_vault_health_status{{component=\"{component}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in {text}"))
}

fn key_count(su: &mut Client) -> i64 {
    su.query_one("SELECT count(*) FROM vault.signing_keys", &[])
        .unwrap()
        .get(0)
}

fn error_of(c: &mut Client, sql: &str) -> (String, String) {
    let e = c.query_one(sql, &[]).unwrap_err();
    let msg = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    (sqlstate(&e), msg)
}

fn set_checkpoint_interval(su: &mut Client, value: Option<&str>) {
    match value {
        Some(v) => su.batch_execute(&format!(
            "ALTER SYSTEM SET vsql_vault.checkpoint_interval = '{v}'"
        )),
        None => su.batch_execute("ALTER SYSTEM RESET vsql_vault.checkpoint_interval"),
    }
    .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn a_removed_key_file_fails_closed_is_never_regenerated_and_shows_in_health() {
    let s = server();
    let mut su = setup(&s);
    login_roles(&mut su, &[("it_health_auditor", Some("vault_auditor"))]);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    let mut auditor = s.connect("it_health_auditor");
    assert_eq!(health(&mut auditor, "signing_key").0, "ok");
    let keys_before = key_count(&mut su);
    let path = key_path(&s);
    let aside = format!("{path}.aside");
    as_postgres(&["mv", &path, &aside]);

    // Every signing operation fails with 58P01, naming the file.
    for sql in [
        "SELECT vault_checkpoint()",
        "SELECT vault_compliance_report()",
    ] {
        let (state, msg) = error_of(&mut su, sql);
        assert_eq!(state, "58P01", "{sql}: {msg}");
        assert!(msg.contains(&path), "{sql}: {msg}");
    }
    // Nothing regenerated it: no new file, no new registered key.
    assert!(!std::path::Path::new(&path).exists());
    assert_eq!(key_count(&mut su), keys_before);
    // Monitoring sees it: vault_health() for an auditor, and the metric.
    let (status, detail) = health(&mut auditor, "signing_key");
    assert_eq!(status, "failing");
    assert!(detail.contains(&path), "{detail}");
    assert_eq!(metric(&mut auditor, "signing_key"), 2.0);
    // The audit writer's scheduled checkpoint logs a WARNING naming the file.
    set_checkpoint_interval(&mut su, Some("1"));
    let log = format!("{}/server.log", s.dir);
    let wanted =
        format!("WARNING:  vsql_vault checkpoint failed: signing key file {path} is missing");
    poll("the writer's warning", 100, || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains(&wanted))
    });
    set_checkpoint_interval(&mut su, None);
    assert!(!std::path::Path::new(&path).exists());

    // Put back, the same key signs again.
    as_postgres(&["mv", &aside, &path]);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    assert_eq!(health(&mut auditor, "signing_key").0, "ok");
    assert_eq!(key_count(&mut su), keys_before);
}

#[test]
fn only_a_superusers_recorded_rotation_replaces_a_lost_key() {
    let s = server();
    let mut su = setup(&s);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    let path = key_path(&s);
    let aside = format!("{path}.lost");
    as_postgres(&["mv", &path, &aside]);
    let mut admin = s.connect("it_admin");
    assert_eq!(
        error_of(&mut admin, "SELECT vault_rotate_signing_key()").0,
        "42501"
    );
    assert!(!std::path::Path::new(&path).exists());
    let new: String = su
        .query_one("SELECT vault_rotate_signing_key()", &[])
        .unwrap()
        .get(0);
    let recorded: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'rotate_signing_key' AND granted
                AND role_name = 'postgres' AND details->>'new_key_id' = $1",
            &[&new],
        )
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    assert_eq!(health(&mut su, "signing_key").0, "ok");
    std::fs::remove_file(&aside).unwrap();
}

#[test]
fn a_key_file_readable_by_others_fails_with_f0000_and_shows_in_health() {
    let s = server();
    let mut su = setup(&s);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    let path = key_path(&s);
    as_postgres(&["chmod", "640", &path]);
    let (state, msg) = error_of(&mut su, "SELECT vault_checkpoint()");
    assert_eq!(state, "F0000", "{msg}");
    assert!(msg.contains(&path) && msg.contains("owner-only"), "{msg}");
    let (status, detail) = health(&mut su, "signing_key");
    assert_eq!(status, "failing");
    assert!(detail.contains("owner-only"), "{detail}");
    as_postgres(&["chmod", "600", &path]);
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    assert_eq!(health(&mut su, "signing_key").0, "ok");
}

#[test]
fn a_dead_retention_worker_shows_as_failing_until_it_is_back() {
    let s = server();
    let mut su = setup(&s);
    login_roles(&mut su, &[("it_monitor", Some("pg_monitor"))]);
    let mut monitor = s.connect("it_monitor");
    let pid = || -> Option<i32> {
        let mut c = server().connect("postgres");
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'vsql_vault retention worker'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
    };
    poll("the retention worker", 150, || pid().is_some());
    assert_eq!(health(&mut monitor, "retention_worker").0, "ok");
    assert_eq!(health(&mut monitor, "audit_writer").0, "ok");
    let old = pid().unwrap();
    su.execute("SELECT pg_terminate_backend($1)", &[&old])
        .unwrap();
    // The postmaster restarts it after 5 seconds; until then it is reported failing.
    poll("the dead worker to be reported", 20, || {
        health(&mut monitor, "retention_worker").0 == "failing"
    });
    assert_eq!(metric(&mut monitor, "retention_worker"), 2.0);
    poll("a new retention worker", 150, || {
        health(&mut monitor, "retention_worker").0 == "ok"
    });
    // Every component has a row, and a role outside auditors, admins and pg_monitor is refused.
    let rows: i64 = monitor
        .query_one("SELECT count(*) FROM vault_health()", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 7);
    let mut app = s.connect("it_a");
    assert_eq!(
        error_of(&mut app, "SELECT * FROM vault_health()").0,
        "42501"
    );
}
