#!/usr/bin/env bash
# Server CPU per call: how much processor time one vault_put / vault_get / vault_head costs in
# the calling backend and in the audit writer, next to the plain statements they are compared
# with. On a 2-core machine throughput at 16 clients is bounded by this, not by WAL flushes.
# Reads the postmaster's cutime/cstime (backends that exited: pgbench's connections) and the
# audit writer's utime/stime from /proc around pgbench runs (benches/percall.sh, which
# benches/run.sh uses for the same table). Own cluster: /tmp/vsql_vault_cpu (CPU_DIR), port 54359
# (CPU_PORT). Writes benches/results/cpu.md (CPU_OUT).
#   bash benches/cpu.sh                 # about 2 minutes
#   PGBIN=<dir> bash benches/cpu.sh     # against another PostgreSQL 15's binaries, vsql_vault and
#                                       # pgaudit already installed there (no tests/setup.sh)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
if [ -n "${PGBIN:-}" ]; then
    export PGBIN PATH="$PGBIN:$PATH"
else
    bash tests/setup.sh >/dev/null
fi
. benches/percall.sh
secs=${CPU_SECONDS:-8}
dir=${CPU_DIR:-/tmp/vsql_vault_cpu}
port=${CPU_PORT:-54359}
db=vault_bench
out=${CPU_OUT:-benches/results/cpu.md}
bash tests/cluster.sh stop "$dir"
rm -rf "$dir"
trap 'bash tests/cluster.sh stop "$dir"' EXIT
VSQL_VAULT_EXTRA_CONF="shared_buffers = '1GB'
shared_preload_libraries = 'vsql_vault, pgaudit'" bash tests/cluster.sh start "$dir" "$port" "$db"
psql_su() { psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"; }
psql_su -c "CREATE EXTENSION vsql_vault"
psql_su -f benches/sql/setup.sql >/dev/null
psql -X -q -h "$dir" -p "$port" -U bench -d "$db" -c \
    "SELECT count(vault_put('bench', 'k' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef')) FROM generate_series(1, 10000) g" >/dev/null
percall_start "$dir"
rows=()
for c in 1 16; do
    for s in put upsert get head select hand_rolled_get; do
        read -r tps b wr p50 p99 <<<"$(percall "$dir" "$port" "$db" "$s" "$c" "$secs" "$dir/pgbench_log")"
        [ "$tps" != FAILED ] || exit 1
        rows+=("| $s | $c | $tps | $b | $wr | $p50 | $p99 |")
        echo "  $s, $c clients: $tps tps, backend $b us/call, audit writer $wr us/call, p50 $p50 ms, p99 $p99 ms"
    done
done
{
    echo "# Server CPU per call (benches/cpu.sh)"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg);"
    echo "pgbench -T $secs, one run each. CPU of the calling backends (reaped by the postmaster) and of"
    echo "the audit writer, divided by the calls made; clock ticks of 1/$percall_tick s, so small figures are coarse."
    echo "Latency: pgbench's per-transaction log of the same run, nearest-rank percentiles."
    echo
    echo "| script (benches/pgbench) | clients | tps | backend CPU per call (µs) | audit writer CPU per call (µs) | p50 (ms) | p99 (ms) |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
