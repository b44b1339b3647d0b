#!/usr/bin/env bash
# Part of tests/demo.sh: a hot standby of the demo cluster serves an audited read whose access
# record lands on the primary, naming the standby. Starts the standby, shows it, stops it.
#   bash tests/demo_standby.sh DIR PORT DB    (the primary's socket directory, port, database)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1 port=$2 db=$3
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
sdir=$dir/standby
sport=$((port + 1))
as_pg() { runuser -u postgres -- "$@"; }
stop_standby() {
    if [ -f "$sdir/data/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$sdir/data" -m fast -w stop >/dev/null || true
    fi
}
stop_standby
rm -rf "$sdir"
trap stop_standby EXIT
q() { # q PORT-DIR PORT USER SQL: one statement, errors shown with their SQLSTATE
    psql -X -q -h "$1" -p "$2" -U "$3" -d "$db" -v VERBOSITY=verbose -v SHOW_CONTEXT=never -c "$4" 2>&1 |
        sed -e '/^LOCATION:/d' || true
}

echo
echo "==> Read replica: a hot standby (pg_basebackup -R, port $sport) serves audited reads; each record is made durable on the primary first"
q "$dir" "$port" postgres "DO \$\$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'demo_forwarder') THEN
        CREATE ROLE demo_forwarder LOGIN IN ROLE vault_forwarder;
    END IF; END \$\$"
q "$dir" "$port" app_a "SELECT vault_put('card', 'customer-77', '\\x5e11'::bytea) AS expires_at"
install -d -o postgres -m 700 "$sdir"
as_pg "$PGBIN/pg_basebackup" -h "$dir" -p "$port" -U postgres -D "$sdir/data" -R -X stream -c fast
cat >>"$sdir/data/postgresql.auto.conf" <<CONF
port = $sport
listen_addresses = ''
unix_socket_directories = '$sdir'
cluster_name = 'demo_replica'
vsql_vault.primary_conninfo = 'host=$dir port=$port user=demo_forwarder'
CONF
echo "   standby settings: cluster_name = 'demo_replica', vsql_vault.primary_conninfo = 'host=$dir port=$port user=demo_forwarder'"
as_pg "$PGBIN/pg_ctl" -D "$sdir/data" -l "$sdir/server.log" -w -t 60 start >/dev/null
lsn=$(psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -Atc "SELECT pg_current_wal_lsn()")
for _ in $(seq 1 300); do
    [ "$(psql -X -q -h "$sdir" -p "$sport" -U postgres -d "$db" -Atc \
        "SELECT pg_is_in_recovery() AND pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn" 2>/dev/null)" = t ] && break
    sleep 0.2
done
echo "==> app_a reads customer-77 on the standby: granted, once the primary holds the record"
q "$sdir" "$sport" app_a "SELECT encrypted_value, owner FROM vault_get('card', 'customer-77')"
echo "==> app_b tries on the standby: denied (42501), and that is on the primary's record too"
q "$sdir" "$sport" app_b "SELECT * FROM vault_get('card', 'customer-77')"
echo "==> A write on the standby: refused (25006)"
q "$sdir" "$sport" app_a "SELECT vault_put('card', 'customer-78', '\\x01'::bytea)"
echo "==> On the primary, the auditor sees both reads, with the standby they were served from"
q "$dir" "$port" auditor "SELECT id, role_name, operation, external_id, granted, sqlstate,
       details->>'served_by_standby' AS served_by_standby, details->>'forwarded_by' AS forwarded_by
  FROM vault.access_log WHERE details ? 'served_by_standby' ORDER BY id"
echo "==> The primary unreachable (the standby pointed at a port where nothing listens): the read fails closed (VV503)"
q "$sdir" "$sport" postgres "ALTER SYSTEM SET vsql_vault.primary_conninfo = 'host=$dir port=$((port + 2)) user=demo_forwarder'"
q "$sdir" "$sport" postgres "SELECT pg_reload_conf()" >/dev/null
sleep 0.5
q "$sdir" "$sport" app_a "SELECT encrypted_value FROM vault_get('card', 'customer-77')"
echo "==> The standby is stopped again"
