//! Upgrades in place: a database on 0.1.0 (the release users have, commit 8ce1768), filled with
//! evidence, then `ALTER EXTENSION vsql_vault UPDATE`. Old and new evidence must verify in the
//! database and offline, the guarantees of the new version must hold for tables protected under
//! the old one, and the upgraded catalog must equal a fresh install of the new version.
//!
//! Runs on a cluster of its own (the extension serves one database per cluster).

mod common;

use common::*;
use postgres::Client;
use std::process::Command;

const OLD: &str = "0.1.0";
/// The version this tree builds (the root Cargo.toml).
const NEW: &str = "0.2.0";

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Installs the frozen 0.1.0 install script next to the current version's files.
fn install_old_script() {
    let out = Command::new(common::pg_program("pg_config"))
        .arg("--sharedir")
        .output()
        .unwrap();
    let share = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let name = format!("vsql_vault--{OLD}.sql");
    std::fs::copy(
        repo().join("tests/upgrade").join(&name),
        format!("{share}/extension/{name}"),
    )
    .expect("copy the 0.1.0 install script (run as root, as tests/run.sh does)");
}

/// A private cluster for this test: (server, stop guard).
struct Cluster(Server);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("tests/cluster.sh"))
            .args(["stop", &self.0.dir])
            .status();
    }
}

fn cluster() -> Cluster {
    let base = server();
    let dir = format!("{}/upgrade_cluster", base.dir);
    let port = base.port + 7;
    let db = "vault_upgrade";
    let status = Command::new("bash")
        .arg(repo().join("tests/cluster.sh"))
        .args(["start", &dir, &port.to_string(), db])
        .status()
        .unwrap();
    assert!(status.success());
    Cluster(Server {
        dir,
        port,
        db: db.to_owned(),
    })
}

/// Everything about the vault's objects that an upgrade script must get right, one line each.
fn catalog(c: &mut Client) -> Vec<String> {
    c.query(
        "WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'vsql_vault'),
         members AS (SELECT d.classid, d.objid FROM pg_depend d, ext
                      WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e')
         SELECT 'function ' || p.oid::regprocedure || ' returns ' || pg_get_function_result(p.oid)
                || ' secdef=' || p.prosecdef || ' volatile=' || p.provolatile::text || ' strict=' || p.proisstrict
                || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
                || ' acl=' || coalesce(p.proacl::text, '') || ' owner=' || p.proowner::regrole
                || ' src=' || md5(CASE WHEN p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'c')
                                       THEN p.prosrc ELSE p.prosrc END)
           FROM pg_proc p JOIN members m ON m.classid = 'pg_proc'::regclass AND m.objid = p.oid
         UNION ALL
         SELECT 'relation ' || c.oid::regclass || ' kind=' || c.relkind::text || ' acl=' || coalesce(c.relacl::text, '')
                || ' owner=' || c.relowner::regrole
           FROM pg_class c JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = c.oid
         UNION ALL
         SELECT 'column ' || a.attrelid::regclass || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                || ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
           FROM pg_attribute a JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         SELECT 'index ' || pg_get_indexdef(i.indexrelid)
           FROM pg_index i JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = i.indrelid
         UNION ALL
         SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(co.oid)
           FROM pg_constraint co JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = co.conrelid
         UNION ALL
         SELECT 'trigger ' || pg_get_triggerdef(t.oid) || ' enabled=' || t.tgenabled::text
           FROM pg_trigger t JOIN members m ON m.classid = 'pg_class'::regclass AND m.objid = t.tgrelid
          WHERE NOT t.tgisinternal
         UNION ALL
         SELECT 'event trigger ' || e.evtname || ' ' || e.evtevent || ' ' || e.evtfoid::regproc
                || ' tags=' || coalesce(array_to_string(e.evttags, ','), '') || ' enabled=' || e.evtenabled::text
           FROM pg_event_trigger e JOIN members m ON m.classid = 'pg_event_trigger'::regclass AND m.objid = e.oid
         UNION ALL
         SELECT 'config ' || cfg::regclass || ' ' || coalesce(cond, '')
           FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(cfg, cond)
          WHERE e.extname = 'vsql_vault'
         ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn installed_version(c: &mut Client) -> String {
    c.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'vsql_vault'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn an_old_install_filled_with_evidence_upgrades_in_place_and_everything_verifies() {
    install_old_script();
    let cl = cluster();
    let s = &cl.0;
    // No writer serves the database before CREATE EXTENSION (one per database with the extension,
    // started by the launcher on the first call): nothing to wait for here.
    let mut su = s.connect("postgres");
    su.batch_execute(&format!(
        "SET vsql_vault.break_glass = on;
         DROP EXTENSION IF EXISTS vsql_vault CASCADE;
         RESET vsql_vault.break_glass;
         DROP TABLE IF EXISTS team_ledger;
         CREATE EXTENSION vsql_vault VERSION '{OLD}';
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'up_app') THEN
             CREATE ROLE up_app LOGIN IN ROLE vault_app;
             CREATE ROLE up_admin LOGIN IN ROLE vault_admin;
           END IF;
         END $$;"
    ))
    .unwrap();
    // The launcher starts a database's audit writer once the extension exists there.
    s.wait_for_writer(&s.db);
    let version = installed_version(&mut su);
    assert_eq!(version, OLD);
    // Evidence of every kind under 0.1.0: access records, a protected team table, checkpoints and
    // a purge proof.
    let mut admin = s.connect("up_admin");
    admin
        .execute("SELECT vault_set_retention_policy('up.card', 30, 7)", &[])
        .unwrap();
    let mut app = s.connect("up_app");
    for i in 0..5 {
        app.execute(
            "SELECT vault_put('up.card', $1, '\\x0102')",
            &[&format!("old-{i}")],
        )
        .unwrap();
        app.query(
            "SELECT * FROM vault_get('up.card', $1)",
            &[&format!("old-{i}")],
        )
        .unwrap();
    }
    app.query_one("SELECT vault_delete('up.card', 'old-0')", &[])
        .unwrap();
    // The library is already the new one, the log not yet: a stated identity has no column to go
    // to, and the call still works and is recorded.
    app.batch_execute("SET vsql_vault.on_behalf_of = 'user:before-update'")
        .unwrap();
    app.query("SELECT * FROM vault_get('up.card', 'old-2')", &[])
        .unwrap();
    app.batch_execute("RESET vsql_vault.on_behalf_of").unwrap();
    // So does 0.1.0's vault_set_access_policy (without require_identity, which it cannot set).
    admin
        .batch_execute(
            "SELECT vault_set_access_policy('up-custom', '{vault_app}', '{@owner}', '{@owner}', 3)",
        )
        .unwrap();
    // 0.1.0's vault_list(purpose) keeps working on the new library (its first page).
    let listed: i64 = app
        .query_one("SELECT count(*) FROM vault_list('up.card')", &[])
        .unwrap()
        .get(0);
    assert_eq!(listed, 4);
    su.batch_execute(
        "CREATE TABLE team_ledger (id int, what text);
         INSERT INTO team_ledger VALUES (1, 'before protection');
         SELECT vault_protect_table('team_ledger', 2);
         INSERT INTO team_ledger VALUES (2, 'old'), (3, 'old');
         SELECT vault_checkpoint();",
    )
    .unwrap();
    // Replication exclusions as 0.1.0 stored them (by name; the new library's vault_sync_exclude
    // needs the new schema): one whose column still has its name, one renamed since.
    su.batch_execute(
        "DROP TABLE IF EXISTS up_cards;
         CREATE TABLE up_cards (id int, pan text, cvv text);
         INSERT INTO vault.sync_exclusions (relid, column_name, table_name, excluded_by)
         VALUES ('up_cards'::regclass, 'pan', 'up_cards', 'up_admin'),
                ('up_cards'::regclass, 'cvv', 'up_cards', 'up_admin');
         ALTER TABLE up_cards RENAME COLUMN cvv TO code;",
    )
    .unwrap();
    let old_proof: i64 = su
        .query_one("SELECT max(id) FROM vault.purge_log", &[])
        .unwrap()
        .get(0);
    assert_chains_verify(&mut su, None);

    // The upgrade: a superuser runs it without break-glass, and it is recorded in the chained log
    // in its own transaction (a rolled-back update leaves no record and no change).
    su.batch_execute("BEGIN; ALTER EXTENSION vsql_vault UPDATE; ROLLBACK;")
        .unwrap();
    assert_eq!(installed_version(&mut su), OLD);
    su.batch_execute("ALTER EXTENSION vsql_vault UPDATE")
        .unwrap();
    let version = installed_version(&mut su);
    assert_eq!(version, NEW);
    let recorded: Vec<(String, bool, String)> = su
        .query(
            "SELECT role_name::text, granted, details->>'version' FROM vault.access_log
              WHERE operation = 'extension_update' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        recorded,
        vec![("postgres".to_string(), true, NEW.to_string())]
    );

    // The old exclusions are bound to their columns by name, or listed as unbound.
    let report: String = su
        .query_one("SELECT vault_scope_report()::text", &[])
        .unwrap()
        .get(0);
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let cards = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.up_cards")
        .unwrap()
        .clone();
    assert_eq!(
        cards["published"],
        serde_json::json!(["id", "code"]),
        "{cards}"
    );
    assert_eq!(cards["excluded"][0]["column"], "cvv", "{cards}");
    assert_eq!(cards["excluded"][0]["unbound"], true, "{cards}");
    assert_eq!(cards["excluded"][1]["column"], "pan", "{cards}");
    assert!(cards["excluded"][1].get("unbound").is_none(), "{cards}");

    // Old evidence verifies, and new evidence joins it.
    assert_chains_verify(&mut su, None);
    assert!(su
        .query_one("SELECT vault_verify_purge_proof($1)", &[&old_proof])
        .unwrap()
        .get::<_, bool>(0));
    // New rows carry the identity in the new column (NULL, and so outside the hash, in old ones).
    app.batch_execute(
        "BEGIN; SET LOCAL vsql_vault.on_behalf_of = 'user:after-update';
         SELECT vault_put('up.card', 'new-1', '\\x03'); COMMIT;",
    )
    .unwrap();
    let stated: Vec<Option<String>> = su
        .query(
            "SELECT on_behalf_of FROM vault.access_log WHERE external_id IN ('old-2', 'new-1')
              AND operation IN ('get', 'put') ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stated,
        vec![None, None, None, Some("user:after-update".into())]
    );
    let kept: (Option<i32>, bool) = su
        .query_one(
            "SELECT max_retrievals, require_identity FROM vault.access_policies WHERE name = 'up-custom'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(kept, (Some(3), false));
    app.query_one("SELECT vault_delete('up.card', 'old-1')", &[])
        .unwrap();
    // Key governance (issue 18) works on the upgraded install: a directive (chained, verified
    // below with every chain), its refusal, its queue over the entries stored under 0.1.0.
    let mut admin = s.connect("up_admin");
    let directive: i64 = admin
        .query_one(
            "SELECT vault_key_directive('deny-algorithm', 'UP-ALG')",
            &[],
        )
        .unwrap()
        .get(0);
    let e = app
        .execute(
            "SELECT vault_put('up.card', 'new-2', '\\x04', 'up-alg')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV426", "{e}");
    let queued: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.reencryption_queue WHERE directive_id = $1",
            &[&directive],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        queued, 0,
        "no entry of the old install is under that algorithm"
    );
    su.batch_execute(
        "INSERT INTO team_ledger VALUES (4, 'new'), (5, 'new'); SELECT vault_checkpoint();",
    )
    .unwrap();
    assert_chains_verify(&mut su, None);
    let new_proof: i64 = su
        .query_one("SELECT max(id) FROM vault.purge_log", &[])
        .unwrap()
        .get(0);
    assert!(new_proof > old_proof);
    assert!(su
        .query_one("SELECT vault_verify_purge_proof($1)", &[&new_proof])
        .unwrap()
        .get::<_, bool>(0));
    for (table, tag) in [("team_ledger", "up_team"), ("vault.access_log", "up_log")] {
        let (code, out) = offline_verdict(s, &mut su, table, tag);
        assert_eq!(code, 0, "{table}: {out}");
    }
    let rows: i64 = su
        .query_one(
            "SELECT sum(rows_checked)::bigint FROM vault_verify_audit('team_ledger')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(rows, 5);

    // A table protected under 0.1.0 is guarded by OID now: no keyword renames it away.
    let e = su
        .batch_execute("ALTER INDEX team_ledger RENAME TO team_ledger_away")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV403", "{e}");

    // The upgraded catalog is the catalog of a fresh install of this version.
    let upgraded = catalog(&mut su);
    su.batch_execute("DROP DATABASE IF EXISTS vault_fresh")
        .unwrap();
    su.batch_execute("CREATE DATABASE vault_fresh").unwrap();
    let mut fresh = s.connect_to("vault_fresh", "postgres", "upgrade test");
    fresh.batch_execute("CREATE EXTENSION vsql_vault").unwrap();
    let installed = catalog(&mut fresh);
    drop(fresh);
    let only_upgraded: Vec<&String> = upgraded.iter().filter(|l| !installed.contains(l)).collect();
    let only_fresh: Vec<&String> = installed.iter().filter(|l| !upgraded.contains(l)).collect();
    assert!(
        only_upgraded.is_empty() && only_fresh.is_empty(),
        "the upgrade script and the install script disagree:\nonly after the upgrade: {only_upgraded:#?}\nonly in a fresh install: {only_fresh:#?}"
    );
}
