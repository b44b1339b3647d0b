# Sourced by benches/run.sh and benches/cpu.sh: one pgbench run of a script of benches/pgbench
# with what each call cost the server in CPU and how long it took (per-transaction log).
#   percall_start DIR          the cluster whose data directory is DIR/data: finds its postmaster
#                              and its audit writer (one database with the extension)
#   percall HOST PORT DB SCRIPT CLIENTS SECS LOGDIR
#       pgbench -n -c CLIENTS -j 2 -T SECS -f benches/pgbench/SCRIPT.sql as role bench, with
#       --log into LOGDIR (removed afterwards); prints one line:
#       "tps backend_us writer_us p50_ms p99_ms", or "FAILED" (pgbench's errors in LOGDIR.err).
# CPU: the postmaster's cutime + cstime (the backends that exited: pgbench's connections, reaped
# within the second slept after the run) and the audit writer's utime + stime, from /proc, divided
# by the transactions; clock ticks of 1/CLK_TCK s. Anything else exiting during the run (an
# autovacuum worker) is counted too. Latency: column 3 of pgbench's log (µs), nearest-rank
# percentiles over every transaction of the run.

percall_start() {
    percall_pm=$(head -1 "$1/data/postmaster.pid")
    percall_writer=$(pgrep -P "$percall_pm" -f 'audit writer' | head -1 || true)
    [ -n "$percall_writer" ] || { echo "no audit writer under postmaster $percall_pm" >&2; return 1; }
    percall_tick=$(getconf CLK_TCK)
}

# nearest-rank percentiles P... (in 1..100) of the numbers on stdin (µs), printed in ms
percentiles_ms() {
    sort -n | awk -v ps="$*" '{v[NR] = $1}
        END {
            n = split(ps, p, " ")
            for (i = 1; i <= n; i++) {
                r = int((p[i] * NR + 99) / 100) # ceil(p/100 * N), p an integer
                if (r < 1) r = 1
                printf "%s%.3f", (i > 1 ? " " : ""), (NR ? v[r] / 1000 : 0)
            }
            print ""
        }'
}

percall() {
    local host=$1 port=$2 db=$3 script=$4 clients=$5 secs=$6 logdir=$7 a w res tx tps be wr pct
    rm -rf "$logdir"
    mkdir -p "$logdir"
    a=$(awk '{print $16 + $17}' "/proc/$percall_pm/stat")
    w=$(awk '{print $14 + $15}' "/proc/$percall_writer/stat")
    res=$(pgbench -n -h "$host" -p "$port" -U bench -c "$clients" -j 2 -T "$secs" \
        --log --log-prefix="$logdir/tx" -f "benches/pgbench/$script.sql" "$db" 2>>"$logdir.err") ||
        { echo "pgbench $script -c $clients failed, see $logdir.err" >&2; rm -rf "$logdir"; echo FAILED; return 0; }
    sleep 1 # the backends exit and are reaped
    tx=$(awk '/number of transactions actually processed/ {split($NF, a, "/"); print a[1]}' <<<"$res")
    tps=$(awk '/^tps/ {printf "%d", $3}' <<<"$res")
    be=$(awk -v a="$a" -v b="$(awk '{print $16 + $17}' "/proc/$percall_pm/stat")" -v n="$tx" -v t="$percall_tick" \
        'BEGIN {printf "%d", (b - a) / t * 1e6 / n}')
    wr=$(awk -v a="$w" -v b="$(awk '{print $14 + $15}' "/proc/$percall_writer/stat")" -v n="$tx" -v t="$percall_tick" \
        'BEGIN {printf "%d", (b - a) / t * 1e6 / n}')
    # one file per pgbench thread: tx.PID and tx.PID.1; column 3 is the latency in µs
    cat "$logdir"/tx.* | awk '{print $3}' >"$logdir/lat"
    [ "$(wc -l <"$logdir/lat")" = "$tx" ] ||
        { echo "pgbench $script -c $clients: $(wc -l <"$logdir/lat") logged of $tx transactions" >&2; rm -rf "$logdir"; echo FAILED; return 0; }
    pct=$(percentiles_ms 50 99 <"$logdir/lat")
    rm -rf "$logdir"
    echo "$tps $be $wr $pct"
}
