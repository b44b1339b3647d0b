#!/usr/bin/env bash
# In-backend unit tests: the `#[pg_test]` functions of src/ (the `tests` modules), run by
# `cargo pgrx test` in a throwaway cluster it starts itself (not preloaded: see
# `pg_test::postgresql_conf_options` in src/lib.rs), each in a transaction that is rolled back.
#
# `cargo pgrx test` installs a test build over the system's vsql_vault (a debug build with the
# `pg_test` feature, whose vsql_vault--*.sql also creates a `tests` schema with the test
# functions, in every later CREATE EXTENSION). The files installed before are put back on exit,
# whatever the outcome. An argument runs only the tests whose names contain it.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension
saved=$(mktemp -d /tmp/vsql_vault_installed.XXXXXX)
pgdata=$(mktemp -d /tmp/vsql_vault_pg_test.XXXXXX)

installed() { echo "$libdir/vsql_vault.so" "$extdir/vsql_vault.control" "$extdir"/vsql_vault--*.sql; }
restore() {
    for f in $(installed); do rm -f "$f"; done
    for f in "$saved"/*; do
        case $f in
        */vsql_vault.so) cp -p "$f" "$libdir/" ;;
        */vsql_vault*) cp -p "$f" "$extdir/" ;;
        esac
    done
    rm -rf "$saved" "$pgdata"
}
trap restore EXIT
# Both builds first (the test binary, and the library `cargo pgrx test` installs): the system has
# the test build instead of its own only while the tests run, seconds rather than a build's minutes.
cargo test --features pg_test --no-run -q
cargo pgrx package --debug --test --pg-config "$PG_CONFIG" --features pg_test >/dev/null
# Moved, not copied: a running server keeps the library file it mapped, and the installer's `cp`
# makes a new file rather than overwriting that one in place.
for f in $(installed); do
    if [ -e "$f" ]; then mv "$f" "$saved/"; fi
done

# initdb refuses root: the cluster runs as postgres, in a directory postgres owns.
install -d -o postgres "$pgdata"
cargo pgrx test pg15 "$@" --runas postgres --pgdata "$pgdata"
