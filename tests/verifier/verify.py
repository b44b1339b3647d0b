#!/usr/bin/env python3
"""A second, independent verifier of vsql_vault evidence.

Written from docs/audit-format.md alone (no Rust source was read), with the Python 3.11 standard
library only.  Ed25519 verification follows RFC 8032 section 5.1.7.

    verify.py verify --export FILE [--export FILE ...] [--checkpoints FILE ...]
                     --public-key HEX [--public-key HEX ...] [--partial] [--table NAME ...]
    verify.py verify-purge --proofs FILE [--proofs FILE ...] --public-key HEX [...]
    verify.py self-test

Exit status: 0 every line `ok` or `skipped`; 1 some line `FAILED`; 2 unreadable input or usage.
Places where the document left a choice open are marked "ASSUMPTION" below.
"""

import argparse
import hashlib
import json
import struct
import sys


# ---------------------------------------------------------------------------------------------
# Ed25519 verification (RFC 8032, sections 5.1.2 to 5.1.7), extended coordinates.
# ---------------------------------------------------------------------------------------------

_P = 2 ** 255 - 19
_L = 2 ** 252 + 27742317777372353535851937790883648493
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _pt_add(p1, p2):
    # RFC 8032 section 5.1.4, extended homogeneous coordinates (X, Y, Z, T), x = X/Z, y = Y/Z,
    # x*y = T/Z.
    x1, y1, z1, t1 = p1
    x2, y2, z2, t2 = p2
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = 2 * t1 * t2 * _D % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _pt_double(p1):
    x1, y1, z1, _ = p1
    a = x1 * x1 % _P
    b = y1 * y1 % _P
    c = 2 * z1 * z1 % _P
    h = a + b
    e = h - (x1 + y1) * (x1 + y1)
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


_IDENTITY = (0, 1, 1, 0)


def _pt_mul(s, pt):
    q = _IDENTITY
    while s > 0:
        if s & 1:
            q = _pt_add(q, pt)
        pt = _pt_double(pt)
        s >>= 1
    return q


def _pt_equal(p1, p2):
    x1, y1, z1, _ = p1
    x2, y2, z2, _ = p2
    return (x1 * z2 - x2 * z1) % _P == 0 and (y1 * z2 - y2 * z1) % _P == 0


def _recover_x(y, sign):
    # RFC 8032 section 5.1.3, steps 2 to 4.
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    if x2 == 0:
        if sign:
            return None
        return 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _pt_decompress(b):
    if len(b) != 32:
        return None
    y = int.from_bytes(b, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)

# [2^i]B for i in 0..255, so that [s]B costs additions only.
_G_POWERS = []
_q = _G
for _ in range(256):
    _G_POWERS.append(_q)
    _q = _pt_double(_q)
del _q


def _base_mul(s):
    q = _IDENTITY
    i = 0
    while s > 0:
        if s & 1:
            q = _pt_add(q, _G_POWERS[i])
        s >>= 1
        i += 1
    return q


def ed25519_verify(public, msg, sig):
    """RFC 8032 section 5.1.7.  Returns True or False, never raises on bad input."""
    if len(public) != 32 or len(sig) != 64:
        return False
    a = _pt_decompress(public)
    if a is None:
        return False
    r = _pt_decompress(sig[:32])
    if r is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    # Section 4: strict verification. Neither A nor R may be of small order; the check is the
    # plain [S]B = R + [k]A (canonical encodings are already required by _pt_decompress).
    if _small_order(a) or _small_order(r):
        return False
    k = int.from_bytes(hashlib.sha512(sig[:32] + public + msg).digest(), "little") % _L
    return _pt_equal(_base_mul(s), _pt_add(r, _pt_mul(k, a)))


def _small_order(pt):
    """Whether [8]pt is the identity (the point's order divides the cofactor)."""
    q = pt
    for _ in range(3):
        q = _pt_double(q)
    return _pt_equal(q, _IDENTITY)


# ---------------------------------------------------------------------------------------------
# Canonical encoding (section 1).
# ---------------------------------------------------------------------------------------------

T_NULL, T_TEXT, T_BYTES, T_INT, T_BOOL, T_TS = 0, 1, 2, 3, 4, 5
_TYPE_TAGS = {"null": T_NULL, "text": T_TEXT, "bytes": T_BYTES, "int": T_INT, "bool": T_BOOL,
              "timestamp": T_TS}
I64_MIN, I64_MAX = -(2 ** 63), 2 ** 63 - 1
I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1


def _lenpre(b):
    return struct.pack(">I", len(b)) + b


def encode(domain, fields):
    """fields: list of (name, (tag, value))."""
    out = [b"VSQLV", b"\x01", _lenpre(domain.encode("utf-8"))]
    for name, (tag, value) in fields:
        out.append(_lenpre(name.encode("utf-8")))
        out.append(bytes([tag]))
        if tag == T_NULL:
            pass
        elif tag == T_TEXT:
            out.append(_lenpre(value.encode("utf-8")))
        elif tag == T_BYTES:
            out.append(_lenpre(value))
        elif tag in (T_INT, T_TS):
            out.append(struct.pack(">q", value))
        elif tag == T_BOOL:
            out.append(b"\x01" if value else b"\x00")
        else:
            raise ValueError("unknown tag")
    return b"".join(out)


def sha256(b):
    return hashlib.sha256(b).digest()


def key_id_of(public):
    return sha256(public)[:8].hex()


def text(v):
    return (T_TEXT, v)


def integer(v):
    return (T_INT, v)


def ts(v):
    return (T_TS, v)


def byts(v):
    return (T_BYTES, v)


def row_hash(table, chain, seq, prev_hash, columns):
    fields = [("table", text(table)), ("chain", integer(chain)), ("seq", integer(seq)),
              ("prev_hash", byts(prev_hash))]
    for name, value in columns:
        if value[0] != T_NULL:
            fields.append((name, value))
    return sha256(encode("vsql_vault.row", fields))


def checkpoint_message(table, chain, seq, head_hash, signed_at, key_id):
    return encode("vsql_vault.checkpoint", [
        ("table", text(table)), ("chain", integer(chain)), ("seq", integer(seq)),
        ("head_hash", byts(head_hash)), ("signed_at", ts(signed_at)), ("key_id", text(key_id))])


def rotation_message(previous_key_id, key_id, public_key, source, signed_at):
    """The bytes an earlier key signs to vouch for a new one (audit-format.md section 4). The
    offline verifiers take keys from the auditor only; this is checked by the self-test."""
    return encode("vsql_vault.key_rotation", [
        ("previous_key_id", text(previous_key_id)), ("key_id", text(key_id)),
        ("public_key", byts(public_key)), ("source", text(source)), ("signed_at", ts(signed_at))])


STATEMENT_FIELDS = [
    ("purpose", T_TEXT), ("external_id", T_TEXT), ("owner", T_TEXT), ("entry_id", T_INT),
    ("created_at", T_TS), ("expires_at", T_TS), ("max_retention_days", T_INT),
    ("default_ttl_days", T_INT), ("purge_method", T_TEXT), ("access_policy", T_TEXT),
    ("reason", T_TEXT), ("purged_by", T_TEXT), ("purged_at", T_TS), ("entry_hash", T_BYTES)]


def statement_bytes(st):
    """st: dict name -> python value (bytes for entry_hash)."""
    return encode("vsql_vault.purge", [(n, (t, st[n])) for n, t in STATEMENT_FIELDS])


def entry_bytes(e):
    return encode("vsql_vault.entry", [
        ("id", integer(e["id"])), ("purpose", text(e["purpose"])),
        ("external_id", text(e["external_id"])), ("encrypted_value", byts(e["encrypted_value"])),
        ("algorithm_hint", (T_NULL, None) if e["algorithm_hint"] is None
         else text(e["algorithm_hint"])),
        ("key_ref", (T_NULL, None) if e["key_ref"] is None else text(e["key_ref"])),
        ("metadata", text(e["metadata"])), ("access_policy", text(e["access_policy"])),
        ("owner", text(e["owner"])), ("created_at", ts(e["created_at"])),
        ("updated_at", ts(e["updated_at"])), ("expires_at", ts(e["expires_at"]))])


def root_message(root, tree_size, batch_id, signed_at, key_id):
    return encode("vsql_vault.purge_root", [
        ("root", byts(root)), ("tree_size", integer(tree_size)), ("batch_id", integer(batch_id)),
        ("signed_at", ts(signed_at)), ("key_id", text(key_id))])


# ---------------------------------------------------------------------------------------------
# Merkle tree (RFC 6962 / RFC 9162).
# ---------------------------------------------------------------------------------------------

def leaf_hash(data):
    return sha256(b"\x00" + data)


def node_hash(left, right):
    return sha256(b"\x01" + left + right)


def merkle_root(leaves):
    n = len(leaves)
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def merkle_path(leaves, index):
    n = len(leaves)
    if n == 1:
        return []
    k = 1
    while k * 2 < n:
        k *= 2
    if index < k:
        return merkle_path(leaves[:k], index) + [merkle_root(leaves[k:])]
    return merkle_path(leaves[k:], index - k) + [merkle_root(leaves[:k])]


def verify_inclusion(leaf, index, size, path, root):
    """RFC 9162 section 2.1.3.2."""
    if index < 0 or size < 1 or index >= size:
        return False
    fn, sn = index, size - 1
    r = leaf
    for p in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


# ---------------------------------------------------------------------------------------------
# Reading the JSON forms (section 5).
# ---------------------------------------------------------------------------------------------

class Unreadable(Exception):
    pass


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _int(v, what, lo=I64_MIN, hi=I64_MAX):
    # ASSUMPTION (D4): a number that is not an integer (1.0, "1", true), or outside i64, makes the
    # input unreadable.
    if not _is_int(v) or not lo <= v <= hi:
        raise Unreadable(f"{what}: not an integer in range: {v!r}")
    return v


def _str(v, what):
    if not isinstance(v, str):
        raise Unreadable(f"{what}: not a string: {v!r}")
    return v


def _hex(v, what, length=None):
    # ASSUMPTION (D3): the document says "all byte strings lowercase hex" but also calls a hash
    # readable when it is "64 hex characters"; uppercase hex digits are accepted (as the reference
    # tool does).
    if not isinstance(v, str) or len(v) % 2 or any(c not in "0123456789abcdefABCDEF" for c in v):
        raise Unreadable(f"{what}: not hex: {v!r}")
    b = bytes.fromhex(v)
    if length is not None and len(b) != length:
        raise Unreadable(f"{what}: not {length} bytes")
    return b


def _value(v, what):
    if not isinstance(v, dict) or "type" not in v:
        raise Unreadable(f"{what}: not a typed value")
    t = v["type"]
    if t not in _TYPE_TAGS:
        raise Unreadable(f"{what}: unknown type {t!r}")
    tag = _TYPE_TAGS[t]
    if tag == T_NULL:
        # ASSUMPTION (D4): a null carrying a non-null "value" is malformed, not "unknown keys".
        if v.get("value") is not None:
            raise Unreadable(f"{what}: a null with a value")
        return (T_NULL, None)
    if "value" not in v:
        raise Unreadable(f"{what}: no value")
    x = v["value"]
    if tag == T_TEXT:
        return (T_TEXT, _str(x, what))
    if tag == T_BYTES:
        return (T_BYTES, _hex(x, what))
    if tag in (T_INT, T_TS):
        return (tag, _int(x, what))
    if not isinstance(x, bool):
        raise Unreadable(f"{what}: not a bool")
    return (T_BOOL, x)


def _json_lines(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise Unreadable(f"{path}: {e}")
    try:
        textdata = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Unreadable(f"{path}: not UTF-8: {e}")
    out = []
    for n, line in enumerate(textdata.split("\n"), 1):
        # ASSUMPTION (D16): a line of only whitespace (or a trailing "\r") counts as empty.
        if line.strip() == "":
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise Unreadable(f"{path}:{n}: not JSON: {e}")
        if not isinstance(obj, dict):
            raise Unreadable(f"{path}:{n}: not a JSON object")
        out.append((f"{path}:{n}", obj))
    return out


class Row:
    __slots__ = ("table", "chain", "seq", "prev_hash", "row_hash", "columns", "order")


def read_rows(path, order_start):
    rows = []
    for where, o in _json_lines(path):
        r = Row()
        r.table = _str(o.get("table"), f"{where}: table")
        cols = o.get("columns")
        if not isinstance(cols, list):
            raise Unreadable(f"{where}: columns missing or not a list")
        r.columns = []
        for c in cols:
            if not isinstance(c, list) or len(c) != 2:
                raise Unreadable(f"{where}: a column is not a [name, value] pair")
            r.columns.append((_str(c[0], f"{where}: column name"),
                              _value(c[1], f"{where}: column {c[0]!r}")))
        # Every chain field that is present must be well formed ("a hash that is present but not
        # 64 hex characters makes the input unreadable"), even when another one is null.
        # ASSUMPTION (D5): `chain` is an i32 (chain_id is `int`), `seq` an i64.
        chain = o.get("chain")
        seq = o.get("seq")
        prev = o.get("prev_hash")
        rh = o.get("row_hash")
        if chain is not None:
            chain = _int(chain, f"{where}: chain", I32_MIN, I32_MAX)
        if seq is not None:
            seq = _int(seq, f"{where}: seq")
        if prev is not None:
            prev = _hex(prev, f"{where}: prev_hash", 32)
        if rh is not None:
            rh = _hex(rh, f"{where}: row_hash", 32)
        if chain is None or seq is None or prev is None or rh is None or chain < 0:
            r.chain = None  # a row without chain fields (chain < 0: the 0.1.0 form)
        else:
            r.chain, r.seq, r.prev_hash, r.row_hash = chain, seq, prev, rh
        r.order = order_start + len(rows)
        rows.append(r)
    return rows


def _sig(o, where):
    """A signature field: must be present and a string; malformed hex gives None (invalid)."""
    v = _str(o.get("signature"), f"{where}: signature")
    try:
        b = _hex(v, "signature", 64)
    except Unreadable:
        return None
    return b


def _path(o, where):
    v = o.get("path")
    if not isinstance(v, list):
        raise Unreadable(f"{where}: path missing or not a list")
    out = []
    for x in v:
        _str(x, f"{where}: path")
        try:
            out.append(_hex(x, "path", 32))
        except Unreadable:
            return None  # ASSUMPTION (D6): a malformed path makes the proof fail, not unreadable
    return out


class Checkpoint:
    __slots__ = ("table", "chain", "seq", "head_hash", "signed_at", "key_id", "signature")


def read_checkpoints(path):
    cps = []
    for where, o in _json_lines(path):
        c = Checkpoint()
        c.table = _str(o.get("table"), f"{where}: table")
        c.chain = _int(o.get("chain"), f"{where}: chain", I32_MIN, I32_MAX)
        c.seq = _int(o.get("seq"), f"{where}: seq")
        c.head_hash = _hex(o.get("head_hash"), f"{where}: head_hash", 32)
        c.signed_at = _int(o.get("signed_at"), f"{where}: signed_at")
        c.key_id = _str(o.get("key_id"), f"{where}: key_id")
        # ASSUMPTION (D6): a signature that is a string but not 128 hex characters is not
        # unreadable input: the checkpoint simply has no valid signature (as the reference does).
        c.signature = _sig(o, where)
        cps.append(c)
    return cps


def parse_keys(hexes):
    keys = {}
    for h in hexes:
        h2 = h.strip()
        if len(h2) != 64 or any(c not in "0123456789abcdefABCDEF" for c in h2):
            raise Unreadable(f"public key {h!r}: not 64 hex characters")
        b = bytes.fromhex(h2)
        # Section 4: a key that does not decode canonically as a point (RFC 8032 5.1.3), or is
        # of small order, is refused: exit status 2.
        point = _pt_decompress(b)
        if point is None:
            raise Unreadable(f"public key {h!r}: not a valid Ed25519 point (RFC 8032 5.1.3)")
        if _small_order(point):
            raise Unreadable(f"public key {h!r}: a point of small order")
        keys[key_id_of(b)] = b
    return keys


def signature_holds(keys, key_id, message, signature):
    pub = keys.get(key_id)
    if pub is None or signature is None:
        return False
    return ed25519_verify(pub, message, signature)


# ---------------------------------------------------------------------------------------------
# verify (section 6).
# ---------------------------------------------------------------------------------------------

def _checkpoint_row_problem(row, keys):
    """Rule 7: the checkpoint a row of vault.audit_checkpoints records must be validly signed."""
    cols = dict(row.columns)
    want = {"table_identity": T_TEXT, "chain": T_INT, "seq": T_INT, "head_hash": T_BYTES,
            "signed_at_us": T_INT, "key_id": T_TEXT, "signature": T_BYTES}
    for name, tag in want.items():
        v = cols.get(name)
        # ASSUMPTION (D9): a checkpoint row with one of these columns missing, null or of another
        # type does not carry a valid signature (a row problem), not unreadable input.
        if v is None or v[0] != tag:
            return f"checkpoint row: column {name} missing or not {tag}"
    msg = checkpoint_message(cols["table_identity"][1], cols["chain"][1], cols["seq"][1],
                             cols["head_hash"][1], cols["signed_at_us"][1], cols["key_id"][1])
    if cols["key_id"][1] not in keys:
        return f"checkpoint row signed by an unknown key {cols['key_id'][1]}"
    if not signature_holds(keys, cols["key_id"][1], msg, cols["signature"][1]):
        return "checkpoint row's signature does not verify"
    return None


def is_checkpoint_table(identity):
    base = identity.rsplit("/", 1)[0] if "/" in identity else identity
    return base == "vault.audit_checkpoints"


def verify_chain(table, rows, cps, keys, partial):
    """rows: the chain's rows, sorted by seq (stable).  Returns (first_bad_seq, reason) or None."""
    problems = []  # (seq, rank, reason); rank 0: the row's own problem, 1: a checkpoint's
    prev = None
    cp_table = is_checkpoint_table(table)
    for r in rows:
        p = None
        if prev is None:
            # ASSUMPTION (D7): without --partial a first row other than seq 1 (also seq 0 or a
            # negative seq) is a gap at seq 1; with --partial any start is accepted, but a row
            # with seq 1 must still have the all-zero prev_hash (section 3), whatever rule 8's
            # "taken as given" says.
            if not partial and r.seq != 1:
                p = (1, f"gap: the chain starts at seq {r.seq}, not at 1")
            elif r.seq == 1 and r.prev_hash != bytes(32):
                p = (r.seq, "the first row's prev_hash is not all zero")
        else:
            if r.seq == prev.seq:
                p = (r.seq, "duplicate: two rows claim this sequence number")
            elif r.seq > prev.seq + 1:
                p = (prev.seq + 1, f"gap: rows {prev.seq + 1} to {r.seq - 1} missing")
            elif r.prev_hash != prev.row_hash:
                p = (r.seq, "prev_hash does not match the previous row's row_hash (broken link)")
        if p is None:
            if row_hash(table, r.chain, r.seq, r.prev_hash, r.columns) != r.row_hash:
                p = (r.seq, "row hash does not match the row's contents")
        if p is None and cp_table:
            why = _checkpoint_row_problem(r, keys)
            if why:
                p = (r.seq, why)
        if p is not None:
            problems.append((p[0], 0, p[1]))
            break  # every later row problem is at a later seq
        prev = r

    by_seq = {}
    for r in rows:
        by_seq.setdefault(r.seq, []).append(r)
    last = rows[-1].seq if rows else None
    for c in cps:
        msg = checkpoint_message(c.table, c.chain, c.seq, c.head_hash, c.signed_at, c.key_id)
        if c.key_id not in keys:
            problems.append((c.seq, 1, f"checkpoint signed by an unknown key {c.key_id}"))
            continue
        if not signature_holds(keys, c.key_id, msg, c.signature):
            problems.append((c.seq, 1, "checkpoint signature does not verify (forged)"))
            continue
        if not rows:
            # Rule 6: a checkpointed chain with no rows fails like rule 5, at its first missing
            # row.  ASSUMPTION (D10): that is seq 1, also with --partial.
            problems.append((1, 1, f"no rows of this chain, but a checkpoint names seq {c.seq}"))
            continue
        present = by_seq.get(c.seq)
        if present:
            if not any(r.row_hash == c.head_hash for r in present):
                problems.append((c.seq, 1, "row differs from the signed checkpoint's head_hash"))
        elif c.seq > last:
            problems.append((last + 1, 1,
                             f"rows {last + 1} to {c.seq} missing: a checkpoint names seq {c.seq}"))
        else:
            # Missing inside the range present, or (ASSUMPTION D8, as the reference does) before
            # the first row of a --partial export: rule 5 says the row "must be present".
            problems.append((c.seq, 1, "the checkpointed row is missing"))
    if not problems:
        return None
    problems.sort(key=lambda p: (p[0], p[1]))
    return problems[0][0], problems[0][2]


def _selected(identity, names):
    if names is None:
        return True
    base = identity.rsplit("/", 1)[0] if "/" in identity else identity
    return identity in names or base in names


def cmd_verify(args):
    try:
        keys = parse_keys(args.public_key)
        rows = []
        for path in args.export:
            rows.extend(read_rows(path, len(rows)))
        cps = []
        for path in args.checkpoints or []:
            cps.extend(read_checkpoints(path))
    except Unreadable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    names = set(args.table) if args.table else None
    lines = []
    failed = False

    all_tables = sorted({r.table for r in rows} | {c.table for c in cps})
    skipped = [t for t in all_tables if not _selected(t, names)]
    rows = [r for r in rows if _selected(r.table, names)]
    cps = [c for c in cps if _selected(c.table, names)]

    # group chained rows by (table, chain), sorted by seq keeping the given order at equal seq
    chains = {}
    unchained = {}
    for r in rows:
        if r.chain is None:
            unchained[r.table] = unchained.get(r.table, 0) + 1
        else:
            chains.setdefault((r.table, r.chain), []).append(r)
    cps_by_chain = {}
    for c in cps:
        cps_by_chain.setdefault((c.table, c.chain), []).append(c)
    for k in cps_by_chain:
        chains.setdefault(k, [])

    # ASSUMPTION (D1): the document does not fix the order of the lines; this is the reference
    # tool's: --table names with nothing, skipped tables, chains (by identity as a string, then
    # chain number), counts of rows without chain fields, then "nothing was verified".
    tables = sorted({t for t, _ in chains} | set(unchained))
    if names is not None:
        for n in args.table:
            if not any(_selected(t, {n}) for t in tables):
                failed = True
                lines.append(f"FAILED  {n}: no rows and no checkpoint of it in the evidence given")
    for t in skipped:
        lines.append(f"skipped {t}: not selected (--table)")
    for (t, ch) in sorted(chains):
        crow = sorted(chains[(t, ch)], key=lambda r: (r.seq, r.order))
        verdict = verify_chain(t, crow, cps_by_chain.get((t, ch), []), keys, args.partial)
        if verdict is None:
            lines.append(f"ok      {t} chain {ch}: {len(crow)} rows intact")
        else:
            failed = True
            lines.append(f"FAILED  {t} chain {ch} at seq {verdict[0]}: {verdict[1]}")
    for t in sorted(unchained):
        failed = True
        lines.append(f"FAILED  {t}: {unchained[t]} row(s) carry no chain fields "
                     "(inserted while the chain trigger was disabled)")
    # ASSUMPTION (D11): the "nothing was verified" line is printed when, after --table selection,
    # no rows and no checkpoints remain and no --table was given (a --table name that matches
    # nothing has its own line).
    if not rows and not cps and names is None:
        failed = True
        lines.append("FAILED  the evidence given holds no rows and no checkpoints: "
                     "nothing was verified")
    for line in lines:
        print(line)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# verify-purge (section 8).
# ---------------------------------------------------------------------------------------------

def read_proofs(path):
    proofs = []
    for where, o in _json_lines(path):
        st = o.get("statement")
        if not isinstance(st, dict):
            raise Unreadable(f"{where}: statement missing")
        s = {}
        for name, tag in STATEMENT_FIELDS:
            v = st.get(name)
            if tag == T_TEXT:
                s[name] = _str(v, f"{where}: statement.{name}")
            elif tag == T_BYTES:
                s[name] = _hex(v, f"{where}: statement.{name}", 32)
            else:
                s[name] = _int(v, f"{where}: statement.{name}")
        proofs.append({
            "id": _int(o.get("id"), f"{where}: id"),
            "statement": s,
            "batch_id": _int(o.get("batch_id"), f"{where}: batch_id"),
            "leaf_index": _int(o.get("leaf_index"), f"{where}: leaf_index"),
            "tree_size": _int(o.get("tree_size"), f"{where}: tree_size"),
            "path": _path(o, where),
            "root": _hex(o.get("root"), f"{where}: root", 32),
            "signed_at": _int(o.get("signed_at"), f"{where}: signed_at"),
            "key_id": _str(o.get("key_id"), f"{where}: key_id"),
            "signature": _sig(o, where),
            "displayed": _displayed(o, where),
        })
    return proofs


def _displayed(o, where):
    # The purge log's timestamptz columns as exported (absent from 0.1.0 exports): not signed,
    # they must equal the statement's signed times.
    d = o.get("displayed")
    if d is None:
        return None
    if not isinstance(d, dict):
        raise Unreadable(f"{where}: displayed is not an object")
    return {n: _int(d.get(n), f"{where}: displayed.{n}")
            for n in ("purged_at", "created_at", "expires_at")}


def proof_problem(p, keys):
    if p["path"] is None:
        return "malformed inclusion path"
    if p["signature"] is None:
        return "malformed signature"
    leaf = leaf_hash(statement_bytes(p["statement"]))
    if not verify_inclusion(leaf, p["leaf_index"], p["tree_size"], p["path"], p["root"]):
        return "the statement's leaf and path do not lead to the root"
    if p["key_id"] not in keys:
        return f"root signed by an unknown key {p['key_id']}"
    msg = root_message(p["root"], p["tree_size"], p["batch_id"], p["signed_at"], p["key_id"])
    if not ed25519_verify(keys[p["key_id"]], msg, p["signature"]):
        return "the root's signature does not verify"
    for name, shown in (p["displayed"] or {}).items():
        if shown != p["statement"][name]:
            return f"the displayed {name} is not the signed one"
    return None


def cmd_verify_purge(args):
    try:
        keys = parse_keys(args.public_key)
        proofs = []
        for path in args.proofs:
            proofs.extend(read_proofs(path))
    except Unreadable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = 0
    for p in proofs:
        why = proof_problem(p, keys)
        if why:
            bad += 1
            st = p["statement"]
            print(f"FAILED  purge proof {p['id']} ({st['purpose']} / {st['external_id']}): {why}")
    if not proofs:
        # Section 8: files with no proof in them are not a pass.
        print("FAILED  the files given hold no purge proofs: nothing was verified")
        return 1
    if bad:
        return 1
    print(f"ok      {len(proofs)} purge proofs verify")
    return 0


# ---------------------------------------------------------------------------------------------
# self-test: RFC 8032 test vector 1 and every value of section 10.
# ---------------------------------------------------------------------------------------------

def _h(s):
    return bytes.fromhex("".join(s.split()))


def cmd_self_test(_args):
    results = []

    def check(name, ok):
        results.append(ok)
        print(f"{'ok     ' if ok else 'FAILED '} {name}")

    # RFC 8032 section 7.1, test 1
    pk1 = _h("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    sig1 = _h("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc"
              "61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
    check("RFC 8032 test 1 verifies", ed25519_verify(pk1, b"", sig1))
    check("RFC 8032 test 1 with another message fails", not ed25519_verify(pk1, b"x", sig1))
    bad = bytearray(sig1)
    bad[5] ^= 1
    check("RFC 8032 test 1 with a changed signature fails",
          not ed25519_verify(pk1, b"", bytes(bad)))

    pub = _h("ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c")
    check("key id of the worked key", key_id_of(pub) == "fe812c12f3ab4ce6")
    kid = "fe812c12f3ab4ce6"

    # A row: parse its export line as a verifier would
    line = ('{"table":"public.payments/1","chain":0,"seq":1,"prev_hash":"000000000000000000000000'
            '0000000000000000000000000000000000000000",'
            '"row_hash":"7bbd755bccd2490f21bc013542a3109a4fd7afad1ead361c6229f442451ea9e8",'
            '"columns":[["id",{"type":"int","value":1}],["payer",{"type":"text","value":"acme"}],'
            '["memo",{"type":"null"}],["paid",{"type":"bool","value":true}],'
            '["at",{"type":"timestamp","value":850000000000000}],'
            '["blob",{"type":"bytes","value":"dead"}]]}')
    o = json.loads(line)
    cols = [(n, _value(v, n)) for n, v in o["columns"]]
    row_fields = [("table", text("public.payments/1")), ("chain", integer(0)),
                  ("seq", integer(1)), ("prev_hash", byts(bytes(32)))]
    row_fields += [(n, v) for n, v in cols if v[0] != T_NULL]
    row_bytes = encode("vsql_vault.row", row_fields)
    check("row bytes", row_bytes == _h("""
5653514c56010000000e7673716c5f7661756c742e726f77000000057461626c
6501000000117075626c69632e7061796d656e74732f3100000005636861696e
0300000000000000000000000373657103000000000000000100000009707265
765f686173680200000020000000000000000000000000000000000000000000
0000000000000000000000000000026964030000000000000001000000057061
796572010000000461636d650000000470616964040100000002617405000305
120c0f200000000004626c6f620200000002dead"""))
    rh = row_hash("public.payments/1", 0, 1, bytes(32), cols)
    check("row hash", rh == _h("7bbd755bccd2490f21bc013542a3109a4fd7afad1ead361c6229f442451ea9e8")
          and rh.hex() == o["row_hash"])

    cmsg = checkpoint_message("public.payments/1", 0, 1, rh, 850000000500000, kid)
    check("checkpoint message", cmsg == _h("""
5653514c5601000000157673716c5f7661756c742e636865636b706f696e7400
0000057461626c6501000000117075626c69632e7061796d656e74732f310000
0005636861696e03000000000000000000000003736571030000000000000001
00000009686561645f6861736802000000207bbd755bccd2490f21bc013542a3
109a4fd7afad1ead361c6229f442451ea9e8000000097369676e65645f617405
000305120c16c120000000066b65795f69640100000010666538313263313266
33616234636536"""))
    csig = _h("""dd13a6726bd95988733db7da8e1c16da52a302c9f332f8213a8ae0caa1050c91
2482b866d9d26d85afb23cb77e652952a71d40162487320811e32a9312c49d0c""")
    check("checkpoint signature verifies", ed25519_verify(pub, cmsg, csig))
    check("checkpoint signature fails on another message",
          not ed25519_verify(pub, cmsg[:-1] + b"7", csig))

    entry = {"id": 41, "purpose": "otp", "external_id": "d1", "encrypted_value": _h("010203"),
             "algorithm_hint": None, "key_ref": "kms://k1", "metadata": "{}",
             "access_policy": "owner-only", "owner": "app_a", "created_at": 849000000000000,
             "updated_at": 849000000000000, "expires_at": 849086400000000}
    eb = entry_bytes(entry)
    check("entry bytes", eb == _h("""
5653514c5601000000107673716c5f7661756c742e656e747279000000026964
03000000000000002900000007707572706f736501000000036f74700000000b
65787465726e616c5f6964010000000264310000000f656e637279707465645f
76616c756502000000030102030000000e616c676f726974686d5f68696e7400
000000076b65795f72656601000000086b6d733a2f2f6b31000000086d657461
6461746101000000027b7d0000000d6163636573735f706f6c69637901000000
0a6f776e65722d6f6e6c79000000056f776e657201000000056170705f610000
000a637265617465645f61740500030429376a10000000000a75706461746564
5f61740500030429376a10000000000a657870697265735f6174050003043d55
417000"""))
    eh = sha256(eb)
    check("entry hash",
          eh == _h("b581e2d2aa528681831729de1b65436587f59b51c9f0f66878fa708e2dfefe62"))

    def stmt(ext, entry_id, ehash):
        return {"purpose": "otp", "external_id": ext, "owner": "app_a", "entry_id": entry_id,
                "created_at": 849000000000000, "expires_at": 849086400000000,
                "max_retention_days": 7, "default_ttl_days": 1,
                "purge_method": "physical-delete", "access_policy": "owner-only",
                "reason": "retention expired", "purged_by": "vsql_vault retention worker",
                "purged_at": 849086401000000, "entry_hash": ehash}
    # ASSUMPTION (D13): section 10 does not give the purpose of d2 and d3; "otp" (d1's) is the
    # value that reproduces the leaves printed there.
    stmts = [stmt("d1", 41, eh), stmt("d2", 42, b"\x01" * 32), stmt("d3", 43, b"\x02" * 32)]
    sb = statement_bytes(stmts[0])
    check("statement bytes of d1", sb == _h("""
5653514c5601000000107673716c5f7661756c742e7075726765000000077075
72706f736501000000036f74700000000b65787465726e616c5f696401000000
026431000000056f776e657201000000056170705f6100000008656e7472795f
69640300000000000000290000000a637265617465645f61740500030429376a
10000000000a657870697265735f6174050003043d55417000000000126d6178
5f726574656e74696f6e5f646179730300000000000000070000001064656661
756c745f74746c5f646179730300000000000000010000000c70757267655f6d
6574686f64010000000f706879736963616c2d64656c6574650000000d616363
6573735f706f6c696379010000000a6f776e65722d6f6e6c7900000006726561
736f6e0100000011726574656e74696f6e206578706972656400000009707572
6765645f6279010000001b7673716c5f7661756c7420726574656e74696f6e20
776f726b6572000000097075726765645f6174050003043d5550b2400000000a
656e7472795f686173680200000020b581e2d2aa528681831729de1b65436587
f59b51c9f0f66878fa708e2dfefe62"""))
    leaves = [leaf_hash(statement_bytes(s)) for s in stmts]
    want_leaves = [_h("79e283cf9eb272d8324d9381d3646d59d1b5a060f77b205a21b7eeccc53e646c"),
                   _h("07d2a8a532b6df7e00f9776abf3427dc6f688688316d1af1e16aa5b0ed3e6946"),
                   _h("a216319bd821152c9cf2e1b02b31a053cdfc5aec04a65e2a107c39d7660cafa3")]
    for i in range(3):
        check(f"leaf {i}", leaves[i] == want_leaves[i])
    root = merkle_root(leaves)
    want_root = _h("c405c42b73b76e41d8ba9da69206ac7ebfc55d9e86d7167269cf2f8b65c772bb")
    check("root", root == want_root)
    path0 = [want_leaves[1], want_leaves[2]]
    path2 = [_h("282086ed51213e952cab237cce46698f712c918f86767e410f4db9cec1f943e6")]
    check("path of leaf 0 as printed", merkle_path(leaves, 0) == path0)
    check("path of leaf 2 as printed", merkle_path(leaves, 2) == path2)
    check("node over leaves 0 and 1", node_hash(leaves[0], leaves[1]) == path2[0])
    check("leaf 0 inclusion verifies", verify_inclusion(leaves[0], 0, 3, path0, want_root))
    check("leaf 2 inclusion verifies", verify_inclusion(leaves[2], 2, 3, path2, want_root))
    check("leaf 1 inclusion verifies",
          verify_inclusion(leaves[1], 1, 3, merkle_path(leaves, 1), want_root))
    check("leaf 0 with leaf 2's path fails",
          not verify_inclusion(leaves[0], 0, 3, path2, want_root))
    check("leaf 2 with leaf 0's path fails",
          not verify_inclusion(leaves[2], 2, 3, path0, want_root))
    rmsg = root_message(root, 3, 9, 849086401000000, kid)
    check("root message", rmsg == _h("""
5653514c5601000000157673716c5f7661756c742e70757267655f726f6f7400
000004726f6f740200000020c405c42b73b76e41d8ba9da69206ac7ebfc55d9e
86d7167269cf2f8b65c772bb00000009747265655f73697a6503000000000000
00030000000862617463685f6964030000000000000009000000097369676e65
645f6174050003043d5550b240000000066b65795f6964010000001066653831
326331326633616234636536"""))
    rsig = _h("""c38fb3d8e73bc4d29c8cb2cc102d131e336d553e3c4eca2bebcdd6927a1f2a02
a4fade71b89f882c502efdab81c52d302a0f5537dab28ec075850d51572ada06""")
    check("root signature verifies", ed25519_verify(pub, rmsg, rsig))
    check("root signature fails for batch 10",
          not ed25519_verify(pub, root_message(root, 3, 10, 849086401000000, kid), rsig))
    # the same proof through the verify-purge path
    proof = {"id": 1, "statement": stmts[0], "batch_id": 9, "leaf_index": 0, "tree_size": 3,
             "path": path0, "root": want_root, "signed_at": 849086401000000, "key_id": kid,
             "signature": rsig, "displayed": None}
    check("proof of d1 verifies as verify-purge would", proof_problem(proof, {kid: pub}) is None)
    next_pub = _h("1398f62c6d1a457c51ba6a4b5f3dbd2f69fca93216218dc8997e416bd17d93ca")
    check("key id of the rotated key", key_id_of(next_pub) == "5c29b78f10a35a49")
    kmsg = rotation_message(kid, "5c29b78f10a35a49", next_pub, "generated", 850000001000000)
    check("rotation message", kmsg == _h("""
5653514c5601000000177673716c5f7661756c742e6b65795f726f746174696f
6e0000000f70726576696f75735f6b65795f6964010000001066653831326331
326633616234636536000000066b65795f696401000000103563323962373866
31306133356134390000000a7075626c69635f6b657902000000201398f62c6d
1a457c51ba6a4b5f3dbd2f69fca93216218dc8997e416bd17d93ca0000000673
6f75726365010000000967656e657261746564000000097369676e65645f6174
05000305120c1e6240"""))
    ksig = _h("""201bc28ebf1194a187e5ba539970ba8a661282d2c77ae7fb250b7cd6a2091973
61f9520f63f714fc700416f46309985aaab21db0f4d65b0b5041a9b08ea2e30c""")
    check("rotation signature verifies", ed25519_verify(pub, kmsg, ksig))
    check("rotation signature fails for another source",
          not ed25519_verify(pub, rotation_message(kid, "5c29b78f10a35a49", next_pub,
                                                   "signing_key_file", 850000001000000), ksig))
    shown = {n: stmts[0][n] for n in ("purged_at", "created_at", "expires_at")}
    check("proof of d1 with its displayed times verifies",
          proof_problem(dict(proof, displayed=shown), {kid: pub}) is None)
    check("proof of d1 with a displayed time that is not the signed one fails",
          proof_problem(dict(proof, displayed=dict(shown, created_at=shown["created_at"] + 1)),
                        {kid: pub}) is not None)
    n_ok = sum(results)
    print(f"{n_ok}/{len(results)} checks passed")
    return 0 if all(results) else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="verify.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--export", action="append", required=True)
    v.add_argument("--checkpoints", action="append")
    v.add_argument("--public-key", action="append", required=True)
    v.add_argument("--partial", action="store_true")
    v.add_argument("--table", action="append")
    p = sub.add_parser("verify-purge")
    p.add_argument("--proofs", action="append", required=True)
    p.add_argument("--public-key", action="append", required=True)
    sub.add_parser("self-test")
    args = ap.parse_args(argv)  # usage errors exit with status 2 (argparse)
    if args.cmd == "verify":
        return cmd_verify(args)
    if args.cmd == "verify-purge":
        return cmd_verify_purge(args)
    return cmd_self_test(args)


if __name__ == "__main__":
    sys.exit(main())
