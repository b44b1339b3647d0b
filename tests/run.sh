#!/usr/bin/env bash
# Runs every test: formatting and lints, the core crate's unit tests, the in-backend #[pg_test]
# units (pg_test/in_backend.sh), then a private preloaded PostgreSQL cluster for the golden-file
# SQL tests (pg_test/) and the integration tests (tests/).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build gains nothing from incremental caches, which were a quarter of target/.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
bash tests/setup.sh

echo "==> cargo fmt --check and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "==> core crate and offline tool tests (no server)"
cargo test -p vsql_vault_core -p vsql-vault

echo "==> in-backend unit tests (#[pg_test], pg_test/in_backend.sh)"
bash pg_test/in_backend.sh

dir=$(mktemp -d /tmp/vsql_vault_test.XXXXXX)
port=${VSQL_VAULT_TEST_PORT:-54331}
db=vault_test
trap 'bash tests/cluster.sh stop "$dir"' EXIT
echo "==> starting a preloaded cluster in $dir on port $port"
bash tests/cluster.sh start "$dir" "$port" "$db"

echo "==> golden-file SQL tests (pg_test/)"
bash pg_test/run.sh "$dir" "$port" "$db"

echo "==> integration tests against the running server (tests/)"
VSQL_VAULT_TEST_DIR="$dir" VSQL_VAULT_TEST_PORT="$port" VSQL_VAULT_TEST_DB="$db" \
    VSQL_VAULT_CLI="$PWD/target/release/vsql-vault" \
    cargo test -p vsql_vault_tests -- --test-threads=1

echo "==> fuzz smoke: every cargo-fuzz target of the core for 30 seconds (tests/fuzz_smoke.sh)"
bash tests/fuzz_smoke.sh
