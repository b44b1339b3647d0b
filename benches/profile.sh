#!/usr/bin/env bash
# Where the time goes, for the aims the benchmarks miss (perf does not work on these VMs, so
# callgrind): the offline verifier over a 100,000-row export, the replication consumer over a
# 20,000-row stream, the output plugin itself decoding that stream in a single-user backend, and
# a backend making 2,000 vault_get calls and one sweeping 20,000 expired entries (the whole server
# runs under valgrind for these two).
# Starts its own small cluster (/tmp/vsql_vault_profile, port 54349), stops it, and writes the top
# functions (callgrind_annotate, exclusive and inclusive) to benches/results/profile.md.
#   bash benches/profile.sh            # about 10 minutes (valgrind runs code ~50x slower)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
bash tests/setup.sh >/dev/null
if ! command -v valgrind >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
rows=${PROFILE_ROWS:-100000}
stream_rows=${PROFILE_STREAM_ROWS:-20000}
top=${PROFILE_TOP:-25}
gets=${PROFILE_GETS:-2000}
sweep=${PROFILE_SWEEP:-20000}
dir=/tmp/vsql_vault_profile
port=${PROFILE_PORT:-54349}
db=vault_profile
out=${PROFILE_OUT:-benches/results/profile.md}
PGBIN=/usr/lib/postgresql/15/bin
bash tests/cluster.sh stop "$dir"
rm -rf "$dir"
trap 'bash tests/cluster.sh stop "$dir"' EXIT
VSQL_VAULT_EXTRA_CONF="vsql_vault.kek_file = '$dir/profile.kek'
vsql_vault.checkpoint_interval = 3600" bash tests/cluster.sh start "$dir" "$port" "$db"
printf 'v1 %s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/profile.kek"
chown postgres "$dir/profile.kek"
chmod 600 "$dir/profile.kek"
psql_su() { psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"; }
psql_su -c "CREATE EXTENSION vsql_vault"

# 1. A protected table of $rows chained rows, exported with its checkpoints.
psql_su -c "CREATE TABLE audit_events (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now(),
            tenant text NOT NULL, actor text NOT NULL, event text NOT NULL, amount numeric)"
psql_su -c "INSERT INTO audit_events (tenant, actor, event, amount)
            SELECT 'tenant-' || g % 100, 'user-' || g % 5000, 'payment ' || g, g * 1.25
            FROM generate_series(1, $rows) g"
psql_su -Atc "SELECT vault_protect_table('audit_events', 16)" >/dev/null
psql_su -Atc "SELECT vault_checkpoint()" >/dev/null
psql_su -Atc "SELECT vault_export_checkpoints()" >"$dir/checkpoints.jsonl"
psql_su -Atc "SELECT vault_export_audit('audit_events')" >"$dir/export.jsonl"
keys=()
for k in $(psql_su -Atc "SELECT public_key FROM vault.signing_keys"); do keys+=(--public-key "$k"); done

# 2. A replication stream of $stream_rows inserted rows in 100-row transactions (the shape of the
#    decoding benchmark), received once into a file; a second slot keeps the same changes for the
#    single-user backend.
psql_su -c "CREATE TABLE decode_rows (id int PRIMARY KEY, note text, amount numeric, at timestamptz)"
psql_su -Atc "SELECT pg_create_logical_replication_slot('prof_recv', 'vsql_vault')" >/dev/null
psql_su -Atc "SELECT pg_create_logical_replication_slot('prof_peek', 'vsql_vault')" >/dev/null
psql_su -c "DO \$\$ BEGIN FOR b IN 0..$((stream_rows / 100 - 1)) LOOP
              INSERT INTO decode_rows SELECT g, 'row ' || g, g * 1.5, now() FROM generate_series(b * 100 + 1, b * 100 + 100) g;
              COMMIT; END LOOP; END \$\$"
endpos=$(psql_su -Atc "SELECT pg_current_wal_lsn()")
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot prof_recv --start --endpos "$endpos" --no-loop \
    -f "$dir/stream.jsonl"
# 3. Entries for vault_get calls, and expired ones for a sweep.
psql_su -c "CREATE ROLE prof LOGIN IN ROLE vault_app, vault_admin"
psql_su -Atc "SELECT vault_set_retention_policy('prof', 365, 90)" >/dev/null
psql_su -Atc "SELECT vault_set_retention_policy('prof.sweep', 365, 1)" >/dev/null
psql_su -c "INSERT INTO vault.entries (purpose, external_id, encrypted_value, access_policy, owner, created_at,
                                       updated_at, expires_at)
            SELECT 'prof.sweep', 's' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef', 'owner-only', 'prof', now(),
                   now(), now() - interval '1 second'
            FROM generate_series(1, $sweep) g"
psql -X -q -h "$dir" -p "$port" -U prof -d "$db" -c \
    "SELECT count(vault_put('prof', 'k' || g, '\xdeadbeefdeadbeefdeadbeefdeadbeef')) FROM generate_series(1, $gets) g" >/dev/null
bash tests/cluster.sh stop "$dir"

cg() { # name, command...: callgrind run (as $RUNAS when set), then its summary
    local name=$1 as=()
    shift
    [ -z "${RUNAS:-}" ] || as=(runuser -u "$RUNAS" --)
    "${as[@]}" valgrind --tool=callgrind --callgrind-out-file="$dir/$name.callgrind" "$@" >/dev/null 2>"$dir/$name.valgrind"
    summary "$name" "$dir/$name.callgrind" "\`$(printf '%s ' "$@" | sed "s|$dir/||g; s|--public-key [0-9a-f]*|--public-key K|g")\`"
}
summary() { # name, callgrind file, what ran: the top functions, exclusive and inclusive
    local name=$1 file=$2
    {
        echo "### $name"
        echo
        echo "$3"
        echo
        echo '```'
        callgrind_annotate --threshold=99 "$file" 2>/dev/null |
            sed -n '/^Ir/,$p' | grep -v '^$' | sed -n "1,$((top + 3))p" | cut -c1-160
        echo '```'
        echo
        echo "Inclusive, below the common call path (97% and more), without recursion entries and"
        echo "unnamed addresses:"
        echo
        echo '```'
        callgrind_annotate --inclusive=yes --threshold=99 "$file" 2>/dev/null | sed -n '/file:function/,$p' |
            awk '/^ *[0-9,]+ +\( *[0-9.]+%\)/ {p = $2; gsub(/[(%)]/, "", p); if (p + 0 >= 97) next}
                 /\x27[0-9]+ \[/ || /\?\?\?:0x/ {next} /^-|^Ir|^$/ {next} {print}' |
            sed -n "1,${top}p" | cut -c1-160
        echo '```'
        echo
    } >>"$dir/profile.md"
}
: >"$dir/profile.md"
echo "==> callgrind: vsql-vault verify, $rows rows"
cg verify target/release/vsql-vault verify --export "$dir/export.jsonl" --checkpoints "$dir/checkpoints.jsonl" --table public.audit_events "${keys[@]}"
echo "==> callgrind: vsql-vault decrypt, $stream_rows rows"
cg decrypt target/release/vsql-vault decrypt --kek-file "$dir/profile.kek" --input "$dir/stream.jsonl" "${keys[@]}"
echo "==> callgrind: the output plugin in a single-user backend, $stream_rows rows"
printf "SELECT count(*) FROM pg_logical_slot_peek_changes('prof_peek', NULL, NULL)\n" >"$dir/peek.sql"
chown postgres "$dir/peek.sql"
(cd "$dir" && RUNAS=postgres cg decoding "$PGBIN/postgres" --single -D "$dir/data" \
    -c shared_buffers=128MB "$db" <"$dir/peek.sql")

echo "==> callgrind: $gets vault_get calls in one backend (the whole server under valgrind)"
install -d -o postgres "$dir/cg"
(cd "$dir" && runuser -u postgres -- valgrind --tool=callgrind --callgrind-out-file="$dir/cg/cg.%p" \
    "$PGBIN/postgres" -D "$dir/data" -c shared_buffers=128MB >"$dir/server-valgrind.log" 2>&1 &)
up=""
for _ in $(seq 1 300); do
    up=$(psql -X -h "$dir" -p "$port" -U postgres -d "$db" -Atc \
        "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'vsql_vault audit writer'" 2>/dev/null || true)
    [ -z "$up" ] || break
    sleep 1
done
[ -n "$up" ] || { echo "the server under valgrind did not start" >&2; exit 1; }
calls=$(psql -X -q -h "$dir" -p "$port" -U prof -d "$db" -Atc "SELECT pg_backend_pid()" \
    -c "SELECT count(*) FROM generate_series(1, $gets) g, vault_get('prof', 'k' || g)")
pid=${calls%%$'\n'*}
echo "==> callgrind: vault_purge_sweep() of $sweep expired entries in one backend"
calls=$(psql -X -q -h "$dir" -p "$port" -U prof -d "$db" -Atc "SELECT pg_backend_pid()" \
    -c "SELECT vault_purge_sweep()")
sweep_pid=${calls%%$'\n'*}
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$dir/data" -m fast -w -t 300 stop >/dev/null
summary vault_get "$dir/cg/cg.$pid" \
    "\`SELECT count(*) FROM generate_series(1, $gets) g, vault_get('prof', 'k' || g)\` (the calling backend only)"
summary vault_purge_sweep "$dir/cg/cg.$sweep_pid" \
    "\`SELECT vault_purge_sweep()\` over $sweep expired entries, one transaction (the calling backend only)"

{
    echo "# Profiles (benches/profile.sh)"
    echo
    echo "callgrind instruction counts (Ir), $(date -u +%Y-%m-%d), release build; top $top functions."
    echo "verify: $rows chained rows of one protected table with checkpoints; decrypt and decoding:"
    echo "$stream_rows inserted rows in 100-row transactions (\`decoding\` is pg_logical_slot_peek_changes"
    echo "in a single-user backend, so it includes the server's own reading and reordering of the WAL);"
    echo "vault_get: $gets calls in one session, and vault_purge_sweep over $sweep expired entries: the"
    echo "calling backend's profile (the audit writer and the retention worker are other processes). Under valgrind the CPU's SHA extensions are not offered, so sha2 runs its"
    echo "portable code: natively SHA-256 costs several times less than the Ir counts here suggest."
    echo
    cat "$dir/profile.md"
} >"$out"
cat "$out"
