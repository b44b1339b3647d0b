#!/usr/bin/env bash
# Server CPU per call: how much processor time one vault_put / vault_get / vault_head costs in
# the calling backend and in the audit writer, next to the plain statements they are compared
# with. On a 2-core machine throughput at 16 clients is bounded by this, not by WAL flushes.
# Reads the postmaster's cutime/cstime (backends that exited: pgbench's connections) and the
# audit writer's utime/stime from /proc around pgbench runs. Own cluster: /tmp/vsql_vault_cpu,
# port 54359. Writes benches/results/cpu.md.
#   bash benches/cpu.sh                 # about 2 minutes
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
bash tests/setup.sh >/dev/null
secs=${CPU_SECONDS:-8}
dir=/tmp/vsql_vault_cpu
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
pm=$(head -1 "$dir/data/postmaster.pid")
writer=$(pgrep -P "$pm" -f 'audit writer' | head -1)
tick=$(getconf CLK_TCK)
children() { awk '{print $16 + $17}' "/proc/$pm/stat"; } # cutime + cstime of reaped backends
own() { awk '{print $14 + $15}' "/proc/$1/stat"; }        # utime + stime
rows=()
for c in 1 16; do
    for s in put upsert get head select hand_rolled_get; do
        a=$(children)
        w=$(own "$writer")
        res=$(pgbench -n -h "$dir" -p "$port" -U bench -c "$c" -j 2 -T "$secs" -f "benches/pgbench/$s.sql" "$db" 2>/dev/null)
        sleep 1 # the backends exit and are reaped
        tx=$(awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}' <<<"$res")
        tps=$(awk '/^tps/ {printf "%d", $3}' <<<"$res")
        b=$(awk -v a="$a" -v b="$(children)" -v n="$tx" -v t="$tick" 'BEGIN {printf "%d", (b - a) / t * 1e6 / n}')
        wr=$(awk -v a="$w" -v b="$(own "$writer")" -v n="$tx" -v t="$tick" 'BEGIN {printf "%d", (b - a) / t * 1e6 / n}')
        rows+=("| $s | $c | $tps | $b | $wr |")
        echo "  $s, $c clients: $tps tps, backend $b us/call, audit writer $wr us/call"
    done
done
{
    echo "# Server CPU per call (benches/cpu.sh)"
    echo
    echo "$(date -u +%Y-%m-%d), $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg);"
    echo "pgbench -T $secs, one run each. CPU of the calling backends (reaped by the postmaster) and of"
    echo "the audit writer, divided by the calls made; clock ticks of 1/$tick s, so small figures are coarse."
    echo
    echo "| script (benches/pgbench) | clients | tps | backend CPU per call (µs) | audit writer CPU per call (µs) |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$out"
cat "$out"
