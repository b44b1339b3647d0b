#!/usr/bin/env bash
# Golden-file tests of the SQL surface: runs pg_test/sql/NAME.sql with psql (echoing each
# statement) in the order of pg_test/schedule and compares with pg_test/expected/NAME.out.
#   pg_test/run.sh SOCKET_DIR PORT DB      compare
#   UPDATE_EXPECTED=1 pg_test/run.sh ...   rewrite the expected files (review the diff!)
set -uo pipefail
cd "$(dirname "$0")"
dir=$1 port=$2 db=$3
out=$dir/pg_test_results
mkdir -p "$out"
# The tests expect a database that has never had the extension: refuse to record anything else.
if [ -n "${UPDATE_EXPECTED:-}" ] && psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -tAc \
    "SELECT 1 FROM pg_extension WHERE extname = 'vsql_vault'" | grep -q 1; then
    echo "UPDATE_EXPECTED needs a fresh database (vsql_vault is already installed in $db)" >&2
    exit 2
fi
passed=0 failed=0
for t in $(grep -v '^#' schedule); do
    # Source locations in Rust error reports move with every edit, and messages that name a time
    # change with every run: drop the one, mask the other.
    PGOPTIONS='-c client_min_messages=notice' psql -X -a -q -h "$dir" -p "$port" -U postgres -d "$db" \
        -v VERBOSITY=verbose -v SHOW_CONTEXT=never -f "sql/$t.sql" 2>&1 |
        sed -E -e '/^LOCATION:/d' \
            -e 's/[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?\+00/<timestamp>/g' >"$out/$t.out"
    if [ -n "${UPDATE_EXPECTED:-}" ]; then
        cp "$out/$t.out" "expected/$t.out"
    fi
    if diff -u "expected/$t.out" "$out/$t.out" >"$out/$t.diff"; then
        echo "ok     $t"
        passed=$((passed + 1))
    else
        echo "FAILED $t"
        cat "$out/$t.diff"
        failed=$((failed + 1))
    fi
done
echo "pg_test: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
