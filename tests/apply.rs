//! `vsql-vault apply` end to end: a workload of every kind on the source, the sealed stream
//! through `vsql-vault decrypt --markers | vsql-vault apply` (or apply on the sealed stream) into a
//! second real cluster, and the two databases hold the same rows; applying again changes nothing;
//! a failing or cut stream leaves the target at its last whole transaction and resumes.

mod common;

use common::cluster::OwnCluster;
use common::*;
use postgres::Client;
use std::process::{Command, Stdio};

/// The same tables on both sides (DDL is not replicated).
const DDL: &str = "
DROP TABLE IF EXISTS ap_types, ap_full, ap_comp, ap_big, ap_child, ap_parent, ap_conf;
CREATE TABLE ap_types (id int PRIMARY KEY, b bigint, n numeric, t text, raw bytea,
    ts timestamptz, d date, doc jsonb, arr int[], tarr text[], f float8, big text);
ALTER TABLE ap_types ALTER big SET STORAGE EXTERNAL;
CREATE TABLE ap_full (a int, b text, c date);
ALTER TABLE ap_full REPLICA IDENTITY FULL;
CREATE TABLE ap_comp (k1 int, k2 text, v text, PRIMARY KEY (k1, k2));
CREATE TABLE ap_big (id int PRIMARY KEY, pad text);
CREATE TABLE ap_parent (id int PRIMARY KEY);
CREATE TABLE ap_child (id int PRIMARY KEY, parent int REFERENCES ap_parent);
CREATE TABLE ap_conf (id int PRIMARY KEY, v text);";

const TABLES: [&str; 7] = [
    "ap_types",
    "ap_full",
    "ap_comp",
    "ap_big",
    "ap_parent",
    "ap_child",
    "ap_conf",
];

fn cli() -> Command {
    Command::new(std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI"))
}

fn key_args(su: &mut Client, kek: &str) -> Vec<String> {
    let mut args = vec!["--kek-file".to_owned(), kek.to_owned()];
    for k in public_keys(su) {
        args.extend(["--public-key".to_owned(), k]);
    }
    args
}

fn conninfo(t: &OwnCluster) -> String {
    format!(
        "host={} port={} user=postgres dbname={}",
        t.server.dir, t.server.port, t.server.db
    )
}

/// `vsql-vault decrypt --markers | vsql-vault apply`, a real pipe: (exit status, apply's stderr).
fn pipeline(keys: &[String], stream: &str, target: &str, extra: &[&str]) -> (i32, String) {
    let mut decrypt = cli()
        .args(["decrypt", "--markers", "--input", stream])
        .args(keys)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = cli()
        .args(["apply", "--target", target])
        .args(extra)
        .stdin(decrypt.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(decrypt.wait().unwrap().success());
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `vsql-vault apply` reading the sealed stream itself.
fn apply_sealed(keys: &[String], stream: &str, target: &str, extra: &[&str]) -> (i32, String) {
    let out = cli()
        .args(["apply", "--target", target, "--input", stream])
        .args(keys)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every row of a table as text, in a fixed order.
fn rows(c: &mut Client, table: &str) -> String {
    c.query_one(
        &format!(
            "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '') FROM {table} t"
        ),
        &[],
    )
    .unwrap()
    .get(0)
}

fn assert_same_rows(src: &mut Client, dst: &mut Client) {
    for t in TABLES {
        let (a, b) = (rows(src, t), rows(dst, t));
        assert!(
            a == b,
            "{t} differs:\nsource:\n{a:.2000}\ntarget:\n{b:.2000}"
        );
    }
}

fn progress(dst: &mut Client) -> Vec<(String, String)> {
    dst.query(
        "SELECT source, commit_lsn::text FROM vsql_vault_apply.progress ORDER BY source",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Both sides ready: the source with its KEK, the tables and a fresh slot; a second cluster
/// (the target, at the test port + `offset`) with the same tables.
struct Sides {
    s: Server,
    su: Client,
    kek: String,
    target: OwnCluster,
    dst: Client,
}

fn sides(name: &str, offset: u16, kek_byte: &str) -> Sides {
    let s = server();
    let mut su = setup(&s);
    let kek = set_kek(&s, &mut su, &kek_line("v1", kek_byte));
    su.batch_execute(DDL).unwrap();
    let target = OwnCluster::start(&format!("{}/{name}", s.dir), s.port + offset, name, "");
    let mut dst = target.server.connect("postgres");
    dst.batch_execute(DDL).unwrap();
    fresh_slot(&mut su, name);
    Sides {
        s,
        su,
        kek,
        target,
        dst,
    }
}

/// Runs each statement as its own transaction (one query string of several would be one).
fn workload(su: &mut Client, statements: &[&str]) {
    for sql in statements {
        su.batch_execute(sql).unwrap();
    }
}

#[test]
fn a_workload_of_every_kind_arrives_whole_and_applying_again_changes_nothing() {
    let Sides {
        s,
        mut su,
        kek,
        target,
        mut dst,
    } = sides("it_apply_slot", 31, "a1");
    workload(
        &mut su,
        &[
        r#"INSERT INTO ap_types VALUES
          (1, 9000000000, 12345.678901234567890, 'it''s "quoted" \back\slash ü €', '\x00ff10'::bytea,
           '2024-02-29 13:14:15.123456+05:30', '1999-12-31', '{"k": ["v", 1, null]}', '{1,NULL,3}',
           '{"a b","c,d",NULL}', 0.1, repeat('toasted text ', 20000)),
          (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
          (3, -1, 'NaN', E'tab\there\nnew line', '\x'::bytea, 'infinity', '-infinity', 'null', '{}', '{}',
           1e-300, 'small')"#,
        // The TOASTed value stays unchanged: it arrives as `unchanged_toast`, left out of SET.
        "UPDATE ap_types SET n = n + 1, t = t || ' again' WHERE id = 1",
        "UPDATE ap_types SET id = 20, b = 2 WHERE id = 2",
        "DELETE FROM ap_types WHERE id = 3",
        "INSERT INTO ap_full VALUES (1, NULL, NULL), (2, 'x', NULL), (2, 'x', NULL), (3, 'y', '2020-01-01')",
        "UPDATE ap_full SET c = '2021-06-01' WHERE a = 1",
        "DELETE FROM ap_full WHERE ctid = (SELECT ctid FROM ap_full WHERE a = 2 LIMIT 1)",
        "UPDATE ap_full SET b = NULL WHERE a = 3",
        "INSERT INTO ap_comp VALUES (1, 'a', 'one'), (1, 'b', 'two'), (2, 'a', 'three')",
        "UPDATE ap_comp SET v = 'changed' WHERE k1 = 1 AND k2 = 'a'",
        "UPDATE ap_comp SET k2 = 'z' WHERE k1 = 1 AND k2 = 'b'",
        "DELETE FROM ap_comp WHERE k1 = 2",
        "INSERT INTO ap_parent SELECT generate_series(1, 5)",
        "INSERT INTO ap_child SELECT i, i FROM generate_series(1, 5) i",
        "TRUNCATE ap_parent, ap_child",
        "BEGIN; INSERT INTO ap_parent VALUES (7); INSERT INTO ap_child VALUES (7, 7); COMMIT",
        "BEGIN;
         INSERT INTO ap_conf VALUES (1, 'with a message');
         SELECT pg_logical_emit_message(true, 'app', 'transactional ü');
         COMMIT",
        "SELECT pg_logical_emit_message(false, 'app', 'not transactional')",
        "SELECT pg_logical_emit_message(true, 'bin', '\\xff00fe'::bytea)",
        "BEGIN; INSERT INTO ap_conf VALUES (99, 'rolled back'); ROLLBACK",
        // One change record over 4 MiB: it fills a batch alone, and the commit still seals the
        // transaction's last batch (which once stayed unwritten, leaving no end to find).
        "INSERT INTO ap_big VALUES (0, repeat('x', 5000000))",
        ],
    );
    // One transaction of about 6 MB: sealed in several batches, applied as one.
    su.batch_execute(
        "INSERT INTO ap_big SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 6000) i;",
    )
    .unwrap();
    su.batch_execute("UPDATE ap_types SET b = 7 WHERE id = 1;")
        .unwrap();
    let file = format!("{}/apply.stream", s.dir);
    recvlogical(&s, &mut su, "it_apply_slot", &file);
    let wire = std::fs::read_to_string(&file).unwrap();
    assert!(
        wire.lines().any(|l| l.contains("\"commit_time\":0,")),
        "the large transaction was not split into several batches"
    );
    let keys = key_args(&mut su, &kek);
    // The unchanged TOAST value really travels as such (else the test would not test it).
    let decrypted = cli()
        .args(["decrypt", "--input", &file])
        .args(&keys)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&decrypted.stdout).contains("\"unchanged_toast\":true"));

    let target_db = conninfo(&target);
    let state = format!("{}/apply.state", s.dir);
    let (code, err) = pipeline(
        &keys,
        &file,
        &target_db,
        &["--messages", "table", "--state", &state],
    );
    assert_eq!(code, 0, "{err}");
    assert_same_rows(&mut su, &mut dst);
    let messages: Vec<(String, Vec<u8>, bool)> = dst
        .query(
            "SELECT prefix, content, transactional FROM vsql_vault_apply.messages ORDER BY lsn",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        messages,
        [
            (
                "app".to_owned(),
                "transactional ü".as_bytes().to_vec(),
                true
            ),
            ("app".to_owned(), b"not transactional".to_vec(), false),
            ("bin".to_owned(), vec![0xff, 0x00, 0xfe], true),
        ]
    );
    let position = progress(&mut dst);
    assert_eq!(position.len(), 1);
    assert_eq!(position[0].0, "it_apply_slot");
    // The state file mirrors the target's position.
    let mirror: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(mirror["source"], "it_apply_slot");
    assert_eq!(mirror["commit_lsn"], position[0].1.as_str());

    // Again, over the same stream, in both forms: nothing changes, nothing is applied twice.
    let (code, err) = pipeline(&keys, &file, &target_db, &["--messages", "table"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(" 0 transactions applied"), "{err}");
    let (code, err) = apply_sealed(&keys, &file, &target_db, &["--messages", "table"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(" 0 transactions applied"), "{err}");
    assert_same_rows(&mut su, &mut dst);
    assert_eq!(progress(&mut dst), position);
    let count: i64 = dst
        .query_one("SELECT count(*) FROM vsql_vault_apply.messages", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 3);

    // Live: pg_recvlogical piped straight into decrypt --markers and apply, as in the README.
    workload(
        &mut su,
        &[
            "UPDATE ap_comp SET v = 'live' WHERE k1 = 1",
            "DELETE FROM ap_full WHERE a = 1",
        ],
    );
    let end: String = su
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .unwrap()
        .get(0);
    let script = format!(
        "pg_recvlogical -h '{dir}' -p {port} -U postgres -d '{db}' --slot it_apply_slot --start \
           --endpos {end} --no-loop -f - \
         | \"$VSQL_VAULT_CLI\" decrypt --markers {keys} | \"$VSQL_VAULT_CLI\" apply --target '{target_db}'",
        dir = s.dir,
        port = s.port,
        db = s.db,
        keys = keys.join(" "),
    );
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(" 2 transactions applied"), "{err}");
    assert_same_rows(&mut su, &mut dst);
    drop(target);
}

#[test]
fn a_failing_or_cut_stream_leaves_the_last_whole_transaction_and_resumes() {
    let Sides {
        s,
        mut su,
        kek,
        target,
        mut dst,
    } = sides("it_apply_resume", 32, "b2");
    workload(
        &mut su,
        &[
        "INSERT INTO ap_conf VALUES (1, 'first')",
        "BEGIN; INSERT INTO ap_conf VALUES (2, 'second'); INSERT INTO ap_conf VALUES (3, 'third'); COMMIT",
        "INSERT INTO ap_big SELECT i, repeat(md5(i::text), 30) FROM generate_series(1, 6000) i",
        "UPDATE ap_conf SET v = 'last' WHERE id = 1",
        ],
    );
    let file = format!("{}/apply_resume.stream", s.dir);
    recvlogical(&s, &mut su, "it_apply_resume", &file);
    let keys = key_args(&mut su, &kek);
    let target_db = conninfo(&target);
    // A row in the way: the second transaction fails, nothing of it stays, the first stays.
    dst.batch_execute("INSERT INTO ap_conf VALUES (3, 'in the way')")
        .unwrap();
    let (code, err) = apply_sealed(&keys, &file, &target_db, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("duplicate key") && err.contains("23505") && err.contains("ap_conf"),
        "{err}"
    );
    assert_eq!(rows(&mut dst, "ap_conf"), "(1,first)\n(3,\"in the way\")");
    assert_eq!(progress(&mut dst).len(), 1);

    // The stream cut inside the large transaction (after its first batch): none of it is
    // applied, the rest before it is.
    dst.batch_execute("DELETE FROM ap_conf WHERE id = 3")
        .unwrap();
    let wire = std::fs::read_to_string(&file).unwrap();
    let cut: Vec<&str> = wire
        .lines()
        .scan(false, |done, l| {
            if *done {
                return None;
            }
            *done = l.contains("\"commit_time\":0,");
            Some(l)
        })
        .collect();
    let cut_file = format!("{}/apply_cut.stream", s.dir);
    std::fs::write(&cut_file, cut.join("\n") + "\n").unwrap();
    let (code, err) = pipeline(&keys, &cut_file, &target_db, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("ended inside transaction"), "{err}");
    assert_eq!(
        rows(&mut dst, "ap_conf"),
        "(1,first)\n(2,second)\n(3,third)"
    );
    assert_eq!(rows(&mut dst, "ap_big"), "");

    // The whole stream: what was applied is skipped, the rest arrives.
    let (code, err) = pipeline(&keys, &file, &target_db, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(" 2 transactions applied"), "{err}");
    assert_same_rows(&mut su, &mut dst);

    // An update whose row is missing in the target is an error, or skipped when asked.
    su.batch_execute("UPDATE ap_conf SET v = 'gone' WHERE id = 2")
        .unwrap();
    dst.batch_execute("DELETE FROM ap_conf WHERE id = 2")
        .unwrap();
    recvlogical(&s, &mut su, "it_apply_resume", &file);
    let (code, err) = apply_sealed(&keys, &file, &target_db, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no target row matches the old key (id=2)"),
        "{err}"
    );
    let before = progress(&mut dst);
    let (code, err) = apply_sealed(&keys, &file, &target_db, &["--missing-rows", "skip"]);
    assert_eq!(code, 0, "{err}");
    assert_ne!(progress(&mut dst), before);
    assert_eq!(rows(&mut dst, "ap_conf"), "(1,last)\n(3,third)");
    dst.batch_execute("INSERT INTO ap_conf VALUES (2, 'gone')")
        .unwrap();

    // A large transaction that began before a small one committed and commits after it: its
    // first batch lies wholly before the position the small one leaves, yet it is applied.
    let mut other = s.connect("postgres");
    su.batch_execute(
        "BEGIN; INSERT INTO ap_big SELECT i, repeat(md5(i::text), 30) FROM generate_series(6001, 12000) i",
    )
    .unwrap();
    other
        .batch_execute("INSERT INTO ap_conf VALUES (4, 'meanwhile')")
        .unwrap();
    su.batch_execute("COMMIT").unwrap();
    recvlogical(&s, &mut su, "it_apply_resume", &file);
    let wire = std::fs::read_to_string(&file).unwrap();
    let upto = wire
        .lines()
        .position(|l| l.contains("\"tables\":[\"public.ap_conf\"]"))
        .unwrap();
    assert!(wire
        .lines()
        .skip(upto)
        .any(|l| l.contains("\"commit_time\":0,")));
    let first: Vec<&str> = wire.lines().take(upto + 1).collect();
    std::fs::write(&cut_file, first.join("\n") + "\n").unwrap();
    let (code, err) = apply_sealed(&keys, &cut_file, &target_db, &[]);
    assert!(
        code == 0 && err.contains(" 1 transactions applied"),
        "{err}"
    );
    let (code, err) = apply_sealed(&keys, &file, &target_db, &[]);
    assert!(
        code == 0 && err.contains(" 1 transactions applied"),
        "{err}"
    );
    assert_same_rows(&mut su, &mut dst);

    // A session that ends inside a transaction (decoding stopped), then a new session that sends
    // it again from its start: the unfinished part is dropped, the whole is applied once. Each
    // SQL decoding call is a session of its own.
    su.batch_execute(
        "INSERT INTO ap_big SELECT i, repeat(md5(i::text), 30) FROM generate_series(12001, 18000) i",
    )
    .unwrap();
    let peek = |su: &mut Client| -> Vec<String> {
        su.query(
            "SELECT data FROM pg_logical_slot_peek_changes('it_apply_resume', NULL, NULL)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let (first, second) = (peek(&mut su), peek(&mut su));
    let chunk = first
        .iter()
        .position(|l| l.contains("\"commit_time\":0,"))
        .unwrap();
    let spliced: Vec<&String> = first[..=chunk].iter().chain(second.iter()).collect();
    std::fs::write(
        &cut_file,
        spliced.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    // apply killed while a transaction is open in the target: none of it stays.
    let before = rows(&mut dst, "ap_big");
    let mut running = cli()
        .args(["apply", "--target", &target_db])
        .args(&keys)
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = running.stdin.take().unwrap();
        for l in &first[..=chunk] {
            writeln!(stdin, "{l}").unwrap();
        }
        stdin.flush().unwrap();
        poll("apply's open transaction in the target", 300, || {
            dst.query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND state = 'idle in transaction'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
                == 1
        });
        running.kill().unwrap();
        running.wait().unwrap();
    }
    assert_eq!(rows(&mut dst, "ap_big"), before);
    let (code, err) = apply_sealed(&keys, &cut_file, &target_db, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("ended unfinished at a new session")
            && err.contains(" 1 transactions applied"),
        "{err}"
    );
    assert_same_rows(&mut su, &mut dst);
    drop(target);
}
