//! `pg_upgrade` of a cluster with the extension (PostgreSQL 15 to 15, into a fresh data
//! directory; issue 17, item 4): the evidence comes through whole. Entries are readable by their
//! owners, denials still apply, every chain verifies in SQL and with both offline verifiers,
//! checkpoints are signed by the same key (the generated key file is copied by hand: pg_upgrade
//! copies relations, not other files of the data directory), and new writes chain on.

mod common;

use common::cluster::{as_postgres, OwnCluster};
use common::evidence::{both_verifiers_accept_everything, checkpoint_key, write_evidence};
use common::{get, pg_program, server, setup, sqlstate, Server};
use std::process::Command;

fn run_as_postgres_in(dir: &str, program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("runuser")
        .env_remove("RUST_BACKTRACE")
        .current_dir(dir)
        .args(["-u", "postgres", "--", &pg_program(program)])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The tails of pg_upgrade's own logs, which it removes only on success.
fn upgrade_logs(new_data: &str) -> String {
    let mut out = String::new();
    let Ok(runs) = std::fs::read_dir(format!("{new_data}/pg_upgrade_output.d")) else {
        return out;
    };
    for run in runs.flatten() {
        let Ok(logs) = std::fs::read_dir(run.path().join("log")) else {
            continue;
        };
        for log in logs.flatten() {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {}\n", log.path().display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn pg_upgrade_keeps_every_chain_entry_and_key() {
    let shared = server();
    let old = OwnCluster::start(
        &format!("{}/pgu-old", shared.dir),
        shared.port + 24,
        "vault_pgu",
        "",
    );
    let p = &old.server;
    let mut su = setup(p);
    su.batch_execute(
        "CREATE TABLE fo_ledger (id bigserial PRIMARY KEY, note text NOT NULL);
         SELECT vault_protect_table('fo_ledger', 2);",
    )
    .unwrap();
    write_evidence(p, &mut su, "old");
    su.query_one("SELECT vault_purge_sweep()", &[]).unwrap();
    let key_before = checkpoint_key(&mut su);
    drop(su);
    old.stop();

    // A fresh data directory, configured as tests/cluster.sh configures one.
    let new_dir = format!("{}/pgu-new", shared.dir);
    let _ = std::fs::remove_dir_all(&new_dir);
    assert!(Command::new("install")
        .args(["-d", "-o", "postgres", "-m", "755", &new_dir])
        .status()
        .is_ok_and(|s| s.success()));
    let old_data = format!("{}/data", p.dir);
    let new_data = format!("{new_dir}/data");
    assert!(as_postgres(
        "initdb",
        &[
            "-D",
            &new_data,
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8"
        ],
    ));
    let new_port = shared.port + 25;
    let conf = std::fs::read_to_string(format!("{old_data}/vsql_vault.conf"))
        .unwrap()
        .replace(&format!("port = {}", p.port), &format!("port = {new_port}"))
        .replace(&p.dir, &new_dir);
    std::fs::write(format!("{new_data}/vsql_vault.conf"), conf).unwrap();
    let mut main_conf = std::fs::read_to_string(format!("{new_data}/postgresql.conf")).unwrap();
    main_conf.push_str("\ninclude_if_exists = 'vsql_vault.conf'\n");
    std::fs::write(format!("{new_data}/postgresql.conf"), main_conf).unwrap();

    let bin = pg_program("");
    let bin = bin.trim_end_matches('/');
    let (ok, out) = run_as_postgres_in(
        &new_dir,
        "pg_upgrade",
        &[
            "-b",
            bin,
            "-B",
            bin,
            "-d",
            &old_data,
            "-D",
            &new_data,
            "-U",
            "postgres",
            "-p",
            &(shared.port + 26).to_string(),
            "-P",
            &(shared.port + 27).to_string(),
            "--socketdir",
            &new_dir,
        ],
    );
    assert!(ok, "pg_upgrade failed:\n{out}\n{}", upgrade_logs(&new_data));
    // The generated signing key is a file of the data directory, not a relation.
    let key = "vsql_vault_signing.key";
    assert!(Command::new("install")
        .args([
            "-o",
            "postgres",
            "-m",
            "600",
            &format!("{old_data}/{key}"),
            &format!("{new_data}/{key}"),
        ])
        .status()
        .is_ok_and(|s| s.success()));
    let log = format!("{new_dir}/server.log");
    assert!(as_postgres(
        "pg_ctl",
        &["-D", &new_data, "-l", &log, "-w", "-t", "60", "start"],
    ));
    let upgraded = Server {
        dir: new_dir.clone(),
        port: new_port,
        db: p.db.clone(),
    };
    let outcome = std::panic::catch_unwind(|| {
        upgraded.wait_for_writer(&upgraded.db);
        let mut su = upgraded.connect("postgres");
        both_verifiers_accept_everything(&upgraded, &mut su, "pgu-upgraded");
        let mut a = upgraded.connect("it_a");
        assert_eq!(get(&mut a, "old-0").unwrap(), b"old-0");
        let mut b = upgraded.connect("it_b");
        assert_eq!(sqlstate(&get(&mut b, "old-0").unwrap_err()), "42501");
        write_evidence(&upgraded, &mut su, "new");
        assert_eq!(checkpoint_key(&mut su), key_before);
        both_verifiers_accept_everything(&upgraded, &mut su, "pgu-after");
    });
    upgraded.pg_ctl(&["-m", "fast", "stop"]);
    let _ = std::fs::remove_dir_all(&new_dir);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
