//! Compliance evidence against a real server: the signed report checked by the offline tool (and
//! caught when altered), and vault_metrics() read by a real Prometheus text-format parser.

mod common;

use common::{kek_line, poll, public_keys, put, server, set_kek, setup, sqlstate};
use postgres::Client;
use prometheus_parse::{Scrape, Value};
use std::process::Command;

fn verify_report(su: &mut Client, path: &str) -> i32 {
    let mut cmd = Command::new(std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI"));
    cmd.args(["verify-report", "--report", path]);
    for k in public_keys(su) {
        cmd.args(["--public-key", &k]);
    }
    cmd.status().unwrap().code().unwrap_or(-1)
}

fn auditor(s: &common::Server, su: &mut Client) -> Client {
    common::login_roles(su, &[("it_auditor", Some("vault_auditor"))]);
    s.connect("it_auditor")
}

#[test]
fn the_compliance_report_verifies_offline_and_an_altered_copy_does_not() {
    let s = server();
    let mut su = setup(&s);
    let mut app = s.connect("it_a");
    put(&mut app, "cr-1", b"\x01").unwrap();
    let mut aud = auditor(&s, &mut su);
    let report: String = aud
        .query_one("SELECT vault_compliance_report()::text", &[])
        .unwrap()
        .get(0);
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    // What the report says agrees with the tables it summarises.
    let active: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.entries WHERE purged_at IS NULL AND expires_at > now()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v["summary"]["active_entries"], serde_json::json!(active));
    assert!(v["by_purpose"]["it.card"]["active"].as_i64().unwrap() >= 1);
    assert_eq!(
        v["by_purpose"]["it.card"]["retention_policy"],
        "30 days max, 7 day default TTL"
    );
    let path = format!("{}/compliance.json", s.dir);
    std::fs::write(&path, &report).unwrap();
    assert_eq!(verify_report(&mut su, &path), 0, "the report must verify");
    // Anyone who improves the figures afterwards is caught.
    let mut altered = v.clone();
    altered["retention_findings"]["past_expiry_not_purged"] = serde_json::json!(0);
    altered["summary"]["expired_pending_purge"] = serde_json::json!(-1);
    std::fs::write(&path, altered.to_string()).unwrap();
    assert_eq!(
        verify_report(&mut su, &path),
        1,
        "an altered report must not verify"
    );
    // A report with its signature removed does not verify either.
    let mut unsigned = v.clone();
    unsigned.as_object_mut().unwrap().remove("signature");
    std::fs::write(&path, unsigned.to_string()).unwrap();
    assert_ne!(verify_report(&mut su, &path), 0);
    // It can be taken in a read-only transaction (not on a standby, where no record of the call
    // can be made: boundaries.rs).
    let mut ro = s.connect("it_auditor");
    ro.batch_execute("BEGIN READ ONLY").unwrap();
    let again: String = ro
        .query_one("SELECT vault_compliance_report()::text", &[])
        .unwrap()
        .get(0);
    let again: serde_json::Value = serde_json::from_str(&again).unwrap();
    ro.batch_execute("COMMIT").unwrap();
    assert_eq!(again["signing_key_id"], v["signing_key_id"]);
    // Only auditors and admins get one; the refusal is logged.
    let e = app
        .query_one("SELECT vault_compliance_report()", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let refused: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'compliance_report' AND role_name = 'it_a' AND NOT granted",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(refused >= 1);
}

fn read_metrics(c: &mut Client) -> (String, Scrape) {
    let text: String = c.query_one("SELECT vault_metrics()", &[]).unwrap().get(0);
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    (text, scrape)
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn metrics_are_well_formed_prometheus_text_and_agree_with_the_tables() {
    let s = server();
    let mut su = setup(&s);
    let mut app = s.connect("it_a");
    put(&mut app, "m-1", b"\x01").unwrap();
    let _ = app.query("SELECT * FROM vault_get('it.card', 'no-such-entry')", &[]);
    let mut aud = auditor(&s, &mut su);
    aud.query("SELECT * FROM vault_verify_audit()", &[])
        .unwrap();
    let (text, scrape) = read_metrics(&mut aud);
    // Every sample line was understood by the parser, and every metric is documented and typed.
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(scrape.samples.len(), sample_lines, "{text}");
    for sample in &scrape.samples {
        assert!(
            scrape.docs.contains_key(&sample.metric),
            "no HELP for {}",
            sample.metric
        );
        match sample.value {
            Value::Counter(_) => assert!(sample.metric.ends_with("_total")),
            Value::Gauge(_) => assert!(!sample.metric.ends_with("_total")),
            ref other => panic!("{} is neither counter nor gauge: {other:?}", sample.metric),
        }
    }
    // The figures are the tables' figures.
    let gets_denied: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'get' AND NOT granted",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        value(
            &scrape,
            "vsql_vault_operations_total",
            &[("operation", "get"), ("outcome", "denied")]
        ),
        Some(gets_denied as f64)
    );
    let active: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.entries WHERE purpose = 'it.card' AND purged_at IS NULL AND expires_at > now()",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        value(
            &scrape,
            "vsql_vault_entries",
            &[("purpose", "it.card"), ("state", "active")]
        ),
        Some(active as f64)
    );
    assert!(
        value(
            &scrape,
            "vsql_vault_last_verification_timestamp_seconds",
            &[]
        )
        .unwrap()
            > 0.0
    );
    assert!(value(&scrape, "vsql_vault_last_verification_ok", &[]).is_some());
    // Sealed replication batches are counted across sessions.
    let before = value(&scrape, "vsql_vault_replication_batches_sealed_total", &[]).unwrap();
    let kek = set_kek(&s, &mut su, &kek_line("v1", "ab"));
    poll("the KEK setting to reach the session", 100, || {
        su.query_one("SHOW vsql_vault.kek_file", &[])
            .is_ok_and(|r| r.get::<_, String>(0) == kek)
    });
    let _ = su.execute("SELECT pg_drop_replication_slot('it_metrics_slot')", &[]);
    su.execute(
        "SELECT pg_create_logical_replication_slot('it_metrics_slot', 'vsql_vault')",
        &[],
    )
    .unwrap();
    // Two transactions, two batches.
    su.batch_execute("CREATE TABLE IF NOT EXISTS it_metrics (id int)")
        .unwrap();
    su.execute("INSERT INTO it_metrics VALUES (1)", &[])
        .unwrap();
    su.execute("INSERT INTO it_metrics VALUES (2)", &[])
        .unwrap();
    let lines: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_get_changes('it_metrics_slot', NULL, NULL)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(lines >= 2);
    let (_, after) = read_metrics(&mut aud);
    let sealed = value(&after, "vsql_vault_replication_batches_sealed_total", &[]).unwrap();
    assert!(sealed >= before + 2.0, "{before} -> {sealed}");
    su.execute("SELECT pg_drop_replication_slot('it_metrics_slot')", &[])
        .unwrap();
    // Application roles cannot read the metrics.
    let e = app.query_one("SELECT vault_metrics()", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
}
