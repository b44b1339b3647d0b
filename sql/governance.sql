-- Key governance (issue 18): directives that retire key references, deny algorithms and set
-- cryptoperiods; the re-encryption queue. Protected (append-only, chained) at the end of
-- sql/compliance.sql, after the other built-in tables. The same block ends
-- sql/vsql_vault--0.1.0--0.2.0.sql.

-- One row per directive, and one per revocation (kind 'revoke', `revokes` = the directive's id):
-- nothing is ever updated. target: a key_ref, a prefix pattern ending in '*' (retire-key,
-- cryptoperiod), or an algorithm_hint (deny-algorithm, compared case-insensitively).
-- max_age: a cryptoperiod's length. New data under a governed key or algorithm is refused
-- (VV426) from effective_at + grace; during the grace period it is stored with a WARNING.
CREATE TABLE vault.key_directives (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL
        CHECK (kind IN ('retire-key', 'deny-algorithm', 'cryptoperiod', 'revoke')),
    target       text NOT NULL,
    max_age      interval CHECK ((kind = 'cryptoperiod') = (max_age IS NOT NULL)),
    effective_at timestamptz NOT NULL,
    grace        interval,
    reason       text,
    revokes      bigint REFERENCES vault.key_directives (id)
        CHECK ((kind = 'revoke') = (revokes IS NOT NULL)),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   name NOT NULL,
    -- A directive applied from a document signed by a governance authority
    -- (vault_apply_directive): the authority's key id, the document's nonce (applied once) and
    -- the whole signed document, so an auditor can show where the rule came from.
    authority_key_id text,
    nonce        text UNIQUE,
    document     jsonb
);
-- A directive is revoked at most once; the index also finds a directive's revocation.
CREATE UNIQUE INDEX key_directives_revokes ON vault.key_directives (revokes)
    WHERE revokes IS NOT NULL;
REVOKE ALL ON vault.key_directives FROM PUBLIC;
GRANT SELECT ON vault.key_directives TO vault_auditor, vault_admin;
SELECT pg_catalog.pg_extension_config_dump('vault.key_directives', 'ORDER BY chain_id, chain_seq');
SELECT pg_catalog.pg_extension_config_dump('vault.key_directives_id_seq', '');

-- What the queue and the put's cryptoperiod check read: live entries by key reference (exact,
-- or a prefix range: text_pattern_ops compares bytes, so a prefix is one index range) with the
-- age of their ciphertext, and by algorithm, case-insensitively.
CREATE INDEX entries_key_ref ON vault.entries (key_ref text_pattern_ops, updated_at)
    WHERE purged_at IS NULL;
CREATE INDEX entries_algorithm_hint ON vault.entries (lower(algorithm_hint))
    WHERE purged_at IS NULL;

CREATE FUNCTION vault_key_directive(
    kind text,
    target text,
    effective_at timestamptz DEFAULT now(),
    grace interval DEFAULT NULL,
    reason text DEFAULT NULL,
    max_age interval DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.id FROM vault.key_directive_impl($1, $2, $3, $4, $5, $6) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

-- A directive document signed by a governance authority (docs/key-governance.md): verified
-- against vsql_vault.directive_public_keys, refused when expired or replayed, stored whole.
CREATE FUNCTION vault_apply_directive(signed jsonb) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.id FROM vault.apply_directive_impl($1::text) r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;

CREATE FUNCTION vault_revoke_directive(id bigint, reason text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    PERFORM vault.raise_reported(r.sqlstate, r.message)
       FROM vault.revoke_directive_impl($1, $2) r;
END
$fn$;

-- Every live entry governed by a directive in force: under a retired key, a denied algorithm,
-- or a key past its cryptoperiod (its oldest live ciphertext older than max_age), one row per
-- directive, whether the directive is in effect yet or not. Each directive is one index range
-- of entries_key_ref or entries_algorithm_hint, never a scan of the entries. Internal: read by
-- vault.reencryption_queue (which filters by caller), vault_key_status(), the compliance report
-- and vault_metrics(), all as the vault's owner.
CREATE VIEW vault.key_directive_matches AS
SELECT e.id AS entry_id, e.purpose, e.external_id, e.owner, e.key_ref, e.algorithm_hint,
       e.updated_at, d.id AS directive_id, d.kind AS directive_kind, d.target AS directive_target,
       d.effective_at, d.effective_at + coalesce(d.grace, interval '0') AS deadline
  FROM (SELECT d.*,
               -- A pattern 'p*' is the byte range [p, p with its last character incremented);
               -- an exact key_ref k the range [k, k || chr(1)), which holds k alone.
               CASE WHEN right(d.target, 1) = '*' THEN left(d.target, -1) ELSE d.target END AS lo,
               CASE WHEN right(d.target, 1) = '*'
                    THEN left(d.target, -2) || chr(ascii(right(left(d.target, -1), 1)) + 1)
                    ELSE d.target || chr(1) END AS hi
          FROM vault.key_directives d
         WHERE d.kind <> 'revoke'
           AND NOT EXISTS (SELECT 1 FROM vault.key_directives r WHERE r.revokes = d.id)) d
  CROSS JOIN LATERAL (
      SELECT k.id, k.purpose, k.external_id, k.owner, k.key_ref, k.algorithm_hint, k.updated_at
        FROM vault.entries k
       WHERE d.kind IN ('retire-key', 'cryptoperiod') AND k.purged_at IS NULL
         AND k.key_ref ~>=~ d.lo AND k.key_ref ~<~ d.hi
         AND (d.kind = 'retire-key'
              OR EXISTS (SELECT 1 FROM vault.entries o
                          WHERE o.key_ref = k.key_ref AND o.purged_at IS NULL
                            AND o.updated_at < now() - d.max_age))
      UNION ALL
      SELECT a.id, a.purpose, a.external_id, a.owner, a.key_ref, a.algorithm_hint, a.updated_at
        FROM vault.entries a
       WHERE d.kind = 'deny-algorithm' AND a.purged_at IS NULL
         AND lower(a.algorithm_hint) = lower(d.target)) e;
REVOKE ALL ON vault.key_directive_matches FROM PUBLIC;

-- What must be re-encrypted, and by when? vault.key_directive_matches for the caller: owners
-- see their own entries, vault_admin and vault_auditor all of them (as vault_list). deadline =
-- effective_at + grace; overdue once it has passed. security_barrier: a caller's own functions
-- in a WHERE clause see only rows the caller may see.
CREATE VIEW vault.reencryption_queue WITH (security_barrier) AS
SELECT m.purpose, m.external_id, m.owner, m.key_ref, m.algorithm_hint, m.directive_id,
       m.directive_kind, m.directive_target, m.deadline, now() >= m.deadline AS overdue
  FROM vault.key_directive_matches m
 WHERE m.owner = current_user
    OR (SELECT pg_has_role('vault_admin', 'USAGE') OR pg_has_role('vault_auditor', 'USAGE'));
COMMENT ON VIEW vault.reencryption_queue IS
    'What must be re-encrypted, under which key directive, and by when? (owners see their own entries)';
REVOKE ALL ON vault.reencryption_queue FROM PUBLIC;
GRANT SELECT ON vault.reencryption_queue TO vault_app, vault_auditor, vault_admin;

-- The key status reported up to the governance authority: every key_ref and algorithm_hint in
-- use, the directives and what they govern, the vault's signing keys and KEK versions; signed
-- like the compliance report (vsql-vault verify-report). For vault_auditor and vault_admin.
CREATE FUNCTION vault_key_status() RETURNS jsonb
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    RETURN (SELECT r.status::jsonb FROM vault.key_status_impl() r
             WHERE vault.raise_reported(r.sqlstate, r.message));
END
$fn$;
