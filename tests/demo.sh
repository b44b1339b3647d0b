#!/usr/bin/env bash
# Sets everything up (tests/setup.sh), starts a private preloaded cluster and walks through the
# vsql_vault quickstart, printing what happens. Safe to run again: the demo cluster is recreated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/setup.sh

dir=${VSQL_VAULT_DEMO_DIR:-/tmp/vsql_vault_demo}
port=${VSQL_VAULT_DEMO_PORT:-54329}
db=vault_demo
bash tests/cluster.sh stop "$dir"
rm -rf "$dir"
echo
echo "==> Starting a private PostgreSQL 15 cluster in $dir (port $port, preloaded with vsql_vault)"
bash tests/cluster.sh start "$dir" "$port" "$db"

run() { # run USER SQL... : one psql session as USER, errors shown with their SQLSTATE
    local user=$1
    shift
    psql -X -q -h "$dir" -p "$port" -U "$user" -d "$db" -v VERBOSITY=verbose -v SHOW_CONTEXT=never \
        "$@" 2>&1 | sed -e '/^LOCATION:/d'
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

cat <<EOF

The demo cluster is still running.
  Connect:  psql -h $dir -p $port -U postgres -d $db     (or -U app_a, app_b, auditor, security_admin)
  Stop:     bash tests/cluster.sh stop $dir
EOF
