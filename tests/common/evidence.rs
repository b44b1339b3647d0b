//! Evidence of every kind written into a server, and the check that all of it verifies in SQL
//! and with both offline verifiers: for tests that move a whole cluster (failover, pg_upgrade).
//! The protected table `fo_ledger` must exist.

use super::{assert_chains_verify, offline_verdict, put, sqlstate, Server};
use postgres::Client;

/// Evidence of every kind: granted and denied accesses, a protected table's rows, purge proofs of
/// a sweep, and a signed checkpoint.
pub fn write_evidence(s: &Server, su: &mut Client, tag: &str) {
    let mut a = s.connect("it_a");
    let mut b = s.connect("it_b");
    for i in 0..5 {
        let id = format!("{tag}-{i}");
        put(&mut a, &id, id.as_bytes()).unwrap();
        super::get(&mut a, &id).unwrap();
        let denied = super::get(&mut b, &id).unwrap_err();
        assert_eq!(sqlstate(&denied), "42501", "{denied:?}");
    }
    su.batch_execute(&format!(
        "INSERT INTO fo_ledger (note) SELECT '{tag} ' || g FROM generate_series(1, 20) g;
         INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner,
                                    created_at, updated_at, expires_at)
         SELECT 'it.card', '{tag}-expired-' || g, '\\xdeadbeef', 'owner-only', 'it_a',
                now() - interval '2 days', now() - interval '2 days', now() - interval '1 second'
           FROM generate_series(1, 3) g;"
    ))
    .unwrap();
}

pub fn checkpoint_key(su: &mut Client) -> String {
    su.query_one("SELECT vault_checkpoint()", &[]).unwrap();
    su.query_one(
        "SELECT key_id FROM vault.audit_checkpoints ORDER BY id DESC LIMIT 1",
        &[],
    )
    .unwrap()
    .get(0)
}

pub fn both_verifiers_accept_everything(s: &Server, su: &mut Client, tag: &str) {
    assert_chains_verify(su, None);
    for table in ["vault.access_log", "fo_ledger", "vault.purge_log"] {
        let (code, out) = offline_verdict(s, su, table, &format!("{tag}-{table}"));
        assert_eq!(code, 0, "{table}: {out}");
    }
    let proofs = format!("{}/{tag}.proofs.jsonl", s.dir);
    let lines: Vec<String> = su
        .query("SELECT vault_export_purge_proofs()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!lines.is_empty(), "the sweep left proofs");
    std::fs::write(&proofs, lines.join("\n") + "\n").unwrap();
    let mut args = vec!["verify-purge".to_string(), "--proofs".into(), proofs];
    for k in super::public_keys(su) {
        args.push("--public-key".into());
        args.push(k);
    }
    let (code, out) = super::offline_tools(&args);
    assert_eq!(code, 0, "{out}");
}
