//! Audited reads on a hot standby (issue 17, item 1): a standby serves vault_get, vault_head,
//! vault_list and vault_verify_audit once their access record is durable on the primary, which
//! records the standby's name; without the primary it fails closed with VV503; `max_retrievals`
//! is counted on the primary; writes stay refused with 25006.

mod common;

use common::cluster::Standby;
use common::{
    assert_chains_verify, get, login_roles, offline_verdict, put, server, setup, sqlstate, Server,
};
use postgres::Client;
use std::time::Duration;

/// The standby's name in its records (its `cluster_name`).
const NAME: &str = "replica_one";

/// A standby of `s` (pg_basebackup -R) that forwards its records as `it_forwarder`.
fn standby_of(s: &Server, su: &mut Client, tag: &str, extra: &str) -> Standby {
    login_roles(
        su,
        &[
            ("it_forwarder", Some("vault_forwarder")),
            ("it_auditor", Some("vault_auditor")),
        ],
    );
    Standby::start(
        s,
        &format!("{}/standby-{tag}", s.dir),
        s.port + 30,
        &format!(
            "cluster_name = '{NAME}'\nvsql_vault.primary_conninfo = 'host={} port={} user=it_forwarder'\n{extra}",
            s.dir, s.port
        ),
    )
}

/// (operation, granted, role, served_by_standby, forwarded_by) of the primary's records of
/// `external_id` that a standby forwarded, oldest first.
fn forwarded_records(
    su: &mut Client,
    external_id: &str,
) -> Vec<(String, bool, String, String, String)> {
    su.query(
        "SELECT operation, granted, role_name::text, details->>'served_by_standby',
                details->>'forwarded_by'
           FROM vault.access_log
          WHERE external_id = $1 AND details ? 'served_by_standby' ORDER BY id",
        &[&external_id],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

#[test]
fn reads_on_a_standby_return_its_data_once_the_primary_holds_their_record() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "sb-read-1", b"standby value").unwrap();
    let standby = standby_of(&s, &mut su, "reads", "");
    standby.catch_up(&mut su, &s.db);
    let mut a_standby = standby.connect(&s.db, "it_a");

    // The standby's data, returned once the record is on the primary.
    assert_eq!(get(&mut a_standby, "sb-read-1").unwrap(), b"standby value");
    let found: bool = a_standby
        .query_one("SELECT found FROM vault_head('it.card', 'sb-read-1')", &[])
        .unwrap()
        .get(0);
    assert!(found);
    let listed: i64 = a_standby
        .query_one(
            "SELECT count(*) FROM vault_list('it.card') WHERE external_id = 'sb-read-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(listed, 1);
    let expected = |op: &str, granted: bool, role: &str| {
        (
            op.to_owned(),
            granted,
            role.to_owned(),
            NAME.to_owned(),
            "it_forwarder".to_owned(),
        )
    };
    assert_eq!(
        forwarded_records(&mut su, "sb-read-1"),
        vec![
            expected("get", true, "it_a"),
            expected("head", true, "it_a")
        ]
    );
    let lists: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'list' AND role_name = 'it_a'
                AND details->>'served_by_standby' = $1",
            &[&NAME],
        )
        .unwrap()
        .get(0);
    assert!(
        lists >= 1,
        "the standby's vault_list is recorded on the primary"
    );

    // A refused read on the standby is recorded on the primary too.
    let mut b_standby = standby.connect(&s.db, "it_b");
    let e = get(&mut b_standby, "sb-read-1").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    assert_eq!(
        forwarded_records(&mut su, "sb-read-1").last(),
        Some(&expected("get", false, "it_b"))
    );

    // Verification works on the standby (itself recorded on the primary), as do the auditor's
    // views; the records the standby forwarded keep the primary's chain intact for both
    // verifiers.
    let mut auditor_standby = standby.connect(&s.db, "it_auditor");
    assert_chains_verify(&mut auditor_standby, Some("vault.access_log"));
    let verified: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'verify_audit'
                AND role_name = 'it_auditor' AND granted AND details->>'served_by_standby' = $1",
            &[&NAME],
        )
        .unwrap()
        .get(0);
    assert!(verified >= 1);
    let summary: i64 = auditor_standby
        .query_one("SELECT count(*) FROM vault.access_summary", &[])
        .unwrap()
        .get(0);
    assert!(summary >= 1);
    auditor_standby
        .query_one("SELECT count(*) FROM vault.audit_integrity", &[])
        .unwrap();
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    assert_chains_verify(&mut su, Some("vault.access_log"));
    let (code, out) = offline_verdict(&s, &mut su, "vault.access_log", "standby-reads");
    assert_eq!(code, 0, "{out}");

    // What must write is refused on the standby at once, unrecorded.
    let mut admin_standby = standby.connect(&s.db, "it_admin");
    for (admin, sql) in [
        (false, "SELECT vault_put('it.card', 'sb-read-2', '\\x01')"),
        (false, "SELECT vault_delete('it.card', 'sb-read-1')"),
        (
            true,
            "SELECT vault_set_retention_policy('it.standby', 30, 7)",
        ),
        (true, "SELECT vault_compliance_report()"),
    ] {
        let c = if admin {
            &mut admin_standby
        } else {
            &mut a_standby
        };
        let e = c.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "25006", "{sql}: {e:?}");
    }
    assert_eq!(get(&mut a, "sb-read-1").unwrap(), b"standby value");
}

#[test]
fn max_retrievals_on_a_standby_are_counted_on_the_primary() {
    let s = server();
    let mut su = setup(&s);
    let mut admin = s.connect("it_admin");
    admin
        .execute(
            "SELECT vault_set_access_policy('sb-once', '{@owner}', '{@owner}', '{@owner}', 1)",
            &[],
        )
        .unwrap();
    let mut a = s.connect("it_a");
    for id in ["sb-once-1", "sb-once-2"] {
        a.execute(
            "SELECT vault_put('it.card', $1, '\\x07', access_policy => 'sb-once')",
            &[&id],
        )
        .unwrap();
    }
    let standby = standby_of(&s, &mut su, "once", "");
    standby.catch_up(&mut su, &s.db);
    let mut a_standby = standby.connect(&s.db, "it_a");

    // Read once on the standby: granted; again on the standby or on the primary: denied.
    assert_eq!(get(&mut a_standby, "sb-once-1").unwrap(), b"\x07");
    let e = get(&mut a_standby, "sb-once-1").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let e = get(&mut a, "sb-once-1").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let records = forwarded_records(&mut su, "sb-once-1");
    assert_eq!(
        records.iter().map(|r| r.1).collect::<Vec<_>>(),
        vec![true, false],
        "{records:?}"
    );

    // Read once on the primary: the standby is denied.
    assert_eq!(get(&mut a, "sb-once-2").unwrap(), b"\x07");
    let e = get(&mut a_standby, "sb-once-2").unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let denials: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE external_id = 'sb-once-2'
                AND operation = 'get' AND NOT granted AND reason LIKE 'max_retrievals%'
                AND details->>'served_by_standby' = $1",
            &[&NAME],
        )
        .unwrap()
        .get(0);
    assert_eq!(denials, 1);
}

#[test]
fn without_the_primary_a_standby_read_fails_closed_at_once() {
    let s = server();
    let mut su = setup(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "sb-down-1", b"v").unwrap();
    // The audit timeout is the longest allowed, the caller's statement timeout shorter: a call
    // that waited for its record would end in 57014, not VV503.
    let standby = standby_of(&s, &mut su, "down", "vsql_vault.audit_timeout = 600000");
    standby.catch_up(&mut su, &s.db);
    let mut su_standby = standby.connect(&s.db, "postgres");
    let mut a_standby = standby.connect(&s.db, "it_a");
    a_standby
        .batch_execute("SET statement_timeout = '30s'")
        .unwrap();
    let set_conninfo = |c: &mut Client, value: Option<&str>| {
        match value {
            Some(v) => c.batch_execute(&format!(
                "ALTER SYSTEM SET vsql_vault.primary_conninfo = '{v}'"
            )),
            None => c.batch_execute("ALTER SYSTEM RESET vsql_vault.primary_conninfo"),
        }
        .unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(500));
    };
    // A primary that does not answer (nothing listens there), then no primary configured.
    for (conninfo, says) in [
        (
            Some(format!(
                "host={} port={} user=it_forwarder",
                s.dir,
                s.port + 31
            )),
            "cannot be reached",
        ),
        (None, "vsql_vault.primary_conninfo is not set"),
    ] {
        set_conninfo(&mut su_standby, conninfo.as_deref());
        for sql in [
            "SELECT * FROM vault_get('it.card', 'sb-down-1')",
            "SELECT * FROM vault_head('it.card', 'sb-down-1')",
            "SELECT * FROM vault_list('it.card')",
        ] {
            let e = a_standby.query(sql, &[]).unwrap_err();
            assert_eq!(sqlstate(&e), "VV503", "{sql}: {e:?}");
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert!(message.contains(says), "{message}");
            assert!(
                !message.contains("it_forwarder"),
                "the connection string stays out of errors: {message}"
            );
        }
    }
    // The setting is the superuser's: others cannot read it.
    let e = a_standby
        .query_one("SHOW vsql_vault.primary_conninfo", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // Back to the primary: reads work again.
    set_conninfo(
        &mut su_standby,
        Some(&format!("host={} port={} user=it_forwarder", s.dir, s.port)),
    );
    assert_eq!(get(&mut a_standby, "sb-down-1").unwrap(), b"v");

    // The primary stops: the same session's next read fails closed with VV503 and returns
    // nothing. Once the primary is back, that session reads again (it reconnects).
    drop(su);
    drop(a);
    s.pg_ctl(&["stop", "-m", "fast"]);
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let e = a_standby
            .query("SELECT * FROM vault_get('it.card', 'sb-down-1')", &[])
            .unwrap_err();
        assert_eq!(sqlstate(&e), "VV503", "{e:?}");
    }));
    s.pg_ctl(&["start", "-l", &format!("{}/server.log", s.dir)]);
    if let Err(panic) = stopped {
        std::panic::resume_unwind(panic);
    }
    s.wait_for_writer(&s.db);
    assert_eq!(get(&mut a_standby, "sb-down-1").unwrap(), b"v");
    // The primary restarts between two reads: the connection the session holds died with the
    // old primary. That is noticed before the record is sent, so the next read already succeeds.
    s.pg_ctl(&[
        "restart",
        "-m",
        "fast",
        "-l",
        &format!("{}/server.log", s.dir),
    ]);
    s.wait_for_writer(&s.db);
    assert_eq!(get(&mut a_standby, "sb-down-1").unwrap(), b"v");
}

/// What a standby's connection may hand the primary: members of vault_forwarder only, records of
/// the four reads only, each field checked; nothing else reaches the log.
#[test]
fn the_primary_accepts_only_read_records_and_only_from_vault_forwarder() {
    let s = server();
    let mut su = setup(&s);
    login_roles(&mut su, &[("it_forwarder", Some("vault_forwarder"))]);
    let record = |operation: &str, external_id: &str| {
        serde_json::json!({
            "logged_at_us": 0, "role_name": "it_a", "session_user": "it_a",
            "application_name": null, "client_addr": "10.0.0.7/32", "backend_pid": 4242,
            "operation": operation, "purpose": "it.card", "external_id": external_id,
            "entry_id": null, "max_retrievals": null, "granted": true, "sqlstate": null,
            "reason": null, "details": null, "on_behalf_of": null
        })
        .to_string()
    };
    let accept = "SELECT vault.accept_forwarded_record($1, $2)";
    // Not a member of vault_forwarder: no EXECUTE.
    let mut a = s.connect("it_a");
    let e = a
        .query_one(accept, &[&"replica_x", &record("get", "sb-acc-1")])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let mut f = s.connect("it_forwarder");
    // A write, a malformed field, a forged chain position, a bad standby name: refused.
    let mut forged = serde_json::from_str::<serde_json::Value>(&record("get", "sb-acc-2")).unwrap();
    forged["seq"] = serde_json::json!(1);
    for (standby, r) in [
        ("replica_x", record("put", "sb-acc-2")),
        ("replica_x", record("get", &"x".repeat(300))),
        ("replica_x", forged.to_string()),
        ("", record("get", "sb-acc-2")),
    ] {
        let e = f.query_one(accept, &[&standby, &r]).unwrap_err();
        assert_eq!(sqlstate(&e), "22023", "{r}: {e}");
    }
    // A valid one is recorded, with its origin.
    let verdict: String = f
        .query_one(accept, &[&"replica_x", &record("head", "sb-acc-3")])
        .unwrap()
        .get(0);
    assert_eq!(verdict, "written");
    assert_eq!(
        forwarded_records(&mut su, "sb-acc-3"),
        vec![(
            "head".to_owned(),
            true,
            "it_a".to_owned(),
            "replica_x".to_owned(),
            "it_forwarder".to_owned()
        )]
    );
    let refused: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE external_id IN ('sb-acc-1', 'sb-acc-2')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(refused, 0);
}
