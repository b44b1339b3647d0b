//! The security test of 0.1.0, replayed as an attacker would: unprivileged login roles trying to
//! run their own code with the vault's rights, to move a protected table away from the DDL guard,
//! or to read what they may not. Each damaging attempt runs inside a transaction that is rolled
//! back, and its effect is checked before the rollback.

mod common;

use common::*;
use postgres::Client;

/// `mallory`: a login role with nothing but the defaults (CONNECT, TEMP) and a schema of her own
/// (so that she can own permanent tables, as any application role does). Her planted function
/// `mallory.spy()` notes who runs it, and whether that role is a superuser, in `mallory.seen`,
/// then tries to make her a superuser.
fn mallory(s: &Server) -> (Client, Client) {
    let mut su = setup(s);
    su.batch_execute(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'mallory') THEN
             CREATE ROLE mallory LOGIN;
           END IF;
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'it_auditor') THEN
             CREATE ROLE it_auditor LOGIN IN ROLE vault_auditor;
           END IF;
         END $$;
         ALTER ROLE mallory NOSUPERUSER;
         SET vsql_vault.break_glass = on;
         DROP SCHEMA IF EXISTS mallory CASCADE;
         RESET vsql_vault.break_glass;
         CREATE SCHEMA mallory AUTHORIZATION mallory;",
    )
    .unwrap();
    let mut m = s.connect("mallory");
    m.batch_execute(
        "CREATE TABLE mallory.seen (who name, was_superuser bool);
         GRANT INSERT, SELECT ON mallory.seen TO PUBLIC;
         GRANT USAGE ON SCHEMA mallory TO PUBLIC;
         CREATE FUNCTION mallory.spy() RETURNS bool LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO mallory.seen
             SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user;
           BEGIN
             EXECUTE 'ALTER ROLE mallory SUPERUSER';
           EXCEPTION WHEN OTHERS THEN NULL;
           END;
           RETURN true;
         END $$;
         GRANT EXECUTE ON FUNCTION mallory.spy() TO PUBLIC;",
    )
    .unwrap();
    (su, m)
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

/// (who, was_superuser) of every run of mallory's planted function.
fn seen(c: &mut Client) -> Vec<(String, bool)> {
    c.query("SELECT who::text, was_superuser FROM mallory.seen", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[test]
fn protecting_a_table_never_runs_its_owners_code_as_superuser() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    // A CHECK constraint calling her function: re-chaining the existing rows evaluates it.
    m.batch_execute(
        "CREATE TABLE mallory.ledger (id int, note text CHECK (mallory.spy()));
         INSERT INTO mallory.ledger VALUES (1, 'a'), (2, 'b');
         TRUNCATE mallory.seen;",
    )
    .unwrap();
    m.batch_execute("BEGIN").unwrap();
    m.execute("SELECT vault_protect_table('mallory.ledger', 1)", &[])
        .unwrap();
    let runs = seen(&mut m);
    assert!(!runs.is_empty(), "the constraint was evaluated");
    assert!(
        runs.iter().all(|(who, sup)| who == "mallory" && !sup),
        "planted code ran as {runs:?}"
    );
    assert!(!is_superuser(&mut su, "mallory"));
    m.batch_execute("ROLLBACK").unwrap();
    assert!(!is_superuser(&mut su, "mallory"));
}

#[test]
fn tables_with_triggers_rules_or_policies_temp_unlogged_and_inherited_tables_are_refused() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    m.batch_execute(
        "CREATE FUNCTION mallory.on_update() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM mallory.spy(); RETURN NEW; END $$;
         CREATE TABLE mallory.with_trigger (id int);
         CREATE TRIGGER t BEFORE UPDATE ON mallory.with_trigger FOR EACH ROW EXECUTE FUNCTION mallory.on_update();
         INSERT INTO mallory.with_trigger VALUES (1);
         CREATE TABLE mallory.with_rule (id int);
         CREATE RULE r AS ON UPDATE TO mallory.with_rule DO ALSO SELECT mallory.spy();
         CREATE TABLE mallory.with_policy (id int);
         CREATE POLICY p ON mallory.with_policy USING (mallory.spy());
         CREATE TABLE mallory.parent (id int);
         CREATE TABLE mallory.child () INHERITS (mallory.parent);
         CREATE UNLOGGED TABLE mallory.unlogged (id int);
         CREATE TEMP TABLE scratch (id int);
         CREATE VIEW mallory.a_view AS SELECT 1 AS id;
         -- Chain columns of its own, of other types and already filled: a bigint taken for the
         -- bytea prev_hash would be read as a pointer by every later verification.
         CREATE TABLE mallory.prechained (id int, chain_id int, chain_seq bigint, prev_hash bigint, row_hash bigint);
         INSERT INTO mallory.prechained VALUES (1, 0, 1, 4096, 4096);
         TRUNCATE mallory.seen;",
    )
    .unwrap();
    for (table, code) in [
        ("mallory.with_trigger", "55000"),
        ("mallory.with_rule", "55000"),
        ("mallory.with_policy", "55000"),
        ("mallory.parent", "55000"),
        ("mallory.child", "55000"),
        ("mallory.unlogged", "55000"),
        ("pg_temp.scratch", "55000"),
        ("mallory.prechained", "55000"),
        ("mallory.a_view", "42809"),
    ] {
        let e = m
            .query_one(&format!("SELECT vault_protect_table('{table}')"), &[])
            .unwrap_err();
        assert_eq!(sqlstate(&e), code, "{table}: {e}");
    }
    assert!(seen(&mut m).is_empty());
    assert!(!is_superuser(&mut su, "mallory"));
    let registered: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.protected_tables WHERE table_name LIKE 'mallory.%' OR table_name LIKE 'pg_temp%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(registered, 0, "nothing half-stored");
    // Each refusal is on record with the caller's identity.
    poll("the refusals to be logged", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'protect_table' AND role_name = 'mallory' AND NOT granted",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= 9
    });
}

/// A protected table of mallory's, with a few rows.
fn mallory_ledger(m: &mut Client) {
    m.batch_execute(
        "CREATE TABLE mallory.ledger (id int, note text);
         SELECT vault_protect_table('mallory.ledger', 1);
         INSERT INTO mallory.ledger VALUES (1, 'a'), (2, 'b');",
    )
    .unwrap();
}

#[test]
fn a_protected_table_cannot_be_renamed_or_moved_under_any_keyword() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    su.batch_execute(
        "DROP SCHEMA IF EXISTS mallory_b; CREATE SCHEMA mallory_b AUTHORIZATION mallory;",
    )
    .unwrap();
    mallory_ledger(&mut m);
    m.batch_execute("CREATE TABLE mallory.other (id int)")
        .unwrap();
    m.batch_execute("CREATE TABLE mallory.pp (LIKE mallory.ledger) PARTITION BY LIST (id);")
        .unwrap();
    // Every form PostgreSQL 15 accepts on a table (docs/security.md, the DDL guard).
    for sql in [
        "ALTER TABLE mallory.ledger RENAME TO ledger2",
        "ALTER INDEX mallory.ledger RENAME TO ledger2",
        "ALTER INDEX IF EXISTS mallory.ledger RENAME TO ledger2",
        "ALTER TABLE mallory.ledger RENAME COLUMN note TO memo",
        "ALTER VIEW mallory.ledger RENAME COLUMN note TO memo",
        "ALTER MATERIALIZED VIEW mallory.ledger RENAME COLUMN note TO memo",
        "ALTER FOREIGN TABLE mallory.ledger RENAME COLUMN note TO memo",
        "ALTER TYPE mallory.ledger RENAME ATTRIBUTE note TO memo",
        "ALTER TABLE mallory.ledger SET SCHEMA mallory_b",
        "ALTER TABLE mallory.ledger DISABLE TRIGGER ALL",
        "ALTER TABLE mallory.ledger DISABLE TRIGGER vault_append_only",
        "ALTER TABLE mallory.ledger ADD COLUMN z int",
        "ALTER TABLE mallory.ledger INHERIT mallory.other",
        "CREATE TABLE mallory.heir () INHERITS (mallory.ledger)",
        "ALTER TABLE mallory.pp ATTACH PARTITION mallory.ledger DEFAULT",
        "ALTER TRIGGER vault_append_only ON mallory.ledger RENAME TO x",
        "DROP TRIGGER vault_append_only ON mallory.ledger",
        "DROP TABLE mallory.ledger",
        "DROP SCHEMA mallory CASCADE",
    ] {
        m.batch_execute("BEGIN").unwrap();
        let r = m.batch_execute(sql);
        m.batch_execute("ROLLBACK").unwrap();
        let e = r.expect_err(sql);
        assert_eq!(sqlstate(&e), "VV403", "{sql}: {e}");
    }
    // Renaming the schema takes CREATE on the database, which mallory lacks; the guard refuses
    // it for anyone.
    let e = su
        .batch_execute("ALTER SCHEMA mallory RENAME TO mallory2")
        .unwrap_err();
    assert_eq!(sqlstate(&e), "VV403", "{e}");
    // Forms PostgreSQL itself refuses on a table (wrong object type), guard or not.
    for sql in [
        "ALTER SEQUENCE mallory.ledger RENAME TO ledger2",
        "ALTER VIEW mallory.ledger RENAME TO ledger2",
        "ALTER VIEW mallory.ledger SET SCHEMA mallory_b",
        "ALTER SEQUENCE mallory.ledger SET SCHEMA mallory_b",
        "ALTER TYPE mallory.ledger RENAME TO ledger2",
    ] {
        let e = m.batch_execute(sql).expect_err(sql);
        assert!(
            ["42809", "VV403"].contains(&sqlstate(&e).as_str()),
            "{sql}: {e}"
        );
    }
    // Still in place, append-only and intact.
    let e = m.batch_execute("DELETE FROM mallory.ledger").unwrap_err();
    assert_eq!(sqlstate(&e), "VV403");
}

#[test]
fn chained_inserts_never_run_look_alike_operators_of_the_callers_search_path() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    mallory_ledger(&mut m);
    // Look-alikes of the comparisons the chain's queries make, in a schema mallory puts before
    // pg_catalog: the chain trigger has no SET clause of its own (it runs per row), so its
    // queries, the first of each statement and the head written back at commit, must pin the
    // path themselves.
    let mut plant = String::new();
    for ty in ["oid", "int4", "int8", "text", "name", "bytea", "regclass"] {
        plant.push_str(&format!(
            "CREATE FUNCTION mallory.eq_{ty}(a {ty}, b {ty}) RETURNS bool LANGUAGE sql
               AS 'SELECT mallory.spy() AND a OPERATOR(pg_catalog.=) b';
             CREATE OPERATOR mallory.= (LEFTARG = {ty}, RIGHTARG = {ty}, FUNCTION = mallory.eq_{ty});"
        ));
    }
    m.batch_execute(&plant).unwrap();
    m.batch_execute(
        "SET search_path = mallory, pg_catalog, public;
         BEGIN;
         INSERT INTO mallory.ledger VALUES (3, 'c');
         INSERT INTO mallory.ledger SELECT g, 'd' FROM generate_series(4, 40) g;
         SAVEPOINT s;
         INSERT INTO mallory.ledger VALUES (41, 'e');
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO mallory.ledger VALUES (42, 'f');
         COMMIT;
         INSERT INTO mallory.ledger VALUES (43, 'g');
         RESET search_path;",
    )
    .unwrap();
    assert!(
        seen(&mut m).is_empty(),
        "a chained insert ran mallory's operator"
    );
    // The planted operators work where they are meant to be used: the test would prove nothing
    // otherwise.
    let used: bool = m
        .query_one("SELECT 1::int4 OPERATOR(mallory.=) 1::int4", &[])
        .unwrap()
        .get(0);
    assert!(used);
    assert_eq!(
        seen(&mut m).len(),
        1,
        "the look-alike operator runs when called"
    );
    let verdict = su
        .query_one(
            "SELECT ok, rows_checked FROM vault_verify_audit('mallory.ledger')",
            &[],
        )
        .unwrap();
    assert!(verdict.get::<_, bool>(0));
    assert_eq!(verdict.get::<_, i64>(1), 2 + 1 + 37 + 1 + 1);
    assert!(!is_superuser(&mut su, "mallory"));
}

#[test]
fn verification_goes_by_oid_and_never_runs_what_took_a_tables_name() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    mallory_ledger(&mut m);
    // A superuser renames the table under break-glass (recorded); a view calling mallory's
    // function takes its old name. Verification must still read the table itself.
    su.batch_execute(
        "SET vsql_vault.break_glass = on;
         ALTER TABLE mallory.ledger RENAME TO ledger_moved;
         RESET vsql_vault.break_glass;",
    )
    .unwrap();
    m.batch_execute(
        "CREATE VIEW mallory.ledger AS SELECT 1 AS id WHERE mallory.spy();
         TRUNCATE mallory.seen;",
    )
    .unwrap();
    let mut auditor = s.connect("it_auditor");
    let rows = auditor
        .query(
            "SELECT table_name, ok, rows_checked FROM vault_verify_audit('mallory.ledger_moved')",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].get::<_, bool>(1), "{:?}", rows[0]);
    assert_eq!(rows[0].get::<_, i64>(2), 2);
    let all = auditor
        .query("SELECT ok FROM vault_verify_audit()", &[])
        .unwrap();
    assert!(!all.is_empty());
    assert!(seen(&mut m).is_empty(), "verification ran mallory's view");
    assert!(!is_superuser(&mut su, "mallory"));
}

#[test]
fn a_table_name_with_dots_protects_that_table_and_nothing_else() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    m.batch_execute(
        "CREATE TABLE mallory.\"vault.entries\" (id int);
         SELECT vault_protect_table('mallory.\"vault.entries\"', 1);
         INSERT INTO mallory.\"vault.entries\" VALUES (1);",
    )
    .unwrap();
    let on_entries: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'vault.entries'::regclass AND tgname LIKE 'vault_%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(on_entries, 0, "triggers landed on vault.entries");
    let on_own: i64 = su
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'mallory.\"vault.entries\"'::regclass AND tgname = 'vault_append_only'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(on_own, 1);
    let ok: bool = su
        .query_one(
            "SELECT bool_and(ok) FROM vault_verify_audit('mallory.\"vault.entries\"')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok);
}

#[test]
fn exporting_a_protected_table_takes_select_on_it() {
    let s = server();
    let (_su, mut m) = mallory(&s);
    mallory_ledger(&mut m);
    let mut auditor = s.connect("it_auditor");
    let e = auditor
        .query("SELECT vault_export_audit('mallory.ledger')", &[])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    // Verification needs no SELECT: it reports chains, not rows.
    let ok: bool = auditor
        .query_one(
            "SELECT bool_and(ok) FROM vault_verify_audit('mallory.ledger')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(ok);
    m.batch_execute("GRANT SELECT ON mallory.ledger TO it_auditor")
        .unwrap();
    let lines = auditor
        .query("SELECT vault_export_audit('mallory.ledger')", &[])
        .unwrap();
    assert_eq!(lines.len(), 2);
}

#[test]
fn a_lock_held_on_a_protected_table_does_not_hang_verification_and_the_verdict_is_recorded() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    mallory_ledger(&mut m);
    m.batch_execute("BEGIN; LOCK TABLE mallory.ledger IN ACCESS EXCLUSIVE MODE;")
        .unwrap();
    // The setting is superuser-only, like every vsql_vault setting.
    su.batch_execute("ALTER ROLE it_auditor SET vsql_vault.verify_lock_timeout = 100")
        .unwrap();
    let mut auditor = s.connect("it_auditor");
    su.batch_execute("ALTER ROLE it_auditor RESET vsql_vault.verify_lock_timeout")
        .unwrap();
    auditor
        .batch_execute("SET statement_timeout = '60s'")
        .unwrap();
    let rows = auditor
        .query(
            "SELECT table_name, ok, detail FROM vault_verify_audit()",
            &[],
        )
        .unwrap();
    m.batch_execute("ROLLBACK").unwrap();
    let ledger: Vec<_> = rows
        .iter()
        .filter(|r| r.get::<_, String>(0).starts_with("mallory.ledger/"))
        .collect();
    assert_eq!(ledger.len(), 1, "{rows:?}");
    assert!(!ledger[0].get::<_, bool>(1));
    assert!(
        ledger[0].get::<_, String>(2).contains("not verified"),
        "{:?}",
        ledger[0]
    );
    // Other tables were verified all the same.
    assert!(rows.len() > 1);
    let recorded: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'verify_audit' AND role_name = 'it_auditor'
               AND granted AND NOT (details->>'ok')::bool",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(recorded >= 1);
}

#[test]
fn the_vaults_tables_belong_to_a_role_that_cannot_escalate() {
    let s = server();
    let (mut su, _m) = mallory(&s);
    // Every table, view and sequence of the extension, and each of its SECURITY DEFINER helpers,
    // belongs to vault_owner: that is whom the API switches to for its own queries.
    let not_owned: Vec<String> = su
        .query(
            "SELECT c.oid::regclass::text || ' ' || c.relowner::regrole FROM pg_class c
               JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
              WHERE c.relkind IN ('r', 'S', 'v') AND c.relowner <> 'vault_owner'::regrole
             UNION ALL
             SELECT p.oid::regprocedure::text || ' ' || p.proowner::regrole FROM pg_proc p
               JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'vsql_vault'
              WHERE p.prosecdef AND p.proowner <> 'vault_owner'::regrole",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(not_owned.is_empty(), "{not_owned:?}");
    let attributes: bool = su
        .query_one(
            "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolcanlogin OR rolbypassrls OR rolreplication
               FROM pg_roles WHERE rolname = 'vault_owner'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!attributes);
    // Code that ever ran as vault_owner could do no more than this, tried for real.
    for sql in [
        "ALTER ROLE mallory SUPERUSER",
        "CREATE ROLE it_escalated",
        "SELECT * FROM mallory.ledger_private",
        "COPY (SELECT 1) TO PROGRAM 'true'",
        "SELECT pg_read_file('postgresql.conf')",
        "SET vsql_vault.break_glass = on",
    ] {
        su.batch_execute(
            "BEGIN; CREATE TABLE IF NOT EXISTS mallory.ledger_private (secret text); SET LOCAL ROLE vault_owner;",
        )
        .unwrap();
        let r = su.batch_execute(sql);
        su.batch_execute("ROLLBACK").unwrap();
        let e = r.expect_err(sql);
        assert_eq!(sqlstate(&e), "42501", "{sql}: {e}");
    }
    assert!(!is_superuser(&mut su, "mallory"));
}

#[test]
fn an_outsider_learns_nothing_of_what_exists_and_members_never_see_policy_names() {
    let s = server();
    let (_su, mut m) = mallory(&s);
    let mut a = s.connect("it_a");
    put(&mut a, "att-secret", b"\x01\x02").unwrap();
    // mallory has no vault role: every call is 42501, existing entry or not.
    for id in ["att-secret", "att-never-stored"] {
        for sql in [
            "SELECT * FROM vault_get('it.card', $1)",
            "SELECT * FROM vault_head('it.card', $1)",
            "SELECT vault_delete('it.card', $1)",
        ] {
            let e = m.query(sql, &[&id]).unwrap_err();
            assert_eq!(sqlstate(&e), "42501", "{sql} {id}: {e}");
        }
    }
    // A member learns that another role's entry exists (403 against 404, documented), but not
    // the name of the policy that keeps it out.
    let mut b = s.connect("it_b");
    let e = get(&mut b, "att-secret").unwrap_err();
    assert_eq!(sqlstate(&e), "42501");
    let text = e.as_db_error().unwrap().message().to_owned();
    assert!(!text.contains("owner-only"), "{text}");
    let e = get(&mut b, "att-never-stored").unwrap_err();
    assert_eq!(sqlstate(&e), "P0002");
}

#[test]
fn control_characters_of_a_refused_call_never_reach_the_log_raw() {
    let s = server();
    let (mut su, _m) = mallory(&s);
    let mut a = s.connect("it_a");
    let forged = "x\n 2026-01-01 | auditor | get | t\x1b[2J";
    let e = get(&mut a, forged).unwrap_err();
    assert_eq!(sqlstate(&e), "22023");
    poll("the refusal to be logged", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE role_name = 'it_a' AND starts_with(external_id, $1)",
            &[&"x\\u{000a} 2026"],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= 1
    });
    let raw: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log
              WHERE coalesce(external_id, '') ~ '[[:cntrl:]]' OR coalesce(reason, '') ~ '[[:cntrl:]]'
                 OR coalesce(purpose, '') ~ '[[:cntrl:]]' OR coalesce(application_name, '') ~ '[[:cntrl:]]'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(raw, 0);
}

#[test]
fn a_put_waiting_on_another_tenants_open_transaction_gives_up_with_a_record() {
    let s = server();
    let (mut su, _m) = mallory(&s);
    let mut b = s.connect("it_b");
    su.batch_execute("ALTER ROLE it_a SET vsql_vault.put_lock_timeout = 200")
        .unwrap();
    let mut a = s.connect("it_a");
    su.batch_execute("ALTER ROLE it_a RESET vsql_vault.put_lock_timeout")
        .unwrap();
    let id = format!(
        "att-squat-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    // it_b takes the id in a transaction it leaves open.
    b.batch_execute("BEGIN").unwrap();
    put(&mut b, &id, b"\x01").unwrap();
    let e = put(&mut a, &id, b"\x02").unwrap_err();
    assert_eq!(sqlstate(&e), "55P03", "{e}");
    poll("the refusal to be logged", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE role_name = 'it_a' AND operation = 'put'
               AND external_id = $1 AND NOT granted AND sqlstate = '55P03'",
            &[&id],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
    // The caller's own setting of lock_timeout is untouched, and once it_b gives the id up, it
    // is free.
    let lock_timeout: String = a.query_one("SHOW lock_timeout", &[]).unwrap().get(0);
    assert_eq!(lock_timeout, "0");
    b.batch_execute("ROLLBACK").unwrap();
    put(&mut a, &id, b"\x02").unwrap();
}

#[test]
fn a_policy_change_is_recorded_whole_however_long_its_details() {
    let s = server();
    let (mut su, _m) = mallory(&s);
    let mut admin = s.connect("it_admin");
    // 1,000 two-byte characters: longer than a queue slot's details field.
    let description = "é".repeat(1000);
    admin
        .execute(
            "SELECT vault_set_access_policy('att-long', '{@owner}', '{@owner,it_b}', '{@owner}', NULL, $1)",
            &[&description],
        )
        .unwrap();
    poll("the policy change to be logged whole", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log
              WHERE operation = 'set_access_policy' AND granted AND details->>'name' = 'att-long'
                AND details->>'description' = $1 AND details->'retrieve_roles' ? 'it_b'",
            &[&description],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= 1
    });
    // A refused change with a 100 KB description: refused, and its record keeps it all.
    let huge = "x".repeat(100_000);
    let e = admin
        .execute(
            "SELECT vault_set_access_policy('att-huge', '{@owner}', '{@owner}', '{@owner}', NULL, $1)",
            &[&huge],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "22023", "{e}");
    poll("the refusal to be logged whole", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log
              WHERE operation = 'set_access_policy' AND NOT granted AND details->>'name' = 'att-huge'
                AND length(details->>'description') = 100000",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
    // A change whose record could not be kept whole is not made: 20,000 roles (160 KB of
    // details, past the 128 KiB a record carries) are refused with 54000, on record.
    let e = admin
        .execute(
            "SELECT vault_set_access_policy('att-vast', '{@owner}', array_fill('@owner'::name, ARRAY[20000]), '{@owner}')",
            &[],
        )
        .unwrap_err();
    assert_eq!(sqlstate(&e), "54000", "{e}");
    let stored: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_policies WHERE name = 'att-vast'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored, 0, "nothing half-stored");
    poll("the oversized change's refusal to be logged", 100, || {
        su.query_one(
            "SELECT count(*) FROM vault.access_log
              WHERE operation = 'set_access_policy' AND NOT granted AND sqlstate = '54000'
                AND details->>'name' = 'att-vast' AND (details->'retrieve_roles'->>'count')::int = 20000",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
}

#[test]
fn a_registration_whose_table_is_gone_is_forgotten_only_by_an_admin_and_on_record() {
    let s = server();
    let (mut su, mut m) = mallory(&s);
    mallory_ledger(&mut m);
    let identity: String = su
        .query_one(
            "SELECT identity FROM vault.protected_tables WHERE relid = 'mallory.ledger'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    let mut admin = s.connect("it_admin");
    // While the table is there, nobody forgets it.
    let e = admin
        .execute("SELECT vault_forget_missing_table($1)", &[&identity])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "55000", "{e}");
    // A superuser drops it with the event triggers off: the guard never sees it.
    su.batch_execute(
        "ALTER EVENT TRIGGER vault_guard_drop DISABLE;
         DROP TABLE mallory.ledger;
         ALTER EVENT TRIGGER vault_guard_drop ENABLE ALWAYS;",
    )
    .unwrap();
    let missing = |su: &mut Client| -> i64 {
        su.query_one(
            "SELECT count(*) FROM vault_verify_audit() WHERE table_name = $1 AND NOT ok",
            &[&identity],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(missing(&mut su), 1);
    let e = m
        .execute("SELECT vault_forget_missing_table($1)", &[&identity])
        .unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
    admin
        .execute("SELECT vault_forget_missing_table($1)", &[&identity])
        .unwrap();
    assert_eq!(missing(&mut su), 0);
    let recorded: i64 = su
        .query_one(
            "SELECT count(*) FROM vault.access_log WHERE operation = 'forget_missing_table' AND granted
               AND details->>'identity' = $1 AND jsonb_array_length(details->'heads') = 1",
            &[&identity],
        )
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);
}

/// Starts the shared server again with `env` set for the postmaster.
fn restart_with_env(s: &Server, env: &[&str]) {
    s.pg_ctl(&["stop", "-m", "fast"]);
    let data = format!("{}/data", s.dir);
    let log = format!("{}/server.log", s.dir);
    let pg_ctl = &common::pg_program("pg_ctl");
    let mut args = vec!["-u", "postgres", "--", "env"];
    args.extend_from_slice(env);
    args.extend_from_slice(&[pg_ctl, "-D", &data, "-w", "-t", "60", "-l", &log, "start"]);
    let status = std::process::Command::new("runuser")
        .env_remove("RUST_BACKTRACE")
        .args(&args)
        .status()
        .unwrap();
    assert!(status.success());
    s.wait_for_writer(&s.db);
}

#[test]
fn rust_backtraces_never_reach_a_client_even_when_the_server_asks_for_them() {
    let s = server();
    restart_with_env(&s, &["RUST_BACKTRACE=full"]);
    let mut su = s.connect("postgres");
    // An error raised from Rust code (pgrx reports those through a panic).
    let e = su
        .query_one("SELECT vault.protect_builtin(0, 1)", &[])
        .unwrap_err();
    drop(su);
    restart_with_env(&s, &[]);
    let db = e.as_db_error().expect("a server error");
    assert!(
        db.message().contains("protecting a built-in table failed"),
        "{e}"
    );
    let detail = db.detail().unwrap_or_default();
    assert!(
        !detail.contains(".rs:") && !detail.contains("backtrace"),
        "{detail}"
    );
}

#[test]
fn a_get_cancelled_before_its_data_is_returned_does_not_use_up_max_retrievals() {
    let s = server();
    let (mut su, _m) = mallory(&s);
    let mut admin = s.connect("it_admin");
    admin
        .execute(
            "SELECT vault_set_access_policy('att-once', '{@owner}', '{@owner}', '{@owner}', 1)",
            &[],
        )
        .unwrap();
    let mut a = s.connect("it_a");
    let id = format!(
        "att-once-{}",
        su.query_one("SELECT txid_current()", &[])
            .unwrap()
            .get::<_, i64>(0)
    );
    a.execute(
        "SELECT vault_put('it.card', $1, '\\x01', access_policy => 'att-once')",
        &[&id],
    )
    .unwrap();
    // The writer is held up (a lock on the log, shorter than its lock timeout) while the caller's
    // statement_timeout cancels the get: it authorised the read but returned nothing.
    let mut holder = s.connect("postgres");
    holder
        .batch_execute("BEGIN; LOCK TABLE vault.access_log IN SHARE MODE;")
        .unwrap();
    a.batch_execute("SET statement_timeout = '300ms'").unwrap();
    let e = get(&mut a, &id).unwrap_err();
    assert_eq!(sqlstate(&e), "57014", "{e}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    holder.batch_execute("COMMIT").unwrap();
    a.batch_execute("RESET statement_timeout").unwrap();
    poll(
        "the cancelled get to be recorded as not returned",
        100,
        || {
            su.query_one(
            "SELECT count(*) FROM vault.access_log WHERE external_id = $1
               AND ((operation = 'get' AND details->>'returned' = 'false') OR operation = 'get_not_returned')",
            &[&id],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
        },
    );
    // The one retrieval the policy allows is still there, and then it is used up.
    assert_eq!(get(&mut a, &id).unwrap(), b"\x01");
    let e = get(&mut a, &id).unwrap_err();
    assert_eq!(sqlstate(&e), "42501", "{e}");
}
