//! Bad input through every SQL function: each case gets its documented SQLSTATE, nothing is
//! stored or changed, the attempt is in the access log with that SQLSTATE, and the backend
//! survives to answer the next query.

mod common;

use common::{server, sqlstate, Server};
use postgres::Client;

/// (what, role, statement, expected SQLSTATE)
type Case = (&'static str, &'static str, String, &'static str);

fn setup(s: &Server) -> Client {
    let mut su = s.connect("postgres");
    su.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS vsql_vault;
         CREATE TABLE IF NOT EXISTS bi_plain (id int PRIMARY KEY, secret text);
         CREATE OR REPLACE VIEW bi_view AS SELECT 1 AS one;",
    )
    .unwrap();
    common::login_roles(
        &mut su,
        &[
            ("bi_app", Some("vault_app")),
            ("bi_admin", Some("vault_admin")),
            ("bi_other", Some("vault_app")),
        ],
    );
    let mut admin = s.connect("bi_admin");
    admin
        .batch_execute(
            "SELECT vault_set_retention_policy('bi.p', 30, 7);
             SELECT vault_set_access_policy('bi-policy', '{vault_app}', '{@owner}', '{@owner}');",
        )
        .unwrap();
    let mut app = s.connect("bi_app");
    app.batch_execute("SELECT vault_put('bi.p', 'existing', '\\x01')")
        .unwrap();
    su
}

/// Everything a refused call must leave untouched.
const STATE: &str = "
SELECT md5(concat_ws('|',
    (SELECT string_agg(e::text, ',' ORDER BY e.id) FROM vault.entries e),
    (SELECT string_agg(p::text, ',' ORDER BY p.purpose) FROM vault.retention_policies p),
    (SELECT string_agg(a::text, ',' ORDER BY a.name) FROM vault.access_policies a),
    (SELECT string_agg(g::text, ',' ORDER BY g.purpose, g.role_name) FROM vault.purpose_grants g),
    (SELECT string_agg(t::text, ',' ORDER BY t.id) FROM vault.protected_tables t),
    (SELECT string_agg(x::text, ',' ORDER BY x.relid, x.column_name) FROM vault.sync_exclusions x),
    (SELECT count(*) FROM vault.purge_log)::text))";

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn cases() -> Vec<Case> {
    let long300 = quote(&"p".repeat(300));
    let big_value = format!("'\\x{}'::bytea", "ab".repeat(1024 * 1024 + 1));
    let big_metadata = format!(
        "jsonb_build_object('blob', {})",
        quote(&"m".repeat(70 * 1024))
    );
    vec![
        // vault_put: every argument
        ("put NULL purpose", "bi_app", "SELECT vault_put(NULL, 'x', '\\x01')".into(), "22004"),
        ("put NULL external_id", "bi_app", "SELECT vault_put('bi.p', NULL, '\\x01')".into(), "22004"),
        ("put NULL value", "bi_app", "SELECT vault_put('bi.p', 'x', NULL)".into(), "22004"),
        ("put NULL access_policy", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', access_policy => NULL)".into(), "22004"),
        ("put NULL metadata", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', metadata => NULL)".into(), "22004"),
        ("put empty value", "bi_app", "SELECT vault_put('bi.p', 'x', '')".into(), "22023"),
        ("put oversized value", "bi_app", format!("SELECT vault_put('bi.p', 'x', {big_value})"), "54000"),
        ("put metadata array", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', metadata => '[1,2]')".into(), "22023"),
        ("put metadata string", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', metadata => '\"s\"')".into(), "22023"),
        ("put metadata number", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', metadata => '42')".into(), "22023"),
        ("put metadata JSON null", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', metadata => 'null')".into(), "22023"),
        ("put huge metadata", "bi_app", format!("SELECT vault_put('bi.p', 'x', '\\x01', metadata => {big_metadata})"), "54000"),
        ("put purpose upper case", "bi_app", "SELECT vault_put('Card', 'x', '\\x01')".into(), "22023"),
        ("put purpose with space", "bi_app", "SELECT vault_put('my card', 'x', '\\x01')".into(), "22023"),
        ("put purpose 300 chars", "bi_app", format!("SELECT vault_put({long300}, 'x', '\\x01')"), "22023"),
        ("put purpose with quote", "bi_app", "SELECT vault_put('ca''rd', 'x', '\\x01')".into(), "22023"),
        ("put purpose with SQL", "bi_app", "SELECT vault_put('x''; DROP TABLE vault.entries; --', 'x', '\\x01')".into(), "22023"),
        ("put purpose with right-to-left mark", "bi_app", "SELECT vault_put(E'bi.p\\u200F', 'x', '\\x01')".into(), "22023"),
        ("put purpose empty", "bi_app", "SELECT vault_put('', 'x', '\\x01')".into(), "22023"),
        ("put purpose without policy", "bi_app", "SELECT vault_put('bi.none', 'x', '\\x01')".into(), "VV428"),
        ("put external_id empty", "bi_app", "SELECT vault_put('bi.p', '', '\\x01')".into(), "22023"),
        ("put external_id 300 bytes", "bi_app", format!("SELECT vault_put('bi.p', {long300}, '\\x01')"), "22023"),
        ("put external_id with newline", "bi_app", "SELECT vault_put('bi.p', E'a\\nb', '\\x01')".into(), "22023"),
        ("put external_id with escape char", "bi_app", "SELECT vault_put('bi.p', E'a\\x1bb', '\\x01')".into(), "22023"),
        ("put expiry in the past", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', expires_at => now() - interval '1 day')".into(), "22023"),
        ("put expiry -infinity", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', expires_at => '-infinity')".into(), "22023"),
        ("put expiry beyond maximum", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', expires_at => now() + interval '31 days')".into(), "VV422"),
        ("put expiry infinity", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', expires_at => 'infinity')".into(), "VV422"),
        ("put unknown access policy", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', access_policy => 'nope')".into(), "22023"),
        ("put under a policy the role may not use", "bi_app", "SELECT vault_put('bi.p', 'x', '\\x01', access_policy => 'admin-only')".into(), "42501"),
        ("put over another role's entry", "bi_admin", "SELECT vault_put('bi.p', 'existing', '\\x02')".into(), "42501"),
        // vault_get / vault_head / vault_list
        ("get NULL purpose", "bi_app", "SELECT * FROM vault_get(NULL, 'x')".into(), "22004"),
        ("get NULL external_id", "bi_app", "SELECT * FROM vault_get('bi.p', NULL)".into(), "22004"),
        ("get purpose upper case", "bi_app", "SELECT * FROM vault_get('BI.P', 'x')".into(), "22023"),
        ("get external_id empty", "bi_app", "SELECT * FROM vault_get('bi.p', '')".into(), "22023"),
        ("get unknown entry", "bi_app", "SELECT * FROM vault_get('bi.p', 'missing')".into(), "P0002"),
        ("get purpose without policy", "bi_app", "SELECT * FROM vault_get('bi.none', 'x')".into(), "P0002"),
        ("head NULL purpose", "bi_app", "SELECT * FROM vault_head(NULL, 'x')".into(), "22004"),
        ("head NULL external_id", "bi_app", "SELECT * FROM vault_head('bi.p', NULL)".into(), "22004"),
        ("head purpose 300 chars", "bi_app", format!("SELECT * FROM vault_head({long300}, 'x')"), "22023"),
        ("list NULL purpose", "bi_app", "SELECT * FROM vault_list(NULL)".into(), "22004"),
        ("list purpose with space", "bi_app", "SELECT * FROM vault_list('b p')".into(), "22023"),
        ("list max_rows 0", "bi_app", "SELECT * FROM vault_list('bi.p', NULL, 0)".into(), "22023"),
        ("list max_rows negative", "bi_app", "SELECT * FROM vault_list('bi.p', max_rows => -1)".into(), "22023"),
        ("list max_rows above 10000", "bi_app", "SELECT * FROM vault_list('bi.p', NULL, 10001)".into(), "22023"),
        ("list max_rows NULL", "bi_app", "SELECT * FROM vault_list('bi.p', NULL, NULL)".into(), "22004"),
        ("access policy NULL require_identity", "bi_admin", "SELECT vault_set_access_policy('bi-q', '{vault_app}', '{@owner}', '{@owner}', NULL, NULL, NULL)".into(), "22004"),
        // vault_delete
        ("delete NULL purpose", "bi_app", "SELECT vault_delete(NULL, 'existing')".into(), "22004"),
        ("delete NULL external_id", "bi_app", "SELECT vault_delete('bi.p', NULL)".into(), "22004"),
        ("delete NULL reason", "bi_app", "SELECT vault_delete('bi.p', 'existing', NULL)".into(), "22004"),
        ("delete unknown entry", "bi_app", "SELECT vault_delete('bi.p', 'missing')".into(), "P0002"),
        ("delete purpose upper case", "bi_app", "SELECT vault_delete('BI.P', 'existing')".into(), "22023"),
        ("delete another role's entry", "bi_other", "SELECT vault_delete('bi.p', 'existing')".into(), "42501"),
        // vault_set_retention_policy
        ("retention NULL purpose", "bi_admin", "SELECT vault_set_retention_policy(NULL, 30, 7)".into(), "22004"),
        ("retention NULL max", "bi_admin", "SELECT vault_set_retention_policy('bi.q', NULL, 7)".into(), "22004"),
        ("retention NULL default", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, NULL)".into(), "22004"),
        ("retention NULL method", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, 7, NULL)".into(), "22004"),
        ("retention zero max", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 0, 7)".into(), "22023"),
        ("retention negative max", "bi_admin", "SELECT vault_set_retention_policy('bi.q', -30, 7)".into(), "22023"),
        ("retention zero default", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, 0)".into(), "22023"),
        ("retention negative default", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, -1)".into(), "22023"),
        ("retention default above maximum", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, 31)".into(), "22023"),
        ("retention unknown method", "bi_admin", "SELECT vault_set_retention_policy('bi.q', 30, 7, 'shred')".into(), "22023"),
        ("retention purpose 300 chars", "bi_admin", format!("SELECT vault_set_retention_policy({long300}, 30, 7)"), "22023"),
        ("retention purpose with right-to-left mark", "bi_admin", "SELECT vault_set_retention_policy(E'\\u200Fbi.q', 30, 7)".into(), "22023"),
        ("retention purpose with SQL", "bi_admin", "SELECT vault_set_retention_policy('q''); DELETE FROM vault.entries; --', 30, 7)".into(), "22023"),
        ("retention by an application role", "bi_app", "SELECT vault_set_retention_policy('bi.q', 30, 7)".into(), "42501"),
        // vault_set_access_policy
        ("access policy NULL name", "bi_admin", "SELECT vault_set_access_policy(NULL, '{vault_app}', '{@owner}', '{@owner}')".into(), "22004"),
        ("access policy NULL roles", "bi_admin", "SELECT vault_set_access_policy('bi-q', NULL, '{@owner}', '{@owner}')".into(), "22004"),
        ("access policy unknown role", "bi_admin", "SELECT vault_set_access_policy('bi-q', '{no_such_role}', '{@owner}', '{@owner}')".into(), "42704"),
        ("access policy zero max_retrievals", "bi_admin", "SELECT vault_set_access_policy('bi-q', '{vault_app}', '{@owner}', '{@owner}', 0)".into(), "22023"),
        ("access policy negative max_retrievals", "bi_admin", "SELECT vault_set_access_policy('bi-q', '{vault_app}', '{@owner}', '{@owner}', -5)".into(), "22023"),
        ("access policy name with space", "bi_admin", "SELECT vault_set_access_policy('bi q', '{vault_app}', '{@owner}', '{@owner}')".into(), "22023"),
        ("access policy replacing a built-in", "bi_admin", "SELECT vault_set_access_policy('owner-only', '{vault_app}', '{vault_app}', '{vault_app}')".into(), "42501"),
        ("access policy by an application role", "bi_app", "SELECT vault_set_access_policy('bi-q', '{vault_app}', '{@owner}', '{@owner}')".into(), "42501"),
        // purpose grants
        ("grant NULL purpose", "bi_admin", "SELECT vault_grant_purpose(NULL, 'bi_app')".into(), "22004"),
        ("grant unknown role", "bi_admin", "SELECT vault_grant_purpose('bi.p', 'no_such_role')".into(), "42704"),
        ("grant purpose without policy", "bi_admin", "SELECT vault_grant_purpose('bi.none', 'bi_app')".into(), "VV428"),
        ("revoke NULL role", "bi_admin", "SELECT vault_revoke_purpose('bi.p', NULL)".into(), "22004"),
        // retention operations
        ("sweep with a negative bound", "bi_admin", "SELECT vault_purge_sweep(-1)".into(), "22023"),
        ("sweep by an application role", "bi_app", "SELECT vault_purge_sweep()".into(), "42501"),
        ("verify NULL purge proof", "bi_admin", "SELECT vault_verify_purge_proof(NULL)".into(), "22004"),
        ("verify unknown purge proof", "bi_admin", "SELECT vault_verify_purge_proof(-7)".into(), "P0002"),
        // audit operations
        ("protect NULL table", "postgres", "SELECT vault_protect_table(NULL)".into(), "22004"),
        ("protect with zero chains", "postgres", "SELECT vault_protect_table('bi_plain', 0)".into(), "22023"),
        ("protect with 1000 chains", "postgres", "SELECT vault_protect_table('bi_plain', 1000)".into(), "22023"),
        ("protect a view", "postgres", "SELECT vault_protect_table('bi_view')".into(), "42809"),
        ("export NULL table", "bi_admin", "SELECT vault_export_audit(NULL)".into(), "22004"),
        ("export an unprotected table", "bi_admin", "SELECT vault_export_audit('bi_plain')".into(), "55000"),
        ("verify an unprotected table", "bi_admin", "SELECT * FROM vault_verify_audit('bi_plain')".into(), "55000"),
        ("verify by an application role", "bi_app", "SELECT * FROM vault_verify_audit()".into(), "42501"),
        // replication scope
        ("exclude NULL column", "bi_admin", "SELECT vault_sync_exclude('bi_plain', NULL)".into(), "22004"),
        ("exclude an unknown column", "bi_admin", "SELECT vault_sync_exclude('bi_plain', 'nope')".into(), "42703"),
        ("exclude by an application role", "bi_app", "SELECT vault_sync_exclude('bi_plain', 'secret')".into(), "42501"),
        // evidence
        ("compliance report by an application role", "bi_app", "SELECT vault_compliance_report()".into(), "42501"),
        ("metrics by an application role", "bi_app", "SELECT vault_metrics()".into(), "42501"),
    ]
}

#[test]
fn every_bad_input_gets_its_sqlstate_stores_nothing_and_is_logged() {
    let s = server();
    let mut su = setup(&s);
    let cases = cases();
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (what, role, sql, expected) in &cases {
        let before: String = su.query_one(STATE, &[]).unwrap().get(0);
        let last_id: i64 = su
            .query_one("SELECT coalesce(max(id), 0) FROM vault.access_log", &[])
            .unwrap()
            .get(0);
        let mut c = s.connect(role);
        let got = match c.batch_execute(sql) {
            Ok(()) => "success".to_owned(),
            Err(e) => e
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_else(|| format!("no sqlstate: {e}")),
        };
        if got != *expected {
            failures.push(format!("{what}: expected {expected}, got {got}"));
            continue;
        }
        // The backend is alive and answers.
        let alive: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(alive, 1, "{what}: backend");
        let after: String = su.query_one(STATE, &[]).unwrap().get(0);
        if before != after {
            failures.push(format!("{what}: something was stored or changed"));
        }
        // The refusal is on record with its SQLSTATE (the privilege checks of PostgreSQL itself,
        // which refuse before the vault runs, are the only exception, and none is listed here).
        let logged: i64 = su
            .query_one(
                "SELECT count(*) FROM vault.access_log WHERE id > $1 AND role_name = $2 AND NOT granted AND sqlstate = $3",
                &[&last_id, role, expected],
            )
            .unwrap()
            .get(0);
        if logged != 1 {
            failures.push(format!("{what}: {logged} access records with {expected}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn a_nul_character_is_refused_by_postgresql_before_the_vault_and_the_backend_survives() {
    let s = server();
    let _su = setup(&s);
    let mut app = s.connect("bi_app");
    // PostgreSQL text cannot hold U+0000: the server refuses the literal itself (22021 for a
    // bound parameter, a syntax error 42601 for the escape in a literal), so the vault never
    // receives it.
    let e = app
        .execute("SELECT vault_put($1, 'x', '\\x01')", &[&"bi\0p"])
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("22021"));
    let e = app
        .batch_execute("SELECT vault_put(E'bi\\u0000p', 'x', '\\x01')")
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42601"));
    // A NUL inside the opaque value is just a byte.
    let v: Vec<u8> = {
        app.execute(
            "SELECT vault_put('bi.p', 'nul-bytes', $1)",
            &[&vec![0u8, 1, 0]],
        )
        .unwrap();
        app.query_one(
            "SELECT encrypted_value FROM vault_get('bi.p', 'nul-bytes')",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(v, vec![0u8, 1, 0]);
    let alive: i32 = app.query_one("SELECT 1", &[]).unwrap().get(0);
    assert_eq!(alive, 1);
}

#[test]
fn a_misspelt_vsql_vault_setting_is_an_error_not_a_silent_placeholder() {
    let s = server();
    // common::setup makes it_a: this test runs first in a fresh cluster.
    let mut su = common::setup(&s);
    // The prefix is reserved: a typo cannot pass for turning a setting on.
    let e = su
        .batch_execute("SET vsql_vault.break_glas = on")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42602", "{e:?}");
    let e = s
        .connect("it_a")
        .batch_execute("SET vsql_vault.no_such_setting = 1")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42602", "{e:?}");
    // The real ones are unaffected.
    su.batch_execute("SET vsql_vault.break_glass = on; RESET vsql_vault.break_glass")
        .unwrap();
}
