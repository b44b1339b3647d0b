//! Key governance (issue 18) against a real server: signed directives pushed down by a
//! governance authority (applied, replayed, tampered with, signed by an unknown key, expired),
//! and the signed key status checked offline.

mod common;

use common::{public_keys, server, setup, sqlstate};
use postgres::Client;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn cli() -> Command {
    Command::new(std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI"))
}

/// Writes an authority key file (owner-only) from a fixed seed; returns its path and public key.
fn authority(s: &common::Server, name: &str, seed: u8) -> (String, String) {
    let path = format!("{}/{name}.key", s.dir);
    std::fs::write(&path, format!("{}\n", hex::encode([seed; 32]))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = vsql_vault_core::keys::decode_file(&path, &std::fs::read(&path).unwrap()).unwrap();
    (path, hex::encode(key.verifying_key().as_bytes()))
}

/// An RFC 3339 time `offset` from the server's clock.
fn at(su: &mut Client, offset: &str) -> String {
    su.query_one(
        "SELECT to_char((now() + $1::text::interval) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')",
        &[&offset],
    )
    .unwrap()
    .get(0)
}

fn sign(key: &str, target: &str, expires_at: &str) -> String {
    let out = cli()
        .args([
            "sign-directive",
            "--key",
            key,
            "--kind",
            "retire-key",
            "--target",
            target,
            "--reason",
            "authority says so",
            "--expires-at",
            expires_at,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The server's message of a refused call.
fn message(e: &postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

fn apply(admin: &mut Client, doc: &str) -> Result<i64, postgres::Error> {
    admin
        .query_one("SELECT vault_apply_directive($1::text::jsonb)", &[&doc])
        .map(|r| r.get(0))
}

#[test]
fn a_signed_directive_is_applied_once_and_replayed_tampered_foreign_or_expired_ones_are_refused() {
    let s = server();
    let mut su = setup(&s);
    let (key, public) = authority(&s, "authority", 7);
    let (foreign, _) = authority(&s, "foreign", 8);
    // Only a superuser lists the authorities.
    let mut admin = s.connect("it_admin");
    let e = admin
        .batch_execute(&format!(
            "SET vsql_vault.directive_public_keys = '{public}'"
        ))
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    // None listed: nothing is accepted.
    let doc = sign(&key, "kms://it-signed/*", &at(&mut su, "1 hour"));
    assert_eq!(sqlstate(&apply(&mut admin, &doc).unwrap_err()), "F0000");
    su.batch_execute(&format!(
        "ALTER ROLE it_admin SET vsql_vault.directive_public_keys = '{public}'"
    ))
    .unwrap();
    let mut admin = s.connect("it_admin");

    // Applied: stored with the whole signed document, and enforced.
    let id = apply(&mut admin, &doc).unwrap();
    let row = su
        .query_one(
            "SELECT kind, target, reason, authority_key_id, document = $2::text::jsonb, created_by::text
               FROM vault.key_directives WHERE id = $1",
            &[&id, &doc],
        )
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(row.get::<_, String>(0), "retire-key");
    assert_eq!(row.get::<_, String>(1), "kms://it-signed/*");
    assert_eq!(row.get::<_, String>(2), "authority says so");
    assert_eq!(row.get::<_, String>(3), v["key_id"].as_str().unwrap());
    assert!(row.get::<_, bool>(4), "the signed document is kept whole");
    assert_eq!(row.get::<_, String>(5), "it_admin");
    let mut app = s.connect("it_a");
    let e = app
        .execute(
            "SELECT vault_put('it.card', 'gov-1', '\\x01'::bytea, key_ref => 'kms://it-signed/k1')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV426");
    let reason: String = su
        .query_one(
            "SELECT reason FROM vault.access_log WHERE operation = 'put' AND external_id = 'gov-1'
              ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(reason.contains(&format!("key directive {id} ")), "{reason}");

    // Replayed: refused, nothing stored.
    let count = |su: &mut Client| -> i64 {
        su.query_one("SELECT count(*) FROM vault.key_directives", &[])
            .unwrap()
            .get(0)
    };
    let before = count(&mut su);
    let e = apply(&mut admin, &doc).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    assert!(message(&e).contains("nonce"), "{}", message(&e));
    // Tampered with (a new nonce, or another target, under the old signature): refused.
    let mut tampered = v.clone();
    tampered["target"] = "kms://*".into();
    tampered["nonce"] = "ffffffffffffffffffffffffffffffff".into();
    let e = apply(&mut admin, &tampered.to_string()).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(message(&e).contains("does not verify"), "{}", message(&e));
    // Signed by a key the superuser did not list: refused.
    let other = sign(&foreign, "kms://it-signed/*", &at(&mut su, "1 hour"));
    let e = apply(&mut admin, &other).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(
        message(&e).contains("not in vsql_vault.directive_public_keys"),
        "{}",
        message(&e)
    );
    // Expired: refused.
    let stale = sign(&key, "kms://it-signed/*", &at(&mut su, "-1 second"));
    let e = apply(&mut admin, &stale).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    assert!(message(&e).contains("expired"), "{}", message(&e));
    // Not a document at all: 22023. Not an admin: 42501.
    assert_eq!(
        sqlstate(&apply(&mut admin, "{\"kind\": 1}").unwrap_err()),
        "22023"
    );
    let fresh = sign(&key, "kms://it-signed/*", &at(&mut su, "1 hour"));
    assert_eq!(sqlstate(&apply(&mut app, &fresh).unwrap_err()), "42501");
    assert_eq!(count(&mut su), before, "no refused document was stored");
    // Every attempt is recorded.
    let refused: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'apply_directive' AND NOT granted",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(refused >= 7, "{refused}");

    admin
        .execute("SELECT vault_revoke_directive($1, 'test over')", &[&id])
        .unwrap();
    su.batch_execute("ALTER ROLE it_admin RESET vsql_vault.directive_public_keys")
        .unwrap();
}

#[test]
fn the_key_status_is_signed_verifies_offline_and_counts_what_is_out_of_compliance() {
    let s = server();
    let mut su = setup(&s);
    common::login_roles(&mut su, &[("it_auditor", Some("vault_auditor"))]);
    let mut app = s.connect("it_a");
    for i in 0..3 {
        app.execute(
            "SELECT vault_put('it.card', $1, '\\x01'::bytea, 'DES', 'kms://it-status/k1')",
            &[&format!("ks-{i}")],
        )
        .unwrap();
    }
    let mut admin = s.connect("it_admin");
    let id: i64 = admin
        .query_one(
            "SELECT vault_key_directive('deny-algorithm', 'des', reason => 'withdrawn')",
            &[],
        )
        .unwrap()
        .get(0);
    let mut aud = s.connect("it_auditor");
    let text: String = aud
        .query_one("SELECT vault_key_status()::text", &[])
        .unwrap()
        .get(0);
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    let key = status["key_refs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_ref"] == "kms://it-status/k1")
        .expect("the key_ref is reported");
    assert_eq!(key["entries"], 3);
    assert_eq!(key["entries_out_of_compliance"], 3);
    assert!(key["directives"].as_array().unwrap().contains(&id.into()));
    let alg = status["algorithm_hints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["algorithm_hint"] == "DES")
        .expect("the algorithm is reported");
    assert!(alg["entries_out_of_compliance"].as_i64().unwrap() >= 3);
    let directive = status["directives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .expect("the directive is reported");
    assert!(directive["entries_out_of_compliance"].as_i64().unwrap() >= 3);
    assert!(!status["signing_keys"].as_array().unwrap().is_empty());
    assert!(status["signing_keys"][0]["age_days"].is_i64());
    assert!(status["kek_versions"].is_array());
    // Offline: verifies with the vault's public keys; an improved copy does not.
    let path = format!("{}/key_status.json", s.dir);
    let verify = |su: &mut Client, path: &str| {
        let mut cmd = cli();
        cmd.args(["verify-report", "--report", path]);
        for k in public_keys(su) {
            cmd.args(["--public-key", &k]);
        }
        cmd.status().unwrap().code().unwrap_or(-1)
    };
    std::fs::write(&path, &text).unwrap();
    assert_eq!(verify(&mut su, &path), 0, "the key status must verify");
    let mut altered = status.clone();
    altered["directives"] = serde_json::json!([]);
    std::fs::write(&path, altered.to_string()).unwrap();
    assert_eq!(
        verify(&mut su, &path),
        1,
        "an altered status must not verify"
    );
    // The compliance report carries the directives, the metrics their non-compliant counts.
    let report: String = aud
        .query_one("SELECT vault_compliance_report()::text", &[])
        .unwrap()
        .get(0);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(report["key_directives"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["id"] == id && d["entries_out_of_compliance"].as_i64() >= Some(3)));
    let metrics: String = aud.query_one("SELECT vault_metrics()", &[]).unwrap().get(0);
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("vsql_vault_key_directive_noncompliant_entries{")
                && l.contains(&format!("directive=\"{id}\""))
        })
        .expect("a metric per directive in force");
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(value, 3.0, "{line}");
    // Only auditors and admins: 42501, recorded.
    let e = app.query_one("SELECT vault_key_status()", &[]).unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    admin
        .execute("SELECT vault_revoke_directive($1, 'test over')", &[&id])
        .unwrap();
}
