//! The line `vsql-vault decrypt` prints for a change record: by definition the record parsed into
//! a `serde_json::Value`, its columns expanded (`stream::expand_columns`) and displayed compactly
//! (object keys sorted, as serde_json's map keeps them). `ChangeWriter` writes exactly those bytes
//! straight from the record's text when every scalar in it is already in the form serde_json
//! prints (the plugin writes them so: `canonical::push_json_str`, integers) and no object repeats
//! a key; anything else (a float, an escape serde_json would print differently, a duplicate key,
//! invalid JSON, deep nesting) takes the definition's own path, so the two never differ
//! (tests below compare them byte for byte, on tampered records too).

use crate::stream::expand_columns;

/// Nesting deeper than this takes the `Value` path (whose own limit is 128).
const MAX_DEPTH: usize = 64;

/// The printed form of a change record, by definition: parsed, expanded, displayed.
pub fn write_change_via_value(record: &str, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(record)?;
    serde_json::to_writer(out, &expand_columns(value))
}

/// Writes change records in their printed form, reusing its buffers from one record to the next.
#[derive(Default)]
pub struct ChangeWriter {
    /// The members of the objects being written: key (start and end in the record, quotes
    /// excluded) and the member's bytes in the output (start and end).
    members: Vec<(usize, usize, usize, usize)>,
    /// An object's members while they are put in key order.
    reorder: Vec<u8>,
}

impl ChangeWriter {
    pub fn new() -> ChangeWriter {
        ChangeWriter::default()
    }

    /// Appends the printed form of `record` to `out` (no newline); the same bytes, and the same
    /// failures, as `write_change_via_value`. On failure `out` is as it was.
    pub fn write(&mut self, record: &str, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        let start = out.len();
        self.members.clear();
        let mut fast = Fast {
            b: record.as_bytes(),
            i: 0,
            out: &mut *out,
            w: self,
        };
        if fast.record().is_some() {
            return Ok(());
        }
        out.truncate(start);
        write_change_via_value(record, out).inspect_err(|_| out.truncate(start))
    }
}

/// `None`: not in the printed form already (or not JSON); the caller takes the `Value` path.
type Step = Option<()>;

struct Fast<'a, 'o> {
    b: &'a [u8],
    i: usize,
    out: &'o mut Vec<u8>,
    w: &'o mut ChangeWriter,
}

impl Fast<'_, '_> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn record(&mut self) -> Step {
        self.ws();
        if self.peek()? != b'{' {
            return None;
        }
        self.object(1, true)?;
        self.ws();
        (self.i == self.b.len()).then_some(())
    }

    fn value(&mut self, depth: usize) -> Step {
        self.ws();
        match self.peek()? {
            b'"' => {
                let (s, e) = self.string()?;
                self.out.extend_from_slice(&self.b[s..e]);
            }
            b'{' => self.object(depth + 1, false)?,
            b'[' => self.array(depth + 1)?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Step {
        if !self.b[self.i..].starts_with(word) {
            return None;
        }
        self.i += word.len();
        self.out.extend_from_slice(word);
        Some(())
    }

    /// A string token exactly as serde_json prints its text: no escape but `\"`, `\\`, `\b`,
    /// `\f`, `\n`, `\r`, `\t` and `\u00xx` (lower-case hex) for the other control characters.
    /// Returns its start and end in the record, quotes included.
    fn string(&mut self) -> Option<(usize, usize)> {
        let start = self.i;
        self.i += 1;
        loop {
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some((start, self.i));
                }
                b'\\' => match *self.b.get(self.i + 1)? {
                    b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                    b'u' => {
                        let h = self.b.get(self.i + 2..self.i + 6)?;
                        let low = match h[3] {
                            d @ b'0'..=b'9' => d - b'0',
                            d @ b'a'..=b'f' => d - b'a' + 10,
                            _ => return None,
                        };
                        let code = match (h[0], h[1], h[2]) {
                            (b'0', b'0', b'0') => low,
                            (b'0', b'0', b'1') => 16 + low,
                            _ => return None,
                        };
                        // These five have a short escape, which serde_json prints instead.
                        if matches!(code, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d) {
                            return None;
                        }
                        self.i += 6;
                    }
                    _ => return None,
                },
                0x00..=0x1f => return None,
                _ => self.i += 1,
            }
        }
    }

    /// An integer serde_json reads as an i64 or u64 (and so prints digit for digit); a fraction,
    /// an exponent, `-0` or a wider integer (read as a float) is not.
    fn number(&mut self) -> Step {
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        let digits = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        let d = &self.b[digits..self.i];
        if d.is_empty() || (d[0] == b'0' && d.len() > 1) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let mut n: u64 = 0;
        for &c in d {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        }
        if negative && (n == 0 || n > 1 << 63) {
            return None;
        }
        self.out.extend_from_slice(&self.b[start..self.i]);
        Some(())
    }

    fn array(&mut self, depth: usize) -> Step {
        self.elements(depth, false)
    }

    /// An array's elements; with `expand`, each element that is an array is written as the
    /// column object `expand_columns` makes of it.
    fn elements(&mut self, depth: usize, expand: bool) -> Step {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.out.push(b'[');
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.ws();
            if expand && self.peek()? == b'[' {
                self.column(depth + 1)?;
            } else {
                self.value(depth)?;
            }
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.out.push(b',');
                }
                b']' => {
                    self.i += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// `[name, type, value]` as `{"name":..,"type":..,"value":..}`, `[name, type]` (and shorter)
    /// as `{"name":..,"type":..,"unchanged_toast":true}`, a missing name or type null; longer
    /// arrays take the `Value` path.
    fn column(&mut self, depth: usize) -> Step {
        const BEFORE: [&[u8]; 3] = [b"{\"name\":", b",\"type\":", b",\"value\":"];
        const TAIL: [&[u8]; 4] = [
            b"{\"name\":null,\"type\":null,\"unchanged_toast\":true}",
            b",\"type\":null,\"unchanged_toast\":true}",
            b",\"unchanged_toast\":true}",
            b"}",
        ];
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.ws();
        let mut parts = 0;
        if self.peek()? == b']' {
            self.i += 1;
        } else {
            loop {
                if parts == 3 {
                    return None;
                }
                self.out.extend_from_slice(BEFORE[parts]);
                self.value(depth)?;
                parts += 1;
                self.ws();
                match self.peek()? {
                    b',' => self.i += 1,
                    b']' => {
                        self.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.out.extend_from_slice(TAIL[parts]);
        Some(())
    }

    /// An object, its members in key order; at the top (`top`), `columns` and `identity` arrays
    /// expanded.
    fn object(&mut self, depth: usize, top: bool) -> Step {
        if depth > MAX_DEPTH {
            return None;
        }
        self.i += 1;
        let start = self.out.len();
        self.out.push(b'{');
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            self.out.push(b'}');
            return Some(());
        }
        let base = self.w.members.len();
        loop {
            self.ws();
            if self.peek()? != b'"' {
                return None;
            }
            let (ks, ke) = self.string()?;
            let key = &self.b[ks + 1..ke - 1];
            // Keys compare as text only when written without escapes.
            if key.contains(&b'\\') {
                return None;
            }
            self.ws();
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            let m = self.out.len();
            self.out.extend_from_slice(&self.b[ks..ke]);
            self.out.push(b':');
            self.ws();
            if top && (key == b"columns" || key == b"identity") && self.peek()? == b'[' {
                self.elements(depth + 1, true)?;
            } else {
                self.value(depth)?;
            }
            self.w.members.push((ks + 1, ke - 1, m, self.out.len()));
            self.ws();
            match self.peek()? {
                b',' => {
                    self.i += 1;
                    self.out.push(b',');
                }
                b'}' => {
                    self.i += 1;
                    break;
                }
                _ => return None,
            }
        }
        let b = self.b;
        let key = |m: &(usize, usize, usize, usize)| &b[m.0..m.1];
        let members = &mut self.w.members[base..];
        if !members.windows(2).all(|p| key(&p[0]) < key(&p[1])) {
            members.sort_by(|x, y| key(x).cmp(key(y)));
            // serde_json keeps the last of repeated keys: left to it.
            if members.windows(2).any(|p| key(&p[0]) == key(&p[1])) {
                return None;
            }
            self.w.reorder.clear();
            self.w.reorder.extend_from_slice(&self.out[start..]);
            self.out.truncate(start + 1);
            for (n, m) in members.iter().enumerate() {
                if n > 0 {
                    self.out.push(b',');
                }
                self.out
                    .extend_from_slice(&self.w.reorder[m.2 - start..m.3 - start]);
            }
        }
        self.out.push(b'}');
        self.w.members.truncate(base);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both paths on one record: the same bytes, or both refuse it.
    fn same(record: &str) -> bool {
        let mut fast = b"prefix".to_vec();
        let mut slow = b"prefix".to_vec();
        let a = ChangeWriter::new().write(record, &mut fast);
        let b = write_change_via_value(record, &mut slow);
        assert_eq!(a.is_ok(), b.is_ok(), "{record:?}");
        assert_eq!(
            String::from_utf8_lossy(&fast),
            String::from_utf8_lossy(&slow),
            "{record:?}"
        );
        a.is_ok()
    }

    /// Whether the record is written without the `Value` path.
    fn fast_only(record: &str) -> bool {
        let mut out = Vec::new();
        Fast {
            b: record.as_bytes(),
            i: 0,
            out: &mut out,
            w: &mut ChangeWriter::new(),
        }
        .record()
        .is_some()
    }

    const PLUGIN: &str = r#"{"action":"U","schema":"public","table":"t","columns":[["id","integer","1"],["note","text","a \"q\" \\ \n\t\r\b\f \u0001\u001f ü €"],["n","numeric",null],["big","text"]],"identity":[["id","integer","1"]],"key":["id"],"lsn":"0/1A2B3C4","xid":751,"commit_time":850000000100000}"#;

    #[test]
    fn a_record_as_the_plugin_writes_it_is_written_directly() {
        assert!(fast_only(PLUGIN));
        assert!(same(PLUGIN));
        let mut out = Vec::new();
        ChangeWriter::new().write(PLUGIN, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"action":"U","columns":[{"name":"id","type":"integer","value":"1"},{"name":"note","type":"text","value":"a \"q\" \\ \n\t\r\b\f \u0001\u001f ü €"},{"name":"n","type":"numeric","value":null},{"name":"big","type":"text","unchanged_toast":true}],"commit_time":850000000100000,"identity":[{"name":"id","type":"integer","value":"1"}],"key":["id"],"lsn":"0/1A2B3C4","schema":"public","table":"t","xid":751}"#
        );
        // A message record (serde_json's own output), and the empty shapes.
        for r in [
            r#"{"action":"M","content":"x","lsn":"0/1","prefix":"p","transactional":true,"xid":0}"#,
            r#"{"action":"M","content":"/wD+","content_encoding":"base64","lsn":"0/1","prefix":"","transactional":false,"xid":4294967295}"#,
            r#"{"action":"T","columns":[],"identity":[],"key":[]}"#,
            "{}",
            "{\"del\":\"\u{7f}\"}",
        ] {
            assert!(fast_only(r), "{r}");
            assert!(same(r));
        }
    }

    #[test]
    fn every_other_form_gives_the_same_bytes_or_the_same_refusal() {
        let cases = [
            // whitespace, nesting, sorting at every level
            " { \"b\" : [ 1 , { \"z\" : null , \"a\" : [ ] } ] , \"a\" : true } ",
            r#"{"columns":[["a","b","c"],"x",{"k":1},[],["only"],["n","t",{"y":1,"x":[2]}]],"identity":"no"}"#,
            r#"{"identity":[["a","b","c","d"]]}"#,
            r#"{"columns":{"not":"an array"}}"#,
            r#"{"nested":{"columns":[["a","b","c"]]}}"#,
            // escapes serde_json prints otherwise
            r#"{"a":"\/"}"#,
            r#"{"a":"\u00e9"}"#,
            r#"{"a":"\u000a"}"#,
            r#"{"a":"\u001F"}"#,
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"a":"\ud83d"}"#,
            r#"{"a\n":1,"a":2}"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"raw \u{1} control\"}",
            // numbers
            r#"{"a":-0}"#,
            r#"{"a":0}"#,
            r#"{"a":-9223372036854775808}"#,
            r#"{"a":-9223372036854775809}"#,
            r#"{"a":18446744073709551615}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a":1.50}"#,
            r#"{"a":1e2}"#,
            r#"{"a":1E400}"#,
            r#"{"a":01}"#,
            r#"{"a":-}"#,
            r#"{"a":+1}"#,
            // keys
            r#"{"a":1,"a":2}"#,
            r#"{"b":1,"a":2,"b":3}"#,
            r#"{"ab":1,"ab!":2,"a":3}"#,
            r#"{"é":1,"z":2,"":3}"#,
            // not an object, or not JSON
            "[1,2]",
            "\"text\"",
            "17",
            "",
            "{",
            "{\"a\":1,}",
            "{\"a\":[1,]}",
            "{\"a\" 1}",
            "{\"a\":1}x",
            "{\"a\":1}{}",
            "{\"a\":tru}",
            "{\"a\":truex}",
            "{\"a\":nul}",
            "{a:1}",
        ];
        for c in cases {
            same(c);
        }
        let deep = |n: usize| format!("{{\"a\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        for n in [60, 63, 64, 65, 126, 127, 128, 200] {
            same(&deep(n));
        }
    }

    /// Every prefix of a plugin record, and the record with each byte replaced by each of a
    /// set of bytes that matter to JSON.
    #[test]
    fn tampered_records_give_the_same_bytes_or_the_same_refusal() {
        for n in 0..PLUGIN.len() {
            if PLUGIN.is_char_boundary(n) {
                same(&PLUGIN[..n]);
            }
        }
        let bytes = PLUGIN.as_bytes();
        for i in 0..bytes.len() {
            for &r in b"\"\\{}[],: 0-9.eE/u\x01" {
                let mut t = bytes.to_vec();
                t[i] = r;
                if let Ok(t) = String::from_utf8(t) {
                    same(&t);
                }
            }
        }
    }

    /// Random records of every JSON shape, with random whitespace, keys and scalars.
    #[test]
    fn random_records_give_the_same_bytes() {
        struct Gen(u64);
        impl Gen {
            fn next(&mut self) -> u64 {
                // xorshift64*
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            fn pick<'s>(&mut self, of: &[&'s str]) -> &'s str {
                of[(self.next() % of.len() as u64) as usize]
            }
            fn ws(&mut self) -> &'static str {
                self.pick(&["", "", "", " ", "\n\t "])
            }
            fn value(&mut self, depth: usize, s: &mut String) {
                let k = if depth > 4 { 4 } else { 6 };
                match self.next() % k {
                    0 => s.push_str(self.pick(&[
                        r#""x""#,
                        r#""""#,
                        r#""a\"b""#,
                        r#""\u0000\u001e""#,
                        r#""\u00fc""#,
                        r#""\/""#,
                        r#""ü""#,
                        r#""\n\\""#,
                        r#""\u000A""#,
                        r#""\ud83d\ude00""#,
                    ])),
                    1 => s.push_str(self.pick(&[
                        "0",
                        "-0",
                        "1",
                        "-1",
                        "42",
                        "1.5",
                        "1e3",
                        "-2.50",
                        "18446744073709551615",
                        "18446744073709551616",
                        "-9223372036854775808",
                        "-9223372036854775809",
                        "123456789012345678901234",
                    ])),
                    2 => s.push_str(self.pick(&["true", "false", "null"])),
                    3 => s.push_str(self.pick(&["[]", "{}"])),
                    4 => {
                        s.push('[');
                        for n in 0..self.next() % 5 {
                            if n > 0 {
                                s.push(',');
                            }
                            s.push_str(self.ws());
                            self.value(depth + 1, s);
                            s.push_str(self.ws());
                        }
                        s.push(']');
                    }
                    _ => self.object(depth + 1, s),
                }
            }
            fn object(&mut self, depth: usize, s: &mut String) {
                s.push('{');
                for n in 0..self.next() % 6 {
                    if n > 0 {
                        s.push(',');
                    }
                    s.push_str(self.ws());
                    s.push_str(self.pick(&[
                        r#""columns""#,
                        r#""identity""#,
                        r#""action""#,
                        r#""a""#,
                        r#""ab""#,
                        r#""ab!""#,
                        r#""é""#,
                        r#""""#,
                        r#""k\n""#,
                        r#""z""#,
                    ]));
                    s.push_str(self.ws());
                    s.push(':');
                    s.push_str(self.ws());
                    if depth <= 1 && self.next().is_multiple_of(2) {
                        // a columns-like array of arrays
                        s.push('[');
                        for c in 0..self.next() % 4 {
                            if c > 0 {
                                s.push(',');
                            }
                            s.push('[');
                            for p in 0..self.next() % 5 {
                                if p > 0 {
                                    s.push(',');
                                }
                                self.value(depth + 1, s);
                            }
                            s.push(']');
                        }
                        s.push(']');
                    } else {
                        self.value(depth, s);
                    }
                }
                s.push_str(self.ws());
                s.push('}');
            }
        }
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let (mut written, mut direct) = (0, 0);
        for _ in 0..20_000 {
            let mut s = g.ws().to_owned();
            g.object(0, &mut s);
            s.push_str(g.ws());
            if same(&s) {
                written += 1;
            }
            if fast_only(&s) {
                direct += 1;
            }
        }
        // Both paths were exercised.
        assert!(written > 10_000 && direct > 1_000, "{written} {direct}");
    }
}
