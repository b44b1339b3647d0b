//! A canonical, versioned byte encoding of records, and SHA-256 over it.
//!
//! Every hash vsql_vault computes or signs is over bytes a third party can rebuild from exported
//! JSON alone: a domain string and format version first, then fields in a fixed order, each with
//! its name, a type tag and a length before the value, and one encoding for NULL. Length prefixes
//! make the encoding injective: ("ab","c") and ("a","bc") never produce the same bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Current version of the canonical record format.
pub const FORMAT_VERSION: u8 = 1;

/// One field value, typed so that `1` the integer and `"1"` the text never collide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "lowercase")]
pub enum Value {
    Null,
    Text(String),
    /// Hex in JSON, raw bytes in the encoding.
    Bytes(#[serde(with = "hex_bytes")] Vec<u8>),
    Int(i64),
    Bool(bool),
    /// Microseconds since 2000-01-01 00:00:00 UTC, PostgreSQL's own timestamptz representation.
    Timestamp(i64),
}

/// Type tags of the encoding, one per `Value` variant.
pub mod tag {
    pub const NULL: u8 = 0x00;
    pub const TEXT: u8 = 0x01;
    pub const BYTES: u8 = 0x02;
    pub const INT: u8 = 0x03;
    pub const BOOL: u8 = 0x04;
    pub const TIMESTAMP: u8 = 0x05;
}

impl Value {
    fn tag(&self) -> u8 {
        match self {
            Value::Null => tag::NULL,
            Value::Text(_) => tag::TEXT,
            Value::Bytes(_) => tag::BYTES,
            Value::Int(_) => tag::INT,
            Value::Bool(_) => tag::BOOL,
            Value::Timestamp(_) => tag::TIMESTAMP,
        }
    }
}

/// Serde helpers: byte strings as lowercase hex in JSON.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// A 32-byte hash as lowercase hex in JSON.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// A 32-byte hash as lowercase hex in JSON, or null.
pub mod hex32_or_null {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(h) => s.serialize_str(&hex::encode(h)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(s) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(Some(out))
    }
}

/// Builds the canonical bytes of one record.
#[derive(Debug, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    /// `domain` names what is encoded (for example `vsql_vault.access_log`), so that bytes
    /// encoded for one table can never verify as a row of another.
    pub fn new(domain: &str) -> Self {
        let mut buf = Vec::with_capacity(256);
        put_header(&mut buf, domain);
        Encoder { buf }
    }

    pub fn field(mut self, name: &str, value: &Value) -> Self {
        put_field(&mut self.buf, name, value);
        self
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn sha256(&self) -> [u8; 32] {
        sha256(&self.buf)
    }
}

/// The same bytes as `Encoder`, written into a buffer the caller keeps (and reuses): the record's
/// start, magic, format version and domain.
pub fn put_header(buf: &mut Vec<u8>, domain: &str) {
    buf.extend_from_slice(b"VSQLV");
    buf.push(FORMAT_VERSION);
    put_len_prefixed(buf, domain.as_bytes());
}

/// One field as `Encoder::field` writes it.
pub fn put_field(buf: &mut Vec<u8>, name: &str, value: &Value) {
    put_name_tag(buf, name, value.tag());
    match value {
        Value::Null => {}
        Value::Text(s) => put_len_prefixed(buf, s.as_bytes()),
        Value::Bytes(b) => put_len_prefixed(buf, b),
        Value::Int(i) | Value::Timestamp(i) => buf.extend_from_slice(&i.to_be_bytes()),
        Value::Bool(b) => buf.push(u8::from(*b)),
    }
}

/// A field's name and type tag; its value follows in the form of that tag: a length-prefixed
/// value (`put_len_prefixed`) for text and bytes, 8 big-endian bytes for int and timestamp, one
/// byte for bool, nothing for null.
pub fn put_name_tag(buf: &mut Vec<u8>, name: &str, tag: u8) {
    put_len_prefixed(buf, name.as_bytes());
    buf.push(tag);
}

pub fn put_len_prefixed(buf: &mut Vec<u8>, data: &[u8]) {
    // u32 lengths: no field of a vault record can approach 4 GiB (values are capped far below).
    let len = u32::try_from(data.len()).expect("canonical field longer than 4 GiB");
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(data);
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// JSON text with object keys sorted at every level, whatever the map type in use: signed JSON
/// documents (the scope report) are signed over this text.
pub fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| {
                    format!(
                        "{}:{}",
                        serde_json::Value::String(k.clone()),
                        canonical_json(&m[k])
                    )
                })
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        serde_json::Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical_json).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// The bytes a signed JSON report is signed over: the report without its `signature`.
pub fn report_message(report: &serde_json::Value) -> Vec<u8> {
    let mut unsigned = report.clone();
    if let Some(m) = unsigned.as_object_mut() {
        m.remove("signature");
    }
    Encoder::new("vsql_vault.report")
        .field("report", &Value::Text(canonical_json(&unsigned)))
        .bytes()
        .to_vec()
}

/// Appends `s` as a JSON string literal, escaped exactly as serde_json escapes it, without the
/// intermediate values and allocations of building a `serde_json::Value` (the decoding plugin
/// writes every column of every change this way).
pub fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escaped.is_empty() {
            out.push_str("\\u00");
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        } else {
            out.push_str(escaped);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// The canonical bytes of named fields in the order given, whatever holds the names.
pub fn encode_named<S: AsRef<str>>(domain: &str, fields: &[(S, Value)]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    put_header(&mut buf, domain);
    for (name, value) in fields {
        put_field(&mut buf, name.as_ref(), value);
    }
    buf
}

/// Encodes a list of named fields in the order given.
pub fn encode(domain: &str, fields: &[(String, Value)]) -> Encoder {
    fields
        .iter()
        .fold(Encoder::new(domain), |e, (n, v)| e.field(n, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(fields: &[(&str, Value)]) -> Vec<u8> {
        fields
            .iter()
            .fold(Encoder::new("t"), |e, (n, v)| e.field(n, v))
            .bytes()
            .to_vec()
    }

    #[test]
    fn numbers_in_a_signed_report_read_back_to_the_same_message() {
        // Found by fuzzing: without exact float parsing, 12e100 came back as another number.
        let report: serde_json::Value =
            serde_json::from_str(r#"{"n": 12e100, "m": 0.1, "k": -7}"#).unwrap();
        let written = report.to_string();
        let read: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(report_message(&report), report_message(&read));
    }

    #[test]
    fn json_strings_are_escaped_exactly_as_serde_json_does() {
        let mut samples: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "100% \"quoted\" \\ back\nnew\r\t line ü €".into(),
            "\u{200f}rtl \u{7f} \u{1b}[0m".into(),
        ];
        samples.push((0u8..0x20).map(char::from).collect());
        for s in samples {
            let mut out = String::from("x");
            push_json_str(&mut out, &s);
            assert_eq!(out[1..], serde_json::to_string(&s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn layout_is_exact() {
        let b = enc(&[
            ("a", Value::Text("xy".into())),
            ("n", Value::Null),
            ("i", Value::Int(1)),
        ]);
        let expected: Vec<u8> = [
            b"VSQLV".as_slice(),
            &[1],
            &[0, 0, 0, 1, b't'],
            &[0, 0, 0, 1, b'a', 0x01, 0, 0, 0, 2, b'x', b'y'],
            &[0, 0, 0, 1, b'n', 0x00],
            &[0, 0, 0, 1, b'i', 0x03, 0, 0, 0, 0, 0, 0, 0, 1],
        ]
        .concat();
        assert_eq!(b, expected);
    }

    #[test]
    fn encoding_is_injective_on_tricky_pairs() {
        let a = enc(&[
            ("f", Value::Text("ab".into())),
            ("g", Value::Text("c".into())),
        ]);
        let b = enc(&[
            ("f", Value::Text("a".into())),
            ("g", Value::Text("bc".into())),
        ]);
        assert_ne!(a, b);
        assert_ne!(
            enc(&[("f", Value::Null)]),
            enc(&[("f", Value::Text(String::new()))])
        );
        assert_ne!(
            enc(&[("f", Value::Int(1))]),
            enc(&[("f", Value::Timestamp(1))])
        );
        assert_ne!(
            enc(&[("f", Value::Text("1".into()))]),
            enc(&[("f", Value::Bytes(b"1".to_vec()))])
        );
        assert_ne!(Encoder::new("a").bytes(), Encoder::new("b").bytes());
    }

    #[test]
    fn values_round_trip_through_json() {
        let fields = vec![
            ("b".to_string(), Value::Bytes(vec![0, 255])),
            ("t".to_string(), Value::Timestamp(-5)),
            ("x".to_string(), Value::Bool(true)),
        ];
        let json = serde_json::to_string(&fields).unwrap();
        let back: Vec<(String, Value)> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, fields);
        assert!(json.contains("\"00ff\""));
    }
}
