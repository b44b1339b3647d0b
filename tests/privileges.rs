//! The privilege matrix: who can select, insert, update, delete and truncate each vault table,
//! execute each function and change each setting — tried for real, not read from the catalog —
//! plus the search_path attack on every SECURITY DEFINER function and the key file through SQL.

mod common;

use common::{server, sqlstate, Server};
use postgres::Client;
use std::collections::BTreeMap;

const ROLES: [&str; 5] = ["pm_public", "pm_app", "pm_auditor", "pm_admin", "postgres"];

fn setup(s: &Server) -> Client {
    let mut su = s.connect("postgres");
    su.batch_execute("CREATE EXTENSION IF NOT EXISTS vsql_vault")
        .unwrap();
    common::login_roles(
        &mut su,
        &[
            ("pm_public", None),
            ("pm_app", Some("vault_app")),
            ("pm_auditor", Some("vault_auditor")),
            ("pm_admin", Some("vault_admin")),
        ],
    );
    su
}

/// What happened to one attempt.
fn outcome(c: &mut Client, sql: &str) -> &'static str {
    c.batch_execute("BEGIN").unwrap();
    let r = c.batch_execute(sql);
    c.batch_execute("ROLLBACK").unwrap();
    match r {
        Ok(()) => "allowed",
        Err(e) => match e.code().map(|c| c.code()) {
            Some("42501") => "denied",
            Some("VV403") => "refused (append-only)",
            // Reached the table and failed on its constraints: the privilege was there.
            Some(_) => "allowed",
            None => panic!("{sql}: {e}"),
        },
    }
}

#[test]
fn table_privileges_match_the_documented_matrix() {
    let s = server();
    let mut su = setup(&s);
    let tables: Vec<String> = su
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'vault' AND c.relkind = 'r' ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Readable by auditors and admins (entries: metadata columns only, never the blob).
    let evidence = [
        "access_daily",
        "access_log",
        "access_policies",
        "audit_checkpoints",
        "chain_heads",
        "entries",
        "key_directives",
        "protected_tables",
        "purge_log",
        "purpose_grants",
        "retention_policies",
        "signing_keys",
        "sweep_runs",
        "sync_exclusions",
        "sync_published",
    ];
    assert_eq!(
        tables,
        evidence.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "a vault table without a decision in this matrix"
    );
    let append_only = [
        "access_log",
        "audit_checkpoints",
        "key_directives",
        "purge_log",
        "signing_keys",
    ];
    let mut clients: BTreeMap<&str, Client> = ROLES.iter().map(|r| (*r, s.connect(r))).collect();
    let mut wrong = Vec::new();
    for t in &tables {
        let first_col: String = su
            .query_one(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = ('vault.' || $1)::regclass AND attnum = 1",
                &[t],
            )
            .unwrap()
            .get(0);
        let attempts = [
            ("select", format!("SELECT * FROM vault.{t} LIMIT 0")),
            ("insert", format!("INSERT INTO vault.{t} DEFAULT VALUES")),
            (
                "update",
                format!("UPDATE vault.{t} SET {first_col} = {first_col} WHERE false"),
            ),
            ("delete", format!("DELETE FROM vault.{t} WHERE false")),
            ("truncate", format!("TRUNCATE vault.{t}")),
        ];
        for role in ROLES {
            for (op, sql) in &attempts {
                let expected = match (role, *op) {
                    ("postgres", "truncate") if append_only.contains(&t.as_str()) => {
                        "refused (append-only)"
                    }
                    // Evidence rows come from the vault's own code paths only.
                    ("postgres", "insert") if append_only.contains(&t.as_str()) => "denied",
                    ("postgres", _) => "allowed",
                    ("pm_auditor" | "pm_admin", "select") if t == "entries" => "denied",
                    ("pm_auditor" | "pm_admin", "select") => "allowed",
                    _ => "denied",
                };
                let got = outcome(clients.get_mut(role).unwrap(), sql);
                if got != expected {
                    wrong.push(format!(
                        "{role} {op} vault.{t}: expected {expected}, got {got}"
                    ));
                }
            }
        }
        if t == "entries" {
            for role in ["pm_auditor", "pm_admin"] {
                let got = outcome(
                    clients.get_mut(role).unwrap(),
                    "SELECT id, purpose, external_id, key_ref, metadata, owner, expires_at FROM vault.entries LIMIT 0",
                );
                if got != "allowed" {
                    wrong.push(format!("{role} cannot read the entries' metadata"));
                }
                let got = outcome(
                    clients.get_mut(role).unwrap(),
                    "SELECT encrypted_value FROM vault.entries LIMIT 0",
                );
                if got != "denied" {
                    wrong.push(format!("{role} can read encrypted_value directly"));
                }
            }
        }
    }
    // The auditor views: auditors and admins only.
    for view in [
        "retention_compliance",
        "access_summary",
        "access_denials",
        "purge_evidence",
        "key_inventory",
        "audit_integrity",
    ] {
        for role in ROLES {
            let expected = match role {
                "pm_auditor" | "pm_admin" | "postgres" => "allowed",
                _ => "denied",
            };
            let got = outcome(
                clients.get_mut(role).unwrap(),
                &format!("SELECT * FROM vault.{view}"),
            );
            if got != expected {
                wrong.push(format!(
                    "{role} select vault.{view}: expected {expected}, got {got}"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn functions_are_executable_exactly_as_documented_and_refusals_inside_are_logged() {
    let s = server();
    let mut su = setup(&s);
    // Internal helpers closed to everyone but the owner; the KEK-id list for the key inventory.
    let closed = [
        "vault.forget_table(oid)",
        "vault.protect_builtin(oid,integer)",
        "vault.role_allowed(name[],oid,name,text)",
        "vault.sync_exclusions_names()",
    ];
    let rows = su
        .query(
            "SELECT p.oid::regprocedure::text,
                    has_function_privilege('pm_public', p.oid, 'EXECUTE'),
                    has_function_privilege('pm_auditor', p.oid, 'EXECUTE')
               FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'",
            &[],
        )
        .unwrap();
    assert!(rows.len() > 40);
    let mut wrong = Vec::new();
    for r in &rows {
        let (f, public, auditor): (String, bool, bool) = (r.get(0), r.get(1), r.get(2));
        let (want_public, want_auditor) = if closed.contains(&f.as_str()) {
            (false, false)
        } else if f == "vault.replication_kek_ids()" {
            (false, true)
        } else if f == "vault.accept_forwarded_record(text,text)" {
            // A hot standby's records: vault_forwarder only (checked below).
            (false, false)
        } else {
            // Open to call; each checks roles and policies inside and logs refusals.
            (true, true)
        };
        if (public, auditor) != (want_public, want_auditor) {
            wrong.push(format!(
                "{f}: PUBLIC {public} auditor {auditor}, expected {want_public} {want_auditor}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let forwarder: bool = su
        .query_one(
            "SELECT has_function_privilege('vault_forwarder',
                 'vault.accept_forwarded_record(text,text)', 'EXECUTE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        forwarder,
        "vault_forwarder executes vault.accept_forwarded_record"
    );
    // The internal functions answer only the API's own SQL functions: called directly, by anyone
    // (a superuser too), they are refused with 42501, do nothing, and the attempt is recorded.
    let mut public = s.connect("pm_public");
    let direct = "SELECT sqlstate FROM vault.set_retention_policy_impl('pm.direct', 30, 7, 'physical-delete', true, NULL)";
    for c in [&mut public, &mut su] {
        let e = c.query_one(direct, &[]).unwrap_err();
        assert_eq!(sqlstate(&e), "42501", "{e}");
        let message = e.as_db_error().map(|d| d.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("call the vault_* function")),
            "{message:?}"
        );
    }
    let stored: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.retention_policies WHERE purpose = 'pm.direct'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "a direct call changed nothing");
    let recorded: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'set_retention_policy'
               AND purpose = 'pm.direct' AND NOT granted AND sqlstate = '42501'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(recorded, 2, "both direct calls are in the access log");
    // Through the API the same call works for an administrator.
    su.batch_execute("SELECT vault_set_retention_policy('pm.direct', 30, 7)")
        .unwrap();
    let e = public
        .query_one(
            "SELECT vault.role_allowed('{@owner}', 10, 'postgres', 'x')",
            &[],
        )
        .unwrap_err();
    assert_eq!(e.code().map(|c| c.code()), Some("42501"));
}

#[test]
fn no_setting_can_be_changed_by_a_non_superuser() {
    let s = server();
    let mut su = setup(&s);
    let settings: Vec<(String, String, String)> = su
        .query(
            "SELECT name, context, setting FROM pg_settings WHERE name LIKE 'vsql\\_vault.%' ORDER BY name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert!(settings.len() >= 12);
    // The one exception, by design: the application states whom it acts for
    // (vsql_vault.on_behalf_of), a statement recorded beside the role; it never lets a role do
    // more than its own rights allow.
    assert!(settings
        .iter()
        .any(|(name, context, _)| name == "vsql_vault.on_behalf_of" && context == "user"));
    for (name, context, value) in settings
        .iter()
        .filter(|(name, _, _)| name != "vsql_vault.on_behalf_of")
    {
        assert!(
            context == "superuser" || context == "sighup" || context == "postmaster",
            "{name} is {context}"
        );
        for role in ["pm_public", "pm_app", "pm_auditor", "pm_admin"] {
            let mut c = s.connect(role);
            let set = c.batch_execute(&format!("SET {name} = '{}'", value.replace('\'', "''")));
            let code = set
                .as_ref()
                .err()
                .and_then(|e| e.code())
                .map(|c| c.code().to_owned());
            assert!(
                matches!(code.as_deref(), Some("42501") | Some("55P02")),
                "{role} SET {name}: {code:?}"
            );
            let alter = c.batch_execute(&format!(
                "ALTER SYSTEM SET {name} = '{}'",
                value.replace('\'', "''")
            ));
            assert_eq!(
                alter.unwrap_err().code().map(|c| c.code()),
                Some("42501"),
                "{role} ALTER SYSTEM SET {name}"
            );
            let role_level = c.batch_execute(&format!(
                "ALTER ROLE {role} SET {name} = '{}'",
                value.replace('\'', "''")
            ));
            assert!(role_level.is_err(), "{role} ALTER ROLE SET {name}");
        }
    }
    // The superuser can (break-glass is the one governance switch, and it is recorded).
    su.batch_execute("SET vsql_vault.break_glass = on; RESET vsql_vault.break_glass")
        .unwrap();
}

#[test]
fn security_definer_functions_resist_a_search_path_attack() {
    let s = server();
    let mut su = setup(&s);
    // Every SECURITY DEFINER function of the extension pins its search_path.
    let loose: Vec<String> = su
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
              WHERE p.prosecdef
                AND NOT coalesce(p.proconfig @> '{\"search_path=pg_catalog, pg_temp\"}', false)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        loose.is_empty(),
        "SECURITY DEFINER without a pinned search_path: {loose:?}"
    );
    let definers: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
              WHERE p.prosecdef",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(definers >= 3);
    // And for real: an ordinary role plants look-alikes of what those functions use (=, the
    // text and oid comparisons, to_regclass, EXISTS's helpers) in a schema it puts first, then
    // runs DDL that makes the event triggers call them.
    su.batch_execute(
        "DROP SCHEMA IF EXISTS pm_evil CASCADE;
         CREATE SCHEMA pm_evil AUTHORIZATION pm_public;
         CREATE TABLE IF NOT EXISTS pm_hits (who text);
         GRANT INSERT ON pm_hits TO pm_public;",
    )
    .unwrap();
    let mut evil = s.connect("pm_public");
    evil.batch_execute(
        "CREATE FUNCTION pm_evil.eq(text, text) RETURNS bool LANGUAGE sql AS
             $$ INSERT INTO public.pm_hits VALUES (current_user) RETURNING true $$;
         CREATE OPERATOR pm_evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pm_evil.eq);
         CREATE FUNCTION pm_evil.oideq(oid, oid) RETURNS bool LANGUAGE sql AS
             $$ INSERT INTO public.pm_hits VALUES (current_user) RETURNING true $$;
         CREATE OPERATOR pm_evil.= (LEFTARG = oid, RIGHTARG = oid, FUNCTION = pm_evil.oideq);
         CREATE FUNCTION pm_evil.to_regclass(text) RETURNS regclass LANGUAGE sql AS
             $$ INSERT INTO public.pm_hits VALUES (current_user) RETURNING 'pg_class'::regclass $$;
         SET search_path = pm_evil, pg_catalog, public;
         CREATE TABLE pm_evil.t (id int);
         ALTER TABLE pm_evil.t ADD COLUMN x int;
         ALTER TABLE pm_evil.t RENAME TO t2;
         DROP TABLE pm_evil.t2;",
    )
    .unwrap();
    let hits: i64 = su
        .query_one("SELECT count(*) FROM pm_hits", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        hits, 0,
        "a planted look-alike ran inside the vault's functions"
    );
    su.batch_execute("DROP SCHEMA pm_evil CASCADE; DROP TABLE pm_hits")
        .unwrap();
}

#[test]
fn only_a_superuser_can_read_the_signing_key_file_through_sql() {
    let s = server();
    let mut su = setup(&s);
    su.execute("SELECT vault_checkpoint()", &[]).unwrap();
    let key_file = "vsql_vault_signing.key";
    let full: String = su
        .query_one(
            "SELECT current_setting('data_directory') || '/' || $1",
            &[&key_file],
        )
        .unwrap()
        .get(0);
    assert!(
        std::path::Path::new(&full).exists(),
        "the generated key file {full}"
    );
    for role in ["pm_public", "pm_app", "pm_auditor", "pm_admin"] {
        let mut c = s.connect(role);
        for sql in [
            format!("SELECT pg_read_file('{key_file}')"),
            format!("SELECT pg_read_binary_file('{full}')"),
            "CREATE TEMP TABLE k (t text)".to_owned() + &format!("; COPY k FROM '{full}'"),
            format!("SELECT lo_import('{full}')"),
            format!("SELECT * FROM pg_stat_file('{full}')"),
        ] {
            let e = c.batch_execute(&sql).unwrap_err();
            assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{role}: {sql}");
            let _ = c.batch_execute("ROLLBACK");
        }
        // The key is in no SQL-readable column either.
        let leaked: i64 = su
            .query_one(
                "SELECT count(*) FROM vault.signing_keys WHERE public_key = pg_read_file($1)",
                &[&key_file],
            )
            .unwrap()
            .get(0);
        assert_eq!(leaked, 0);
    }
    // The superuser can: the threat model says so (docs/security.md).
    let contents: String = su
        .query_one("SELECT pg_read_file($1)", &[&key_file])
        .unwrap()
        .get(0);
    assert!(!contents.trim().is_empty());
}
