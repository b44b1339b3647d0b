-- The extension, its group roles and the login roles every golden test uses.
CREATE EXTENSION vsql_vault;
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname LIKE 'vault\_%' ORDER BY 1;
SELECT tablename FROM pg_tables WHERE schemaname = 'vault' ORDER BY 1;
SELECT name, store_roles, retrieve_roles, purge_roles, max_retrievals
  FROM vault.access_policies ORDER BY name;
CREATE ROLE app_a LOGIN IN ROLE vault_app;
CREATE ROLE app_b LOGIN IN ROLE vault_app;
CREATE ROLE app_c LOGIN IN ROLE vault_app;
CREATE ROLE auditor1 LOGIN IN ROLE vault_auditor;
CREATE ROLE admin1 LOGIN IN ROLE vault_admin;
CREATE ROLE outsider LOGIN;
-- The launcher starts this database's audit writer once CREATE EXTENSION has committed.
DO $$
BEGIN
  FOR i IN 1..100 LOOP
    PERFORM pg_stat_clear_snapshot();
    EXIT WHEN EXISTS (SELECT 1 FROM pg_stat_activity
                       WHERE backend_type = 'vsql_vault audit writer'
                         AND datname = current_database());
    PERFORM pg_sleep(0.1);
  END LOOP;
END $$;
SELECT backend_type, datname = current_database() AS this_db
  FROM pg_stat_activity WHERE backend_type = 'vsql_vault audit writer';
