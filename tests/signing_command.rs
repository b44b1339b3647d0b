//! `vsql_vault.signing_command` (issue 17, item 2): the private evidence key need not sit on the
//! database host. Here the command is `vsql-vault sign-evidence` with a key file outside PGDATA,
//! standing in for a KMS or a signing host reached over ssh. Checkpoints, purge proofs and the
//! compliance report are signed through it, the command's key is vouched for by the key before it,
//! both verifiers accept everything, SQL rotation is refused, and a failing command fails closed
//! with 38000.

mod common;

use common::cluster::OwnCluster;
use common::evidence::{both_verifiers_accept_everything, checkpoint_key, write_evidence};
use common::*;
use postgres::Client;
use std::process::Command;

fn set_signing_command(s: &Server, su: &mut Client, command: Option<&str>) {
    match command {
        Some(c) => su.batch_execute(&format!(
            "ALTER SYSTEM SET vsql_vault.signing_command = '{}'",
            c.replace('\'', "''")
        )),
        None => su.batch_execute("ALTER SYSTEM RESET vsql_vault.signing_command"),
    }
    .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    // A reload reaches each backend at its next command; a new session sees it once the
    // postmaster has re-read the file.
    let want = command.unwrap_or("").to_owned();
    for _ in 0..100 {
        let mut c = s.connect("postgres");
        let now: String = c
            .query_one("SELECT current_setting('vsql_vault.signing_command')", &[])
            .unwrap()
            .get(0);
        if now == want {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("vsql_vault.signing_command never became {want:?}");
}

/// A fresh Ed25519 key file, owner-only and owned by the server's user, outside PGDATA.
fn key_file_outside_pgdata(s: &Server) -> String {
    let dir = format!("{}/signer", s.dir);
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("install")
        .args(["-d", "-o", "postgres", "-m", "700", &dir])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut seed = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut seed)
        .unwrap();
    let tmp = format!("{}/signer.seed", s.dir);
    std::fs::write(&tmp, format!("{}\n", hex::encode(seed))).unwrap();
    let path = format!("{dir}/evidence.key");
    let ok = Command::new("install")
        .args(["-o", "postgres", "-m", "600", &tmp, &path])
        .status()
        .unwrap();
    assert!(ok.success());
    std::fs::remove_file(&tmp).unwrap();
    path
}

fn public_key_of(command: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", command])
        .env("VSQL_VAULT_OP", "public-key")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn a_signing_command_signs_all_evidence_with_a_key_kept_off_the_server() {
    // A cluster of its own: the setting is cluster-wide, and every chain of it must verify.
    let shared = server();
    let own = OwnCluster::start(
        &format!("{}/signing-command", shared.dir),
        shared.port + 28,
        "vault_signcmd",
        "",
    );
    let s = &own.server;
    let mut su = setup(s);
    su.batch_execute(
        "DO $$ BEGIN
           IF to_regclass('fo_ledger') IS NULL THEN
             CREATE TABLE fo_ledger (id bigserial PRIMARY KEY, note text NOT NULL);
             PERFORM vault_protect_table('fo_ledger', 2);
           END IF;
         END $$;",
    )
    .unwrap();
    let before = checkpoint_key(&mut su);
    write_evidence(s, &mut su, "filekey");
    su.query_one("SELECT vault_purge_sweep()", &[]).unwrap();
    let cli = std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI (run through tests/run.sh)");
    let command = format!("{cli} sign-evidence --key {}", key_file_outside_pgdata(s));
    let public = public_key_of(&command);

    set_signing_command(s, &mut su, Some(&command));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut su = s.connect("postgres");
        let key_id = checkpoint_key(&mut su);
        assert_ne!(
            key_id, before,
            "checkpoints are signed by the command's key"
        );
        let row = su
            .query_one(
                "SELECT key_id, source, previous_key_id FROM vault.signing_keys
                  WHERE public_key = $1",
                &[&public],
            )
            .unwrap();
        assert_eq!(row.get::<_, String>("key_id"), key_id);
        assert_eq!(row.get::<_, String>("source"), "signing_command");
        assert_eq!(
            row.get::<_, Option<String>>("previous_key_id").as_deref(),
            Some(before.as_str()),
            "the key before vouches for the command's key"
        );
        // Purge proofs and a checkpoint made through the command, then every verifier.
        write_evidence(s, &mut su, "signcmd");
        su.query_one("SELECT vault_purge_sweep()", &[]).unwrap();
        assert_eq!(checkpoint_key(&mut su), key_id);
        both_verifiers_accept_everything(s, &mut su, "signcmd");
        let signed_by: String = su
            .query_one("SELECT vault_compliance_report() ->> 'signing_key_id'", &[])
            .unwrap()
            .get(0);
        assert_eq!(
            signed_by, key_id,
            "the compliance report is signed by it too"
        );
        let e = su
            .query_one("SELECT vault_rotate_signing_key()", &[])
            .unwrap_err();
        assert_eq!(sqlstate(&e), "55000", "{e:?}");
    }));
    // A signer that fails: nothing is signed, with 38000 (external_routine_exception).
    let failing = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        set_signing_command(s, &mut su, Some("exit 3"));
        let mut su = s.connect("postgres");
        let e = su.query_one("SELECT vault_checkpoint()", &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "38000", "{e:?}");
    }));
    set_signing_command(s, &mut su, None);
    if let Err(panic) = outcome.and(failing) {
        std::panic::resume_unwind(panic);
    }
    assert_eq!(checkpoint_key(&mut su), before, "back to the key file");
}
