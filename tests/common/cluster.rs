//! Servers a test starts and stops itself: a private primary (`tests/cluster.sh`) and a
//! streaming standby made by `pg_basebackup -R`, for tests of standbys and failover.

use super::{pg_program, poll, Server};
use postgres::{Client, Config, NoTls};
use std::process::Command;

/// Runs a PostgreSQL program as the postgres user (initdb and its data directories are theirs).
pub fn as_postgres(program: &str, args: &[&str]) -> bool {
    let path = pg_program(program);
    Command::new("runuser")
        .env_remove("RUST_BACKTRACE")
        .args(["-u", "postgres", "--", &path])
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
        .success()
}

/// A cluster of its own, created by `tests/cluster.sh` in `dir` (initdb, preload, start, create
/// the database, wait for the audit writer), stopped and removed when dropped.
pub struct OwnCluster {
    pub server: Server,
}

impl OwnCluster {
    /// `extra_conf`: more lines for its configuration file.
    pub fn start(dir: &str, port: u16, db: &str, extra_conf: &str) -> OwnCluster {
        stop_and_remove(dir);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/cluster.sh");
        let started = Command::new("bash")
            .env("VSQL_VAULT_EXTRA_CONF", extra_conf)
            .args([script, "start", dir, &port.to_string(), db])
            .status()
            .is_ok_and(|s| s.success());
        assert!(started, "tests/cluster.sh start {dir}");
        OwnCluster {
            server: Server {
                dir: dir.to_owned(),
                port,
                db: db.to_owned(),
            },
        }
    }

    pub fn stop(&self) {
        self.server.pg_ctl(&["-m", "fast", "stop"]);
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        stop_and_remove(&self.server.dir);
    }
}

fn stop_and_remove(dir: &str) {
    let data = format!("{dir}/data");
    if std::path::Path::new(&format!("{data}/PG_VERSION")).exists() {
        let _ = as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A streaming standby of a server, stopped and removed when dropped.
pub struct Standby {
    pub dir: String,
    pub port: u16,
}

impl Standby {
    /// `pg_basebackup -R` of `s` into `dir`, started on `port`. `extra` is appended to the copied
    /// `postgresql.auto.conf` (later lines win).
    pub fn start(s: &Server, dir: &str, port: u16, extra: &str) -> Standby {
        let _ = std::fs::remove_dir_all(dir);
        let made = Command::new("install")
            .args(["-d", "-o", "postgres", "-m", "700", dir])
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "install -d {dir}");
        let data = format!("{dir}/data");
        let port_text = s.port.to_string();
        assert!(as_postgres(
            "pg_basebackup",
            &[
                "-h", &s.dir, "-p", &port_text, "-U", "postgres", "-D", &data, "-R", "-X",
                "stream", "-c", "fast",
            ],
        ));
        let auto = format!("{data}/postgresql.auto.conf");
        let mut conf = std::fs::read_to_string(&auto).unwrap();
        conf.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{dir}'\n{extra}\n"
        ));
        std::fs::write(&auto, conf).unwrap();
        let log = format!("{dir}/server.log");
        assert!(as_postgres(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-t", "60", "start"],
        ));
        Standby {
            dir: dir.to_owned(),
            port,
        }
    }

    pub fn connect(&self, db: &str, user: &str) -> Client {
        Config::new()
            .host_path(&self.dir)
            .port(self.port)
            .dbname(db)
            .user(user)
            .connect(NoTls)
            .unwrap_or_else(|e| panic!("connect to the standby: {e}"))
    }

    /// Waits until the standby has replayed everything `primary` had written when called.
    pub fn catch_up(&self, primary: &mut Client, db: &str) {
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .unwrap()
            .get(0);
        let mut standby = self.connect(db, "postgres");
        poll("the standby to replay the primary's WAL", 300, || {
            standby
                .query_one(
                    "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                    &[&lsn],
                )
                .unwrap()
                .get::<_, bool>(0)
        });
    }

    /// `pg_ctl promote`, waiting until the server accepts writes; returns it as a `Server` of `db`.
    pub fn promote(&self, db: &str) -> Server {
        let data = format!("{}/data", self.dir);
        assert!(as_postgres(
            "pg_ctl",
            &["-D", &data, "-w", "-t", "60", "promote"]
        ));
        Server {
            dir: self.dir.clone(),
            port: self.port,
            db: db.to_owned(),
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let data = format!("{}/data", self.dir);
        let _ = as_postgres("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
