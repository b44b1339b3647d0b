//! Table digests (issue 16) against a real server: two databases holding the same rows in
//! different physical orders, under different collations and session settings, get the same
//! root; one changed value changes it and the range digests narrow it to one bucket; the offline
//! tool recomputes the same from the export; bad input gets its documented SQLSTATE; the caller's
//! privileges and row-level security apply.

mod common;

use common::cluster::OwnCluster;
use common::{server, setup, sqlstate, Server};
use postgres::Client;
use std::process::Command;
use vsql_vault_core::canonical::Value;
use vsql_vault_core::digest;

const NODE_B: &str = "vault_digest_b";

const TABLE: &str = "CREATE TABLE dg_items (
        code text, n int, amount numeric, price float8, at timestamptz, day date, span interval,
        flag bool, data bytea, tags text[], doc jsonb, note text, seen timestamptz[], period tstzrange,
        PRIMARY KEY (code, n))";

/// The rows both nodes hold: keys whose order differs between collations (case, accents,
/// punctuation), values whose text forms depend on session settings.
fn rows() -> Vec<String> {
    let codes = ["a", "B", "b", "Z", "é", "e", "_x", "10", "9", "ä"];
    let mut out = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        for n in 0..12 {
            let k = i * 12 + n;
            out.push(format!(
                "('{code}', {n}, {k}.5, {k}.1e-3, '2024-03-{:02} 12:34:56.789+02'::timestamptz + interval '{k} min',
                  date '2001-02-03' + {k}, interval '{k} days 3 hours', {}, '\\x{:04x}'::bytea,
                  ARRAY['t{k}', 'u'], '{{\"k\": {k}, \"f\": 0.1}}', {},
                  ARRAY['2020-01-01 10:00+00'::timestamptz + interval '{k} h'],
                  tstzrange('2021-06-01 00:00+00'::timestamptz, '2021-06-01 00:00+00'::timestamptz + interval '{k} d'))",
                1 + k % 28,
                k % 2 == 0,
                k,
                if k % 5 == 0 { "NULL".to_owned() } else { format!("'note {k}'") }
            ));
        }
    }
    out
}

/// Node A: the test database (C collation). Node B: another database whose default collation is
/// ICU's, where the same rows go in in reverse, with dead tuples in between.
fn two_nodes(s: &Server, su: &mut Client) -> (Client, Client) {
    // Made once and kept (dropping a database the vault's workers serve is another test's
    // subject).
    let exists = su
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&NODE_B])
        .unwrap()
        .is_some();
    if !exists {
        su.batch_execute(&format!(
            "CREATE DATABASE {NODE_B} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'und' LOCALE 'C'"
        ))
        .unwrap();
    }
    let mut b = s.connect_to(NODE_B, "postgres", "digest test");
    b.batch_execute("CREATE EXTENSION IF NOT EXISTS vsql_vault; DROP TABLE IF EXISTS dg_items")
        .unwrap();
    let mut a = s.connect("postgres");
    a.batch_execute("DROP TABLE IF EXISTS dg_items").unwrap();
    let rows = rows();
    a.batch_execute(TABLE).unwrap();
    a.batch_execute(&format!("INSERT INTO dg_items VALUES {}", rows.join(",")))
        .unwrap();
    b.batch_execute(TABLE).unwrap();
    for r in rows.iter().rev() {
        b.batch_execute(&format!("INSERT INTO dg_items VALUES {r}"))
            .unwrap();
    }
    // Physically different again: every other row rewritten (a new tuple version elsewhere).
    b.batch_execute("UPDATE dg_items SET note = note WHERE n % 2 = 0")
        .unwrap();
    (a, b)
}

fn root(c: &mut Client, table: &str) -> String {
    c.query_one(
        "SELECT encode(vault_table_digest($1::text::regclass), 'hex')",
        &[&table],
    )
    .unwrap()
    .get(0)
}

/// (bucket, first key, last key, rows, root) of every bucket.
type Range = (i32, Option<String>, Option<String>, i64, String);

fn ranges(c: &mut Client, table: &str, buckets: i32) -> Vec<Range> {
    c.query(
        "SELECT bucket, first_key::text, last_key::text, rows, encode(root, 'hex')
           FROM vault_table_digest_ranges($1::text::regclass, $2) ORDER BY bucket",
        &[&table, &buckets],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn key_bytes_of(json: &str) -> Vec<u8> {
    let fields: Vec<(String, Value)> = serde_json::from_str(json).unwrap();
    digest::key_bytes(&fields)
}

#[test]
fn the_same_rows_in_any_physical_order_collation_and_session_settings_give_the_same_root() {
    let s = server();
    let mut su = setup(&s);
    let (mut a, mut b) = two_nodes(&s, &mut su);
    // The two nodes really do order the keys differently.
    let order = |c: &mut Client| -> Vec<String> {
        c.query("SELECT DISTINCT code FROM dg_items ORDER BY code", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_ne!(order(&mut a), order(&mut b));
    let ra = root(&mut a, "dg_items");
    assert_eq!(ra.len(), 64);
    assert_eq!(ra, root(&mut b, "dg_items"));
    assert_eq!(
        ranges(&mut a, "dg_items", 16),
        ranges(&mut b, "dg_items", 16)
    );
    // Every output setting a text form depends on (DateStyle and TimeZone: the timestamptz[] and
    // tstzrange columns; extra_float_digits: float8; IntervalStyle: interval), changed on node
    // B: the same root.
    b.batch_execute(
        "SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Tokyo'; SET extra_float_digits = 3;
         SET IntervalStyle = 'sql_standard'; SET bytea_output = 'escape'; SET search_path = public, pg_catalog",
    )
    .unwrap();
    assert_eq!(ra, root(&mut b, "dg_items"));
    // A subset of columns: equal too, and a root of its own.
    let cols = |c: &mut Client| -> String {
        c.query_one(
            "SELECT encode(vault_table_digest('dg_items', ARRAY['amount', 'code']), 'hex')",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let subset = cols(&mut a);
    assert_eq!(subset, cols(&mut b));
    assert_ne!(subset, ra);
    // Rows: the sum over the buckets is the table's.
    let total: i64 = ranges(&mut a, "dg_items", 16).iter().map(|r| r.3).sum();
    assert_eq!(total, rows().len() as i64);
}

#[test]
fn one_changed_value_changes_the_root_and_the_ranges_narrow_it_to_one_bucket() {
    let s = server();
    let mut su = setup(&s);
    let (mut a, mut b) = two_nodes(&s, &mut su);
    b.batch_execute("UPDATE dg_items SET amount = amount + 0.001 WHERE code = 'é' AND n = 7")
        .unwrap();
    assert_ne!(root(&mut a, "dg_items"), root(&mut b, "dg_items"));
    for buckets in [1, 7, 64] {
        let (ra, rb) = (
            ranges(&mut a, "dg_items", buckets),
            ranges(&mut b, "dg_items", buckets),
        );
        assert_eq!(ra.len(), buckets as usize);
        let differing: Vec<(&Range, &Range)> = ra.iter().zip(&rb).filter(|(x, y)| x != y).collect();
        assert_eq!(differing.len(), 1, "{buckets} buckets");
        let (x, y) = differing[0];
        // Same keys and counts on both sides; only the root differs.
        assert_eq!((x.0, &x.1, &x.2, x.3), (y.0, &y.1, &y.2, y.3));
        assert_ne!(x.4, y.4);
        // The changed row's key lies between the bucket's first and last key, and is in it.
        let changed = digest::key_bytes(&[("code", Value::Text("é".into())), ("n", Value::Int(7))]);
        let first = key_bytes_of(x.1.as_deref().unwrap());
        let last = key_bytes_of(x.2.as_deref().unwrap());
        assert!(first <= changed && changed <= last, "{x:?}");
        assert_eq!(digest::bucket_of(&changed, buckets as u32), x.0 as u32);
        // That bucket's export on each node: the same rows but one, the changed row.
        let lines = |c: &mut Client| -> Vec<String> {
            c.query(
                "SELECT vault_table_digest_export('dg_items', NULL, $1, $2)",
                &[&buckets, &x.0],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let (la, lb) = (lines(&mut a), lines(&mut b));
        assert_eq!(la.len() as i64, x.3);
        let differing: Vec<(&String, &String)> =
            la.iter().zip(&lb).filter(|(p, q)| p != q).collect();
        assert_eq!(differing.len(), 1);
        let line: digest::ExportLine = serde_json::from_str(differing[0].1).unwrap();
        assert_eq!(line.bytes().0, changed);
    }
}

fn export(c: &mut Client, table: &str) -> String {
    c.query(
        "SELECT vault_table_digest_export($1::text::regclass)",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| r.get::<_, String>(0) + "\n")
    .collect()
}

/// `vsql-vault digest --input FILE --ranges N`: its output lines, or its exit status.
fn offline(text: &str, tag: &str, buckets: i32) -> Result<Vec<serde_json::Value>, i32> {
    let path = format!("/tmp/vsql_vault_digest_{tag}.jsonl");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(std::env::var("VSQL_VAULT_CLI").expect("VSQL_VAULT_CLI"))
        .args(["digest", "--input", &path, "--ranges", &buckets.to_string()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        return Err(out.status.code().unwrap_or(-1));
    }
    Ok(String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect())
}

fn same_offline(c: &mut Client, table: &str, tag: &str) {
    let lines = offline(&export(c, table), tag, 8).unwrap();
    assert_eq!(
        lines[0]["root"].as_str().unwrap(),
        root(c, table),
        "{table}"
    );
    let sql = ranges(c, table, 8);
    assert_eq!(lines.len(), 1 + sql.len());
    for (line, r) in lines[1..].iter().zip(&sql) {
        let as_json = |k: &Option<String>| {
            k.as_deref()
                .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap())
                .unwrap_or(serde_json::Value::Null)
        };
        assert_eq!(line["bucket"], r.0);
        assert_eq!(line["first_key"], as_json(&r.1));
        assert_eq!(line["last_key"], as_json(&r.2));
        assert_eq!(line["rows"], r.3);
        assert_eq!(line["root"], r.4.as_str());
    }
}

#[test]
fn the_offline_tool_recomputes_the_same_digest_from_the_export() {
    let s = server();
    let mut su = setup(&s);
    let (mut a, mut b) = two_nodes(&s, &mut su);
    same_offline(&mut a, "dg_items", "a");
    same_offline(&mut b, "dg_items", "b");
    // The export is read from its values: one altered value changes the offline root, and a
    // shuffled export gives the same one.
    let text = export(&mut a, "dg_items");
    let good = offline(&text, "good", 8).unwrap();
    let altered = text.replacen("note 1\"", "note 1!\"", 1);
    assert_ne!(altered, text);
    assert_ne!(offline(&altered, "altered", 8).unwrap()[0], good[0]);
    let mut shuffled: Vec<&str> = text.lines().collect();
    shuffled.reverse();
    shuffled.swap(1, 50);
    assert_eq!(
        offline(&(shuffled.join("\n") + "\n"), "shuffled", 8).unwrap(),
        good
    );
    // An unreadable export: exit status 2.
    assert_eq!(offline(&(text.clone() + "{\"key\":1}\n"), "bad", 8), Err(2));
    assert_eq!(offline(&text, "buckets", 0), Err(2));
    // A table without a key, with a duplicate row, and an empty table.
    a.batch_execute(
        "DROP TABLE IF EXISTS dg_nokey, dg_empty;
         CREATE TABLE dg_nokey (x int, y text);
         INSERT INTO dg_nokey VALUES (3, 'c'), (1, NULL), (3, 'c'), (2, 'b');
         CREATE TABLE dg_empty (x int PRIMARY KEY)",
    )
    .unwrap();
    same_offline(&mut a, "dg_nokey", "nokey");
    // Names that need quoting, in the table's name, its key and its columns.
    a.batch_execute(
        r#"DROP TABLE IF EXISTS "DG Odd";
           CREATE TABLE "DG Odd" ("K ey" int PRIMARY KEY, "q""uote'" text, "Ünï" numeric);
           INSERT INTO "DG Odd" VALUES (1, 'a', 1.50), (2, NULL, -0.0)"#,
    )
    .unwrap();
    same_offline(&mut a, "\"DG Odd\"", "odd");
    let odd = export(&mut a, "\"DG Odd\"");
    assert!(
        odd.contains(r#"["q\"uote'",{"type":"text","value":"a"}]"#),
        "{odd}"
    );
    same_offline(&mut a, "dg_empty", "empty");
    assert_eq!(
        root(&mut a, "dg_empty"),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let nokey_rows: i64 = ranges(&mut a, "dg_nokey", 4).iter().map(|r| r.3).sum();
    assert_eq!(nokey_rows, 4);
}

#[test]
fn the_known_answer_vector_is_what_the_database_computes() {
    let s = server();
    let mut su = setup(&s);
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vectors/table_digest_v1.json"
        ))
        .unwrap(),
    )
    .unwrap();
    su.batch_execute("DROP TABLE IF EXISTS dg_vector").unwrap();
    su.batch_execute(v["create"].as_str().unwrap()).unwrap();
    su.batch_execute(v["insert"].as_str().unwrap()).unwrap();
    assert_eq!(root(&mut su, "dg_vector"), v["root"].as_str().unwrap());
    let lines: Vec<serde_json::Value> = export(&mut su, "dg_vector")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(serde_json::Value::from(lines), v["rows"]);
    let four: Vec<serde_json::Value> = ranges(&mut su, "dg_vector", 4)
        .into_iter()
        .map(|r| serde_json::json!({"bucket": r.0, "rows": r.3, "root": r.4}))
        .collect();
    assert_eq!(serde_json::Value::from(four), v["ranges_4"]);
}

#[test]
fn bad_input_gets_its_documented_sqlstate() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "DROP VIEW IF EXISTS dg_view; DROP TABLE IF EXISTS dg_bad;
         CREATE TABLE dg_bad (id int PRIMARY KEY, v text);
         CREATE VIEW dg_view AS SELECT * FROM dg_bad",
    )
    .unwrap();
    for (sql, state) in [
        (
            "SELECT vault_table_digest('dg_bad', ARRAY['nope'])",
            "42703",
        ),
        (
            "SELECT vault_table_digest('dg_bad', ARRAY['ctid'])",
            "42703",
        ),
        (
            "SELECT vault_table_digest('dg_bad', ARRAY['v', 'v'])",
            "42701",
        ),
        (
            "SELECT vault_table_digest('dg_bad', ARRAY[]::text[])",
            "22023",
        ),
        (
            "SELECT vault_table_digest('dg_bad', ARRAY[NULL]::text[])",
            "22023",
        ),
        (
            "SELECT * FROM vault_table_digest_ranges('dg_bad', 0)",
            "22023",
        ),
        (
            "SELECT * FROM vault_table_digest_ranges('dg_bad', 4097)",
            "22023",
        ),
        (
            "SELECT * FROM vault_table_digest_ranges('dg_bad', NULL)",
            "22023",
        ),
        (
            "SELECT vault_table_digest_export('dg_bad', NULL, 4, 4)",
            "22023",
        ),
        (
            "SELECT vault_table_digest_export('dg_bad', NULL, 4, -1)",
            "22023",
        ),
        (
            "SELECT vault_table_digest_export('dg_bad', NULL, NULL, 0)",
            "22023",
        ),
        (
            "SELECT vault_table_digest_export('dg_bad', NULL, 4)",
            "22023",
        ),
        (
            "SELECT vault_table_digest_export('dg_bad', NULL, 0, 0)",
            "22023",
        ),
        ("SELECT vault_table_digest('dg_view')", "42809"),
        // The internal helpers, called directly with what they were not made for.
        (
            "SELECT vault.table_digest_line('\\x00', '\\x00', true)",
            "22023",
        ),
        ("SELECT vault.table_digest_key(ARRAY['a'], 1)", "22023"),
        (
            "SELECT vault.table_digest_row(ARRAY['a'], ROW(1, 2))",
            "22023",
        ),
        ("SELECT vault.table_digest_bucket('\\x00', 0)", "22023"),
        ("SELECT vault_table_digest_export('dg_view')", "42809"),
        ("SELECT vault_table_digest(NULL)", "22004"),
        (
            "SELECT vault_table_digest(2147483647::oid::regclass)",
            "42P01",
        ),
        ("SELECT vault_table_digest('no_such_table')", "42P01"),
    ] {
        let e = su.query(sql, &[]).unwrap_err();
        assert_eq!(sqlstate(&e), state, "{sql}: {e}");
    }
    assert_eq!(
        ranges(&mut su, "dg_bad", 4096).len(),
        4096,
        "the largest bucket count is accepted"
    );
}

#[test]
fn the_digest_covers_what_the_caller_may_read() {
    let s = server();
    let mut su = setup(&s);
    su.batch_execute(
        "DROP TABLE IF EXISTS dg_priv, dg_priv_visible;
         DROP ROLE IF EXISTS dg_reader;
         CREATE ROLE dg_reader LOGIN;
         CREATE TABLE dg_priv (id int PRIMARY KEY, owner_name text, secret text);
         INSERT INTO dg_priv SELECT i, CASE WHEN i % 3 = 0 THEN 'dg_reader' ELSE 'other' END, 's' || i
           FROM generate_series(1, 30) i;
         CREATE TABLE dg_priv_visible AS SELECT * FROM dg_priv WHERE owner_name = 'dg_reader';
         ALTER TABLE dg_priv_visible ADD PRIMARY KEY (id)",
    )
    .unwrap();
    let mut reader = s.connect("dg_reader");
    // No SELECT: refused, for every function.
    for sql in [
        "SELECT vault_table_digest('dg_priv')",
        "SELECT * FROM vault_table_digest_ranges('dg_priv', 4)",
        "SELECT vault_table_digest_export('dg_priv')",
    ] {
        let e = reader.query(sql, &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
    }
    // SELECT on some columns: those columns only.
    su.batch_execute("GRANT SELECT (id, owner_name) ON dg_priv TO dg_reader")
        .unwrap();
    let e = reader
        .query("SELECT vault_table_digest('dg_priv')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    let partial: String = reader
        .query_one(
            "SELECT encode(vault_table_digest('dg_priv', ARRAY['id', 'owner_name']), 'hex')",
            &[],
        )
        .unwrap()
        .get(0);
    let expected: String = su
        .query_one(
            "SELECT encode(vault_table_digest('dg_priv', ARRAY['id', 'owner_name']), 'hex')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(partial, expected);
    // Row-level security: the digest is over the rows the caller sees.
    su.batch_execute(
        "GRANT SELECT ON dg_priv TO dg_reader;
         ALTER TABLE dg_priv ENABLE ROW LEVEL SECURITY;
         CREATE POLICY dg_own ON dg_priv FOR SELECT USING (owner_name = current_user)",
    )
    .unwrap();
    let seen = root(&mut reader, "dg_priv");
    assert_eq!(seen, root(&mut su, "dg_priv_visible"));
    assert_ne!(seen, root(&mut su, "dg_priv"));
    let lines = export(&mut reader, "dg_priv");
    assert_eq!(lines.lines().count(), 10);
    su.batch_execute("DROP TABLE dg_priv, dg_priv_visible; DROP ROLE dg_reader")
        .unwrap();
}

#[test]
fn a_second_cluster_with_other_defaults_and_type_oids_gets_the_same_root() {
    let shared = server();
    let mut a = setup(&shared);
    let own = OwnCluster::start(
        &format!("{}/digest-node-c", shared.dir),
        shared.port + 33,
        "vault_digest_c",
        "timezone = 'Pacific/Chatham'\ndatestyle = 'German, DMY'\nintervalstyle = 'iso_8601'\nextra_float_digits = 0\nbytea_output = 'escape'",
    );
    let mut c = own.server.connect("postgres");
    c.batch_execute("CREATE EXTENSION IF NOT EXISTS vsql_vault")
        .unwrap();
    // The enum and the composite type are made in opposite orders on the two nodes: other OIDs.
    let types_a = "CREATE TYPE dg_mood AS ENUM ('sad', 'ok', 'happy');
        CREATE TYPE dg_pair AS (x int, y text);";
    let types_c = "CREATE TYPE dg_pair AS (x int, y text);
        CREATE TYPE dg_mood AS ENUM ('sad', 'ok', 'happy');";
    let schema = "DROP TABLE IF EXISTS dg_typed; DROP TYPE IF EXISTS dg_mood, dg_pair;";
    let table =
        "CREATE TABLE dg_typed (id int PRIMARY KEY, mood dg_mood, pair dg_pair, at timestamptz,
                               f float8, iv interval, ts timestamp, r tstzrange, b bytea[])";
    let rows: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "({i}, '{}', ROW({i}, 'p{i}'), '2022-11-{:02} 23:30:00+00', {i}.0 / 7, interval '{i} days {i} min',
                  '1999-12-31 23:59:59.5'::timestamp + interval '{i} h',
                  tstzrange('2022-01-01 00:00+00', '2022-01-01 00:00+00'::timestamptz + interval '{i} h'),
                  ARRAY['\\x{:02x}'::bytea, NULL])",
                ["sad", "ok", "happy"][i % 3],
                1 + i % 28,
                i
            )
        })
        .collect();
    a.batch_execute(&format!("{schema} {types_a} {table}"))
        .unwrap();
    a.batch_execute(&format!("INSERT INTO dg_typed VALUES {}", rows.join(",")))
        .unwrap();
    c.batch_execute(&format!("{schema} {types_c} {table}"))
        .unwrap();
    for r in rows.iter().rev() {
        c.batch_execute(&format!("INSERT INTO dg_typed VALUES {r}"))
            .unwrap();
    }
    // The nodes really differ: type OIDs, and the text a default session gets.
    let shown = |n: &mut Client| -> (bool, String) {
        let r = n
            .query_one(
                "SELECT 'dg_mood'::regtype::oid < 'dg_pair'::regtype::oid,
                        format('%s %s %s', at, f, iv) FROM dg_typed WHERE id = 5",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let (sa, sc) = (shown(&mut a), shown(&mut c));
    assert_ne!(sa.0, sc.0);
    assert_ne!(sa.1, sc.1);
    assert_eq!(root(&mut a, "dg_typed"), root(&mut c, "dg_typed"));
    assert_eq!(ranges(&mut a, "dg_typed", 8), ranges(&mut c, "dg_typed", 8));
    c.batch_execute("UPDATE dg_typed SET mood = 'happy' WHERE id = 0")
        .unwrap();
    assert_ne!(root(&mut a, "dg_typed"), root(&mut c, "dg_typed"));
}
