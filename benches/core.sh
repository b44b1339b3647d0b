#!/usr/bin/env bash
# Core crate primitives next to `openssl speed` on the same machine (the practical limit):
# AES-256-GCM seal and open, SHA-256 (MB/s, MB = 10^6 bytes), Ed25519 sign and verify (ops/s),
# Merkle root (leaves/s, against openssl's SHA-256 of 64-byte inputs in hashes/s, since each
# leaf costs one node hash of 65 bytes: two compression blocks, like a 64-byte message).
# Needs cargo, openssl and python3; no PostgreSQL. Takes about 2 minutes (plus about 1 minute for the first release build).
#   bash benches/core.sh               # markdown table on stdout, progress on stderr
#   bash benches/core.sh out.md        # the same table also written to out.md
#   OPENSSL_SECONDS=1 bash benches/core.sh   # shorter openssl runs (default 3 s per size)
set -euo pipefail
load=$(cut -d' ' -f1 /proc/loadavg)
out=${1:-}
[ -z "$out" ] || out=$(realpath -m "$out")
cd "$(dirname "$0")/.."
secs=${OPENSSL_SECONDS:-3}

# 1. Criterion, release (the bench profile inherits [profile.release]); its report goes to stderr.
cargo bench -q -p vsql_vault_core --bench primitives -- --noplot >&2
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

# 2. openssl speed, machine-readable (-mr: +F lines in bytes/s or ops/s).
speed=$(mktemp)
trap 'rm -f "$speed"' EXIT
for args in "-evp aes-256-gcm" "-decrypt -evp aes-256-gcm" "-evp sha256" "ed25519"; do
    echo "openssl speed -seconds $secs $args" >&2
    # shellcheck disable=SC2086
    openssl speed -seconds "$secs" -mr $args 2>/dev/null |
        sed -n "s/^+F/$(echo "$args" | tr ' ' '_')\t+F/p" >>"$speed"
done

# 3. The table.
table=$(CRITERION_DIR="$target/criterion" SPEED="$speed" python3 - <<'PY'
import json, os

crit = os.environ["CRITERION_DIR"]

def ours(bench_id):
    """Criterion's own figure (slope if it fitted one, else mean), as units per second."""
    d = os.path.join(crit, bench_id, "new")
    with open(os.path.join(d, "benchmark.json")) as f:
        (kind, per_iter), = json.load(f)["throughput"].items()
    with open(os.path.join(d, "estimates.json")) as f:
        est = json.load(f)
    ns = (est.get("slope") or est["mean"])["point_estimate"]
    rate = per_iter / (ns * 1e-9)
    return rate / 1e6 if kind == "Bytes" else rate

# openssl -mr lines: "+F:n:AES-256-GCM:v16:v64:v256:v1024:v8192:v16384" (bytes/s per block size)
# and "+F6:n:253:Ed25519:sign/s:verify/s".
speed = {}
with open(os.environ["SPEED"]) as f:
    for line in f:
        run, fields = line.rstrip("\n").split("\t")
        parts = fields.split(":")
        if parts[0] == "+F6":
            speed[run] = {"sign": float(parts[4]), "verify": float(parts[5])}
        else:
            sizes = [16, 64, 256, 1024, 8192, 16384]
            speed[run] = dict(zip(sizes, map(float, parts[3:])))

enc = speed["-evp_aes-256-gcm"][16384] / 1e6
dec = speed["-decrypt_-evp_aes-256-gcm"][16384] / 1e6
sha = speed["-evp_sha256"][16384] / 1e6
sha64 = speed["-evp_sha256"][64] / 64
ed = speed["ed25519"]
rows = [
    ("AES-256-GCM seal, 16 KiB (MB/s)", ours("aes-256-gcm/seal/16KiB"), enc),
    ("AES-256-GCM seal, 1 MiB (MB/s)", ours("aes-256-gcm/seal/1MiB"), enc),
    ("AES-256-GCM open, 16 KiB (MB/s)", ours("aes-256-gcm/open/16KiB"), dec),
    ("AES-256-GCM open, 1 MiB (MB/s)", ours("aes-256-gcm/open/1MiB"), dec),
    ("SHA-256, 16 KiB (MB/s)", ours("sha256/digest/16KiB"), sha),
    ("SHA-256, 1 MiB (MB/s)", ours("sha256/digest/1MiB"), sha),
    ("Ed25519 sign, 64-byte message (ops/s)", ours("ed25519/sign"), ed["sign"]),
    ("Ed25519 verify, 64-byte message (ops/s)", ours("ed25519/verify"), ed["verify"]),
    ("Merkle root, 1,000 leaves (leaves/s)", ours("merkle/root/1000"), sha64),
    ("Merkle root, 100,000 leaves (leaves/s)", ours("merkle/root/100000"), sha64),
]
print("| primitive | vsql_vault_core | openssl speed | ratio |")
print("|---|---|---|---|")
for name, a, b in rows:
    print(f"| {name} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
PY
)
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
flags=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|pclmulqdq|sha_ni|avx2|vaes|vpclmulqdq|avx512f|avx512ifma' | tr '\n' ' ')
note="One thread each; $cpu (${flags% }), $(nproc) cores (load average $load at the start: other work on the machine lowers both columns, not always alike), $(openssl version | cut -d' ' -f1-2).
openssl columns: \`openssl speed -seconds $secs -evp aes-256-gcm\` (open: with \`-decrypt\`) and \`-evp sha256\` at 16384 bytes, \`ed25519\` sign/s and verify/s; Merkle against \`-evp sha256\` at 64 bytes in hashes/s. MB = 10^6 bytes."
result=$(printf '%s\n\n%s\n' "$table" "$note")
printf '%s\n' "$result"
[ -z "$out" ] || printf '%s\n' "$result" >"$out"
