//! Caller identity behind connection pools (vsql_vault.on_behalf_of, require_identity) and
//! vault_list's keyset pages, against a real server.

mod common;

use common::{assert_chains_verify, offline_verdict, put, server, setup, sqlstate};
use postgres::Client;

fn on_behalf_of_of(su: &mut Client, op: &str, external_id: &str) -> Vec<Option<String>> {
    su.query(
        "SELECT on_behalf_of FROM vault.access_log
          WHERE purpose = 'it.card' AND operation = $1 AND external_id = $2 ORDER BY id",
        &[&op, &external_id],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn on_behalf_of_is_recorded_for_its_transaction_only_and_shown_in_views_and_report() {
    let s = server();
    let mut su = setup(&s);
    common::login_roles(&mut su, &[("it_auditor", Some("vault_auditor"))]);
    let mut app = s.connect("it_a");
    let before: i64 = su
        .query_one(
            "SELECT coalesce(sum(identified), 0)::bigint FROM vault.access_summary
              WHERE day = (now() AT TIME ZONE 'UTC')::date",
            &[],
        )
        .unwrap()
        .get(0);
    // A pooled application states whom it acts for inside its own transaction.
    app.batch_execute("BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:alice@tenant-7'")
        .unwrap();
    put(&mut app, "obo-1", b"\x01").unwrap();
    app.query("SELECT * FROM vault_get('it.card', 'obo-1')", &[])
        .unwrap();
    let e = app
        .query("SELECT * FROM vault_get('it.card', 'obo-absent')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "P0002");
    app.batch_execute("ROLLBACK").unwrap();
    // Gone with the transaction: the next one on the same pooled connection states no one.
    let now: String = app
        .query_one("SELECT current_setting('vsql_vault.on_behalf_of')", &[])
        .unwrap()
        .get(0);
    assert_eq!(now, "");
    put(&mut app, "obo-2", b"\x02").unwrap();

    let alice = Some("user:alice@tenant-7".to_string());
    // Records survive the caller's ROLLBACK, each with the identity of its call.
    assert_eq!(
        on_behalf_of_of(&mut su, "put", "obo-1"),
        vec![alice.clone()]
    );
    assert_eq!(
        on_behalf_of_of(&mut su, "get", "obo-1"),
        vec![alice.clone()]
    );
    assert_eq!(
        on_behalf_of_of(&mut su, "get", "obo-absent"),
        vec![alice.clone()]
    );
    assert_eq!(on_behalf_of_of(&mut su, "put", "obo-2"), vec![None]);
    let mut aud = s.connect("it_auditor");
    let denied: Option<String> = aud
        .query_one(
            "SELECT on_behalf_of FROM vault.access_denials WHERE external_id = 'obo-absent'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(denied, alice);
    let after: i64 = aud
        .query_one(
            "SELECT coalesce(sum(identified), 0)::bigint FROM vault.access_summary
              WHERE day = (now() AT TIME ZONE 'UTC')::date",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(after - before, 3, "put, get and the refused get of alice");
    let report: String = aud
        .query_one("SELECT vault_compliance_report()::text", &[])
        .unwrap()
        .get(0);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert!(
        report["access_summary"]["identified_accesses_last_30_days"]
            .as_i64()
            .unwrap()
            >= 3,
        "{report}"
    );
    // The new column is evidence like the others: the chain verifies, in the database and with
    // both offline verifiers.
    su.batch_execute("SELECT vault_checkpoint()").unwrap();
    assert_chains_verify(&mut su, Some("vault.access_log"));
    let (code, out) = offline_verdict(&s, &mut su, "vault.access_log", "identity_log");
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_bad_on_behalf_of_is_refused_when_set() {
    let s = server();
    let _su = setup(&s);
    let mut app = s.connect("it_a");
    app.batch_execute("SET vsql_vault.on_behalf_of = 'service:billing'")
        .unwrap();
    for bad in [
        "x".repeat(129),
        "alice\nbob".to_string(),
        " alice".to_string(),
    ] {
        let e = app
            .execute(
                "SELECT set_config('vsql_vault.on_behalf_of', $1, true)",
                &[&bad],
            )
            .unwrap_err();
        assert_eq!(sqlstate(&e), "22023", "{bad:?}: {e}");
        assert!(format!("{e:?}").contains("on_behalf_of"), "{e:?}");
    }
    // The value before the refused SET stays.
    let now: String = app
        .query_one("SELECT current_setting('vsql_vault.on_behalf_of')", &[])
        .unwrap()
        .get(0);
    assert_eq!(now, "service:billing");
    app.batch_execute(&format!(
        "SET vsql_vault.on_behalf_of = '{}'",
        "é".repeat(64)
    ))
    .unwrap();
}
