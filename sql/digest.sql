-- Table digests (issue 16, docs/table-digest.md): an RFC 6962 Merkle root over a table's rows in
-- an order and encoding every node agrees on, roots over hash buckets of the key to narrow a
-- difference down, and the export `vsql-vault digest` recomputes them from offline.
-- SECURITY INVOKER, like a SELECT: the caller needs SELECT on the table (or on the key and the
-- digested columns), row-level security applies, and the digest covers the rows the caller sees.
-- Not audited calls: they read only what the caller can read and change nothing.

CREATE FUNCTION vault_table_digest(tbl regclass, columns text[] DEFAULT NULL) RETURNS bytea
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.root FROM vault.table_digest_buckets($1::oid, $2, 1) r);
END
$fn$;

CREATE FUNCTION vault_table_digest_ranges(tbl regclass, buckets integer, columns text[] DEFAULT NULL)
RETURNS TABLE (bucket integer, first_key jsonb, last_key jsonb, rows bigint, root bytea)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.bucket, r.first_key, r.last_key, r.rows, r.root
                   FROM vault.table_digest_buckets($1::oid, $3, coalesce($2, 0)) r;
END
$fn$;

-- With buckets and bucket: only the rows of that bucket of vault_table_digest_ranges(tbl, buckets).
CREATE FUNCTION vault_table_digest_export(tbl regclass, columns text[] DEFAULT NULL,
                                          buckets integer DEFAULT NULL, bucket integer DEFAULT NULL)
RETURNS SETOF text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY EXECUTE vault.table_digest_export_query($1::oid, $2, $3, $4);
END
$fn$;
