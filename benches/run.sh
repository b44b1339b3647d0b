#!/usr/bin/env bash
# Benchmarks: vsql_vault side by side with what users would do instead, printed as ratios.
# Builds and installs the release library, starts its own tuned cluster, runs every scenario of the
# benchmark issue (pgbench runs of fixed length, median of several; timed SQL calls; timed command
# pipelines), stops the cluster, runs benches/core.sh when present, and writes one table with the
# machine description to benches/results/latest.md, ending with the aims missed (measured here)
# and why (benches/results/notes.md, written by hand).
#   bash benches/run.sh                                     # the standard run (about 25 minutes)
#   bash benches/run.sh --render                            # rewrite latest.md from the last run (after editing notes.md)
#   BENCH_SECONDS=1 BENCH_REPS=1 BENCH_SWEEPS=1000 BENCH_VERIFY_ROWS=10000 BENCH_ENTRIES=20000 \
#   BENCH_ACCESS_ROWS=100000 BENCH_DECODE_ROWS=10000 BENCH_MEM_MB=20 BENCH_WORKER_SWEEP=1000 \
#   BENCH_PERCALL_SECONDS=2 BENCH_CORE=0 BENCH_OUT=/tmp/bench.md bash benches/run.sh   # a quick check of the script
# BENCH_PERCALL_SECONDS (default 8): each pgbench run of the latency and CPU-per-call tables.
# BENCH_ONLY=pipeline: after the set-up, only the pg_recvlogical pipeline rows (vsql-vault decrypt
# vs wal2json format 1 into cat, and the two-step figures), printed; $out is left as it is.
# BENCH_KEEP_STREAM=1 keeps the two-step run's captured stream ($BENCH_DIR/stream.jsonl).
# BENCH_DIR (default /tmp/vsql_vault_bench), BENCH_PORT (default 54339; the standby takes the next).
# PGBIN=<dir>: run against another PostgreSQL 15's binaries (psql, pgbench, pg_ctl... taken from
# there), with vsql_vault, pgaudit and wal2json already installed in it; tests/setup.sh and the
# Debian packages are then skipped (target/release/vsql-vault must be built).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
out=${BENCH_OUT:-benches/results/latest.md}
dir=${BENCH_DIR:-/tmp/vsql_vault_bench} # the cluster and the run's files; removed at the start of a run
results=$dir/results                     # the last run's measurements, kept until the next run

# Writes $out from the last run's measurements and benches/results/notes.md (hand-written: why
# each aim is missed and what it would take). `bash benches/run.sh --render` does only this, so
# the notes can be revised after a run without measuring again.
render() {
    mkdir -p "$(dirname "$out")"
    {
        cat "$results/header.md"
        echo
        echo "How to read it: the ratio is always \"how vsql_vault compares\", above 1 better. Throughput rows"
        echo "(tps, rows/s, entries/s): ratio = vsql_vault / peer. Time rows (s) and memory rows (MB): ratio ="
        echo "peer / vsql_vault. Where the aim is a rate (verification, retention), the peer column is that rate"
        echo "(1,000,000 rows/s; 1,000,000 entries in 30 s = 33,334/s). Compliance rows: the peer column is the"
        echo "vsql-vault service's 5 s target; the aim is under 1 s. get peers: (a) plain SELECT by key,"
        echo "(b) the same SELECT logged by pgaudit (\`pgaudit.log = 'read'\` for that role only; the log line is"
        echo "written, not fsynced), (c) a plpgsql get that appends a sha256-chained audit row under a lock on"
        echo "a one-row chain head, committed with the caller's transaction (benches/sql/setup.sql)."
        echo "\"reference\" rows have no aim of their own."
        echo
        echo "| scenario | vsql_vault | peer | ratio | target |"
        echo "|---|---|---|---|---|"
        cat "$results/rows.md"
        echo
        for f in latency:"Latency per call (p50, p99) against the replaced service's targets" \
            cpu:"Server CPU per call"; do
            if [ -f "$results/${f%%:*}.md" ]; then
                echo "## ${f#*:}"
                echo
                cat "$results/${f%%:*}.md"
                echo
            fi
        done
        echo "## Data set-up and side figures"
        echo
        cat "$results/info.md"
        if [ -f "$results/core.md" ]; then
            echo
            echo "## Core primitives vs openssl speed (benches/core.sh)"
            echo
            cat "$results/core.md"
        fi
        echo
        echo "## Missed aims"
        echo
        if [ -f "$results/missed.md" ]; then
            echo "Measured in this run (by how much):"
            echo
            cat "$results/missed.md"
        else
            echo "None in this run."
        fi
        if [ -f benches/results/notes.md ]; then
            echo
            cat benches/results/notes.md
        fi
    } >"$out"
}
if [ "${1:-}" = --render ]; then
    [ -f "$results/rows.md" ] || { echo "no measurements in $results: run benches/run.sh first" >&2; exit 1; }
    render
    echo "wrote $out"
    exit 0
fi

t0=$(date +%s)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
if [ -n "${PGBIN:-}" ]; then
    export PGBIN PATH="$PGBIN:$PATH" # tests/cluster.sh reads PGBIN too
else
    bash tests/setup.sh >/dev/null
fi
# Peers and tools, for the benchmarks only: wal2json (decoding), pgaudit (audited reads), GNU time
# (peak memory of the consumer), procps (pgrep, free).
need=()
for p in postgresql-15-wal2json postgresql-15-pgaudit time procps; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ] && [ -z "${PGBIN:-}" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }
fi

secs=${BENCH_SECONDS:-5}
reps=${BENCH_REPS:-3}
sweeps=${BENCH_SWEEPS:-100000 1000000}     # vault_purge_sweep() of this many expired entries
worker_sweep=${BENCH_WORKER_SWEEP:-1000000} # the retention worker's sweep
verify_rows=${BENCH_VERIFY_ROWS:-1000000}  # chained rows of a protected table, verified
bulk_rows=${BENCH_BULK_ROWS:-20000}        # one INSERT ... SELECT into a protected table
entries=${BENCH_ENTRIES:-1000000}          # compliance report: entries in all
access_rows=${BENCH_ACCESS_ROWS:-10000000} # compliance report: access-log rows in all
decode_rows=${BENCH_DECODE_ROWS:-200000}   # decoding: rows, in 100-row transactions
mem_mb=${BENCH_MEM_MB:-200}                # memory: one transaction of this many MB of rows
percall_secs=${BENCH_PERCALL_SECONDS:-8}   # latency and CPU per call: pgbench -T of each run
port=${BENCH_PORT:-54339}
db=vault_bench
bash tests/cluster.sh stop "$dir"
rm -rf "$dir"
# The hot standby of the standby rows (pg_basebackup -R of this cluster).
sdir=$dir/standby
sport=$((port + 1))
stop_standby() {
    if [ -f "$sdir/data/postmaster.pid" ]; then
        runuser -u postgres -- "${PGBIN:-/usr/lib/postgresql/15/bin}/pg_ctl" -D "$sdir/data" -m fast -w stop >/dev/null || true
    fi
}
trap 'stop_standby; bash tests/cluster.sh stop "$dir"' EXIT
# tests/cluster.sh writes its own settings first; the later lines here override them
# (shared_preload_libraries with pgaudit, more slots and senders).
VSQL_VAULT_EXTRA_CONF="shared_buffers = '1GB'
max_wal_size = '4GB'
checkpoint_timeout = '30min'
vsql_vault.checkpoint_interval = 3600
vsql_vault.sweep_interval = 604800
vsql_vault.kek_file = '$dir/bench.kek'
logical_decoding_work_mem = '256MB'
shared_preload_libraries = 'vsql_vault, pgaudit'
max_replication_slots = 32
max_wal_senders = 32
$(runuser -u postgres -- "${PGBIN:-/usr/lib/postgresql/15/bin}/postgres" --describe-config 2>/dev/null |
    grep '^output_plugin_libraries' >/dev/null &&
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json, vsql_vault'")" \
    bash tests/cluster.sh start "$dir" "$port" "$db"
printf 'v1 %s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/bench.kek"
chown postgres "$dir/bench.kek"
chmod 600 "$dir/bench.kek"
mkdir -p "$results"

psql_su() { psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"; }
psql_as() { local u=$1; shift; psql -X -q -h "$dir" -p "$port" -U "$u" -d "$db" -v ON_ERROR_STOP=1 "$@"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.3f", b - a}'; }
per_sec() { awk -v n="$1" -v s="$2" 'BEGIN {printf "%d", n / s}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
commas() { printf '%s' "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
fail() { echo "FAILED: $*" >&2; exit 1; }
# After a purge the retention worker vacuums vault.entries; let it finish before the next timing.
wait_vacuum() {
    sleep 1
    for _ in $(seq 1 600); do
        [ "$(psql_su -Atc "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = 'vault.entries'::regclass")" = 0 ] &&
            return 0
        sleep 1
    done
}

psql_su -c "CREATE EXTENSION vsql_vault"
psql_su -f benches/sql/setup.sql >/dev/null
# The seed is itself a measurement: 10,000 audited puts in one transaction (each a statement of
# its own inside the call), against 10,000 upserts in one transaction.
seed_start=$(date +%s.%N)
psql_as bench -c \
    "SELECT count(vault_put('bench', 'k' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef')) FROM generate_series(1, 10000) g" >/dev/null
seed_puts=$(awk -v a="$seed_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
seed_start=$(date +%s.%N)
psql_as bench -c "DO \$\$ BEGIN FOR g IN 20001 .. 30000 LOOP
    INSERT INTO plain_kv VALUES (g, '\xdeadbeefdeadbeefdeadbeefdeadbeef') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;
    END LOOP; END \$\$" >/dev/null
seed_upserts=$(awk -v a="$seed_start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
# Public keys of the evidence, for the offline verifier and the consumer.
psql_su -Atc "SELECT vault_checkpoint()" >/dev/null
keys=()
for k in $(psql_su -Atc "SELECT public_key FROM vault.signing_keys"); do keys+=(--public-key "$k"); done
[ ${#keys[@]} -gt 0 ] || fail "no public key in vault.signing_keys"

rows=()   # the table
missed=() # aims missed, with by how much
info=()   # how the data was built, and side figures

# by how much: a factor, or a percentage when under 10%
by() { awk -v f="$1" -v w="$2" 'BEGIN {if (f < 1.1) printf "%.0f%% %s", (f - 1) * 100, w; else printf "%.1fx %s", f, w}'; }

# add_row KIND SCENARIO OURS PEER TARGET [AIM]
#   KIND rate: higher is better, ratio = ours / peer; KIND time (or MB): lower is better,
#   ratio = peer / ours. AIM, checked here: r:X (ratio >= X), max:X (ours <= X), min:X (ours >= X).
add_row() {
    local kind=$1 name=$2 a=$3 b=$4 target=$5 aim=${6:-} ratio short=""
    for v in "$a" "$b"; do
        if ! [[ $v =~ ^[0-9]+(\.[0-9]+)?$ ]] || ! awk -v x="$v" 'BEGIN {exit !(x > 0)}'; then
            fail "$name: no figure (got '$a' vs '$b')"
        fi
    done
    if [ "$kind" = rate ]; then
        ratio=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", a / b}')
    else
        ratio=$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b / a}')
    fi
    rows+=("| $name | $a | $b | ${ratio}x | $target |")
    echo "  $name: $a vs $b (${ratio}x)"
    case "$aim" in
    r:*) awk -v r="$ratio" -v m="${aim#r:}" 'BEGIN {exit !(r < m)}' &&
        short="${ratio}x against $target: $(by "$(awk -v r="$ratio" -v m="${aim#r:}" 'BEGIN {print m / r}')" short)" ;;
    max:*) awk -v x="$a" -v m="${aim#max:}" 'BEGIN {exit !(x > m)}' &&
        short="$a against $target: $(by "$(awk -v x="$a" -v m="${aim#max:}" 'BEGIN {print x / m}')" over)" ;;
    min:*) awk -v x="$a" -v m="${aim#min:}" 'BEGIN {exit !(x < m)}' &&
        short="$a against $target: $(by "$(awk -v x="$a" -v m="${aim#min:}" 'BEGIN {print m / x}')" short)" ;;
    esac
    if [ -n "$short" ]; then missed+=("- $name: $short"); fi
    return 0
}

# median tps of $reps runs of benches/pgbench/$1.sql with $2 clients, as role $3 (bench)
tps() {
    local runs=() out
    for _ in $(seq 1 "$reps"); do
        out=$(pgbench -n -h "${bench_host:-$dir}" -p "${bench_port:-$port}" -U "${3:-bench}" -c "$2" -j 2 -T "$secs" \
            -f "benches/pgbench/$1.sql" "$db" 2>>"$dir/pgbench.log") ||
            { echo "pgbench $1 -c $2 failed, see $dir/pgbench.log" >&2; echo FAILED; return 0; }
        runs+=("$(awk '/^tps/ {printf "%d", $3}' <<<"$out")")
    done
    median "${runs[@]}"
}

# The decoding data: $decode_rows rows in 100-row transactions, and the slots that read them,
# created first (the peek slots too unless $1 is "pipeline"). Sets endpos and dn.
slot() { psql_su -Atc "SELECT pg_create_logical_replication_slot('$1', '$2')" >/dev/null; }
decode_setup() {
    psql_su -c "CREATE TABLE decode_rows (id int PRIMARY KEY, note text, amount numeric, at timestamptz)"
    psql_su -c "CREATE PUBLICATION bench_pub FOR TABLE decode_rows"
    if [ "$1" != pipeline ]; then
        for plugin in vsql_vault wal2json test_decoding pgoutput; do slot "bench_$plugin" "$plugin"; done
    fi
    for i in $(seq 1 "$reps"); do
        slot "recv_vsql_$i" vsql_vault
        slot "recv_w2j_$i" wal2json
    done
    slot recv_file vsql_vault
    psql_su -c "DO \$\$ BEGIN FOR b IN 0..$((decode_rows / 100 - 1)) LOOP
                  INSERT INTO decode_rows SELECT g, 'row ' || g, g * 1.5, now() FROM generate_series(b * 100 + 1, b * 100 + 100) g;
                  COMMIT; END LOOP; END \$\$"
    endpos=$(psql_su -Atc "SELECT pg_current_wal_lsn()")
    dn=$(commas "$decode_rows")
}
recv() { # slot, endpos, extra pg_recvlogical options: the stream on stdout
    local s=$1 e=$2
    shift 2
    pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot "$s" --start --endpos "$e" --no-loop "$@" \
        -f - 2>>"$dir/recvlogical.log"
}
decrypt() { target/release/vsql-vault decrypt --kek-file "$dir/bench.kek" "${keys[@]}"; }
# pg_recvlogical into vsql-vault decrypt vs wal2json format 1 into cat, alternating, then the same
# stream in two steps (into a file, then decrypted) to tell the server's part from the consumer's.
pipeline() {
    local ours_runs=() peer_runs=() a n i s1 s2
    for i in $(seq 1 "$reps"); do
        a=$(now)
        n=$(recv "recv_vsql_$i" "$endpos" | decrypt | wc -l) || fail "pg_recvlogical | vsql-vault decrypt failed"
        ours_runs+=("$(elapsed "$a")")
        [ "$n" -ge "$decode_rows" ] || fail "pg_recvlogical | vsql-vault decrypt gave $n changes of $decode_rows"
        a=$(now)
        recv "recv_w2j_$i" "$endpos" -o format-version=1 | cat >/dev/null || fail "pg_recvlogical with wal2json failed"
        peer_runs+=("$(elapsed "$a")")
        psql_su -Atc "SELECT pg_drop_replication_slot('recv_vsql_$i'), pg_drop_replication_slot('recv_w2j_$i')" >/dev/null
    done
    add_row time "decoding $dn rows through pg_recvlogical: into vsql-vault decrypt vs wal2json format 1 into cat (s)" \
        "$(median "${ours_runs[@]}")" "$(median "${peer_runs[@]}")" ">= 1.0x" r:1
    # The same pipeline in two steps, to tell the server's part from the consumer's.
    a=$(now)
    recv recv_file "$endpos" >"$dir/stream.jsonl"
    s1=$(elapsed "$a")
    a=$(now)
    n=$(target/release/vsql-vault decrypt --kek-file "$dir/bench.kek" --input "$dir/stream.jsonl" "${keys[@]}" | wc -l) ||
        fail "vsql-vault decrypt of the received stream failed"
    s2=$(elapsed "$a")
    psql_su -Atc "SELECT pg_drop_replication_slot('recv_file')" >/dev/null
    info+=("- Decoding $dn rows in two steps: pg_recvlogical into a file $s1 s ($(du -m "$dir/stream.jsonl" | cut -f1) MB), then vsql-vault decrypt of that file $s2 s ($(commas "$n") changes, $(per_sec "$n" "$s2") changes/s).")
    [ -n "${BENCH_KEEP_STREAM:-}" ] || rm -f "$dir/stream.jsonl"
}

if [ "${BENCH_ONLY:-}" = pipeline ]; then
    # Only the pg_recvlogical pipeline rows (and their two-step figures), printed, not written to $out.
    echo "==> pipeline only: $(commas "$decode_rows") inserted rows in 100-row transactions"
    decode_setup pipeline
    pipeline
    printf '%s\n' "${info[@]}"
    exit 0
fi

echo "==> storage (tps, median of $reps x ${secs}s)"
for c in 1 4 16; do
    add_row rate "vault_put vs INSERT ON CONFLICT, $c clients (tps)" "$(tps put "$c")" "$(tps upsert "$c")" \
        ">= 0.8x" r:0.8
done
add_row time "10,000 first vault_put calls in one transaction vs 10,000 upserts in one transaction, a plpgsql loop (s)" \
    "$seed_puts" "$seed_upserts" "reference (was quadratic in the number of puts)"
audit_lines() { grep -c 'AUDIT: SESSION' "$dir/server.log" || true; }
for c in 1 4 16; do
    at16=""
    [ "$c" = 16 ] && at16=r:0.5
    get=$(tps get "$c")
    sel=$(tps select "$c")
    before=$(audit_lines)
    audited=$(tps select "$c" bench_audited)
    [ "$(audit_lines)" -gt "$before" ] || fail "pgaudit wrote no AUDIT line for bench_audited"
    hand=$(tps hand_rolled_get "$c")
    head=$(tps head "$c")
    add_row rate "vault_get vs SELECT by key, $c clients (tps)" "$get" "$sel" ">= 0.5x at 16" "$at16"
    add_row rate "vault_get vs SELECT+pgaudit (pgaudit.log = read), $c clients (tps)" "$get" "$audited" \
        "reference (aim is vs SELECT)"
    add_row rate "vault_get vs hand-rolled chained audit get (plpgsql), $c clients (tps)" "$get" "$hand" \
        "reference (aim is vs SELECT)"
    add_row rate "vault_head vs SELECT by key, $c clients (tps)" "$head" "$sel" ">= 0.5x at 16" "$at16"
done
info+=("- pgaudit wrote $(commas "$(audit_lines)") AUDIT lines to the server log (not fsynced) during the runs of peer (b).")
hand_rows=$(psql_su -Atc "SELECT count(*) FROM hand_rolled_audit")
hand_ok=$(psql_su -Atc "SELECT count(*) FROM hand_rolled_audit a JOIN hand_rolled_audit b ON b.seq = a.seq + 1 WHERE b.prev_hash <> a.row_hash")
[ "$hand_ok" = 0 ] || fail "the hand-rolled chain forked or broke ($hand_ok bad links)"
info+=("- The hand-rolled chain (peer c) holds $(commas "$hand_rows") rows, every link intact.")

echo "==> latency and server CPU per call (pgbench -T $percall_secs, one run each)"
# One run of each script at 1 and 16 clients, nothing else running on the cluster
# (benches/percall.sh): latency percentiles from pgbench's per-transaction log, the CPU of the
# backends and of the audit writer from /proc. The targets are the replaced service's.
. benches/percall.sh
percall_start "$dir"
declare -A pc
for c in 1 16; do
    for s in put upsert get head select; do
        pc[$s.$c]=$(percall "$dir" "$port" "$db" "$s" "$c" "$percall_secs" "$dir/pgbench_log")
        [ "${pc[$s.$c]}" != FAILED ] || fail "pgbench $s, $c clients (latency and CPU per call)"
        echo "  $s, $c clients: ${pc[$s.$c]} (tps, backend µs, writer µs, p50 ms, p99 ms)"
    done
done
lat_rows=() cpu_rows=()
for op in "vault_put put upsert INSERT_ON_CONFLICT 5" "vault_get get select SELECT_by_key 3" \
    "vault_head head select SELECT_by_key 2"; do
    read -r name s peer pname target <<<"$op"
    pname=${pname//_/ }
    for c in 1 16; do
        read -r tps be wr p50 p99 <<<"${pc[$s.$c]}"
        read -r ptps pbe pwr pp50 pp99 <<<"${pc[$peer.$c]}"
        if awk -v x="$p99" -v t="$target" 'BEGIN {exit !(x < t)}'; then
            within=yes
        else
            over=$(by "$(awk -v x="$p99" -v t="$target" 'BEGIN {print x / t}')" over)
            missed+=("- $name p99 latency, $c clients: $p99 ms against < $target ms: $over")
            if awk -v x="$p50" -v t="$target" 'BEGIN {exit !(x < t)}'; then
                within="no: p99 $over (p50 within)"
            else
                within="no: p99 $over, p50 too"
            fi
        fi
        lat_rows+=("| $name | $c | $p50 | $p99 | $pname: $pp50 / $pp99 | < $target ms | $within |")
        cpu_rows+=("| $name | $c | $tps | $be | $wr | $pname | $ptps | $pbe | $pwr | $(awk -v a="$((be + wr))" -v b="$((pbe + pwr))" \
            'BEGIN {if (a > 0) printf "%.2fx", b / a; else print "-"}') |")
    done
done
{
    echo "pgbench -T $percall_secs, -j 2, one run of each script at 1 and 16 clients, the same scripts as the"
    echo "throughput rows (benches/pgbench/). Percentiles: nearest rank over every transaction of the run, from"
    echo "\`pgbench --log\` (latency as pgbench sees it: client round trip included). Peer: the upsert for"
    echo "vault_put, the plain SELECT by key for vault_get and vault_head. Targets: those of the service"
    echo "vsql_vault replaces (store < 5 ms, retrieve < 3 ms, head < 2 ms), which name no percentile;"
    echo "\"within\" reads them as p99."
    echo
    echo "| operation | clients | p50 (ms) | p99 (ms) | peer: p50 / p99 (ms) | target | within |"
    echo "|---|---|---|---|---|---|---|"
    printf '%s\n' "${lat_rows[@]}"
} >"$dir/latency.md"
{
    echo "The same runs: CPU time of the calling backends (read from the postmaster's cutime + cstime once"
    echo "pgbench's connections have exited) and of the audit writer (its utime + stime), divided by the"
    echo "transactions; clock ticks of 1/$percall_tick s, so small figures are coarse. Ratio, as above:"
    echo "the peer's CPU per call (backend + writer) over vsql_vault's, above 1 better. benches/cpu.sh"
    echo "measures the same on its own cluster."
    echo
    echo "| operation | clients | tps | backend (µs) | audit writer (µs) | peer | peer tps | peer backend (µs) | peer writer (µs) | CPU ratio |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${cpu_rows[@]}"
} >"$dir/cpu.md"

echo "==> audited reads on a hot standby (pg_basebackup -R of this cluster, port $sport)"
# vault_get on the standby makes its record durable on the primary (one round trip per call over
# the session's libpq connection, then the primary's group commit) before it returns; the peer is
# the same SELECT by key on the standby.
psql_su -c "CREATE ROLE bench_forwarder LOGIN IN ROLE vault_forwarder" >/dev/null
install -d -o postgres -m 700 "$sdir"
runuser -u postgres -- "${PGBIN:-/usr/lib/postgresql/15/bin}/pg_basebackup" -h "$dir" -p "$port" -U postgres \
    -D "$sdir/data" -R -X stream -c fast
cat >>"$sdir/data/postgresql.auto.conf" <<CONF
port = $sport
listen_addresses = ''
unix_socket_directories = '$sdir'
shared_buffers = '256MB'
cluster_name = 'bench_standby'
vsql_vault.primary_conninfo = 'host=$dir port=$port user=bench_forwarder'
CONF
runuser -u postgres -- "${PGBIN:-/usr/lib/postgresql/15/bin}/pg_ctl" -D "$sdir/data" -l "$sdir/server.log" \
    -w -t 60 start >/dev/null
lsn=$(psql_su -Atc "SELECT pg_current_wal_lsn()")
for _ in $(seq 1 300); do
    [ "$(psql -X -q -h "$sdir" -p "$sport" -U postgres -d "$db" -Atc \
        "SELECT pg_last_wal_replay_lsn() >= '$lsn'::pg_lsn")" = t ] && break
    sleep 0.2
done
for c in 1 16; do
    sget=$(bench_host=$sdir bench_port=$sport tps get "$c")
    ssel=$(bench_host=$sdir bench_port=$sport tps select "$c")
    add_row rate "vault_get on a hot standby (record made durable on the primary) vs SELECT by key on the standby, $c clients (tps)" \
        "$sget" "$ssel" "reference (no aim yet)"
done
forwarded=$(psql_su -Atc "SELECT count(*) FROM vault.access_log WHERE operation = 'get' AND granted
                          AND details->>'served_by_standby' = 'bench_standby'")
[ "$forwarded" -gt 0 ] || fail "no record of the standby's gets on the primary"
info+=("- Standby rows: the primary recorded $(commas "$forwarded") gets served by the standby.")
stop_standby

echo "==> chained append-only insert"
add_row rate "chained insert vs plain insert, 16 clients (tps)" "$(tps insert_chained 16)" "$(tps insert_plain 16)" \
    ">= 0.8x" r:0.8
psql_su -c "CREATE TABLE bulk_plain (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL)"
psql_su -c "CREATE TABLE bulk_chained (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL)"
psql_su -Atc "SELECT vault_protect_table('bulk_chained', 16)" >/dev/null
bulk() {
    local a
    a=$(now)
    psql_su -c "INSERT INTO $1 (tenant, event) SELECT 'acme', 'login ' || g FROM generate_series(1, $bulk_rows) g"
    per_sec "$bulk_rows" "$(elapsed "$a")"
}
add_row rate "chained bulk insert: one INSERT ... SELECT of $(commas "$bulk_rows") rows vs plain (rows/s)" \
    "$(bulk bulk_chained)" "$(bulk bulk_plain)" ">= 0.8x" r:0.8

echo "==> verification"
# verify TABLE: in SQL and offline (export, checkpoints, public keys); adds two rows
verify() {
    local t=$1 a n ok sql_rate off_rate
    psql_su -Atc "SELECT vault_checkpoint()" >/dev/null
    a=$(now)
    IFS='|' read -r ok n < <(psql_su -Atc "SELECT bool_and(ok), sum(rows_checked) FROM vault_verify_audit('$t')")
    sql_rate=$(per_sec "$n" "$(elapsed "$a")")
    [ "$ok" = t ] || fail "vault_verify_audit('$t') found a broken chain"
    a=$(now)
    psql_su -Atc "SELECT vault_export_checkpoints()" >"$dir/checkpoints.jsonl"
    psql_su -Atc "SELECT vault_export_audit('$t')" >"$dir/export.jsonl"
    info+=("- Exporting $(commas "$n") rows of $t with vault_export_audit (psql -Atc into a file): $(elapsed "$a") s.")
    a=$(now)
    target/release/vsql-vault verify --export "$dir/export.jsonl" --checkpoints "$dir/checkpoints.jsonl" \
        --table "$t" "${keys[@]}" >"$dir/verify.out" || fail "vsql-vault verify of $t: $(cat "$dir/verify.out")"
    off_rate=$(per_sec "$n" "$(elapsed "$a")")
    add_row rate "verify $(commas "$n") chained rows of $t offline: vsql-vault verify with checkpoints (rows/s)" \
        "$off_rate" 1000000 ">= 1,000,000 rows/s" r:1
    add_row rate "verify $(commas "$n") chained rows of $t in SQL: vault_verify_audit vs offline (rows/s)" \
        "$sql_rate" "$off_rate" "reference (aim is offline)"
}
verify vault.access_log
psql_su -c "CREATE TABLE audit_events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
            tenant text NOT NULL, actor text NOT NULL, event text NOT NULL, amount numeric)"
a=$(now)
psql_su -c "INSERT INTO audit_events (tenant, actor, event, amount)
            SELECT 'tenant-' || g % 100, 'user-' || g % 5000, 'payment ' || g, g * 1.25
            FROM generate_series(1, $verify_rows) g"
fill=$(elapsed "$a")
a=$(now)
psql_su -Atc "SELECT vault_protect_table('audit_events', 16)" >/dev/null
protect_s=$(elapsed "$a")
info+=("- $(commas "$verify_rows") chained rows: INSERT ... SELECT into a plain table ($fill s), then vault_protect_table, which chains the rows already there ($protect_s s).")
# Issue 14: protecting a table that already holds the rows, against three times their INSERT.
add_row time "vault_protect_table on $(commas "$verify_rows") rows already there vs 3x their INSERT ... SELECT (s)" \
    "$protect_s" "$(awk -v f="$fill" 'BEGIN {printf "%.3f", 3 * f}')" "<= 3x the insert" r:1
verify public.audit_events

echo "==> retention"
for n in $sweeps; do
    psql_su -c "INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner, created_at,
                                           updated_at, expires_at)
                SELECT 'bench.sweep', 's' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef', 'owner-only', 'bench', now(),
                       now(), now() - interval '1 second'
                FROM generate_series(1, $n) g"
    a=$(now)
    purged=$(psql_as bench -Atc "SELECT vault_purge_sweep()")
    s=$(elapsed "$a")
    [ "$purged" = "$n" ] || fail "vault_purge_sweep() purged $purged of $n"
    wait_vacuum
    add_row rate "purge with signed proofs: vault_purge_sweep(), $(commas "$n") expired entries in $s s (entries/s)" \
        "$(per_sec "$n" "$s")" 33334 "1,000,000 in <= 30 s" r:1
done
# The retention worker: one committed transaction per batch. Woken by a 1 s interval, measured
# from its own record in vault.sweep_runs (the VACUUM that follows is not counted).
psql_su -c "INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner, created_at,
                                       updated_at, expires_at)
            SELECT 'bench.sweep', 'w' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef', 'owner-only', 'bench', now(),
                   now(), now() - interval '1 second'
            FROM generate_series(1, $worker_sweep) g"
last_run=$(psql_su -Atc "SELECT coalesce(max(id), 0) FROM vault.sweep_runs")
psql_su -c "ALTER SYSTEM SET vsql_vault.sweep_interval = 1" -c "SELECT pg_reload_conf()" >/dev/null
run=""
for _ in $(seq 1 3600); do
    run=$(psql_su -Atc "SELECT entries_purged || '|' || extract(epoch FROM finished_at - started_at)
                        FROM vault.sweep_runs WHERE id > $last_run AND finished_at IS NOT NULL AND entries_purged > 0
                        ORDER BY id LIMIT 1")
    [ -z "$run" ] || break
    sleep 1
done
psql_su -c "ALTER SYSTEM RESET vsql_vault.sweep_interval" -c "SELECT pg_reload_conf()" >/dev/null
[ -n "$run" ] || fail "the retention worker did not sweep within an hour"
wait_vacuum
IFS='|' read -r wn ws <<<"$run"
[ "$wn" = "$worker_sweep" ] ||
    echo "  (the worker's first run purged $wn of $worker_sweep; the rest went to its next run)"
add_row rate "purge with signed proofs: retention worker, $(commas "$wn") expired entries in $(printf '%.1f' "$ws") s (entries/s)" \
    "$(per_sec "$wn" "$ws")" 33334 "1,000,000 in <= 30 s" r:1

echo "==> decoding: $(commas "$decode_rows") inserted rows in 100-row transactions"
decode_setup peek
peek_secs() { # median seconds of $reps peeks: slot, SQL function, extra options
    local runs=() a
    for _ in $(seq 1 "$reps"); do
        a=$(now)
        psql_su -Atc "SELECT count(*) FROM $2('bench_$1', NULL, NULL $3)" >/dev/null
        runs+=("$(elapsed "$a")")
    done
    median "${runs[@]}"
}
ours=$(peek_secs vsql_vault pg_logical_slot_peek_changes "")
w1=$(peek_secs wal2json pg_logical_slot_peek_changes ", 'format-version', '1'")
w2=$(peek_secs wal2json pg_logical_slot_peek_changes ", 'format-version', '2'")
td=$(peek_secs test_decoding pg_logical_slot_peek_changes "")
po=$(peek_secs pgoutput pg_logical_slot_peek_binary_changes ", 'proto_version', '1', 'publication_names', 'bench_pub'")
add_row time "decoding $dn rows (pg_logical_slot_peek_changes), vsql_vault (encrypting, signing) vs wal2json format 1 (s)" \
    "$ours" "$w1" ">= 1.0x" r:1
add_row time "decoding vs wal2json format 2 (s)" "$ours" "$w2" "reference"
add_row time "decoding vs test_decoding (s)" "$ours" "$td" "reference"
add_row time "decoding vs pgoutput (s)" "$ours" "$po" "as close as possible"
for plugin in vsql_vault wal2json test_decoding pgoutput; do
    psql_su -Atc "SELECT pg_drop_replication_slot('bench_$plugin')" >/dev/null
done

pipeline

echo "==> memory: one transaction of $mem_mb MB of rows, logical_decoding_work_mem = 64MB (the default)"
mem_rows=$((mem_mb * 855)) # about 1,170 bytes of table per row
psql_su -c "CREATE TABLE mem_rows (id int PRIMARY KEY, payload text NOT NULL)"
slot mem_vsql vsql_vault
slot mem_w2j wal2json
a=$(now)
psql_su -c "INSERT INTO mem_rows SELECT g, repeat(md5(g::text), 31) FROM generate_series(1, $mem_rows) g"
mem_end=$(psql_su -Atc "SELECT pg_current_wal_lsn()")
mem_size=$(psql_su -Atc "SELECT pg_relation_size('mem_rows') / 1000000")
info+=("- Memory scenario: one INSERT of $(commas "$mem_rows") rows of 992 characters, a $mem_size MB table, in $(elapsed "$a") s.")
# mem_run SLOT CONSUMER [pg_recvlogical options]: decodes the transaction with the walsender's
# work memory at its default, polling the walsender's /proc status; sets wal_hwm, wal_anon (peak
# RssAnon seen), recv_rss, cons_rss (kB) and mem_secs.
mem_run() {
    local s=$1 consumer=$2 bg wpid="" st a
    shift 2
    a=$(now)
    (
        PGOPTIONS="-c logical_decoding_work_mem=64MB" /usr/bin/time -f %M -o "$dir/recv.rss" \
            pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot "$s" --start --endpos "$mem_end" \
            --no-loop "$@" -f - 2>>"$dir/recvlogical.log" |
            if [ "$consumer" = decrypt ]; then
                /usr/bin/time -f %M -o "$dir/cons.rss" target/release/vsql-vault decrypt \
                    --kek-file "$dir/bench.kek" "${keys[@]}"
            else
                /usr/bin/time -f %M -o "$dir/cons.rss" cat
            fi | wc -l >"$dir/mem.count"
    ) &
    bg=$!
    wal_hwm=0 wal_anon=0
    # The walsender is the bench postmaster's only child with that title while this runs.
    while kill -0 "$bg" 2>/dev/null; do
        if [ -z "$wpid" ]; then
            wpid=$(pgrep -P "$postmaster" -f '^postgres: walsender' | head -1 || true)
        fi
        if [ -n "$wpid" ] && st=$(cat "/proc/$wpid/status" 2>/dev/null); then
            # (an exited walsender, a zombie until reaped, has no Vm lines: keep the last figures)
            wal_hwm=$(awk -v m="$wal_hwm" '/^VmHWM/ && $2 > m {m = $2} END {print m}' <<<"$st")
            wal_anon=$(awk -v m="$wal_anon" '/^RssAnon/ && $2 > m {m = $2} END {print m}' <<<"$st")
            sleep 0.05
        else
            sleep 0.01
        fi
    done
    wait "$bg" || fail "decoding the $mem_mb MB transaction through $s failed, see $dir/recvlogical.log"
    mem_secs=$(elapsed "$a")
    recv_rss=$(cat "$dir/recv.rss")
    cons_rss=$(cat "$dir/cons.rss")
    [ "$wal_hwm" -gt 0 ] || fail "no walsender seen for slot $s"
    [ "$(cat "$dir/mem.count")" -gt 0 ] || fail "nothing received through slot $s"
}
postmaster=$(head -1 "$dir/data/postmaster.pid")
mb() { awk -v k="$1" 'BEGIN {printf "%d", k / 1024}'; }
mem_run mem_vsql decrypt
v_hwm=$(mb "$wal_hwm") v_anon=$(mb "$wal_anon") v_recv=$(mb "$recv_rss") v_cons=$(mb "$cons_rss") v_secs=$mem_secs
[ "$(cat "$dir/mem.count")" -ge "$mem_rows" ] || fail "vsql-vault decrypt printed $(cat "$dir/mem.count") of $mem_rows changes"
mem_run mem_w2j cat -o format-version=1
w_hwm=$(mb "$wal_hwm") w_anon=$(mb "$wal_anon") w_recv=$(mb "$recv_rss") w_cons=$(mb "$cons_rss") w_secs=$mem_secs
spill=$(psql_su -Atc "SELECT string_agg(slot_name || ' ' || pg_size_pretty(spill_bytes), ', ' ORDER BY slot_name)
                      FROM pg_stat_replication_slots WHERE slot_name IN ('mem_vsql', 'mem_w2j')")
info+=("- Memory scenario: vsql_vault decoded it in $v_secs s (walsender peak RssAnon $v_anon MB; pg_recvlogical $v_recv MB, vsql-vault decrypt $v_cons MB), wal2json format 1 in $w_secs s (walsender peak RssAnon $w_anon MB; pg_recvlogical $w_recv MB, cat $w_cons MB). Spilled to disk by the reorder buffer: ${spill:-not reported}.")
add_row MB "memory, $mem_size MB transaction: walsender peak resident (VmHWM), vsql_vault vs wal2json format 1 (MB)" \
    "$v_hwm" "$w_hwm" "bounded: below wal2json v1" r:1
add_row MB "memory, $mem_size MB transaction: receiving side peak resident, pg_recvlogical + vsql-vault decrypt vs pg_recvlogical + cat (wal2json v1) (MB)" \
    "$((v_recv + v_cons))" "$((w_recv + w_cons))" "bounded: below wal2json v1" r:1
psql_su -Atc "SELECT pg_drop_replication_slot('mem_vsql'), pg_drop_replication_slot('mem_w2j')" >/dev/null

echo "==> compliance evidence: $(commas "$entries") entries, $(commas "$access_rows") access rows"
a=$(now)
psql_su -v entries="$entries" -f benches/sql/compliance_entries.sql >/dev/null
info+=("- Compliance scenario: entries topped up to $(commas "$entries") by INSERT ... SELECT into vault.entries in $(elapsed "$a") s.")
a=$(now)
before=$(psql_su -Atc "SELECT count(*) FROM vault.access_log")
psql_su -v access_rows="$access_rows" -f benches/sql/compliance_access.sql >/dev/null
s=$(elapsed "$a")
added=$(($(psql_su -Atc "SELECT count(*) FROM vault.access_log") - before))
[ $((before + added)) -ge "$access_rows" ] ||
    fail "benches/sql/compliance_access.sql left the access log at $((before + added)) rows of $access_rows"
info+=("- Compliance scenario: the access log topped up to $(commas "$access_rows") rows: $(commas "$added") rows with their chain fields computed in SQL (benches/sql/compliance_access.sql) and inserted as a restore would, in vsql_vault.restore_mode (the log refuses any other direct insert), 1,000 per transaction, in $s s ($(per_sec "$added" "$s") rows/s).")
psql_su -c "VACUUM ANALYZE vault.entries, vault.access_log, vault.access_daily" >/dev/null
psql_su -c "CREATE ROLE bench_auditor LOGIN IN ROLE vault_auditor"
# median seconds of 3 runs of query $1 in one session of bench_auditor (psql \timing)
secs3() {
    local t
    local -a ms
    t=$(printf '\\o /dev/null\n\\timing on\n%s;\n%s;\n%s;\n' "$1" "$1" "$1" |
        psql_as bench_auditor | awk '/^Time:/ {print $2}')
    [ "$(wc -l <<<"$t")" = 3 ] || { echo "FAILED"; return 0; }
    mapfile -t ms <<<"$t"
    # Below a millisecond (a view over pre-aggregated rows), three decimals would print 0.000.
    awk -v ms="$(median "${ms[@]}")" 'BEGIN {printf (ms < 1 ? "%.6f" : "%.3f"), ms / 1000}'
}
ce=$(psql_su -Atc "SELECT count(*) FROM vault.entries")
ca=$(psql_su -Atc "SELECT count(*) FROM vault.access_log")
size="$(commas "$ce") entries, $(commas "$ca") access rows"
add_row time "vault_compliance_report() (signed), $size (s, median of 3) vs the service's 5 s target" \
    "$(secs3 "SELECT vault_compliance_report()")" 5 "< 1 s" max:1
add_row time "vault_metrics(), same data (s, median of 3)" "$(secs3 "SELECT vault_metrics()")" 5 "< 1 s" max:1
for v in retention_compliance access_summary key_inventory audit_integrity; do
    add_row time "SELECT count(*) FROM vault.$v, same data (s, median of 3)" \
        "$(secs3 "SELECT count(*) FROM vault.$v")" 5 "< 1 s" max:1
done

# Key governance (issue 18): the re-encryption queue of one directive over the same entries, an
# exact key (1/250 of them) and a prefix pattern (61 of the 250 keys, about a quarter).
exact=$(psql_su -Atc "SELECT vault_key_directive('retire-key', 'kms://bench/key-7')")
prefix=$(psql_su -Atc "SELECT vault_key_directive('retire-key', 'kms://bench/key-2*')")
for d in "$exact exact key_ref" "$prefix prefix pattern kms://bench/key-2*"; do
    add_row time "overdue entries of one retire-key directive ($(cut -d' ' -f2- <<<"$d")) from vault.reencryption_queue, $(commas "$ce") entries (s, median of 3)" \
        "$(secs3 "SELECT count(*) FROM vault.reencryption_queue WHERE directive_id = ${d%% *} AND overdue")" 5 "< 1 s" max:1
done
psql_su -Atc "SELECT vault_revoke_directive($exact, 'bench'), vault_revoke_directive($prefix, 'bench')" >/dev/null

pgver=$(psql_su -Atc "SHOW server_version")
bash tests/cluster.sh stop "$dir"

core_md=""
core_failed=""
if [ "${BENCH_CORE:-1}" != 0 ] && [ -f benches/core.sh ]; then
    echo "==> core crate primitives vs openssl speed (benches/core.sh)"
    if bash benches/core.sh "$dir/core.md" 2>"$dir/core.log" >/dev/null; then
        core_md=$(cat "$dir/core.md")
    else
        core_failed=1
        core_md="benches/core.sh failed; the end of its output:

\`\`\`
$(tail -20 "$dir/core.log")
\`\`\`"
    fi
fi

total=$(($(date +%s) - t0))
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
{
    echo "# vsql_vault benchmarks"
    echo
    echo "Run $(date -u +%Y-%m-%dT%H:%MZ) by \`bash benches/run.sh\` in $((total / 60)) min $((total % 60)) s, on"
    echo "$cpu, $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB, $(sed -n 's/^PRETTY_NAME="\(.*\)"/\1/p' /etc/os-release),"
    echo "Linux $(uname -r), PostgreSQL $pgver, $(rustc --version | cut -d' ' -f1-2), release build."
    echo "Cluster: shared_buffers 1GB, synchronous_commit on, fsync on, logical_decoding_work_mem 256MB"
    echo "(64MB, the default, in the memory rows); pgbench -T $secs, -j 2, median of $reps. Load average"
    echo "(1, 5, 15 min) at the start: $load0; at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work shares the machine)."
} >"$results/header.md"
printf '%s\n' "${rows[@]}" >"$results/rows.md"
printf '%s\n' "${info[@]}" >"$results/info.md"
if [ ${#missed[@]} -gt 0 ]; then printf '%s\n' "${missed[@]}" >"$results/missed.md"; fi
[ -z "$core_md" ] || printf '%s\n' "$core_md" >"$results/core.md"
cp "$dir/latency.md" "$dir/cpu.md" "$results/"
render
cat "$out"
echo
echo "total run time: $((total / 60)) min $((total % 60)) s"
[ -z "$core_failed" ] || fail "benches/core.sh failed (see $dir/core.log)"
