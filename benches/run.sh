#!/usr/bin/env bash
# Benchmarks: vsql_vault side by side with what users would do instead, printed as ratios.
# Builds and installs the release library, starts its own tuned cluster, runs every scenario with
# pgbench (fixed-length runs, median of several), stops the cluster, and writes the table to
# benches/results/latest.md.
#   bash benches/run.sh                 # the standard run
#   BENCH_SECONDS=10 BENCH_REPS=5 BENCH_SWEEP=1000000 bash benches/run.sh   # longer
set -euo pipefail
cd "$(dirname "$0")/.."
VSQL_VAULT_RELEASE=1 bash tests/setup.sh >/dev/null
# The decoding peer: wal2json (benchmarks only).
if ! dpkg-query -W -f='${Status}' postgresql-15-wal2json 2>/dev/null | grep -q "install ok installed"; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15-wal2json >/dev/null
fi
secs=${BENCH_SECONDS:-5}
reps=${BENCH_REPS:-3}
sweep_n=${BENCH_SWEEP:-100000}
dir=/tmp/vsql_vault_bench
port=${BENCH_PORT:-54339}
db=vault_bench
bash tests/cluster.sh stop "$dir"
rm -rf "$dir"
trap 'bash tests/cluster.sh stop "$dir"' EXIT
VSQL_VAULT_EXTRA_CONF="shared_buffers = '1GB'
max_wal_size = '4GB'
checkpoint_timeout = '30min'
vsql_vault.checkpoint_interval = 3600
vsql_vault.sweep_interval = 604800
vsql_vault.kek_file = '$dir/bench.kek'
logical_decoding_work_mem = '256MB'
$(runuser -u postgres -- /usr/lib/postgresql/15/bin/postgres --describe-config 2>/dev/null |
    grep '^output_plugin_libraries' >/dev/null &&
    echo "output_plugin_libraries = 'pgoutput, test_decoding, wal2json, vsql_vault'")" \
    bash tests/cluster.sh start "$dir" "$port" "$db"
printf 'v1 %s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/bench.kek"
chown postgres "$dir/bench.kek"
chmod 600 "$dir/bench.kek"

psql_su() { psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"; }
psql_su -c "CREATE EXTENSION vsql_vault"
psql_su -c "CREATE ROLE bench LOGIN IN ROLE vault_app, vault_admin"
psql_su -c "SELECT vault_set_retention_policy('bench', 365, 90)"
psql_su -c "SELECT vault_set_retention_policy('bench.sweep', 365, 1)"
psql_su <<'SQL'
CREATE TABLE plain_kv (id int PRIMARY KEY, v bytea NOT NULL, metadata jsonb NOT NULL DEFAULT '{}');
INSERT INTO plain_kv SELECT g, '\xdeadbeefdeadbeefdeadbeefdeadbeef' FROM generate_series(1, 10000) g;
CREATE TABLE events_plain (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
CREATE TABLE events_chained (id bigserial PRIMARY KEY, tenant text NOT NULL, event text NOT NULL);
GRANT ALL ON plain_kv, events_plain, events_chained, events_plain_id_seq, events_chained_id_seq TO bench;
SQL
psql_su -c "SELECT vault_protect_table('events_chained', 16)"
psql -X -q -h "$dir" -p "$port" -U bench -d "$db" -c \
    "SELECT count(vault_put('bench', 'k' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef')) FROM generate_series(1, 10000) g" >/dev/null

w=$dir/scripts
mkdir -p "$w"
printf '\\set id random(1, 10000)\nSELECT vault_put('"'"'bench'"'"', '"'"'k'"'"' || :id, '"'"'\\xdeadbeefdeadbeefdeadbeefdeadbeef'"'"');\n' >"$w/put.sql"
printf '\\set id random(1, 10000)\nINSERT INTO plain_kv VALUES (:id, '"'"'\\xdeadbeefdeadbeefdeadbeefdeadbeef'"'"') ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v;\n' >"$w/upsert.sql"
printf '\\set id random(1, 10000)\nSELECT encrypted_value FROM vault_get('"'"'bench'"'"', '"'"'k'"'"' || :id);\n' >"$w/get.sql"
printf '\\set id random(1, 10000)\nSELECT found FROM vault_head('"'"'bench'"'"', '"'"'k'"'"' || :id);\n' >"$w/head.sql"
printf '\\set id random(1, 10000)\nSELECT v FROM plain_kv WHERE id = :id;\n' >"$w/select.sql"
printf 'INSERT INTO events_plain (tenant, event) VALUES ('"'"'acme'"'"', '"'"'login'"'"');\n' >"$w/insert_plain.sql"
printf 'INSERT INTO events_chained (tenant, event) VALUES ('"'"'acme'"'"', '"'"'login'"'"');\n' >"$w/insert_chained.sql"

# median tps of $reps runs of script $1 with $2 clients
tps() {
    local runs=()
    for _ in $(seq 1 "$reps"); do
        runs+=("$(pgbench -n -h "$dir" -p "$port" -U bench -c "$2" -j 2 -T "$secs" -f "$w/$1.sql" "$db" 2>/dev/null |
            awk '/^tps/ {printf "%d", $3}')")
    done
    printf '%s\n' "${runs[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

rows=()
row() { # scenario, ours, peer, target
    local ratio
    ratio=$(awk -v a="$2" -v b="$3" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }')
    rows+=("| $1 | $2 | $3 | $ratio | $4 |")
    echo "  $1: $2 vs $3 ($ratio)"
}

echo "==> storage (tps, median of $reps x ${secs}s)"
for c in 1 4 16; do
    row "vault_put vs INSERT ON CONFLICT, $c clients (tps)" "$(tps put "$c")" "$(tps upsert "$c")" ">= 0.8x"
done
for c in 1 4 16; do
    row "vault_get vs SELECT by key, $c clients (tps)" "$(tps get "$c")" "$(tps select "$c")" ">= 0.5x at 16"
done
for c in 1 16; do
    row "vault_head vs SELECT by key, $c clients (tps)" "$(tps head "$c")" "$(tps select "$c")" ">= 0.5x at 16"
done
echo "==> chained append-only insert"
row "chained insert vs plain insert, 16 clients (tps)" "$(tps insert_chained 16)" "$(tps insert_plain 16)" ">= 0.8x"

echo "==> verification"
log_rows=$(psql_su -Atc "SELECT count(*) FROM vault.access_log")
start=$(date +%s.%N)
psql_su -Atc "SELECT count(*) FROM vault_verify_audit('vault.access_log')" >/dev/null
end=$(date +%s.%N)
in_db=$(awk -v n="$log_rows" -v a="$start" -v b="$end" 'BEGIN {printf "%d", n / (b - a)}')
psql_su -Atc "SELECT vault_export_audit('vault.access_log')" >"$dir/export.jsonl"
keys=()
for k in $(psql_su -Atc "SELECT public_key FROM vault.signing_keys"); do keys+=(--public-key "$k"); done
if [ ${#keys[@]} -eq 0 ]; then
    psql_su -Atc "SELECT vault_checkpoint()" >/dev/null
    for k in $(psql_su -Atc "SELECT public_key FROM vault.signing_keys"); do keys+=(--public-key "$k"); done
fi
start=$(date +%s.%N)
target/release/vsql-vault verify --export "$dir/export.jsonl" "${keys[@]}" >/dev/null
end=$(date +%s.%N)
offline=$(awk -v n="$log_rows" -v a="$start" -v b="$end" 'BEGIN {printf "%d", n / (b - a)}')
row "verify $log_rows chained rows: in SQL vs offline (rows/s)" "$in_db" "$offline" "offline >= 1,000,000 rows/s"

echo "==> retention"
psql_su -c "INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner, created_at,
                                       updated_at, expires_at)
            SELECT 'bench.sweep', 's' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef', 'owner-only', 'bench', now(),
                   now(), now() - interval '1 second'
            FROM generate_series(1, $sweep_n) g"
start=$(date +%s.%N)
purged=$(psql -X -q -h "$dir" -p "$port" -U bench -d "$db" -Atc "SELECT vault_purge_sweep()")
end=$(date +%s.%N)
rate=$(awk -v n="$purged" -v a="$start" -v b="$end" 'BEGIN {printf "%d", n / (b - a)}')
row "purge with signed proofs, $purged expired entries (entries/s)" "$rate" "33334" "1,000,000 in <= 30 s"

echo "==> decoding: 200,000 inserted rows in 100-row transactions, pg_logical_slot_peek_changes"
psql_su -c "CREATE TABLE decode_rows (id int PRIMARY KEY, note text, amount numeric, at timestamptz)"
psql_su -c "CREATE PUBLICATION bench_pub FOR TABLE decode_rows"
for plugin in vsql_vault wal2json test_decoding pgoutput; do
    psql_su -Atc "SELECT pg_create_logical_replication_slot('bench_$plugin', '$plugin')" >/dev/null
done
psql_su -c "DO \$\$ BEGIN FOR b IN 0..1999 LOOP
              INSERT INTO decode_rows SELECT g, 'row ' || g, g * 1.5, now() FROM generate_series(b * 100 + 1, b * 100 + 100) g;
              COMMIT; END LOOP; END \$\$"
peek_secs() { # median seconds of $reps peeks: slot, SQL function, extra options
    local runs=()
    for _ in $(seq 1 "$reps"); do
        local a b
        a=$(date +%s.%N)
        psql_su -Atc "SELECT count(*) FROM $2('bench_$1', NULL, NULL $3)" >/dev/null
        b=$(date +%s.%N)
        runs+=("$(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.3f", b - a}')")
    done
    printf '%s\n' "${runs[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
ours=$(peek_secs vsql_vault pg_logical_slot_peek_changes "")
w1=$(peek_secs wal2json pg_logical_slot_peek_changes ", 'format-version', '1'")
w2=$(peek_secs wal2json pg_logical_slot_peek_changes ", 'format-version', '2'")
td=$(peek_secs test_decoding pg_logical_slot_peek_changes "")
po=$(peek_secs pgoutput pg_logical_slot_peek_binary_changes ", 'proto_version', '1', 'publication_names', 'bench_pub'")
speed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", b / a }'; }
rows+=("| decoding 200,000 rows, vsql_vault (encrypting, signing) vs wal2json format 1 (s) | $ours | $w1 | $(speed "$ours" "$w1") | >= 1.0x |")
rows+=("| decoding vs wal2json format 2 (s) | $ours | $w2 | $(speed "$ours" "$w2") | |")
rows+=("| decoding vs test_decoding (s) | $ours | $td | $(speed "$ours" "$td") | |")
rows+=("| decoding vs pgoutput (s) | $ours | $po | $(speed "$ours" "$po") | as close as possible |")
echo "  vsql_vault $ours s, wal2json v1 $w1 s, v2 $w2 s, test_decoding $td s, pgoutput $po s"
for plugin in vsql_vault wal2json test_decoding pgoutput; do
    psql_su -Atc "SELECT pg_drop_replication_slot('bench_$plugin')" >/dev/null
done

pgver=$(psql_su -Atc "SHOW server_version")
out=benches/results/latest.md
{
    echo "# vsql_vault benchmarks"
    echo
    echo "Run $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB, PostgreSQL $pgver,"
    echo "release build; shared_buffers 1GB, synchronous_commit on, fsync on; pgbench -T $secs, median of $reps."
    echo "The retention peer column is the rate the aim needs (1,000,000 in 30 s); decoding rows are"
    echo "seconds (lower is better) and the ratio is peer time / vsql_vault time."
    echo
    echo "| scenario | vsql_vault | peer | ratio | target |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$out"
echo
cat "$out"
