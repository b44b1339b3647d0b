//! Calls that no access record could be made for are refused before they read anything: in a
//! database the vault does not serve (issue 15, item 9). On a hot standby, see tests/standby.rs.

mod common;

use common::{log_count, server, setup, sqlstate};

/// `vsql_vault.database` set: the vault serves that database only.
fn restrict_to(su: &mut postgres::Client, db: Option<&str>) {
    match db {
        Some(db) => su.batch_execute(&format!("ALTER SYSTEM SET vsql_vault.database = '{db}'")),
        None => su.batch_execute("ALTER SYSTEM RESET vsql_vault.database"),
    }
    .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn every_call_in_a_database_the_vault_does_not_serve_is_refused_before_it_reads() {
    let s = server();
    let mut su = setup(&s);
    restrict_to(&mut su, Some(&s.db));
    let outcome = std::panic::catch_unwind(|| refused_outside_the_served_database(&s));
    restrict_to(&mut su, None);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn refused_outside_the_served_database(s: &common::Server) {
    let mut su = s.connect("postgres");
    su.batch_execute("DROP DATABASE IF EXISTS vault_unserved")
        .unwrap();
    su.batch_execute("CREATE DATABASE vault_unserved").unwrap();
    let mut other_su = s.connect_to("vault_unserved", "postgres", "unserved");
    // An entry a superuser wrote into that database's tables directly, owned by it_a.
    other_su
        .batch_execute(
            "CREATE EXTENSION vsql_vault;
             INSERT INTO vault.retention_policies (purpose, max_retention_days, default_ttl_days,
                                                   purge_method, updated_by)
             VALUES ('it.card', 30, 7, 'physical-delete', 'postgres');
             INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner,
                                        created_at, updated_at, expires_at)
             VALUES ('it.card', 'unserved-1', '\\x01', 'owner-only', 'it_a', now(), now(),
                     now() + interval '1 day');",
        )
        .unwrap();
    let mut a = s.connect_to("vault_unserved", "it_a", "unserved");
    // Before: the entry came back to its owner, an unknown id answered P0002 and a purpose
    // without policy VV428, each revealing something about a database nobody audits.
    for sql in [
        "SELECT * FROM vault_get('it.card', 'unserved-1')",
        "SELECT * FROM vault_get('it.card', 'unserved-none')",
        "SELECT * FROM vault_head('it.card', 'unserved-1')",
        "SELECT * FROM vault_list('it.card')",
        "SELECT vault_put('it.nopolicy', 'unserved-2', '\\x02')",
        "SELECT vault_put('it.card', 'unserved-1', '\\x03')",
        "SELECT vault_delete('it.card', 'unserved-1')",
    ] {
        let e = a.batch_execute(sql).unwrap_err();
        assert_eq!(sqlstate(&e), "55000", "{sql}: {e:?}");
        let message = e.as_db_error().map(|d| d.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("vsql_vault.database")),
            "{sql}: {message:?}"
        );
    }
    let value: Vec<u8> = other_su
        .query_one(
            "SELECT encrypted_value FROM vault.entries WHERE external_id = 'unserved-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(value, vec![1u8], "nothing was changed");
    // Nothing from that database reached the served database's log.
    for id in ["unserved-1", "unserved-none"] {
        for granted in [true, false] {
            assert_eq!(log_count(&mut su, "get", id, granted), 0);
        }
    }
    drop(a);
    drop(other_su);
    su.batch_execute("DROP DATABASE vault_unserved").unwrap();
}

/// The transaction that runs CREATE EXTENSION holds the new access log until it commits, so no
/// call made inside it can be recorded: it is refused at once with 55P03 and a message saying to
/// commit first (it waited for vsql_vault.audit_timeout and failed with VV503), and after COMMIT
/// the vault works.
#[test]
fn calls_in_the_create_extension_transaction_are_refused_at_once_and_work_after_commit() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute("DROP DATABASE IF EXISTS vault_fresh")
        .unwrap();
    su.batch_execute("CREATE DATABASE vault_fresh").unwrap();
    let outcome = std::panic::catch_unwind(|| {
        let mut fresh = s.connect_to("vault_fresh", "postgres", "fresh");
        let mut tx = fresh.transaction().unwrap();
        tx.batch_execute("CREATE EXTENSION vsql_vault; SET LOCAL vsql_vault.audit_timeout = '20s'")
            .unwrap();
        // 55P03, not VV503: refused before waiting for the writer (the wait ends in VV503).
        let e = tx
            .batch_execute("SELECT vault_set_retention_policy('it.fresh', 30, 7)")
            .unwrap_err();
        assert_eq!(sqlstate(&e), "55P03", "{e:?}");
        let message = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("after COMMIT"), "{message}");
        drop(tx);
        fresh.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
        fresh
            .batch_execute(
                "SELECT vault_set_retention_policy('it.fresh', 30, 7);
                 SELECT vault_put('it.fresh', 'fresh-1', '\\x0a0b');",
            )
            .unwrap();
        let got: Vec<u8> = fresh
            .query_one(
                "SELECT encrypted_value FROM vault_get('it.fresh', 'fresh-1')",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(got, vec![0x0a, 0x0b]);
        let recorded: i64 = fresh
            .query_one(
                "SELECT count(*) FROM vault.access_log WHERE purpose = 'it.fresh' AND granted",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(recorded, 3, "policy, put and get recorded");
    });
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    su.batch_execute("DROP DATABASE vault_fresh").unwrap();
}
