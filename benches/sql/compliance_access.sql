-- Access rows of the compliance scenario (run by benches/run.sh as the superuser with the psql
-- variable :access_rows, the total wanted).
--
-- vault.access_log accepts rows from vsql_vault's own code only, except while a superuser restores
-- a dump (vsql_vault.restore_mode), and then only rows that carry their chain fields, as a dump's
-- rows do. So this script does what a dump would bring: it computes each row's chain fields itself
-- (the canonical encoding of docs/audit-format.md, SHA-256 in SQL) from the chain's current head,
-- and inserts the rows in restore mode, 1,000 per transaction (each row moves the chain head, and
-- within one transaction that costs more with every row). The result verifies with
-- vault_verify_audit like rows the audit writer wrote. Going through the API instead (vault_head
-- calls, each waiting for its durable record) would take about an hour for ten million rows.

-- The encoding below covers exactly these columns, in this order: stop if the table changed.
SELECT string_agg(attname || ':' || format_type(atttypid, atttypmod), ',' ORDER BY attnum) <>
       'id:bigint,logged_at:timestamp with time zone,role_name:name,session_user_name:name,'
       'application_name:text,client_addr:inet,backend_pid:integer,operation:text,purpose:text,'
       'external_id:text,entry_id:bigint,granted:boolean,sqlstate:text,reason:text,details:jsonb,'
       'caller_xid:xid8,chain_id:integer,chain_seq:bigint,prev_hash:bytea,row_hash:bytea,'
       'on_behalf_of:text'
       AS changed
  FROM pg_attribute WHERE attrelid = 'vault.access_log'::regclass AND attnum > 0 AND NOT attisdropped \gset
\if :changed
-- An error, not \quit: psql's \quit exits 0, and the run went on with an access log never filled.
DO $$ BEGIN
    RAISE EXCEPTION 'vault.access_log has other columns than benches/sql/compliance_access.sql encodes: update it';
END $$;
\endif

SET vsql_vault.restore_mode = on;

-- Canonical encoding: a field is its name (u32 length + bytes), a type tag (01 text, 02 bytes,
-- 03 int, 04 bool, 05 timestamp) and the value (u32 length + bytes; 8 bytes big-endian; 1 byte);
-- a NULL column is left out. The constant part of each field is computed once.
CREATE FUNCTION pg_temp.f(name text, tag text) RETURNS bytea
LANGUAGE sql IMMUTABLE AS $$
    SELECT int4send(octet_length(name)) || convert_to(name, 'UTF8') || decode(tag, 'hex') $$;

-- Rows topped up to :access_rows in all, over the last 60 days, 8 roles, 4 operations, 2% denied.
CREATE PROCEDURE pg_temp.fill_access(total bigint, batch int)
LANGUAGE plpgsql AS $fn$
DECLARE
    ident    text;
    have     bigint;
    done     bigint := 0;
    n        int;
    seq      bigint;
    prev     bytea;
    r        record;
    head     bytea;  -- "VSQLV", format version 1, the domain, and the table field
    p_chain  bytea := pg_temp.f('chain', '03') || int8send(0);
    p_seq    bytea := pg_temp.f('seq', '03');
    p_prev   bytea := pg_temp.f('prev_hash', '02') || int4send(32);
    p_id     bytea := pg_temp.f('id', '03');
    p_at     bytea := pg_temp.f('logged_at', '05');
    p_role   bytea := pg_temp.f('role_name', '01');
    p_user   bytea := pg_temp.f('session_user_name', '01');
    p_pid    bytea := pg_temp.f('backend_pid', '03');
    p_op     bytea := pg_temp.f('operation', '01');
    p_purp   bytea := pg_temp.f('purpose', '01');
    p_ext    bytea := pg_temp.f('external_id', '01');
    p_entry  bytea := pg_temp.f('entry_id', '03');
    p_gr     bytea := pg_temp.f('granted', '04');
    p_state  bytea := pg_temp.f('sqlstate', '01');
    p_reason bytea := pg_temp.f('reason', '01');
BEGIN
    SELECT p.identity INTO ident FROM vault.protected_tables p WHERE p.table_name = 'vault.access_log';
    head := '\x5653514c5601'::bytea || int4send(14) || convert_to('vsql_vault.row', 'UTF8')
            || pg_temp.f('table', '01') || int4send(octet_length(ident)) || convert_to(ident, 'UTF8');
    CREATE TEMP TABLE fill_rows (LIKE vault.access_log) ON COMMIT DELETE ROWS;
    SELECT count(*) INTO have FROM vault.access_log;
    WHILE have + done < total LOOP
        n := least(batch, total - have - done);
        SELECT h.seq, h.head_hash INTO seq, prev FROM vault.chain_heads h
         WHERE h.identity = ident AND h.chain_id = 0 FOR UPDATE;
        FOR r IN
            SELECT nextval('vault.access_log_id_seq') AS id,
                   date_trunc('second', now()) - ((i * 7919) % 5184000) * interval '1 second' AS logged_at,
                   'app_' || (i % 8) AS role_name, 10000 + (i % 500)::int AS backend_pid,
                   (ARRAY['get', 'get', 'get', 'put', 'head', 'list'])[1 + i % 6] AS operation,
                   (ARRAY['comp.card', 'comp.health', 'comp.session', 'comp.kyc'])[1 + i % 4] AS purpose,
                   'c' || (i % 1000000) AS external_id, i % 1000000 + 1 AS entry_id,
                   i % 50 <> 0 AS granted,
                   CASE WHEN i % 50 = 0 THEN '42501' END AS sqlstate,
                   CASE WHEN i % 50 = 0 THEN 'the entry''s access policy refuses this role' END AS reason
              FROM generate_series(have + done + 1, have + done + n) i
        LOOP
            seq := seq + 1;
            INSERT INTO fill_rows (id, logged_at, role_name, session_user_name, backend_pid, operation,
                                   purpose, external_id, entry_id, granted, sqlstate, reason,
                                   chain_id, chain_seq, prev_hash, row_hash)
            VALUES (r.id, r.logged_at, r.role_name, r.role_name, r.backend_pid, r.operation, r.purpose,
                    r.external_id, r.entry_id, r.granted, r.sqlstate, r.reason, 0, seq, prev,
                    sha256(head || p_chain || p_seq || int8send(seq) || p_prev || prev
                           || p_id || int8send(r.id)
                           || p_at || int8send((extract(epoch FROM r.logged_at) * 1000000)::bigint - 946684800000000)
                           || p_role || int4send(octet_length(r.role_name)) || convert_to(r.role_name, 'UTF8')
                           || p_user || int4send(octet_length(r.role_name)) || convert_to(r.role_name, 'UTF8')
                           || p_pid || int8send(r.backend_pid)
                           || p_op || int4send(octet_length(r.operation)) || convert_to(r.operation, 'UTF8')
                           || p_purp || int4send(octet_length(r.purpose)) || convert_to(r.purpose, 'UTF8')
                           || p_ext || int4send(octet_length(r.external_id)) || convert_to(r.external_id, 'UTF8')
                           || p_entry || int8send(r.entry_id)
                           || p_gr || CASE WHEN r.granted THEN '\x01'::bytea ELSE '\x00'::bytea END
                           || coalesce(p_state || int4send(octet_length(r.sqlstate)) || convert_to(r.sqlstate, 'UTF8'), '')
                           || coalesce(p_reason || int4send(octet_length(r.reason)) || convert_to(r.reason, 'UTF8'), '')))
            RETURNING row_hash INTO prev;
        END LOOP;
        INSERT INTO vault.access_log SELECT * FROM fill_rows ORDER BY chain_seq;
        done := done + n;
        COMMIT;
    END LOOP;
END
$fn$;
CALL pg_temp.fill_access(:access_rows, 1000);
ANALYZE vault.access_log;
ANALYZE vault.access_daily;
