//! Failover keeps the evidence (issue 17, item 2): a streaming standby made by
//! `pg_basebackup -R` is promoted after its primary stops, and on the new primary the audit writer
//! and the retention worker run, every chain continues without a fork or a gap, both verifiers
//! accept the whole history across the promotion, checkpoints are signed by the same key, and the
//! retention schedule goes on.
//!
//! The test runs its own primary (the shared test cluster's evidence is tampered with on purpose
//! by other tests, and this one stops its primary).

mod common;

use common::cluster::{OwnCluster, Standby};
use common::evidence::{both_verifiers_accept_everything, checkpoint_key, write_evidence};
use common::{poll, server, setup};
use postgres::Client;

fn workers(su: &mut Client) -> Vec<String> {
    su.query(
        "SELECT backend_type || ' ' || coalesce(datname, '-') FROM pg_stat_activity
          WHERE backend_type LIKE 'vsql_vault%' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn a_promoted_standby_continues_every_chain_with_the_same_key_and_schedule() {
    let shared = server();
    let primary = OwnCluster::start(
        &format!("{}/fo-primary", shared.dir),
        shared.port + 21,
        "vault_fo",
        "",
    );
    let p = &primary.server;
    let mut su = setup(p);
    su.batch_execute(
        "CREATE TABLE fo_ledger (id bigserial PRIMARY KEY, note text NOT NULL);
         SELECT vault_protect_table('fo_ledger', 2);",
    )
    .unwrap();
    write_evidence(p, &mut su, "before");
    assert_eq!(
        su.query_one("SELECT vault_purge_sweep()", &[])
            .unwrap()
            .get::<_, i64>(0),
        3
    );
    let key_before = checkpoint_key(&mut su);
    let runs_before: i64 = su
        .query_one("SELECT max(id) FROM vault.sweep_runs", &[])
        .unwrap()
        .get(0);

    let standby = Standby::start(
        p,
        &format!("{}/fo-standby", shared.dir),
        shared.port + 22,
        "",
    );
    standby.catch_up(&mut su, &p.db);
    drop(su);
    primary.stop();
    let promoted = standby.promote(&p.db);

    promoted.wait_for_writer(&p.db);
    let mut su = promoted.connect("postgres");
    poll("the retention worker on the new primary", 300, || {
        workers(&mut su)
            .iter()
            .any(|w| w.starts_with("vsql_vault retention worker"))
    });
    // The history written before the promotion verifies there, in SQL and offline.
    both_verifiers_accept_everything(&promoted, &mut su, "fo-promoted");

    write_evidence(&promoted, &mut su, "after");
    // The same key signs: it travelled with the base backup (see README, "High availability").
    assert_eq!(checkpoint_key(&mut su), key_before);
    let keys: i64 = su
        .query_one("SELECT count(*) FROM vault.signing_keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 1, "no key was generated on the new primary");
    // The schedule goes on: the worker sweeps what expired, and its run follows the old ones.
    su.batch_execute("ALTER SYSTEM SET vsql_vault.sweep_interval = '1'")
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    poll("the scheduled sweep on the new primary", 300, || {
        su.query_one(
            "SELECT count(*) FROM vault.entries WHERE external_id LIKE 'after-expired-%' AND purged_at IS NULL",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 0
    });
    let scheduled: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.sweep_runs WHERE id > $1 AND started_by = 'schedule'
                AND entries_purged > 0 AND errors IS NULL",
            &[&runs_before],
        )
        .unwrap()
        .get(0);
    assert!(scheduled >= 1, "a scheduled sweep ran on the new primary");
    // Old and new evidence together: one history, no fork and no gap.
    let seqs: Vec<(i64, i64, i64)> = su
        .query(
            "SELECT chain_id::bigint, count(*), max(chain_seq) - min(chain_seq) + 1
               FROM vault.access_log GROUP BY chain_id ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(
        seqs.iter().all(|(_, n, span)| n == span),
        "gapless chains: {seqs:?}"
    );
    both_verifiers_accept_everything(&promoted, &mut su, "fo-after");
    drop(su);
    drop(standby);
}
