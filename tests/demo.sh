#!/usr/bin/env bash
# Sets everything up (tests/setup.sh), starts a private preloaded cluster and walks through the
# vsql_vault quickstart, printing what happens. Safe to run again: the demo cluster is recreated.
# VSQL_VAULT_SKIP_SETUP=1 skips tests/setup.sh (on a machine already set up: the extension
# installed for the server in PGBIN, target/release/vsql-vault built).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VSQL_VAULT_SKIP_SETUP:-}" ]; then bash tests/setup.sh; fi

dir=${VSQL_VAULT_DEMO_DIR:-/tmp/vsql_vault_demo}
port=${VSQL_VAULT_DEMO_PORT:-54329}
db=vault_demo
# The second clusters (tests/demo_standby.sh, tests/demo_apply.sh) too, should a run have been killed.
for d in "$dir/standby" "$dir/apply" "$dir"; do bash tests/cluster.sh stop "$d"; done
rm -rf "$dir"
echo
echo "==> Starting a private PostgreSQL 15 cluster in $dir (port $port, preloaded with vsql_vault)"
bash tests/cluster.sh start "$dir" "$port" "$db"

run() { # run USER SQL... : one psql session as USER, errors shown with their SQLSTATE.
    # Refusals are part of the demo, so an ERROR does not stop it.
    local user=$1
    shift
    psql -X -q -h "$dir" -p "$port" -U "$user" -d "$db" -v VERBOSITY=verbose -v SHOW_CONTEXT=never \
        "$@" 2>&1 | sed -e '/^LOCATION:/d' || true
}

run postgres <<'SQL'
\echo '==> As the superuser: CREATE EXTENSION, and login roles for two applications, an auditor and an admin'
CREATE EXTENSION vsql_vault;
CREATE ROLE app_a LOGIN IN ROLE vault_app;
CREATE ROLE app_b LOGIN IN ROLE vault_app;
CREATE ROLE auditor LOGIN IN ROLE vault_auditor;
CREATE ROLE security_admin LOGIN IN ROLE vault_admin;
SELECT backend_type, datname FROM pg_stat_activity WHERE backend_type = 'vsql_vault audit writer';
SQL

run security_admin <<'SQL'
\echo '==> security_admin: a retention policy for purpose "card" (365 days at most, 90 by default)'
SELECT vault_set_retention_policy('card', 365, 90, 'crypto-shred', true, 'Card numbers (PCI DSS 3.1)');
TABLE vault.retention_policies;
SQL

run app_a <<'SQL'
\echo '==> app_a stores a card number it already encrypted elsewhere (the vault never sees plaintext)'
SELECT vault_put('card', 'customer-42', '\x8f3a9c01d2e4'::bytea, 'aes-256-gcm', 'kms://payments/key-7',
                 '{"last4": "4242"}') AS expires_at;
\echo '==> app_a reads it back: granted'
SELECT encrypted_value, algorithm_hint, key_ref, metadata, owner FROM vault_get('card', 'customer-42');
\echo '==> app_a reads it inside a transaction that rolls back: the access is still on record'
BEGIN;
SELECT encrypted_value FROM vault_get('card', 'customer-42');
ROLLBACK;
\echo '==> app_a tries to keep it for two years: refused, beyond the policy maximum (VV422)'
SELECT vault_put('card', 'customer-43', '\x01'::bytea, expires_at => now() + interval '2 years');
\echo '==> app_a tries a purpose that has no retention policy: refused (VV428)'
SELECT vault_put('marketing', 'customer-42', '\x01'::bytea);
SQL

run app_b <<'SQL'
\echo '==> app_b tries to read app_a''s entry (policy owner-only): denied (42501)'
SELECT * FROM vault_get('card', 'customer-42');
\echo '==> app_b cannot read the tables directly either'
SELECT encrypted_value FROM vault.entries;
SQL

run auditor <<'SQL'
\echo '==> The auditor reads the access log: every call, granted or denied, with who made it'
SELECT id, role_name, operation, purpose, external_id, granted, sqlstate,
       left(reason, 60) AS reason
  FROM vault.access_log ORDER BY id;
\echo '==> ...and whether each change''s transaction committed'
SELECT id, role_name, operation, external_id, pg_xact_status(caller_xid) AS transaction
  FROM vault.access_log WHERE caller_xid IS NOT NULL ORDER BY id;
\echo '==> The log is append-only, for everyone (VV403)'
SQL
run postgres -c "DELETE FROM vault.access_log WHERE role_name = 'app_b'"

run postgres <<'SQL'
\echo '==> Tamper evidence: the log is hash-chained; security_admin signs the chain heads (Ed25519)'
SET ROLE security_admin;
SELECT vault_checkpoint() AS chains_signed;
RESET ROLE;
SELECT table_identity, chain, seq, key_id FROM vault.audit_checkpoints;
\echo '==> A team protects its own audit table (append-only, chained)'
CREATE TABLE tenant_audit_log (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
SELECT vault_protect_table('tenant_audit_log', 4);
INSERT INTO tenant_audit_log (tenant, event) VALUES ('acme', 'login'), ('acme', 'export'), ('acme', 'logout');
\echo '==> Nobody, superuser included, may change it or switch the protection off (VV403)'
UPDATE tenant_audit_log SET event = 'nothing happened';
ALTER TABLE tenant_audit_log DISABLE TRIGGER vault_append_only;
\echo '==> The auditor verifies: everything intact'
SET ROLE auditor;
SELECT table_name, chain, rows_checked, ok, detail FROM vault_verify_audit();
RESET ROLE;
\echo '==> A superuser goes around the rules: break-glass (recorded), then edits the log behind the triggers'
SET vsql_vault.break_glass = on;
ALTER TABLE vault.access_log DISABLE TRIGGER vault_append_only;
UPDATE vault.access_log SET granted = true, sqlstate = NULL, reason = NULL WHERE role_name = 'app_b';
ALTER TABLE vault.access_log ENABLE ALWAYS TRIGGER vault_append_only;
RESET vsql_vault.break_glass;
\echo '==> ...and is caught, with the exact row:'
SET ROLE auditor;
SELECT table_name, chain, first_bad_seq, ok, detail FROM vault_verify_audit('vault.access_log');
SELECT operation, role_name, details->>'command' AS command, details->>'object' AS object
  FROM vault.access_log WHERE operation = 'break_glass';
SQL

echo
echo "==> The auditor takes the evidence away and checks it offline with vsql-vault (no database):"
out=$dir/evidence
install -d "$out"
# Checkpoints before rows: a checkpoint signed after the rows were exported would name rows the
# export lacks.
psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT vault_export_checkpoints()" >"$out/checkpoints.jsonl"
psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT vault_export_audit('vault.access_log')" >"$out/access_log.jsonl"
keys=()
for k in $(psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT public_key FROM vault.signing_keys"); do
    keys+=(--public-key "$k")
done
echo "   target/release/vsql-vault verify --export $out/access_log.jsonl --checkpoints $out/checkpoints.jsonl --table vault.access_log ${keys[*]}"
set +e
target/release/vsql-vault verify --export "$out/access_log.jsonl" --checkpoints "$out/checkpoints.jsonl" --table vault.access_log "${keys[@]}"
echo "   exit status $? (1: tampering found)"
set -e

run security_admin <<'SQL'
\echo '==> Retention: customer-42 asks to be forgotten; the owner deletes the entry and gets a signed purge proof'
SQL
run app_a -c "SELECT vault_delete('card', 'customer-42', 'GDPR erasure request #1234') AS purge_proof_id"
run app_a -c "SELECT * FROM vault_get('card', 'customer-42')"
run auditor <<'SQL'
SELECT id, purpose, external_id, owner, purge_method, reason, purged_by, vault_verify_purge_proof(id) AS proof_verifies
  FROM vault.purge_log;
SQL
psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT vault_export_purge_proofs()" >"$out/proofs.jsonl"
echo "   target/release/vsql-vault verify-purge --proofs $out/proofs.jsonl ..."
target/release/vsql-vault verify-purge --proofs "$out/proofs.jsonl" "${keys[@]}" || true

echo
echo "==> Encrypted replication: a KEK file, a slot with the vsql_vault plugin, pg_recvlogical into the consumer"
kek=$dir/replication.kek
printf 'v1 %s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$kek"
chown postgres "$kek"
chmod 600 "$kek"
run postgres <<SQL
ALTER SYSTEM SET vsql_vault.kek_file = '$kek';
SELECT pg_reload_conf();
CREATE TABLE payments (id int PRIMARY KEY, pan text, amount numeric);
SQL
echo "   security_admin keeps card numbers on the source: vault_sync_exclude('payments', 'pan')"
run security_admin -c "SELECT vault_sync_exclude('payments', 'pan')"
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot demo_slot --create-slot -P vsql_vault
echo "   (and a second slot, demo_apply, whose stream a second cluster receives at the end: tests/demo_apply.sh)"
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot demo_apply --create-slot -P vsql_vault
run postgres -c "INSERT INTO payments VALUES (1, '4111111111111111', 42.50), (2, '5500000000000004', 9.99)"
end=$(psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -Atc "SELECT pg_current_wal_lsn()")
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot demo_slot --start --endpos "$end" --no-loop -f "$out/stream.jsonl"
echo "   on the wire (what a broker would see), first 160 characters of each line:"
cut -c1-160 "$out/stream.jsonl" | sed 's/^/   /'
printf '   amounts in clear on the wire: %s\n' "$(grep -c '42.50' "$out/stream.jsonl" || true)"
keys=()
for k in $(psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT public_key FROM vault.signing_keys"); do
    keys+=(--public-key "$k")
done
echo "   decrypted by the consumer (the excluded pan column never left the server):"
target/release/vsql-vault decrypt --kek-file "$kek" "${keys[@]}" --input "$out/stream.jsonl" | sed 's/^/   /'
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot demo_slot --drop-slot

bash tests/demo_standby.sh "$dir" "$port" "$db"

echo
echo "==> Compliance evidence: the auditor's questions, one view each (docs/compliance.md)"
run auditor <<'SQL'
SELECT purpose, external_id, finding, overdue_by FROM vault.retention_compliance;
SELECT role_name, purpose, operation, granted, denied FROM vault.access_summary ORDER BY 1, 2, 3;
SELECT logged_at::time(0) AS at, role_name, operation, purpose, external_id, sqlstate
  FROM vault.access_denials ORDER BY log_id;
SELECT kind, key_id, purposes, entries, date_trunc('second', oldest_age) AS oldest_age FROM vault.key_inventory;
SELECT table_name, chain, rows_chained, rows_since_checkpoint, last_verification_ok FROM vault.audit_integrity;
\echo '   the signed compliance report (summary and purge sections):'
SELECT jsonb_pretty(r->'summary') AS summary, jsonb_pretty(r->'purge_compliance') AS purge_compliance
  FROM (SELECT vault_compliance_report() AS r) x;
SQL
psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT vault_compliance_report()" >"$out/report.json"
echo "   target/release/vsql-vault verify-report --report $out/report.json ..."
target/release/vsql-vault verify-report --report "$out/report.json" "${keys[@]}" || true
echo "   the same report with one figure improved afterwards:"
sed 's/"denied_accesses_last_30_days": [0-9]*/"denied_accesses_last_30_days": 0/' "$out/report.json" >"$out/report-edited.json"
target/release/vsql-vault verify-report --report "$out/report-edited.json" "${keys[@]}" || echo "   exit status $? (altered report rejected)"
echo "   metrics for Prometheus (first lines of vault_metrics()):"
psql -X -q -h "$dir" -p "$port" -U auditor -d "$db" -Atc "SELECT vault_metrics()" | grep -v '^#' | head -12 | sed 's/^/   /'

bash tests/demo_apply.sh "$dir" "$port" "$db"

cat <<EOF

The demo cluster is still running.
  Connect:  psql -h $dir -p $port -U postgres -d $db     (or -U app_a, app_b, auditor, security_admin)
  Stop:     bash tests/cluster.sh stop $dir
EOF
