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
    app.batch_execute("COMMIT").unwrap();
    app.batch_execute("BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:alice@tenant-7'")
        .unwrap();
    // A put rolled back leaves no record (its record commits with it); the reads stay recorded.
    put(&mut app, "obo-3", b"\x03").unwrap();
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
    // And with a COMMIT.
    app.batch_execute("BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:carol'; COMMIT")
        .unwrap();
    let now: String = app
        .query_one("SELECT current_setting('vsql_vault.on_behalf_of')", &[])
        .unwrap()
        .get(0);
    assert_eq!(now, "");
    put(&mut app, "obo-2", b"\x02").unwrap();

    let alice = Some("user:alice@tenant-7".to_string());
    // Read records survive the caller's ROLLBACK, each with the identity of its call.
    assert_eq!(
        on_behalf_of_of(&mut su, "put", "obo-1"),
        vec![alice.clone()]
    );
    assert_eq!(on_behalf_of_of(&mut su, "put", "obo-3"), vec![]);
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

#[test]
fn require_identity_refuses_a_call_without_one_with_28000_and_records_it() {
    let s = server();
    let mut su = setup(&s);
    let mut admin = s.connect("it_admin");
    admin
        .batch_execute(
            "SELECT vault_set_access_policy('it-named', '{vault_app}', '{@owner}', '{@owner}',
                                            require_identity => true)",
        )
        .unwrap();
    let required: bool = su
        .query_one(
            "SELECT require_identity FROM vault.access_policies WHERE name = 'it-named'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(required);
    let mut app = s.connect("it_a");
    let put_named = "SELECT vault_put('it.card', 'ri-1', '\\x01', access_policy => 'it-named')";
    // Without an identity: refused, recorded, and nothing stored.
    let e = app.batch_execute(put_named).unwrap_err();
    assert_eq!(sqlstate(&e), "28000", "{e}");
    assert!(
        format!("{e:?}").contains("vsql_vault.on_behalf_of"),
        "{e:?}"
    );
    // With one: stored.
    app.batch_execute(&format!(
        "BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:bob'; {put_named}; COMMIT;"
    ))
    .unwrap();
    // Every later call on the entry needs one too: get, head, list and delete.
    for call in [
        "SELECT * FROM vault_get('it.card', 'ri-1')",
        "SELECT * FROM vault_head('it.card', 'ri-1')",
        "SELECT vault_delete('it.card', 'ri-1')",
    ] {
        let e = app.batch_execute(call).unwrap_err();
        assert_eq!(sqlstate(&e), "28000", "{call}: {e}");
    }
    let listed = |c: &mut Client| -> Vec<String> {
        c.query(
            "SELECT external_id FROM vault_list('it.card', 'ri-', 10) WHERE external_id LIKE 'ri-%'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    assert!(listed(&mut app).is_empty(), "listed without an identity");
    app.batch_execute("BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:bob'")
        .unwrap();
    assert_eq!(listed(&mut app), vec!["ri-1".to_string()]);
    let v: Vec<u8> = app
        .query_one(
            "SELECT encrypted_value FROM vault_get('it.card', 'ri-1')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v, b"\x01");
    app.batch_execute("COMMIT").unwrap();
    // The refusals are in the log, with their SQLSTATE and the policy's name for auditors.
    let refused: Vec<(String, Option<String>)> = su
        .query(
            "SELECT operation, details->>'access_policy' FROM vault.access_log
              WHERE external_id = 'ri-1' AND NOT granted AND sqlstate = '28000'
              ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ops: Vec<&str> = refused.iter().map(|(o, _)| o.as_str()).collect();
    assert_eq!(ops, ["put", "get", "head", "delete"]);
    assert_eq!(refused[0].1.as_deref(), Some("it-named"));
    assert_eq!(refused[1].1.as_deref(), Some("it-named"));
    let granted_as: Vec<Option<String>> = su
        .query(
            "SELECT on_behalf_of FROM vault.access_log
              WHERE external_id = 'ri-1' AND granted AND operation IN ('put', 'get') ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        granted_as,
        vec![Some("user:bob".to_string()), Some("user:bob".to_string())]
    );
    // Policies without the option ask nothing: the built-in ones keep working unidentified.
    put(&mut app, "ri-plain", b"\x02").unwrap();
}

#[test]
fn vault_list_pages_return_every_entry_once_in_order_with_bounded_pages() {
    let s = server();
    let mut su = setup(&s);
    let mut admin = s.connect("it_admin");
    admin
        .execute("SELECT vault_set_retention_policy('it.pages', 30, 7)", &[])
        .unwrap();
    let mut app = s.connect("it_a");
    let mut other = s.connect("it_b");
    app.batch_execute(
        "SELECT vault_put('it.pages', 'pg-' || lpad(i::text, 4, '0'), '\\x01')
           FROM generate_series(1, 2500) i",
    )
    .unwrap();
    // Entries the caller may not retrieve are not listed and do not shorten a page.
    other
        .batch_execute(
            "SELECT vault_put('it.pages', 'pg-' || lpad(i::text, 4, '0') || '-b', '\\x01')
               FROM generate_series(1, 300) i",
        )
        .unwrap();
    let mut seen: Vec<String> = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page: Vec<String> = app
            .query(
                "SELECT external_id FROM vault_list('it.pages', after => $1, max_rows => 700)",
                &[&after],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(page.len() <= 700);
        pages += 1;
        match page.last() {
            None => break,
            Some(last) => after = Some(last.clone()),
        }
        seen.extend(page);
    }
    assert_eq!(pages, 5, "four pages of at most 700 and an empty one");
    let expected: Vec<String> = (1..=2500).map(|i| format!("pg-{i:04}")).collect();
    assert_eq!(seen, expected, "every entry once, in external_id order");
    // The old call still works: its first page, 1000 entries by default.
    let first: i64 = app
        .query_one("SELECT count(*) FROM vault_list('it.pages')", &[])
        .unwrap()
        .get(0);
    assert_eq!(first, 1000);
    // Each page is one access record, saying where it started and how long it was.
    let details: serde_json::Value = serde_json::from_str(
        &su.query_one(
            "SELECT details::text FROM vault.access_log
              WHERE operation = 'list' AND purpose = 'it.pages' AND role_name = 'it_a'
                AND details->>'after' = 'pg-0700'",
            &[],
        )
        .unwrap()
        .get::<_, String>(0),
    )
    .unwrap();
    assert_eq!(
        details,
        serde_json::json!({"entries": 700, "after": "pg-0700", "max_rows": 700})
    );
}
