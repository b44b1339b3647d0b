-- A look-alike operator in a schema placed first in search_path must never run inside the API,
-- which queries the vault as the tables' owner.
-- A statement expected to fail shows its message, and the \echo :SQLSTATE after it its SQLSTATE.
\set SHOW_CONTEXT never
-- The look-alike operator would give itself away with a NOTICE.
SET client_min_messages = notice;
CREATE SCHEMA evil AUTHORIZATION app_b;
SET ROLE app_b;
CREATE FUNCTION evil.text_eq(a text, b text) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'look-alike operator ran as %', current_user;
    RETURN true;
END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
SET search_path = evil, pg_catalog, public;
-- Through the API: no NOTICE, and app_b is still denied. The internal functions answer only the
-- API's own SQL functions: called directly they are refused (42501), with no NOTICE either.
SELECT * FROM vault_get('card', 'p1');
\echo :SQLSTATE
SELECT sqlstate, encrypted_value FROM vault.get_impl('card', 'p1');
\echo :SQLSTATE
SELECT sqlstate FROM vault.put_impl('card', 'p1', '\x00', NULL, NULL, '{}', NULL, 'owner-only');
\echo :SQLSTATE
SELECT external_id FROM vault_list('card');
RESET search_path;
RESET ROLE;
DROP SCHEMA evil CASCADE;
