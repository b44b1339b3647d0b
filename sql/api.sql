-- The public SQL API. Each function is a thin wrapper: the work, the policy decision and the
-- durable access record happen in the vault.*_impl functions (Rust); the wrapper raises the
-- failure they report with its documented SQLSTATE (custom codes such as VV428 cannot be raised
-- from pgrx). Wrappers are not SECURITY DEFINER, so the caller's effective role is what the vault
-- records and checks; search_path is pinned against look-alike objects.

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
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.put_impl($1, $2, $3, $4, $5, $6::text, $7, $8);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    RETURN r.expires_at;
END
$fn$;

CREATE FUNCTION vault_get(purpose text, external_id text)
RETURNS TABLE (encrypted_value bytea, algorithm_hint text, key_ref text, metadata jsonb,
               owner name, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.get_impl($1, $2);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    encrypted_value := r.encrypted_value;
    algorithm_hint := r.algorithm_hint;
    key_ref := r.key_ref;
    metadata := r.metadata::jsonb;
    owner := r.owner;
    created_at := r.created_at;
    expires_at := r.expires_at;
    RETURN NEXT;
END
$fn$;

CREATE FUNCTION vault_head(purpose text, external_id text)
RETURNS TABLE (found bool, expired bool, owner name, access_policy text,
               created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.head_impl($1, $2);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
    -- RETURN QUERY, not assignments: an OUT column named found would be plpgsql's FOUND.
    RETURN QUERY SELECT r.found, r.expired, r.owner::name, r.access_policy, r.created_at, r.expires_at;
END
$fn$;

CREATE FUNCTION vault_list(purpose text)
RETURNS TABLE (external_id text, owner name, algorithm_hint text, key_ref text, metadata jsonb,
               access_policy text, created_at timestamptz, expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    FOR r IN SELECT * FROM vault.list_impl($1) LOOP
        IF r.sqlstate IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
        END IF;
        external_id := r.external_id;
        owner := r.owner;
        algorithm_hint := r.algorithm_hint;
        key_ref := r.key_ref;
        metadata := r.metadata::jsonb;
        access_policy := r.access_policy;
        created_at := r.created_at;
        expires_at := r.expires_at;
        RETURN NEXT;
    END LOOP;
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
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.set_retention_policy_impl($1, $2, $3, $4, $5, $6);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
END
$fn$;

CREATE FUNCTION vault_set_access_policy(
    name text,
    store_roles name[],
    retrieve_roles name[],
    purge_roles name[],
    max_retrievals int DEFAULT NULL,
    description text DEFAULT NULL
) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.set_access_policy_impl($1, $2::text[], $3::text[], $4::text[], $5, $6);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
END
$fn$;

CREATE FUNCTION vault_grant_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.grant_purpose_impl($1, $2::text);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
END
$fn$;

CREATE FUNCTION vault_revoke_purpose(purpose text, role name) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE r record;
BEGIN
    SELECT * INTO r FROM vault.revoke_purpose_impl($1, $2::text);
    IF r.sqlstate IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = r.sqlstate, MESSAGE = r.message;
    END IF;
END
$fn$;
