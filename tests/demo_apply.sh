#!/usr/bin/env bash
# Part of tests/demo.sh, its last step: a second cluster receives the demo's encrypted replication
# stream through `vsql-vault apply`, and vault_table_digest shows both clusters hold the same rows;
# one value changed on the second cluster changes its digest, and vault_table_digest_ranges
# narrows the difference down to one bucket. Starts the second cluster, shows it, stops it.
#   bash tests/demo_apply.sh DIR PORT DB    (the demo cluster's socket directory, port, database)
# Expects what tests/demo.sh made: the slot demo_apply (vsql_vault plugin, created before the
# payments rows were written), the KEK file DIR/replication.kek and the directory DIR/evidence.
# The second cluster: DIR/apply, port PORT+3 (VSQL_VAULT_DEMO_APPLY_PORT), recreated on every run.
# Exit status 1 if the digests do not match where they should (or differ in more than one bucket).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$1 port=$2 db=$3
tdir=$dir/apply
tport=${VSQL_VAULT_DEMO_APPLY_PORT:-$((port + 3))}
kek=$dir/replication.kek
out=$dir/evidence
vv=target/release/vsql-vault
stop_target() { bash tests/cluster.sh stop "$tdir"; }
stop_target
rm -rf "$tdir"
trap stop_target EXIT

src() { # src SQL...: psql on the demo cluster as postgres, stopping at the first error
    psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"
}
tgt() { # tgt SQL...: the same on the second cluster
    psql -X -q -h "$tdir" -p "$tport" -U postgres -d "$db" -v ON_ERROR_STOP=1 "$@"
}
fail() {
    echo "demo_apply.sh: $*" >&2
    exit 1
}

echo
echo "==> Applying the stream to a second PostgreSQL: a cluster on port $tport receives the sealed stream through vsql-vault apply"
bash tests/cluster.sh start "$tdir" "$tport" "$db"
echo "   the slot demo_apply was created before the payments rows above; more changes on the source since:"
orders_ddl="CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, amount numeric(10,2),
                     placed_at timestamptz, items jsonb);"
printf '%s\n' "$orders_ddl" | sed 's/^/   /'
src -c "$orders_ddl"
workload=$(
    cat <<'SQL'
INSERT INTO orders SELECT g, 'customer-' || (g % 97), g * 1.25, timestamptz '2026-01-01 00:00+00' + g * interval '1 hour',
                          jsonb_build_object('sku', 'A-' || g, 'qty', g % 5 + 1)
                     FROM generate_series(1, 1000) g;
INSERT INTO orders VALUES (1001, 'Zoë "quoted" \ O''Brien', NULL, NULL, '{"note": "ünïcode ✓"}');
BEGIN; UPDATE orders SET amount = amount * 1.1 WHERE id % 10 = 0; DELETE FROM orders WHERE id % 50 = 7; COMMIT;
BEGIN; DELETE FROM orders WHERE id <= 100; ROLLBACK;   -- rolled back: never leaves the source
UPDATE payments SET amount = 45.00 WHERE id = 1;
INSERT INTO payments VALUES (3, '4000056655665556', 120.00);
DELETE FROM payments WHERE id = 2;
SQL
)
printf '%s\n' "$workload" | sed 's/^/   /'
src <<<"$workload"

echo "   on the second cluster, the extension (for the digests) and the tables (DDL is not replicated;"
echo "   payments without pan, the column that never leaves the source):"
tgt <<SQL
CREATE EXTENSION vsql_vault;
$orders_ddl
CREATE TABLE payments (id int PRIMARY KEY, amount numeric);
SQL

keys=()
for k in $(src -Atc "SELECT public_key FROM vault.signing_keys"); do
    keys+=(--public-key "$k")
done
end=$(src -Atc "SELECT pg_current_wal_lsn()")
target="host=$tdir port=$tport user=postgres dbname=$db"
echo "==> The pipeline (the stream is sealed until vsql-vault apply opens it; tee keeps a copy):"
echo "   pg_recvlogical -h $dir -p $port -U postgres -d $db --slot demo_apply --start --endpos $end --no-loop -f - \\"
echo "     | tee $out/apply-stream.jsonl \\"
echo "     | $vv apply --kek-file $kek --public-key <hex> --target '$target'"
echo "   (or: ... | vsql-vault decrypt --markers --kek-file ... --public-key ... | vsql-vault apply --target ...)"
pg_recvlogical -h "$dir" -p "$port" -U postgres -d "$db" --slot demo_apply --start --endpos "$end" --no-loop -f - |
    tee "$out/apply-stream.jsonl" |
    "$vv" apply --kek-file "$kek" "${keys[@]}" --target "$target" 2>&1 | sed 's/^/   /'
printf '   %s lines on the wire; lines with the new amount or card number in clear: %s\n' \
    "$(wc -l <"$out/apply-stream.jsonl")" "$(grep -c -e '120\.00' -e '4000056655665556' "$out/apply-stream.jsonl" || true)"
echo "==> Exactly once: the same stream applied again changes nothing (the position is kept in the target)"
"$vv" apply --kek-file "$kek" "${keys[@]}" --input "$out/apply-stream.jsonl" --target "$target" 2>&1 | sed 's/^/   /'
tgt -c "TABLE vsql_vault_apply.progress" | sed 's/^/   /'

digest() { # digest src|tgt TABLE [COLUMNS]: the hex root of vault_table_digest
    "$1" -Atc "SELECT encode(vault_table_digest('$2'${3:+, $3}), 'hex')"
}
show() { # show TABLE A B
    printf '   %-9s %-66s %s\n' "$1" "$2" "$3"
}
compare() { # compare: both tables' digests side by side; sets same=yes when both match
    show table "source (port $port)" "target (port $tport)"
    local a b
    same=yes
    a=$(digest src orders) b=$(digest tgt orders)
    show orders "$a" "$b"
    [ "$a" = "$b" ] || same=no
    a=$(digest src payments "ARRAY['id', 'amount']") b=$(digest tgt payments)
    show payments "$a" "$b"
    [ "$a" = "$b" ] || same=no
}
echo "==> vault_table_digest on both clusters (payments: the columns that left, id and amount)"
echo "   SELECT encode(vault_table_digest('orders'), 'hex');"
echo "   SELECT encode(vault_table_digest('payments', ARRAY['id', 'amount']), 'hex');  -- on the target: ('payments')"
compare
printf '   rows: orders %s / %s, payments %s / %s\n' \
    "$(src -Atc 'SELECT count(*) FROM orders')" "$(tgt -Atc 'SELECT count(*) FROM orders')" \
    "$(src -Atc 'SELECT count(*) FROM payments')" "$(tgt -Atc 'SELECT count(*) FROM payments')"
[ "$same" = yes ] || fail "the two clusters' digests differ after apply"
echo "   equal: the second cluster holds the same rows"

echo "==> One value changed on the target behind the stream's back:"
echo "   UPDATE orders SET amount = 999.99 WHERE id = 417;"
tgt -c "UPDATE orders SET amount = 999.99 WHERE id = 417"
compare
[ "$same" = no ] || fail "the digests still match after a value changed on the target"
echo "==> vault_table_digest_ranges('orders', 16) on both, bucket by bucket (first 16 hex characters of each root):"
ranges="SELECT bucket, rows, left(encode(root, 'hex'), 16) FROM vault_table_digest_ranges('orders', 16) ORDER BY bucket"
mapfile -t ra < <(src -AtF ' ' -c "$ranges")
mapfile -t rb < <(tgt -AtF ' ' -c "$ranges")
[ "${#ra[@]}" = 16 ] && [ "${#rb[@]}" = 16 ] || fail "vault_table_digest_ranges did not return 16 buckets"
printf '   %-6s %-24s %s\n' bucket "source rows root" "target rows root"
differing=()
for i in "${!ra[@]}"; do
    read -r b na ha <<<"${ra[$i]}"
    read -r _ nb hb <<<"${rb[$i]}"
    mark=
    if [ "$na $ha" != "$nb $hb" ]; then
        mark="   <== differs"
        differing+=("$b")
    fi
    printf '   %-6s %4s %-19s %4s %s%s\n' "$b" "$na" "$ha" "$nb" "$hb" "$mark"
done
[ "${#differing[@]}" = 1 ] || fail "expected one differing bucket, found ${#differing[@]}"
b=${differing[0]}
echo "==> Only bucket $b differs; its keys on the source:"
src -c "SELECT bucket, rows, first_key, last_key FROM vault_table_digest_ranges('orders', 16) WHERE bucket = $b" |
    sed 's/^/   /'
echo "==> That bucket exported on both (vault_table_digest_export('orders', NULL, 16, $b)) and compared: the one row"
export_sql="SELECT vault_table_digest_export('orders', NULL, 16, $b)"
diff <(src -Atc "$export_sql") <(tgt -Atc "$export_sql") | sed 's/^/   /' || true
src -c "SELECT pg_drop_replication_slot('demo_apply')" >/dev/null
echo "==> The slot demo_apply is dropped and the second cluster stopped again"
