#!/usr/bin/env bash
# Offline verification rows/s and peak memory on a generated export, without PostgreSQL:
# `vsql-vault verify` with checkpoints, as benches/run.sh times it on real exports.
#   bash benches/verify.sh                          # 1,000,000 rows shaped like public.audit_events
#   ROWS=200000 SHAPE=access_log bash benches/verify.sh   # 16 columns, like vault.access_log
#   SHUFFLE=1 bash benches/verify.sh                # rows out of chain order (the sorting path)
#   CHAINS=16 bash benches/verify.sh                # rows in 16 chains
# The export is generated once per (ROWS, SHAPE, CHAINS) under /tmp/vsql_vault_verify_bench and
# reused. Peak memory is GNU time's maximum resident set size.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${ROWS:-1000000}
shape=${SHAPE:-audit_events}
chains=${CHAINS:-1}
dir=/tmp/vsql_vault_verify_bench/$shape-$rows-$chains
cargo build --release -q -p vsql-vault --example gen_export --bin vsql-vault
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
if [ ! -f "$dir/public_key.hex" ]; then
    echo "generating $rows rows ($shape, $chains chains) in $dir" >&2
    "$target/release/examples/gen_export" "$dir" "$rows" "$shape" "$chains" >/dev/null
fi
export_file=$dir/export.jsonl
if [ -n "${SHUFFLE:-}" ]; then
    [ -f "$dir/shuffled.jsonl" ] || shuf --random-source=<(yes) "$dir/export.jsonl" >"$dir/shuffled.jsonl"
    export_file=$dir/shuffled.jsonl
fi
out=$(mktemp)
trap 'rm -f "$out"' EXIT
/usr/bin/time -f '%e %M' -o "$out.time" "$target/release/vsql-vault" verify --export "$export_file" \
    --checkpoints "$dir/checkpoints.jsonl" --public-key "$(cat "$dir/public_key.hex")" >"$out"
grep -q FAILED "$out" && { cat "$out"; exit 1; }
read -r secs rss <"$out.time"
rm -f "$out.time"
awk -v n="$rows" -v s="$secs" -v rss="$rss" -v f="$(du -m "$export_file" | cut -f1)" -v shape="$shape" \
    -v sorted="${SHUFFLE:+ (shuffled)}" 'BEGIN {
    printf "verify %d rows (%s, %d MB)%s: %.2f s, %d rows/s, max RSS %.1f MB\n", n, shape, f, sorted, s, n / s, rss / 1024 }'
