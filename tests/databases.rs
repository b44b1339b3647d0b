//! Every database of the cluster (issue 17, item 3): each database where `CREATE EXTENSION
//! vsql_vault` ran has its own audit writer, retention worker, chains and checkpoints, and no
//! record crosses over; DROP EXTENSION and DROP DATABASE stop that database's workers cleanly;
//! `vsql_vault.max_databases` caps how many databases are served.

mod common;

use common::cluster::OwnCluster;
use common::{assert_chains_verify, poll, server, setup, sqlstate, Server};
use postgres::Client;

fn workers_in(su: &mut Client, db: &str) -> Vec<String> {
    su.query(
        "SELECT backend_type FROM pg_stat_activity
          WHERE backend_type IN ('vsql_vault audit writer', 'vsql_vault retention worker')
            AND datname = $1 ORDER BY 1",
        &[&db],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn fresh_database(s: &Server, su: &mut Client, db: &str) -> Client {
    su.batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .unwrap();
    su.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut c = s.connect_to(db, "postgres", "databases test");
    c.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    let mut admin = s.connect_to(db, "it_admin", "databases test");
    admin
        .execute("SELECT vault_set_retention_policy('it.card', 30, 7)", &[])
        .unwrap();
    c
}

fn put_and_get(s: &Server, db: &str, value: &[u8]) -> Vec<u8> {
    let mut a = s.connect_to(db, "it_a", "databases test");
    a.execute("SELECT vault_put('it.card', 'db-shared-id', $1)", &[&value])
        .unwrap();
    a.query_one(
        "SELECT encrypted_value FROM vault_get('it.card', 'db-shared-id')",
        &[],
    )
    .unwrap()
    .get(0)
}

fn log_lines(c: &mut Client, id: &str) -> Vec<String> {
    c.query(
        "SELECT operation || ' ' || application_name FROM vault.access_log
          WHERE external_id = $1 ORDER BY id",
        &[&id],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Appends of the server log after `from` (bytes) that say a worker could not connect.
fn connection_failures_since(s: &Server, from: usize) -> Vec<String> {
    let log = std::fs::read(format!("{}/server.log", s.dir)).unwrap_or_default();
    String::from_utf8_lossy(&log[from.min(log.len())..])
        .lines()
        .filter(|l| l.contains("FATAL") && l.contains("does not exist"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn each_database_has_its_own_workers_and_log_and_drops_stop_them_cleanly() {
    let s = server();
    let mut su = setup(&s);
    let mut one = fresh_database(&s, &mut su, "vault_db_one");
    let mut two = fresh_database(&s, &mut su, "vault_db_two");
    assert_eq!(put_and_get(&s, "vault_db_one", b"one"), b"one");
    assert_eq!(put_and_get(&s, "vault_db_two", b"two"), b"two");
    for db in ["vault_db_one", "vault_db_two"] {
        poll(&format!("both workers of {db}"), 100, || {
            workers_in(&mut su, db).len() == 2
        });
    }
    // Each database's log holds its own records, and only those: one put and one get each.
    for c in [&mut one, &mut two] {
        assert_eq!(
            log_lines(c, "db-shared-id"),
            vec!["put databases test", "get databases test"]
        );
        c.query_one("SELECT vault_checkpoint()", &[]).unwrap();
        assert_chains_verify(c, None);
    }
    let in_shared_db: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE external_id = 'db-shared-id'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        in_shared_db, 0,
        "nothing crossed into the test database's log"
    );

    // DROP EXTENSION: that database's workers leave and are not started again.
    two.batch_execute("DROP EXTENSION vsql_vault CASCADE")
        .unwrap();
    poll("the workers of vault_db_two to leave", 100, || {
        workers_in(&mut su, "vault_db_two").is_empty()
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(workers_in(&mut su, "vault_db_two").is_empty());
    // CREATE EXTENSION again: the first call is served.
    two.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    drop(two);
    let mut admin = s.connect_to("vault_db_two", "it_admin", "databases test");
    admin
        .execute("SELECT vault_set_retention_policy('it.card', 30, 7)", &[])
        .unwrap();
    assert_eq!(put_and_get(&s, "vault_db_two", b"again"), b"again");
    drop(admin);

    // DROP DATABASE while its workers run: allowed, and nothing tries to reconnect to it.
    drop(one);
    let log_from = std::fs::metadata(format!("{}/server.log", s.dir))
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    su.batch_execute("DROP DATABASE vault_db_one").unwrap();
    su.batch_execute("DROP DATABASE vault_db_two").unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(workers_in(&mut su, "vault_db_one").is_empty());
    assert_eq!(
        connection_failures_since(&s, log_from),
        Vec::<String>::new()
    );
    // The test database is still served.
    let mut a = s.connect("it_a");
    common::put(&mut a, "db-still-served", b"x").unwrap();
}

#[test]
fn max_databases_caps_the_databases_served() {
    let shared = server();
    let own = OwnCluster::start(
        &format!("{}/db-cap", shared.dir),
        shared.port + 23,
        "vault_cap_one",
        "vsql_vault.max_databases = 1",
    );
    let s = &own.server;
    let mut su = setup(s);
    let mut a = s.connect("it_a");
    common::put(&mut a, "cap-1", b"1").unwrap();
    su.batch_execute("CREATE DATABASE vault_cap_two").unwrap();
    let mut two = s.connect_to("vault_cap_two", "postgres", "cap");
    two.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    let e = two
        .execute("SELECT vault_set_retention_policy('it.card', 30, 7)", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "53400", "{e:?}");
    let message = e.as_db_error().map(|d| d.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("max_databases")),
        "{message:?}"
    );
    // Once the first database no longer needs its workers, the second is served.
    drop(a);
    su.batch_execute("DROP EXTENSION vsql_vault CASCADE")
        .unwrap();
    poll("the second database to be served", 100, || {
        two.execute("SELECT vault_set_retention_policy('it.card', 30, 7)", &[])
            .is_ok()
    });
}

/// The key file is the cluster's, each database's key registry its own: after a rotation in one
/// database, another database registers the new key with a rotation statement signed by the old
/// one (kept beside the key file as `vsql_vault_signing.key.previous`), so it trusts it.
#[test]
fn a_rotation_in_one_database_is_vouched_for_in_the_others() {
    let s = server();
    let mut su = setup(&s);
    let mut other = fresh_database(&s, &mut su, "vault_db_rot");
    other.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    let old: String = other
        .query_one(
            "SELECT key_id FROM vault.audit_checkpoints ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let new: String = su
        .query_one("SELECT vault_rotate_signing_key()", &[])
        .unwrap()
        .get(0);
    assert_ne!(new, old);
    other.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    let row = other
        .query_one(
            "SELECT previous_key_id FROM vault.signing_keys WHERE key_id = $1",
            &[&new],
        )
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some(old.as_str()),
        "the old key vouches for the new one in the other database too"
    );
    assert_chains_verify(&mut other, None);
    drop(other);
    su.batch_execute("DROP DATABASE vault_db_rot WITH (FORCE)")
        .unwrap();
}
