//! Shared by the integration test files: the running server and the roles the tests use.
#![allow(dead_code)]

pub mod cluster;
pub mod evidence;

use postgres::{Client, Config, NoTls};
use std::process::Command;
use std::thread;
use std::time::Duration;

pub struct Server {
    pub dir: String,
    pub port: u16,
    pub db: String,
}

/// The path of a PostgreSQL program: `$PGBIN/program` (default the system PostgreSQL 15), so a
/// run can use a private copy of PostgreSQL with its own installed extension.
pub fn pg_program(program: &str) -> String {
    let bin = std::env::var("PGBIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned());
    format!("{bin}/{program}")
}

pub fn server() -> Server {
    let dir = std::env::var("VSQL_VAULT_TEST_DIR")
        .expect("run through tests/run.sh (VSQL_VAULT_TEST_DIR)");
    let port = std::env::var("VSQL_VAULT_TEST_PORT")
        .expect("VSQL_VAULT_TEST_PORT")
        .parse()
        .expect("port");
    let db = std::env::var("VSQL_VAULT_TEST_DB").expect("VSQL_VAULT_TEST_DB");
    Server { dir, port, db }
}

impl Server {
    pub fn connect_to(&self, db: &str, user: &str, app: &str) -> Client {
        Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .dbname(db)
            .user(user)
            .application_name(app)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connect as {user} to {db}: {e}"))
    }

    pub fn connect(&self, user: &str) -> Client {
        self.connect_to(&self.db, user, "vsql_vault integration")
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        let data = format!("{}/data", self.dir);
        let status = Command::new("runuser")
            .env_remove("RUST_BACKTRACE")
            .args([
                "-u",
                "postgres",
                "--",
                &pg_program("pg_ctl"),
                "-D",
                &data,
                "-w",
                "-t",
                "60",
            ])
            .args(args)
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {args:?}");
    }

    /// Waits until the audit writer serves `db` (it restarts to follow vsql_vault.database).
    pub fn wait_for_writer(&self, db: &str) {
        poll(&format!("the audit writer to serve {db}"), 300, || {
            Config::new()
                .host_path(&self.dir)
                .port(self.port)
                .dbname("postgres")
                .user("postgres")
                .connect(NoTls)
                .ok()
                .and_then(|mut c| {
                    c.query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'vsql_vault audit writer' AND datname = $1",
                        &[&db],
                    )
                    .ok()
                })
                .is_some_and(|r| r.get::<_, i64>(0) == 1)
        });
    }
}

/// Polls `done` every 200 ms, at most `attempts` times, and fails the test if it never holds.
/// (A bound on waiting for the server, counted in attempts: tests measure no speed.)
pub fn poll(what: &str, attempts: u32, mut done: impl FnMut() -> bool) {
    for _ in 0..attempts {
        if done() {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
    assert!(done(), "gave up waiting for {what}");
}

/// Roles and a purpose shared by the tests; safe to run again.
pub fn setup(s: &Server) -> Client {
    let mut su = s.connect("postgres");
    su.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS vsql_vault;
         DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'it_a') THEN
             CREATE ROLE it_a LOGIN IN ROLE vault_app;
             CREATE ROLE it_b LOGIN IN ROLE vault_app;
             CREATE ROLE it_admin LOGIN IN ROLE vault_admin;
           END IF;
         END $$;",
    )
    .unwrap();
    let mut admin = s.connect("it_admin");
    admin
        .execute("SELECT vault_set_retention_policy('it.card', 30, 7)", &[])
        .unwrap();
    su
}

pub fn sqlstate(e: &postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no sqlstate: {e}"))
}

pub fn log_count(su: &mut Client, op: &str, external_id: &str, granted: bool) -> i64 {
    su.query_one(
        "SELECT count(*) FROM vault.access_log WHERE purpose = 'it.card' AND operation = $1 AND external_id = $2 AND granted = $3",
        &[&op, &external_id, &granted],
    )
    .unwrap()
    .get(0)
}

pub fn put(c: &mut Client, id: &str, value: &[u8]) -> Result<(), postgres::Error> {
    c.execute("SELECT vault_put('it.card', $1, $2)", &[&id, &value])
        .map(|_| ())
}

pub fn get(c: &mut Client, id: &str) -> Result<Vec<u8>, postgres::Error> {
    c.query_one(
        "SELECT encrypted_value FROM vault_get('it.card', $1)",
        &[&id],
    )
    .map(|r| r.get(0))
}

/// One KEK file line: version id and 32 key bytes.
pub fn kek_line(id: &str, byte: &str) -> String {
    format!("{id} {}\n", byte.repeat(32))
}

/// Writes the KEK file as the server's user, owner-only, and points the server at it.
pub fn set_kek(s: &Server, su: &mut Client, contents: &str) -> String {
    let path = format!("{}/replication.kek", s.dir);
    std::fs::write(&path, contents).unwrap();
    let ok = Command::new("sh")
        .args(["-c", &format!("chown postgres {path} && chmod 600 {path}")])
        .status()
        .unwrap();
    assert!(ok.success());
    su.batch_execute(&format!("ALTER SYSTEM SET vsql_vault.kek_file = '{path}'"))
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    path
}

/// `set_kek`, then waits until the server's sessions see the new setting.
pub fn use_kek(s: &Server, su: &mut Client, contents: &str) -> String {
    let kek = set_kek(s, su, contents);
    poll("the KEK setting", 100, || {
        su.query_one("SHOW vsql_vault.kek_file", &[])
            .is_ok_and(|r| r.get::<_, String>(0) == kek)
    });
    kek
}

/// The public halves of every signing key, after a checkpoint so the current key is registered.
pub fn public_keys(su: &mut Client) -> Vec<String> {
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    su.query("SELECT public_key FROM vault.signing_keys", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The indexes of a stream's batch lines.
pub fn batch_lines(lines: &[String]) -> Vec<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"type\":\"batch\""))
        .map(|(i, _)| i)
        .collect()
}

/// Runs the offline consumer over a captured stream: (exit status, stdout, stderr).
pub fn decrypt(su: &mut Client, kek: &str, stream: &str) -> (i32, String, String) {
    decrypt_with(&public_keys(su), kek, stream, &[])
}

/// Runs the offline consumer over a captured stream trusting `keys`, with `extra` options.
pub fn decrypt_with(
    keys: &[String],
    kek: &str,
    stream: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut cmd = Command::new(std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI"));
    cmd.args(["decrypt", "--kek-file", kek, "--input", stream]);
    for k in keys {
        cmd.args(["--public-key", k]);
    }
    cmd.args(extra);
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Receives the slot's changes with pg_recvlogical up to the current WAL position.
pub fn recvlogical(s: &Server, su: &mut Client, slot: &str, file: &str) {
    let end: String = su
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let _ = std::fs::remove_file(file);
    let port = s.port.to_string();
    let out = Command::new("pg_recvlogical")
        .args([
            "-h", &s.dir, "-p", &port, "-U", "postgres", "-d", &s.db, "--slot", slot, "--start",
        ])
        .args(["--endpos", &end, "--no-loop", "-f", file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_recvlogical: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a PostgreSQL client program against the test server, returning (success, stderr).
pub fn client_program(s: &Server, program: &str, args: &[&str]) -> (bool, String) {
    let port = s.port.to_string();
    let out = Command::new(program)
        .env_remove("PGOPTIONS")
        .args(["-h", &s.dir, "-p", &port, "-U", "postgres"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Points the audit writer at `db` and waits until it serves it.
pub fn serve(s: &Server, su: &mut Client, db: &str) {
    su.batch_execute(&format!("ALTER SYSTEM SET vsql_vault.database = '{db}'"))
        .unwrap();
    su.batch_execute("SELECT pg_reload_conf()").unwrap();
    s.wait_for_writer(db);
}

pub fn fresh_slot(su: &mut Client, slot: &str) {
    let _ = su.execute("SELECT pg_drop_replication_slot($1)", &[&slot]);
    su.execute(
        "SELECT pg_create_logical_replication_slot($1, 'vsql_vault')",
        &[&slot],
    )
    .unwrap();
}

/// Creates login roles once, each a member of its group (or of none): `(name, group)`.
pub fn login_roles(su: &mut Client, roles: &[(&str, Option<&str>)]) {
    for (name, group) in roles {
        let member = group.map(|g| format!(" IN ROLE {g}")).unwrap_or_default();
        su.batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                 CREATE ROLE {name} LOGIN{member};
               END IF;
             END $$;"
        ))
        .unwrap();
    }
}

/// Exports `table` and the checkpoints, runs the offline tool on that table; returns (exit code,
/// output).
pub fn offline_verdict(s: &Server, su: &mut Client, table: &str, tag: &str) -> (i32, String) {
    let export = format!("{}/{tag}.export.jsonl", s.dir);
    let checkpoints = format!("{}/{tag}.checkpoints.jsonl", s.dir);
    // Checkpoints first, as the README says: one signed after the rows were exported (the export
    // itself is recorded, and the writer checkpoints on its own) names a row the export lacks.
    let cps: Vec<String> = su
        .query("SELECT vault_export_checkpoints()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&checkpoints, cps.join("\n") + "\n").unwrap();
    let lines: Vec<String> = su
        .query(&format!("SELECT vault_export_audit('{table}')"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    std::fs::write(&export, lines.join("\n") + "\n").unwrap();
    let identity = identity_of(su, table);
    run_verify(su, &export, &checkpoints, &["--table", &identity])
}

/// The identity of protected table `table` in hashes, checkpoints and exports.
pub fn identity_of(su: &mut Client, table: &str) -> String {
    su.query_one(
        "SELECT identity FROM vault.protected_tables WHERE relid = $1::text::regclass",
        &[&table],
    )
    .unwrap()
    .get(0)
}

/// `vsql-vault verify` of an export and a checkpoint file with every known public key and `extra`
/// options: (exit code, standard output).
pub fn run_verify(
    su: &mut Client,
    export: &str,
    checkpoints: &str,
    extra: &[&str],
) -> (i32, String) {
    let mut args: Vec<String> = ["verify", "--export", export, "--checkpoints", checkpoints]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(extra.iter().map(|a| a.to_string()));
    for r in su
        .query("SELECT public_key FROM vault.signing_keys", &[])
        .unwrap()
    {
        args.push("--public-key".into());
        args.push(r.get::<_, String>(0));
    }
    offline_tools(&args)
}

/// Runs `vsql-vault` and the second verifier written from docs/audit-format.md alone
/// (`tests/verifier/verify.py`) with the same arguments. They must exit alike and reach the same
/// verdicts (status and subject of each line; the reasons' wording is each tool's own). Returns
/// vsql-vault's (exit code, standard output).
pub fn offline_tools(args: &[String]) -> (i32, String) {
    let run = |program: &str, pre: &[&str]| {
        let out = Command::new(program)
            .args(pre)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cli = std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI (run through tests/run.sh)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/verifier/verify.py");
    let ours = run(&cli, &[]);
    let theirs = run("python3", &[script]);
    let verdicts = |out: &str| {
        let mut v: Vec<String> = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_once(": ").map_or(l, |(head, _)| head).to_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        (ours.0, verdicts(&ours.1)),
        (theirs.0, verdicts(&theirs.1)),
        "vsql-vault and verify.py disagree on {args:?}\nvsql-vault:\n{}\nverify.py:\n{}{}",
        ours.1,
        theirs.1,
        theirs.2
    );
    (ours.0, ours.1)
}

/// Fails unless every chain `vault_verify_audit` checks (of `table`, or of every table) is intact.
pub fn assert_chains_verify(c: &mut Client, table: Option<&str>) {
    let bad: Vec<String> = c
        .query(
            "SELECT table_name || ' ' || coalesce(chain::text, '-') || ': ' || detail
               FROM vault_verify_audit($1::text::regclass) WHERE NOT ok",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
}
