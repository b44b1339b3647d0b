#!/usr/bin/env bash
# Fuzz smoke test: builds every cargo-fuzz target of fuzz/ and runs each for 30 seconds on its
# committed corpus (fuzz/corpus/<target>), one after another in one process each. Prints one line
# per target and exits non-zero if any target crashes, times out or fails to build.
#
# Works on a stable toolchain. With --sanitizer none (the default here) cargo-fuzz passes rustc
# only stable -C flags; RUSTC_BOOTSTRAP=1 is set anyway so that FUZZ_SANITIZER=address, which
# needs -Zsanitizer, also builds on stable.
#
#   bash tests/fuzz_smoke.sh                          # every target, 30 s each
#   FUZZ_SECONDS=5 bash tests/fuzz_smoke.sh           # shorter
#   bash tests/fuzz_smoke.sh kek_ring                 # some targets only
#   FUZZ_SANITIZER=address bash tests/fuzz_smoke.sh   # with AddressSanitizer (slower)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-30}
export RUSTC_BOOTSTRAP=1
sanitizer=${FUZZ_SANITIZER:-none}
opts=(--fuzz-dir fuzz --sanitizer "$sanitizer" --target-dir fuzz/target)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "==> building the fuzz targets ($(cargo fuzz --version))"
cargo fuzz build "${opts[@]}" 2>&1 | grep -E '^(warning|error)|Finished' || true
# The pipe above hides the build's status: build again quietly to fail on an error.
cargo fuzz build "${opts[@]}" >/dev/null 2>&1 || {
    cargo fuzz build "${opts[@]}"
    exit 1
}

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
failed=0
for t in "${targets[@]}"; do
    dict=()
    case $t in
    stream_reader | audit_verify | purge_proof | signed_report) dict=(-dict=fuzz/dict/json.dict) ;;
    esac
    # New inputs go to a scratch directory; the committed corpus is only read.
    mkdir -p "$logs/$t"
    if cargo fuzz run "${opts[@]}" "$t" "$logs/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 "${dict[@]}" \
        >"$logs/$t.log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
        cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$logs/$t.log" | tail -1)
        printf 'ok     %-14s %ss  runs: %s  %s\n' "$t" "$seconds" "${runs:-?}" "${cov:-}"
    else
        failed=1
        artifact=$(grep -oE 'fuzz/artifacts/[^ ]+' "$logs/$t.log" | head -1 || true)
        printf 'CRASH  %-14s %s\n' "$t" "${artifact:-see the log below}"
        if grep -qE 'panicked at|ERROR: libFuzzer|==ERROR' "$logs/$t.log"; then
            grep -E -A8 'panicked at|ERROR: libFuzzer|==ERROR' "$logs/$t.log" | head -40
        else
            tail -40 "$logs/$t.log"
        fi
    fi
done
exit "$failed"
