#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) and builds and installs vsql_vault:
# Debian packages, cargo-pgrx 0.18.1, `cargo pgrx init` against the system PostgreSQL 15, and
# `cargo pgrx install`. Every step is skipped when already done, so running it again is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGBIN=/usr/lib/postgresql/15/bin

say() { printf '\n==> %s\n' "$*"; }

packages=(postgresql-15 postgresql-client-15 postgresql-server-dev-15 libpq-dev libclang-dev clang sudo)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# A server older than 15.19 lacks the output_plugin_libraries hardening; bring the current minor.
if [ ${#missing[@]} -eq 0 ] && ! runuser -u postgres -- "$PGBIN/postgres" --describe-config 2>/dev/null | grep '^output_plugin_libraries' >/dev/null; then
    missing+=(postgresql-15)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "Installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
fi

# The second, independent verifier of the tests (tests/verifier/verify.py) needs Python 3 only.
if ! command -v python3 >/dev/null; then
    say "Installing python3 (the tests' second verifier)"
    apt-get install -y -qq python3 >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
    say "Installing cargo-pgrx 0.18.1 (a few minutes the first time)"
    cargo install cargo-pgrx --version 0.18.1 --locked
fi

if ! grep -q "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml" 2>/dev/null; then
    say "Pointing pgrx at the system PostgreSQL 15"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

say "Building and installing vsql_vault into $("$PG_CONFIG" --pkglibdir)"
# A release build by default: the server a user follows the README into gets an optimized
# library. VSQL_VAULT_DEBUG=1 installs a debug build instead (for development).
release=--release
if [ -n "${VSQL_VAULT_DEBUG:-}" ]; then release=; fi
cargo pgrx install --pg-config "$PG_CONFIG" $release 2>&1 |
    grep -E 'Finished|Installing|error|warning: unused' || true
test -f "$("$PG_CONFIG" --pkglibdir)/vsql_vault.so"

say "Building the offline verifier: target/release/vsql-vault"
cargo build --release -q -p vsql-vault
