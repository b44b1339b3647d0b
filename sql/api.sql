-- The public SQL API. Each function is a one-statement PL/pgSQL wrapper: the work, the policy
-- decision and the durable access record happen in the vault.*_impl functions (Rust), which
-- return (sqlstate, message, result columns); vault.raise_reported (schema.sql) raises a reported
-- failure with its documented SQLSTATE (custom codes such as VV428 cannot be raised from pgrx).
-- The access record is durable before the impl returns, so raising afterwards loses nothing.
-- Columns are qualified with r.: unqualified, they would be ambiguous with the OUT parameters
-- of the same name (found, owner, metadata...). PL/pgSQL, not SQL: a SQL function with a SET
-- clause is planned again on every call, PL/pgSQL keeps its plans for the session. Wrappers are
-- not SECURITY DEFINER, so the caller's effective role is what the vault records and checks;
-- search_path is pinned against look-alike objects.

CREATE FUNCTION vault_put(
    purpose text,
    external_id text,
    encrypted_value bytea,
    algorithm_hint text DEFAULT NULL,
    key_ref text DEFAULT NULL,
    metadata jsonb DEFAULT '{}',
    expires_at timestamptz DEFAULT NULL,
    access_policy text DEFAULT 'owner-only'
) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.expires_at FROM vault.put_impl($1, $2, $3, $4, $5, $6::text, $7, $8) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_get(purpose text, external_id text)
RETURNS TABLE (encrypted_value bytea, algorithm_hint text, key_ref text, metadata jsonb,
               owner name, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.encrypted_value, r.algorithm_hint, r.key_ref, r.metadata::jsonb,
                        r.owner::name, r.created_at, r.expires_at
                   FROM vault.get_impl($1, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE FUNCTION vault_head(purpose text, external_id text)
RETURNS TABLE (found bool, expired bool, owner name, access_policy text,
               created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- RETURN QUERY, not assignments: an OUT column named found would be plpgsql's FOUND.
    RETURN QUERY SELECT r.found, r.expired, r.owner::name, r.access_policy,
                        r.created_at, r.expires_at
                   FROM vault.head_impl($1, $2) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

-- One keyset page: at most max_rows entries with external_id > after, ordered by external_id.
CREATE FUNCTION vault_list(purpose text, after text DEFAULT NULL, max_rows int DEFAULT 1000)
RETURNS TABLE (external_id text, owner name, algorithm_hint text, key_ref text, metadata jsonb,
               access_policy text, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN QUERY SELECT r.external_id, r.owner::name, r.algorithm_hint, r.key_ref,
                        r.metadata::jsonb, r.access_policy, r.created_at, r.expires_at
                   FROM vault.list_page_impl($1, $2, $3) r
                  WHERE vault.raise_reported(r.sqlstate, r.message);
END
$fn$;

CREATE FUNCTION vault_set_retention_policy(
    purpose text,
    max_retention_days int,
    default_ttl_days int,
    purge_method text DEFAULT 'physical-delete',
    require_purge_proof bool DEFAULT true,
    description text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.set_retention_policy_impl($1, $2, $3, $4, $5, $6) r;
END
$fn$;

CREATE FUNCTION vault_set_access_policy(
    name text,
    store_roles name[],
    retrieve_roles name[],
    purge_roles name[],
    max_retrievals int DEFAULT NULL,
    description text DEFAULT NULL,
    require_identity bool DEFAULT false
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.set_access_policy_v2_impl($1, $2::text[], $3::text[], $4::text[], $5, $6, $7) r;
END
$fn$;

CREATE FUNCTION vault_grant_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.grant_purpose_impl($1, $2::text) r;
END
$fn$;

CREATE FUNCTION vault_revoke_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.revoke_purpose_impl($1, $2::text) r;
END
$fn$;
