//! Reading `vault_export_audit()` files for verification: one JSON object per line
//! (docs/audit-format.md), turned straight into what the verifier needs (`chain::Link`) without
//! building the row.
//!
//! A line in the exact form the exporter writes is parsed in place: strings borrowed from the
//! line, hashes decoded straight into `[u8; 32]`, the canonical bytes of the row written while
//! its columns are read, then hashed. Anything else (another key order, unknown keys, escapes in
//! a hash, a number in another form, a malformed line) goes through serde's `ExportRow`, so the
//! verdict and every error message stay those of the full parser: the fast path only ever
//! accepts a line that reads to the same row there (`fast_and_full_parsers_agree`).

use crate::canonical::{self, tag};
use crate::chain::{self, ExportRow, Link, CHECKPOINT_TABLE, UNCHAINED};
use ed25519_dalek::VerifyingKey;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::ControlFlow;

/// Reads export lines into links, reusing its buffer from line to line.
pub struct LineReader<'k> {
    keys: &'k BTreeMap<String, VerifyingKey>,
    buf: Vec<u8>,
    /// The columns of the line before, as `Parser::columns` read them.
    shapes: Vec<Shape>,
}

/// One column as a line wrote it, from its `[` up to its value (through the value object's end
/// for a NULL), and what those bytes read to: the next line's column at the same place starting
/// with the same bytes reads to the same, without scanning its name and type again.
#[derive(Default)]
struct Shape {
    json: Vec<u8>,
    /// The canonical bytes of the column's name and type tag (empty for a NULL).
    canonical: Vec<u8>,
    /// None for a NULL.
    tag: Option<u8>,
}

/// One line read: its table and link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineRow<'a> {
    pub table: Cow<'a, str>,
    pub link: Link,
}

impl<'k> LineReader<'k> {
    pub fn new(keys: &'k BTreeMap<String, VerifyingKey>) -> LineReader<'k> {
        LineReader {
            keys,
            buf: Vec::with_capacity(1024),
            shapes: Vec::new(),
        }
    }

    /// The row of one non-empty line. `hash(table)` says whether its hash is wanted (rows of
    /// tables left out are parsed, so a malformed one still fails the run, but not hashed).
    pub fn read<'a>(
        &mut self,
        line: &'a str,
        hash: impl Fn(&str) -> bool,
    ) -> Result<LineRow<'a>, serde_json::Error> {
        if let Some(row) = self.fast(line, &hash) {
            return Ok(row);
        }
        self.full(line, &hash)
    }

    /// The reference path: serde's `ExportRow`, then `Link::of`.
    pub fn full<'a>(
        &self,
        line: &'a str,
        hash: impl Fn(&str) -> bool,
    ) -> Result<LineRow<'a>, serde_json::Error> {
        let row: ExportRow = serde_json::from_str(line)?;
        let link = if hash(&row.table) {
            Link::of(&row, self.keys)
        } else {
            Link {
                chain: row.chain,
                seq: row.seq,
                prev_hash: row.prev_hash,
                row_hash: row.row_hash,
                hash_ok: false,
                signature_ok: false,
            }
        };
        Ok(LineRow {
            table: Cow::Owned(row.table),
            link,
        })
    }

    /// The line in the exporter's own form, or None.
    fn fast<'a>(&mut self, line: &'a str, hash: &impl Fn(&str) -> bool) -> Option<LineRow<'a>> {
        let mut p = Parser {
            src: line,
            s: line.as_bytes(),
            i: 0,
        };
        p.ws();
        p.eat(b'{')?;
        let mut table: Option<Cow<'a, str>> = None;
        let mut chain: Option<Option<i64>> = None;
        let mut seq: Option<Option<i64>> = None;
        let mut prev: Option<Option<[u8; 32]>> = None;
        let mut hash32: Option<Option<[u8; 32]>> = None;
        let hashed;
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            // Each key once; "columns" last (the row's header must be known before them).
            match &*key {
                "table" if table.is_none() => table = Some(p.string()?),
                "chain" if chain.is_none() => chain = Some(p.nullable(Parser::int)?),
                "seq" if seq.is_none() => seq = Some(p.nullable(Parser::int)?),
                "prev_hash" if prev.is_none() => prev = Some(p.nullable(Parser::hash)?),
                "row_hash" if hash32.is_none() => hash32 = Some(p.nullable(Parser::hash)?),
                "columns" => {
                    let table = table.as_deref()?;
                    let chain = match chain.flatten() {
                        Some(c) => Some(i32::try_from(c).ok()?),
                        None => None,
                    };
                    let link = match (chain, seq.flatten(), prev.flatten(), hash32.flatten()) {
                        (Some(c), Some(s), Some(ph), Some(rh)) if c >= 0 => Some((c, s, ph, rh)),
                        _ => None,
                    };
                    // Rows of the checkpoint table carry a signature: the full path checks it.
                    if table.starts_with(CHECKPOINT_TABLE) {
                        return None;
                    }
                    self.buf.clear();
                    let wanted = link.filter(|_| hash(table));
                    if let Some((c, s, ph, _)) = wanted {
                        chain::put_row_header(&mut self.buf, table, c, s, &ph);
                    }
                    p.columns(&mut self.buf, &mut self.shapes)?;
                    hashed = match wanted {
                        Some((c, s, ph, rh)) => Link {
                            chain: c,
                            seq: s,
                            prev_hash: ph,
                            row_hash: rh,
                            hash_ok: canonical::sha256(&self.buf) == rh,
                            signature_ok: false,
                        },
                        None => match link {
                            Some((c, s, ph, rh)) => Link {
                                chain: c,
                                seq: s,
                                prev_hash: ph,
                                row_hash: rh,
                                hash_ok: false,
                                signature_ok: false,
                            },
                            None => unchained(),
                        },
                    };
                    p.ws();
                    p.eat(b'}')?;
                    break;
                }
                _ => return None,
            }
            p.ws();
            p.eat(b',')?;
        }
        p.ws();
        if p.i != p.s.len() {
            return None;
        }
        Some(LineRow {
            table: table?,
            link: hashed,
        })
    }
}

fn unchained() -> Link {
    Link {
        chain: UNCHAINED,
        seq: 0,
        prev_hash: [0; 32],
        row_hash: [0; 32],
        hash_ok: false,
        signature_ok: false,
    }
}

/// A strict reader of the subset of JSON the exporter writes; every method returns None for
/// anything else, and the caller falls back to serde.
struct Parser<'a> {
    src: &'a str,
    s: &'a [u8],
    i: usize,
}

/// Hex digit values (as `hex` reads them: either case), 0xff for anything else.
const HEX: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Offset of the first quote, backslash or control character in `s` (None if there is none),
/// eight bytes at a time.
fn special(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut i = 0;
    while let Some(w) = s.get(i..i + 8) {
        let x = u64::from_le_bytes(w.try_into().ok()?);
        // A byte is below 0x20, a quote or a backslash: the lowest flagged byte is exact.
        let hit = (x.wrapping_sub(ONES * 0x20) & !x & HIGH)
            | zero(x ^ (ONES * u64::from(b'"')))
            | zero(x ^ (ONES * u64::from(b'\\')));
        if hit != 0 {
            return Some(i + (hit.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    s[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .map(|p| i + p)
}

/// Whether `s` is all ASCII; no early exit, so that the compiler compares many bytes at a time.
fn ascii(s: &[u8]) -> bool {
    s.chunks(4096)
        .all(|c| c.iter().fold(0u8, |any, &b| any | b) < 0x80)
}

/// `hex::decode_to_slice` without its per-digit error paths: false where it would fail.
fn unhex(hex: &[u8], out: &mut [u8]) -> bool {
    if hex.len() != out.len() * 2 {
        return false;
    }
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (HEX[pair[0] as usize], HEX[pair[1] as usize]);
        bad |= hi | lo;
        *o = (hi << 4) | (lo & 0x0f);
    }
    bad & 0xf0 == 0
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.s.get(self.i) == Some(&b)).then(|| self.i += 1)
    }

    fn word(&mut self, w: &[u8]) -> Option<()> {
        self.s[self.i..].starts_with(w).then(|| self.i += w.len())
    }

    /// `"key":` with the whitespace around, the key as written (no escapes).
    fn key(&mut self, key: &[u8]) -> Option<()> {
        self.ws();
        self.word(key)?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }

    fn nullable<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.word(b"null").is_some() {
            return Some(None);
        }
        f(self).map(Some)
    }

    /// A JSON string; borrowed when it has no escapes. `\u` escapes of surrogates are left to
    /// serde.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        match self.raw_string()? {
            Ok(s) => Some(Cow::Borrowed(s)),
            Err(start) => {
                let mut out = Vec::new();
                self.unescape_into(start, &mut out)?;
                String::from_utf8(out).ok().map(Cow::Owned)
            }
        }
    }

    /// A string without escapes, or Err(where its contents start) at its first backslash.
    fn raw_string(&mut self) -> Option<Result<&'a str, usize>> {
        self.eat(b'"')?;
        let start = self.i;
        self.i += special(&self.s[start..])?;
        match self.s[self.i] {
            // Cut at ASCII quotes: char boundaries of the line.
            b'"' => {
                let raw = self.src.get(start..self.i)?;
                self.i += 1;
                Some(Ok(raw))
            }
            b'\\' => Some(Err(start)),
            _ => None,
        }
    }

    /// Appends the string whose contents start at `start` to `out`, unescaped as serde_json
    /// does; None for a control character or an escape left to serde.
    fn unescape_into(&mut self, start: usize, out: &mut Vec<u8>) -> Option<()> {
        self.i = start;
        loop {
            let run = special(&self.s[self.i..])?;
            out.extend_from_slice(&self.s[self.i..self.i + run]);
            self.i += run;
            let b = self.s[self.i];
            self.i += 1;
            match b {
                b'"' => return Some(()),
                b'\\' => {
                    let e = *self.s.get(self.i)?;
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hex = self.src.get(self.i..self.i + 4)?;
                            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                                return None;
                            }
                            self.i += 4;
                            char::from_u32(u32::from_str_radix(hex, 16).ok()?)?
                        }
                        _ => return None,
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                _ => return None,
            }
        }
    }

    /// An integer as JSON writes it (no leading zeros, fraction or exponent) within i64.
    fn int(&mut self) -> Option<i64> {
        let neg = self.eat(b'-').is_some();
        let digits = self.i;
        // Up to 19 digits fit in a u64 (10^19 - 1 < 2^64); more are refused below.
        let mut v: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.s.get(self.i) {
            v = v.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
            self.i += 1;
        }
        let n = self.i - digits;
        if n == 0 || (n > 1 && self.s[digits] == b'0') || n > 19 {
            return None;
        }
        // serde_json reads -0 as a float, which no integer field takes.
        if neg && v == 0 {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.s.get(self.i) {
            return None;
        }
        match neg {
            // -2^63 is i64::MIN; anything below it does not fit.
            true if v <= 1 << 63 => Some((v as i64).wrapping_neg()),
            true => None,
            false => i64::try_from(v).ok(),
        }
    }

    /// The inside of a string that should be hex digits (checked by `unhex`, which refuses
    /// anything else, escapes included).
    fn hex_str(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let len = memchr::memchr(b'"', &self.s[start..])?;
        self.i = start + len + 1;
        Some(&self.s[start..start + len])
    }

    /// `"` 64 hex digits `"`: what `hex_str` then `unhex` accept into 32 bytes, without looking
    /// for the closing quote.
    fn hash(&mut self) -> Option<[u8; 32]> {
        let s = self.s.get(self.i..self.i + 66)?;
        if s[0] != b'"' || s[65] != b'"' {
            return None;
        }
        let mut out = [0u8; 32];
        unhex(&s[1..65], &mut out).then_some(())?;
        self.i += 66;
        Some(out)
    }

    /// `[[name, {"type": ..., "value": ...}], ...]`, each non-NULL column's canonical bytes
    /// appended to `buf` as `chain::row_hash` writes them.
    fn columns(&mut self, buf: &mut Vec<u8>, shapes: &mut Vec<Shape>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.eat(b']').is_some() {
            return Some(());
        }
        let mut k = 0;
        loop {
            self.ws();
            let start = self.i;
            // The same bytes as the line before's column here read to the same name and type:
            // the parse is a function of the bytes it reads, and reads none past `json`.
            let known = shapes
                .get(k)
                .filter(|shape| self.s[start..].starts_with(&shape.json));
            let tag = match known {
                Some(shape) => {
                    self.i += shape.json.len();
                    buf.extend_from_slice(&shape.canonical);
                    shape.tag
                }
                None => {
                    self.eat(b'[')?;
                    self.ws();
                    let name = self.string()?;
                    self.ws();
                    self.eat(b',')?;
                    self.ws();
                    let tag = self.value_head()?;
                    let at = buf.len();
                    if let Some(tag) = tag {
                        canonical::put_name_tag(buf, &name, tag);
                    }
                    if shapes.len() <= k {
                        shapes.resize_with(k + 1, Shape::default);
                    }
                    let shape = &mut shapes[k];
                    shape.json.clear();
                    shape.json.extend_from_slice(&self.s[start..self.i]);
                    shape.canonical.clear();
                    shape.canonical.extend_from_slice(&buf[at..]);
                    shape.tag = tag;
                    tag
                }
            };
            if let Some(tag) = tag {
                self.ws();
                self.value_body(tag, buf)?;
            }
            self.ws();
            self.eat(b']')?;
            self.ws();
            if self.eat(b']').is_some() {
                return Some(());
            }
            self.eat(b',')?;
            k += 1;
        }
    }

    /// The start of a value object in the exporter's compact form, up to its value (or to its
    /// end for a null): its type, and whether that was all.
    fn compact_type(&mut self) -> Option<(&'static str, bool)> {
        const FORMS: [(&str, &[u8], bool); 6] = [
            ("text", b"text\",\"value\":", false),
            ("int", b"int\",\"value\":", false),
            ("null", b"null\"}", true),
            ("timestamp", b"timestamp\",\"value\":", false),
            ("bool", b"bool\",\"value\":", false),
            ("bytes", b"bytes\",\"value\":", false),
        ];
        let rest = self.s[self.i..].strip_prefix(b"{\"type\":\"")?;
        // The forms differ in their first two bytes.
        let (ty, form, done) = FORMS.into_iter().find(|(_, f, _)| {
            rest.first() == f.first() && rest.get(1) == f.get(1) && rest.starts_with(f)
        })?;
        self.i += 9 + form.len();
        Some((ty, done))
    }

    /// A value object up to its value: the value's type tag, or None for a NULL (then read
    /// through the object's end).
    fn value_head(&mut self) -> Option<Option<u8>> {
        let ty = match self.compact_type() {
            Some((_, true)) => return Some(None),
            Some((ty, false)) => ty,
            None => {
                self.eat(b'{')?;
                self.key(b"\"type\"")?;
                let ty = self.raw_string()?.ok()?;
                self.ws();
                if ty == "null" {
                    self.eat(b'}')?;
                    return Some(None);
                }
                self.eat(b',')?;
                self.key(b"\"value\"")?;
                ty
            }
        };
        Some(Some(match ty {
            "text" => tag::TEXT,
            "bytes" => tag::BYTES,
            "int" => tag::INT,
            "timestamp" => tag::TIMESTAMP,
            "bool" => tag::BOOL,
            _ => return None,
        }))
    }

    /// A value of type `tag` and the end of its object, its canonical bytes appended to `buf`
    /// (after the name and tag the caller wrote).
    fn value_body(&mut self, tag: u8, buf: &mut Vec<u8>) -> Option<()> {
        match tag {
            tag::TEXT => match self.raw_string()? {
                Ok(text) => canonical::put_len_prefixed(buf, text.as_bytes()),
                Err(start) => {
                    // Unescaped in place, its length written in front after.
                    let at = buf.len();
                    buf.extend_from_slice(&[0; 4]);
                    self.unescape_into(start, buf)?;
                    let len = u32::try_from(buf.len() - at - 4).ok()?;
                    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
                }
            },
            tag::BYTES => {
                let hex = self.hex_str()?;
                if hex.len() % 2 != 0 {
                    return None;
                }
                let len = u32::try_from(hex.len() / 2).ok()?;
                buf.extend_from_slice(&len.to_be_bytes());
                let at = buf.len();
                buf.resize(at + hex.len() / 2, 0);
                if !unhex(hex, &mut buf[at..]) {
                    return None;
                }
            }
            tag::INT | tag::TIMESTAMP => {
                let v = self.int()?;
                buf.extend_from_slice(&v.to_be_bytes());
            }
            tag::BOOL => {
                let v = if self.word(b"true").is_some() {
                    true
                } else {
                    self.word(b"false")?;
                    false
                };
                buf.push(u8::from(v));
            }
            _ => return None,
        }
        self.ws();
        self.eat(b'}')
    }
}

/// Bytes of export read at a time and handed to one worker.
const BLOCK: usize = 1 << 18;
/// Blocks read but not yet verified, at most: with `BLOCK` this bounds the memory the reading
/// takes, whatever the size of the export.
const IN_FLIGHT: usize = 8;

/// Lines of one file, cut at a line end.
struct Block {
    index: usize,
    file: usize,
    data: Vec<u8>,
    /// `data` is all ASCII: checked by the reader while it is in that core's cache.
    ascii: bool,
    /// Reading the file failed after `data`.
    error: Option<String>,
}

/// A block read: its rows in file order, their tables by index into `tables`.
struct Chunk {
    index: usize,
    file: usize,
    /// Lines read (up to the bad one): the reader numbers lines in file order.
    lines: usize,
    tables: Vec<String>,
    rows: Vec<(u32, Link)>,
    /// The error, and whether it is about the last line read (then the message is the path,
    /// " line N: " and this).
    error: Option<(bool, String)>,
    /// The block's buffer, handed back to the reader for the next block.
    data: Vec<u8>,
}

/// Reads `paths` in order, one block at a time, and parses and hashes the blocks on `threads`
/// threads; `consume` gets the chunks in file order until it breaks. The first error in file
/// order (a file that cannot be opened or read, a line that does not parse) ends the reading,
/// with the message the line-by-line reader gave.
fn read_chunks(
    paths: &[String],
    keys: &BTreeMap<String, VerifyingKey>,
    selected: &(dyn Fn(&str) -> bool + Sync),
    Sizes { threads, block, .. }: Sizes,
    consume: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
) -> Result<(), String> {
    use std::sync::mpsc;
    // A token is a buffer to read a block into: IN_FLIGHT of them, reused block after block.
    let (token_tx, token_rx) = mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
    for _ in 0..IN_FLIGHT {
        token_tx.send(Vec::new()).map_err(|e| e.to_string())?;
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<Block>(IN_FLIGHT);
    let work_rx = std::sync::Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<Chunk>();
    std::thread::scope(|scope| {
        scope.spawn(move || read_blocks(paths, block, &token_rx, &work_tx));
        for _ in 0..threads.max(1) {
            let done_tx = done_tx.clone();
            let work_rx = &work_rx;
            scope.spawn(move || {
                let mut reader = LineReader::new(keys);
                loop {
                    // The lock is held only to take the next block.
                    let next = work_rx.lock().map(|rx| rx.recv());
                    let Ok(Ok(block)) = next else { return };
                    let chunk = parse_block(&mut reader, paths, block, selected);
                    if done_tx.send(chunk).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        in_order(paths, done_rx, token_tx, consume)
    })
}

/// Hands the chunks to `consume` in file order, giving a token back for each.
fn in_order(
    paths: &[String],
    done_rx: std::sync::mpsc::Receiver<Chunk>,
    token_tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    consume: &mut dyn FnMut(Chunk) -> ControlFlow<()>,
) -> Result<(), String> {
    let mut waiting: BTreeMap<usize, Chunk> = BTreeMap::new();
    let mut next = 0;
    // Lines before the chunk's, in its file.
    let (mut file, mut lines) = (0, 0);
    while let Ok(chunk) = done_rx.recv() {
        waiting.insert(chunk.index, chunk);
        while let Some(mut chunk) = waiting.remove(&next) {
            next += 1;
            if chunk.file != file {
                (file, lines) = (chunk.file, 0);
            }
            lines += chunk.lines;
            let data = std::mem::take(&mut chunk.data);
            let error = chunk.error.take().map(|(at_line, e)| match at_line {
                true => format!("{} line {lines}: {e}", paths[file]),
                false => e,
            });
            if consume(chunk).is_break() {
                return Ok(());
            }
            if let Some(e) = error {
                return Err(e);
            }
            // Never blocks: at most IN_FLIGHT tokens exist.
            let _ = token_tx.try_send(data);
        }
    }
    Ok(())
}

fn read_blocks(
    paths: &[String],
    block_size: usize,
    tokens: &std::sync::mpsc::Receiver<Vec<u8>>,
    work: &std::sync::mpsc::SyncSender<Block>,
) {
    let mut index = 0;
    for (file, path) in paths.iter().enumerate() {
        let mut opened = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"));
        let mut carry: Vec<u8> = Vec::new();
        loop {
            let Ok(mut data) = tokens.recv() else { return };
            data.clear();
            data.extend_from_slice(&carry);
            let (eof, error) = match &mut opened {
                Ok(f) => fill(f, &mut data, block_size, path),
                Err(e) => (true, Some(e.clone())),
            };
            if !eof && error.is_none() {
                let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                carry.clear();
                carry.extend_from_slice(&data[end..]);
                data.truncate(end);
            }
            let failed = error.is_some();
            let block = Block {
                index,
                file,
                ascii: ascii(&data),
                data,
                error,
            };
            index += 1;
            if work.send(block).is_err() || failed {
                return;
            }
            if eof {
                break;
            }
        }
    }
}

/// Reads from `f` onto `data` until it holds `block` bytes and a line end, or the file ends
/// (then true), or reading fails (then the error).
fn fill(
    f: &mut std::fs::File,
    data: &mut Vec<u8>,
    block: usize,
    path: &str,
) -> (bool, Option<String>) {
    use std::io::Read;
    loop {
        let want = block.saturating_sub(data.len()).max(64 * 1024);
        let start = data.len();
        // A reused buffer already has the room: no growing (copies) while reading.
        data.reserve(want);
        // read_to_end fills without zeroing the buffer first.
        match f.take(want as u64).read_to_end(data) {
            Ok(0) => return (true, None),
            Ok(_) => {
                if data.len() >= block && data[start..].contains(&b'\n') {
                    return (false, None);
                }
            }
            Err(e) => return (false, Some(format!("{path}: {e}"))),
        }
    }
}

/// Parses and hashes the lines of one block, up to the first bad one.
fn parse_block(
    reader: &mut LineReader,
    paths: &[String],
    mut block: Block,
    selected: &(dyn Fn(&str) -> bool + Sync),
) -> Chunk {
    let data = std::mem::take(&mut block.data);
    let mut chunk = Chunk {
        index: block.index,
        file: block.file,
        lines: 0,
        tables: Vec::new(),
        rows: Vec::with_capacity(data.len() / 256),
        error: None,
        data: Vec::new(),
    };
    let path = &paths[block.file];
    chunk.error = parse_lines(reader, path, &data, block.ascii, selected, &mut chunk)
        .or(block.error.map(|e| (false, e)));
    chunk.data = data;
    chunk
}

/// The lines of `data` into `chunk`'s rows; the error at the first bad one.
fn parse_lines(
    reader: &mut LineReader,
    path: &str,
    data: &[u8],
    ascii: bool,
    selected: &(dyn Fn(&str) -> bool + Sync),
    chunk: &mut Chunk,
) -> Option<(bool, String)> {
    // Valid UTF-8 checked once for the whole block (cut at ASCII line ends, its lines are valid
    // when it is), at memory speed when it is all ASCII; else line by line.
    let text = match ascii {
        // SAFETY: every byte of `data` is below 0x80 (`Block::ascii`, checked by `ascii()` in
        // `read_blocks` on these very bytes), and ASCII is valid UTF-8.
        true => Some(unsafe { std::str::from_utf8_unchecked(data) }),
        false => std::str::from_utf8(data).ok(),
    };
    let mut last_table = u32::MAX;
    let mut start = 0;
    while start < data.len() {
        let end = memchr::memchr(b'\n', &data[start..]).map_or(data.len(), |p| start + p);
        let (from, mut to) = (start, end);
        start = end + 1;
        if to > from && data[to - 1] == b'\r' {
            to -= 1;
        }
        // `from` and `to` are at ASCII bytes or the ends: char boundaries.
        let line = match text {
            Some(text) => &text[from..to],
            None => match std::str::from_utf8(&data[from..to]) {
                Ok(line) => line,
                // As `BufRead::lines` says it.
                Err(_) => {
                    return Some((false, format!("{path}: stream did not contain valid UTF-8")))
                }
            },
        };
        chunk.lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        match reader.read(line, selected) {
            Ok(row) => {
                let same = chunk
                    .tables
                    .get(last_table as usize)
                    .is_some_and(|t| *t == row.table);
                if !same {
                    last_table = match chunk.tables.iter().position(|t| *t == row.table) {
                        Some(i) => i as u32,
                        None => {
                            chunk.tables.push(row.table.into_owned());
                            (chunk.tables.len() - 1) as u32
                        }
                    };
                }
                chunk.rows.push((last_table, row.link));
            }
            Err(e) => return Some((true, e.to_string())),
        }
    }
    None
}

/// The verdict on a set of export files.
pub struct Verdict {
    pub reports: Vec<chain::ChainReport>,
    /// Every table the exports hold rows of, selected or not.
    pub tables: std::collections::BTreeSet<String>,
    /// Whether the rows were not in chain order and had to be sorted first.
    pub sorted: bool,
}

/// Verifies export files (in the order given, as one export) against `checkpoints`, with the
/// rows of the tables `selected` names. When each chain's rows come in order (as
/// `vault_export_audit` writes them; chains may interleave) the rows are verified while they are
/// read, in one pass, with memory bounded by `IN_FLIGHT` blocks of `BLOCK` bytes whatever the
/// size of the export. Otherwise the files are read again and only each row's link (88 bytes)
/// is kept and sorted by (table, chain, seq), in runs of `RUN` links spilled to temporary files
/// (`std::env::temp_dir()`, removed after) and merged, so that the verdict is the one on sorted
/// rows and memory stays bounded too.
pub fn verify_files(
    paths: &[String],
    checkpoints: Vec<chain::Checkpoint>,
    public_keys: &[VerifyingKey],
    partial: bool,
    selected: &(dyn Fn(&str) -> bool + Sync),
) -> Result<Verdict, String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    let sizes = Sizes {
        threads,
        block: BLOCK,
        run: RUN,
    };
    verify_files_with(paths, checkpoints, public_keys, partial, selected, sizes)
}

/// Stable: duplicates stay in file order, where the verifier names them.
fn sort_links(links: &mut [(u32, Link)], names: &[String]) {
    links.sort_by(|(ta, a), (tb, b)| {
        (&names[*ta as usize], a.chain, a.seq).cmp(&(&names[*tb as usize], b.chain, b.seq))
    });
}

/// Bytes of one link in a run file.
const RECORD: usize = 4 + 4 + 8 + 32 + 32 + 1;

/// Sorted runs of links in temporary files, removed when dropped.
#[derive(Default)]
struct Runs {
    files: Vec<std::path::PathBuf>,
}

impl Drop for Runs {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Runs {
    /// Sorts `links` into a new run file and empties it.
    fn spill(&mut self, links: &mut Vec<(u32, Link)>, names: &[String]) -> Result<(), String> {
        use std::io::Write;
        sort_links(links, names);
        // Unique in the process too: two verifications may run at once (as the tests do).
        static RUN_FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUN_FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vsql-vault-sort-{}-{n}", std::process::id()));
        let io = |e: std::io::Error| format!("{}: {e}", path.display());
        let file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io)?;
        self.files.push(path.clone());
        let mut w = std::io::BufWriter::with_capacity(1 << 16, file);
        for (t, l) in links.iter() {
            let mut r = [0u8; RECORD];
            r[0..4].copy_from_slice(&t.to_le_bytes());
            r[4..8].copy_from_slice(&l.chain.to_le_bytes());
            r[8..16].copy_from_slice(&l.seq.to_le_bytes());
            r[16..48].copy_from_slice(&l.prev_hash);
            r[48..80].copy_from_slice(&l.row_hash);
            r[80] = u8::from(l.hash_ok) | u8::from(l.signature_ok) << 1;
            w.write_all(&r).map_err(io)?;
        }
        w.flush().map_err(io)?;
        links.clear();
        Ok(())
    }

    /// The links of every run in (table, chain, seq) order; equal ones in file order.
    fn merge(&self, names: &[String], mut each: impl FnMut(u32, &Link)) -> Result<(), String> {
        use std::cmp::Reverse;
        use std::io::Read;
        let mut order: Vec<u32> = (0..names.len() as u32).collect();
        order.sort_by(|a, b| names[*a as usize].cmp(&names[*b as usize]));
        let mut rank = vec![0u32; names.len()];
        for (r, t) in order.iter().enumerate() {
            rank[*t as usize] = r as u32;
        }
        let mut readers = Vec::new();
        for path in &self.files {
            let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            readers.push(std::io::BufReader::with_capacity(1 << 16, f));
        }
        let next =
            |r: &mut std::io::BufReader<std::fs::File>| -> Result<Option<(u32, Link)>, String> {
                let mut b = [0u8; RECORD];
                match r.read_exact(&mut b) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(e.to_string()),
                }
                let int4 = |at: usize| [b[at], b[at + 1], b[at + 2], b[at + 3]];
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&b[8..16]);
                let mut link = Link {
                    chain: i32::from_le_bytes(int4(4)),
                    seq: i64::from_le_bytes(seq),
                    prev_hash: [0; 32],
                    row_hash: [0; 32],
                    hash_ok: b[80] & 1 != 0,
                    signature_ok: b[80] & 2 != 0,
                };
                link.prev_hash.copy_from_slice(&b[16..48]);
                link.row_hash.copy_from_slice(&b[48..80]);
                Ok(Some((u32::from_le_bytes(int4(0)), link)))
            };
        let mut heads: Vec<Option<(u32, Link)>> = Vec::new();
        let mut heap = std::collections::BinaryHeap::new();
        for (i, r) in readers.iter_mut().enumerate() {
            let head = next(r)?;
            if let Some((t, l)) = &head {
                heap.push(Reverse((rank[*t as usize], l.chain, l.seq, i)));
            }
            heads.push(head);
        }
        while let Some(Reverse((_, _, _, i))) = heap.pop() {
            if let Some((t, l)) = heads[i].take() {
                each(t, &l);
            }
            heads[i] = next(&mut readers[i])?;
            if let Some((t, l)) = &heads[i] {
                heap.push(Reverse((rank[*t as usize], l.chain, l.seq, i)));
            }
        }
        Ok(())
    }
}

/// Threads, bytes a block, and links sorted in memory at most (more are sorted in runs on disk).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    threads: usize,
    block: usize,
    run: usize,
}

/// Links sorted in memory at most (88 bytes each, some 70 MB with the sort's own buffer);
/// an export out of chain order with more rows is sorted in runs in temporary files.
const RUN: usize = 1 << 19;

/// `verify_files` with these sizes.
fn verify_files_with(
    paths: &[String],
    checkpoints: Vec<chain::Checkpoint>,
    public_keys: &[VerifyingKey],
    partial: bool,
    selected: &(dyn Fn(&str) -> bool + Sync),
    sizes: Sizes,
) -> Result<Verdict, String> {
    let keys = chain::key_map(public_keys);
    let mut tables = std::collections::BTreeSet::new();
    let mut v = chain::Verifier::with_partial(checkpoints.clone(), public_keys, partial);
    // A pipe (`--export /dev/stdin`) cannot be read twice: it is sorted from the start.
    let rereadable = paths
        .iter()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file()));
    let mut in_chain_order = rereadable;
    let first_pass = |consume: &mut dyn FnMut(Chunk) -> ControlFlow<()>| match rereadable {
        true => read_chunks(paths, &keys, selected, sizes, consume),
        false => Ok(()),
    };
    first_pass(&mut |chunk| {
        for t in &chunk.tables {
            if !tables.contains(t) {
                tables.insert(t.clone());
            }
        }
        let wanted: Vec<bool> = chunk.tables.iter().map(|t| selected(t)).collect();
        for (t, link) in &chunk.rows {
            if wanted[*t as usize] && !v.push_link(&chunk.tables[*t as usize], link) {
                in_chain_order = false;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if in_chain_order {
        return Ok(Verdict {
            reports: v.finish(),
            tables,
            sorted: false,
        });
    }
    // Out of order: every selected row's link, by table id, sorted as the rows would be, in
    // runs of at most `run` links spilled to temporary files and merged.
    let mut names: Vec<String> = Vec::new();
    let mut ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut links: Vec<(u32, Link)> = Vec::new();
    let mut runs = Runs::default();
    let mut spill_error = None;
    read_chunks(paths, &keys, selected, sizes, &mut |chunk| {
        let global: Vec<Option<u32>> = chunk
            .tables
            .iter()
            .map(|t| {
                if !tables.contains(t) {
                    tables.insert(t.clone());
                }
                selected(t).then(|| {
                    *ids.entry(t.clone()).or_insert_with(|| {
                        names.push(t.clone());
                        (names.len() - 1) as u32
                    })
                })
            })
            .collect();
        links.extend(
            chunk
                .rows
                .iter()
                .filter_map(|(t, l)| global[*t as usize].map(|g| (g, *l))),
        );
        if links.len() >= sizes.run {
            if let Err(e) = runs.spill(&mut links, &names) {
                spill_error = Some(e);
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if let Some(e) = spill_error {
        return Err(e);
    }
    let mut v = chain::Verifier::with_partial(checkpoints, public_keys, partial);
    if runs.files.is_empty() {
        sort_links(&mut links, &names);
        for (t, link) in &links {
            v.push_link(&names[*t as usize], link);
        }
    } else {
        runs.spill(&mut links, &names)?;
        runs.merge(&names, |t, link| {
            v.push_link(&names[t as usize], link);
        })?;
    }
    Ok(Verdict {
        reports: v.finish(),
        tables,
        sorted: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::Value;
    use crate::chain::{row_hash, ChainReport, Checkpoint, Verifier, GENESIS};
    use crate::keys;

    /// A small deterministic generator (xorshift64*), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn value(rng: &mut Rng, i: i64) -> Value {
        match rng.below(9) {
            0 => Value::Null,
            1 => Value::Text(format!("plain {i}")),
            2 => Value::Text(format!("\"q\" \\ \n\t ü € \u{1} {i} \u{200f}")),
            3 => Value::Bytes((0..rng.below(40)).map(|_| rng.next() as u8).collect()),
            4 => Value::Int([0, -1, i64::MIN, i64::MAX, i * 1_000_003][rng.below(5)]),
            5 => Value::Bool(rng.below(2) == 0),
            6 => Value::Timestamp(-(i * 17)),
            7 => Value::Text(String::new()),
            _ => Value::Int(i),
        }
    }

    /// `n` rows of chain `chain` of `table`, with columns of every type.
    fn rows(rng: &mut Rng, table: &str, chain: i32, n: i64) -> Vec<ExportRow> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let columns: Vec<(String, Value)> = (0..1 + rng.below(6))
                    .map(|c| (format!("c{c}"), value(rng, seq)))
                    .collect();
                let h = row_hash(table, chain, seq, &prev, &columns);
                let row = ExportRow {
                    table: table.into(),
                    chain,
                    seq,
                    prev_hash: prev,
                    row_hash: h,
                    columns,
                };
                prev = h;
                row
            })
            .collect()
    }

    fn checkpoint(key: &ed25519_dalek::SigningKey, row: &ExportRow) -> Checkpoint {
        Checkpoint::sign(key, (&row.table, row.chain, row.seq), row.row_hash, 1)
    }

    /// Lines around the exporter's own form: what the fast path must read as serde does, or
    /// leave to serde.
    fn variants(line: &str, rng: &mut Rng) -> Vec<String> {
        let mut out = vec![line.to_owned()];
        // The reader keeps the line before's column shapes: these differ from it only just
        // before, in or just after a shape.
        let edits: [(&str, &str); 19] = [
            (":", " : "),
            ("\"value\":", "\"value\": "),
            ("],[\"c1\",{", "] , [\"c1\", {"),
            ("{\"type\":\"null\"}]", "{\"type\":\"null\"} ]"),
            (",", ", "),
            ("{\"type\":\"null\"}", "{\"type\":\"null\",\"value\":null}"),
            (
                "\"type\":\"int\",\"value\":0",
                "\"type\":\"int\",\"value\":-0",
            ),
            (
                "\"type\":\"int\",\"value\":",
                "\"type\":\"int\",\"value\":0",
            ),
            (
                "\"type\":\"int\",\"value\":1",
                "\"type\":\"int\",\"value\":1.0",
            ),
            (
                "\"type\":\"int\",\"value\":1",
                "\"type\":\"int\",\"value\":1e0",
            ),
            ("\"chain\":", "\"extra\":1,\"chain\":"),
            ("\"seq\":", "\"seq\":1,\"seq\":"),
            ("\"value\":\"", "\"value\":\"\\u0041\\/"),
            ("\"value\":\"", "\"value\":\"\\ud800"),
            ("\"row_hash\":\"", "\"row_hash\":\"A"),
            (
                "\"type\":\"bytes\",\"value\":\"",
                "\"type\":\"bytes\",\"value\":\"0",
            ),
            ("\"type\":\"text\"", "\"value\":\"x\",\"type\":\"text\""),
            ("\"chain\":0", "\"chain\":4294967296"),
            ("]]}", "]],\"table\":\"t\"}"),
        ];
        for (from, to) in edits {
            if line.contains(from) {
                out.push(line.replacen(from, to, 1));
            }
        }
        out.push(line.to_uppercase());
        out.push(format!(" {line} \r"));
        out.push(line.replace("columns", "columnz"));
        // Random single-byte damage.
        for _ in 0..8 {
            let mut b = line.as_bytes().to_vec();
            let i = rng.below(b.len());
            b[i] = b"{}[],:\"\\0a-9 x"[rng.below(14)];
            if let Ok(s) = String::from_utf8(b) {
                out.push(s);
            }
        }
        out
    }

    #[test]
    fn fast_and_full_parsers_agree() {
        let mut rng = Rng(0x5eed);
        let keys = BTreeMap::new();
        let mut reader = LineReader::new(&keys);
        let mut fast = 0;
        let mut lines: Vec<String> = rows(&mut rng, "public.t/7", 0, 300)
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        let mut unchained = rows(&mut rng, "public.t/7", 0, 3);
        unchained[0].chain = UNCHAINED;
        lines.push(serde_json::to_string(&unchained[0]).unwrap());
        lines.push(r#"{"table":"t","columns":[["id",{"type":"int","value":1}]]}"#.into());
        let mut checked = 0;
        for line in &lines {
            for v in variants(line, &mut rng) {
                for wanted in [true, false] {
                    let full = reader.full(&v, |_| wanted);
                    if let Some(row) = reader.fast(&v, &|_| wanted) {
                        fast += 1;
                        assert_eq!(Some(row), full.ok(), "{v}");
                    }
                    checked += 1;
                }
            }
        }
        // The exporter's own lines take the fast path.
        assert!(fast > lines.len() * 2, "{fast} of {checked}");
    }

    #[test]
    fn integers_read_as_serde_reads_an_i64() {
        for text in [
            "0",
            "-0",
            "7",
            "-7",
            "00",
            "01",
            "-01",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775808",
            "-9223372036854775809",
            "9999999999999999999",
            "18446744073709551616",
            "99999999999999999999",
            "1.0",
            "1e3",
            "-",
            "",
            "12a",
        ] {
            let mut p = Parser {
                src: text,
                s: text.as_bytes(),
                i: 0,
            };
            // The parser reads a prefix (the caller checks what follows): a whole number only.
            let fast = p.int().filter(|_| p.i == text.len());
            let serde = serde_json::from_str::<i64>(text).ok();
            assert_eq!(fast, serde, "{text:?}");
        }
    }

    /// Known answers: rows the database hashed (0.1.0's own exports, tests/evidence/v0.1.0)
    /// and the canonical vectors (tests/vectors/canonical_v1.json) come out of the in-place
    /// reader with the same bytes, hence the same hashes, as out of the core's encoder.
    #[test]
    fn the_in_place_reader_meets_the_known_answers() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/evidence/v0.1.0/");
        let text = std::fs::read_to_string(format!("{dir}public_key.hex")).unwrap();
        let keys = chain::key_map(&[keys::parse_public(text.trim()).unwrap()]);
        let mut reader = LineReader::new(&keys);
        // generated_column.jsonl: 0.1.0 hashed other bytes than it exported (its README).
        for (file, intact) in [
            ("access_log.jsonl", true),
            ("ledger.jsonl", true),
            ("purge_log.jsonl", true),
            ("audit_checkpoints.jsonl", true),
            ("generated_column.jsonl", false),
        ] {
            let text = std::fs::read_to_string(format!("{dir}{file}")).unwrap();
            for line in text.lines() {
                let full = reader.full(line, |_| true).unwrap();
                assert_eq!(full.link.hash_ok, intact, "{file}: {line}");
                if full.table.starts_with(CHECKPOINT_TABLE) {
                    assert!(full.link.signature_ok, "{line}");
                    assert_eq!(reader.fast(line, &|_| true), None, "{line}");
                } else {
                    assert_eq!(reader.fast(line, &|_| true), Some(full), "{file}: {line}");
                }
            }
        }
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/vectors/canonical_v1.json"
        );
        let vectors: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for v in vectors {
            let text = |key: &str| v[key].as_str().unwrap().to_owned();
            let (domain, canonical_hex, sha256_hex) =
                (text("domain"), text("canonical_hex"), text("sha256_hex"));
            let fields: Vec<(String, Value)> = serde_json::from_value(v["fields"].clone()).unwrap();
            // A row's hash leaves NULL columns out: those vectors are met without their NULLs.
            let nulls = fields.iter().any(|(_, value)| *value == Value::Null);
            let expected = match nulls {
                false => hex::decode(&canonical_hex).unwrap(),
                true => {
                    let kept: Vec<_> = fields
                        .iter()
                        .filter(|(_, x)| *x != Value::Null)
                        .cloned()
                        .collect();
                    canonical::encode(&domain, &kept).bytes().to_vec()
                }
            };
            for json in [
                serde_json::to_string(&fields).unwrap(),
                serde_json::to_string_pretty(&fields).unwrap(),
            ] {
                let mut buf = Vec::new();
                canonical::put_header(&mut buf, &domain);
                let mut p = Parser {
                    src: &json,
                    s: json.as_bytes(),
                    i: 0,
                };
                p.columns(&mut buf, &mut Vec::new()).unwrap();
                assert_eq!(hex::encode(&buf), hex::encode(&expected), "{json}");
                if !nulls {
                    assert_eq!(hex::encode(canonical::sha256(&buf)), sha256_hex);
                }
            }
        }
    }

    /// The verdict of the tool before streaming: every line parsed, sorted, verified.
    fn load_and_sort(
        files: &[String],
        cps: Vec<Checkpoint>,
        key: &ed25519_dalek::SigningKey,
    ) -> Result<Vec<ChainReport>, String> {
        let mut rows: Vec<ExportRow> = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                rows.push(
                    serde_json::from_str(line)
                        .map_err(|e| format!("{path} line {}: {e}", n + 1))?,
                );
            }
        }
        rows.sort_by(|a, b| (&a.table, a.chain, a.seq).cmp(&(&b.table, b.chain, b.seq)));
        let mut v = Verifier::new(cps, &[key.verifying_key()]);
        rows.iter().for_each(|r| v.push(r));
        Ok(v.finish())
    }

    fn write(dir: &std::path::Path, name: &str, lines: &[String]) -> String {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path.to_string_lossy().into_owned()
    }

    #[test]
    fn streaming_gives_the_verdict_of_load_and_sort_on_shuffled_and_tampered_exports() {
        let dir = std::env::temp_dir().join(format!("vsql-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = keys::generate().unwrap();
        let mut rng = Rng(42);
        let all = |_: &str| true;
        for case in 0..60 {
            // Two tables, three chains, interleaved as the chains are written.
            let mut chains = [
                rows(&mut rng, "public.a/1", 0, 40),
                rows(&mut rng, "public.a/1", 1, 25),
                rows(&mut rng, "vault.access_log/2", 0, 30),
            ];
            let cps: Vec<Checkpoint> = chains
                .iter()
                .map(|c| checkpoint(&key, &c[c.len() - 1 - rng.below(3)]))
                .collect();
            let which = rng.below(chains.len());
            let n = chains[which].len();
            let at = rng.below(n);
            match case % 6 {
                0 => {}
                1 => {
                    chains[which][at].columns[0].1 = Value::Text("forged".into());
                }
                2 => {
                    chains[which].remove(at);
                }
                3 => {
                    let dup = chains[which][at].clone();
                    chains[which].insert(rng.below(n), dup);
                }
                4 => chains[which].truncate(at.max(1)),
                _ => {
                    let mut stray = chains[which][at].clone();
                    stray.chain = UNCHAINED;
                    chains[which].push(stray);
                }
            }
            let mut lines: Vec<String> = Vec::new();
            let mut cursors = vec![0; chains.len()];
            loop {
                let open: Vec<usize> = (0..chains.len())
                    .filter(|&c| cursors[c] < chains[c].len())
                    .collect();
                if open.is_empty() {
                    break;
                }
                let c = open[rng.below(open.len())];
                lines.push(serde_json::to_string(&chains[c][cursors[c]]).unwrap());
                cursors[c] += 1;
            }
            // In order, a few rows moved, or all shuffled; some blank lines.
            match case % 3 {
                0 => {}
                1 => {
                    for _ in 0..2 {
                        let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
                        lines.swap(i, j);
                    }
                }
                _ => {
                    for i in (1..lines.len()).rev() {
                        lines.swap(i, rng.below(i + 1));
                    }
                }
            }
            lines.insert(rng.below(lines.len()), String::new());
            let half = rng.below(lines.len());
            let files = vec![
                write(&dir, &format!("{case}-a.jsonl"), &lines[..half]),
                write(&dir, &format!("{case}-b.jsonl"), &lines[half..]),
            ];
            let expected = load_and_sort(&files, cps.clone(), &key).unwrap();
            for (threads, block, run) in [(1, 1, 7), (2, 700, 50), (3, 1 << 20, 1 << 20)] {
                let sizes = Sizes {
                    threads,
                    block,
                    run,
                };
                let got = verify_files_with(
                    &files,
                    cps.clone(),
                    &[key.verifying_key()],
                    false,
                    &all,
                    sizes,
                )
                .unwrap();
                assert_eq!(got.reports, expected, "case {case}, sizes {sizes:?}");
                if case % 3 == 2 && lines.len() > 3 {
                    assert!(got.sorted, "case {case}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_line_is_named_as_the_line_by_line_reader_named_it() {
        let dir = std::env::temp_dir().join(format!("vsql-export-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = keys::generate().unwrap();
        let mut rng = Rng(7);
        let lines: Vec<String> = rows(&mut rng, "t", 0, 50)
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        let good = write(&dir, "good.jsonl", &lines);
        let mut broken = lines.clone();
        broken.insert(3, String::new());
        broken[30] = broken[30].replacen("\"seq\":", "\"seq\":\"x\",\"zz\":", 1);
        broken[40] = "not json".into();
        let bad = write(&dir, "bad.jsonl", &broken);
        let missing = dir.join("missing.jsonl").to_string_lossy().into_owned();
        std::fs::write(dir.join("latin1.jsonl"), b"\n\xff\n").unwrap();
        let latin1 = dir.join("latin1.jsonl").to_string_lossy().into_owned();
        for files in [
            vec![good.clone(), bad.clone()],
            vec![good.clone(), missing.clone(), bad.clone()],
            vec![latin1.clone(), bad.clone()],
        ] {
            let expected = load_and_sort(&files, vec![], &key)
                .map_err(|e| e.replace("stream did not contain valid UTF-8", "UTF8"));
            for (threads, block) in [(1, 1), (2, 500), (2, 1 << 20)] {
                let sizes = Sizes {
                    threads,
                    block,
                    run: 10,
                };
                let got = verify_files_with(
                    &files,
                    vec![],
                    &[key.verifying_key()],
                    false,
                    &|_: &str| true,
                    sizes,
                )
                .map(|v| v.reports)
                .map_err(|e| e.replace("stream did not contain valid UTF-8", "UTF8"));
                assert!(got.is_err(), "{files:?}");
                // read_to_string says "invalid UTF-8" for the whole file; lines() said this.
                if files[0] != latin1 {
                    assert_eq!(got, expected, "{files:?} {sizes:?}");
                } else {
                    assert_eq!(got, Err(format!("{latin1}: UTF8")));
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pipe_out_of_chain_order_is_read_once_and_sorted() {
        let dir = std::env::temp_dir().join(format!("vsql-export-pipe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = keys::generate().unwrap();
        let mut rng = Rng(9);
        let chain = rows(&mut rng, "t", 0, 30);
        let cps = vec![checkpoint(&key, &chain[29])];
        let mut lines: Vec<String> = chain
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        lines.swap(3, 20);
        let file = write(&dir, "rows.jsonl", &lines);
        let pipe = dir.join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&pipe).status();
        assert!(made.unwrap().success());
        let pipe = pipe.to_string_lossy().into_owned();
        let writer = {
            let (pipe, text) = (pipe.clone(), lines.join("\n"));
            std::thread::spawn(move || std::fs::write(pipe, text).unwrap())
        };
        let sizes = Sizes {
            threads: 2,
            block: 100,
            run: 8,
        };
        let keys = [key.verifying_key()];
        let got = verify_files_with(&[pipe], cps.clone(), &keys, false, &|_: &str| true, sizes);
        writer.join().unwrap();
        let got = got.unwrap();
        assert!(got.sorted);
        assert_eq!(got.reports, load_and_sort(&[file], cps, &key).unwrap());
        assert!(got.reports[0].ok, "{:?}", got.reports);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
