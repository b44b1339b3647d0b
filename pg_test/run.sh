#!/usr/bin/env bash
# Golden-file tests of the SQL surface, run by PostgreSQL's pg_regress against a running cluster:
# pg_test/sql/NAME.sql in the order of pg_test/schedule, each compared with pg_test/expected/NAME.out.
# What a test's output must not depend on (times, source locations) each test masks itself.
#   pg_test/run.sh SOCKET_DIR PORT DB      compare; on failure print regression.diffs
#   UPDATE_EXPECTED=1 pg_test/run.sh ...   rewrite the expected files from this run (review the diff!)
# DB must be a database that has never had the extension (setup.sql creates it): with
# --use-existing pg_regress neither drops nor creates it. Results go to SOCKET_DIR/pg_regress/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=$1 port=$2 db=$3
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
pg_regress=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress/pg_regress
out=$dir/pg_regress
# The tests expect a database that has never had the extension: refuse to record anything else.
if [ -n "${UPDATE_EXPECTED:-}" ] && psql -X -q -h "$dir" -p "$port" -U postgres -d "$db" -tAc \
    "SELECT 1 FROM pg_extension WHERE extname = 'vsql_vault'" | grep -q 1; then
    echo "UPDATE_EXPECTED needs a fresh database (vsql_vault is already installed in $db)" >&2
    exit 2
fi
rm -rf "$out"
mkdir -p "$out"
if [ -n "${UPDATE_EXPECTED:-}" ]; then
    # pg_regress stops at a test without an expected file: give a new test an empty one.
    for t in $(sed -n 's/^test:[[:space:]]*//p' "$here/schedule"); do
        [ -f "$here/expected/$t.out" ] || : >"$here/expected/$t.out"
    done
fi
status=0
"$pg_regress" --use-existing --host="$dir" --port="$port" --user=postgres --dbname="$db" \
    --bindir="$("$PG_CONFIG" --bindir)" --inputdir="$here" --outputdir="$out" \
    --schedule="$here/schedule" || status=$?
if [ -n "${UPDATE_EXPECTED:-}" ] && [ "$status" -le 1 ]; then
    cp "$out"/results/*.out "$here/expected/"
    echo "pg_test: expected files rewritten from $out/results: review git diff pg_test/expected"
    exit 0
elif [ "$status" -ne 0 ] && [ -f "$out/regression.diffs" ]; then
    cat "$out/regression.diffs"
fi
exit "$status"
