#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for the demo and the tests, preloaded with vsql_vault.
#   tests/cluster.sh start DIR PORT DB   initdb if needed, configure, start, create DB
#   tests/cluster.sh stop DIR            stop it (fast shutdown)
# The data directory is owned by postgres (initdb refuses root); the server listens on
# 127.0.0.1:PORT and on a Unix socket in DIR.
set -euo pipefail
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
cmd=$1 dir=$2

as_pg() { runuser -u postgres -- "$@"; }

case "$cmd" in
start)
    port=$3 db=$4
    install -d -o postgres -m 755 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres --auth=trust --no-locale -E UTF8 >"$dir/initdb.log"
    fi
    plugins=""
    # 15.19+ only load output plugins named in output_plugin_libraries; older minors refuse the name.
    if as_pg "$PGBIN/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
        plugins="output_plugin_libraries = 'pgoutput, test_decoding, vsql_vault'"
    fi
    cat >"$dir/data/vsql_vault.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'vsql_vault'
wal_level = logical
max_replication_slots = 10
max_wal_senders = 10
max_connections = 100
# Two background workers per database with the extension, and the launcher.
max_worker_processes = 32
log_min_messages = warning
$plugins
${VSQL_VAULT_EXTRA_CONF:-}
CONF
    grep -q "include_if_exists = 'vsql_vault.conf'" "$dir/data/postgresql.conf" ||
        echo "include_if_exists = 'vsql_vault.conf'" >>"$dir/data/postgresql.conf"
    chown postgres "$dir/data/vsql_vault.conf"
    if ! as_pg "$PGBIN/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        # A backtrace setting inherited from a developer's shell would put Rust backtraces into
        # error details.
        env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE runuser -u postgres -- \
            "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    fi
    if ! psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1; then
        psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -c "CREATE DATABASE \"$db\""
    fi
    # The launcher starts an audit writer in each database once the extension is created there.
    for _ in $(seq 1 100); do
        psql -X -q -h "$dir" -p "$port" -U postgres -d postgres -tAc \
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'vsql_vault launcher'" |
            grep -q 1 && break
        sleep 0.2
    done
    ;;
stop)
    if [ -f "$dir/data/PG_VERSION" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
    ;;
*)
    echo "usage: $0 start DIR PORT DB | stop DIR" >&2
    exit 2
    ;;
esac
