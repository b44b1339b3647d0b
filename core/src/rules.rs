//! Input rules for the storage API. The extension calls these before touching a table, so a bad
//! input is refused with the same SQLSTATE whatever function receives it.

use thiserror::Error;

/// Longest purpose name: a purpose is used as an identifier in reports and metrics.
pub const PURPOSE_MAX_LEN: usize = 63;
/// Longest external id, in bytes.
pub const EXTERNAL_ID_MAX_BYTES: usize = 256;
/// Largest metadata document, in bytes of its JSON text.
pub const METADATA_MAX_BYTES: usize = 64 * 1024;
/// Longest policy description.
pub const DESCRIPTION_MAX_CHARS: usize = 1000;
/// Longest `vsql_vault.on_behalf_of`, in bytes: the access record keeps it whole.
pub const ON_BEHALF_OF_MAX_BYTES: usize = 128;
/// Largest page `vault_list` returns (`max_rows`): a page is held in memory until its access
/// record is durable.
pub const LIST_MAX_ROWS: i32 = 10_000;

/// Why an input was refused. Each variant maps to one documented SQLSTATE.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InputError {
    #[error("{0} must not be NULL")]
    Null(&'static str),
    #[error("invalid purpose {0:?}: a purpose matches ^[a-z0-9][a-z0-9_.-]{{0,62}}$")]
    Purpose(String),
    #[error("invalid external_id: {0}")]
    ExternalId(&'static str),
    #[error("encrypted_value must not be empty")]
    EmptyValue,
    #[error("encrypted_value is {size} bytes, above vsql_vault.max_value_bytes ({limit})")]
    ValueTooLarge { size: usize, limit: usize },
    #[error("metadata must be a JSON object, not {0}")]
    MetadataNotObject(&'static str),
    #[error("metadata is {size} bytes, above the limit of {limit}")]
    MetadataTooLarge { size: usize, limit: usize },
    #[error("invalid policy name {0:?}: a policy name matches ^[a-z0-9][a-z0-9_.-]{{0,62}}$")]
    PolicyName(String),
    #[error(
        "unknown purge method {0:?}: expected physical-delete, crypto-shred or retention-expire"
    )]
    PurgeMethod(String),
    #[error("{name} must be a positive number of days, got {value}")]
    Days { name: &'static str, value: i32 },
    #[error("default_ttl_days ({ttl}) must not exceed max_retention_days ({max})")]
    TtlAboveMax { ttl: i32, max: i32 },
    #[error("max_retrievals must be positive, got {0}")]
    MaxRetrievals(i32),
    #[error("description is longer than {DESCRIPTION_MAX_CHARS} characters")]
    Description,
    #[error("{name} must be positive, got {value}")]
    NotPositive { name: &'static str, value: i64 },
    #[error(
        "require_purge_proof = false is not supported: every destruction writes a signed purge proof, and a purge that cannot be proven does not happen"
    )]
    PurgeProofOptional,
    #[error("invalid vsql_vault.on_behalf_of: {0}")]
    OnBehalfOf(&'static str),
    #[error("max_rows must be between 1 and {LIST_MAX_ROWS}, got {0}")]
    MaxRows(i32),
    #[error("invalid key directive: {0}")]
    Directive(String),
}

impl InputError {
    /// The SQLSTATE documented in README for this refusal.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            InputError::Null(_) => "22004",
            InputError::ValueTooLarge { .. } | InputError::MetadataTooLarge { .. } => "54000",
            _ => "22023",
        }
    }
}

/// Limits that come from settings rather than from the format.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_value_bytes: usize,
}

fn is_identifier(s: &str) -> bool {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > PURPOSE_MAX_LEN {
        return false;
    }
    let first_ok = b[0].is_ascii_lowercase() || b[0].is_ascii_digit();
    first_ok
        && b[1..].iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-')
        })
}

pub fn required<T>(value: Option<T>, name: &'static str) -> Result<T, InputError> {
    value.ok_or(InputError::Null(name))
}

pub fn purpose(p: &str) -> Result<(), InputError> {
    if is_identifier(p) {
        Ok(())
    } else {
        Err(InputError::Purpose(p.to_owned()))
    }
}

pub fn policy_name(p: &str) -> Result<(), InputError> {
    if is_identifier(p) {
        Ok(())
    } else {
        Err(InputError::PolicyName(p.to_owned()))
    }
}

pub fn external_id(id: &str) -> Result<(), InputError> {
    if id.is_empty() {
        return Err(InputError::ExternalId("must not be empty"));
    }
    if id.len() > EXTERNAL_ID_MAX_BYTES {
        return Err(InputError::ExternalId("longer than 256 bytes"));
    }
    if id.chars().any(char::is_control) {
        return Err(InputError::ExternalId("contains control characters"));
    }
    Ok(())
}

pub fn encrypted_value(value: &[u8], limits: Limits) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::EmptyValue);
    }
    if value.len() > limits.max_value_bytes {
        return Err(InputError::ValueTooLarge {
            size: value.len(),
            limit: limits.max_value_bytes,
        });
    }
    Ok(())
}

/// The end user or service a pooled application states it acts for (`vsql_vault.on_behalf_of`).
/// Empty means none. Printable text only: it is shown to auditors as it is.
pub fn on_behalf_of(s: &str) -> Result<(), InputError> {
    if s.len() > ON_BEHALF_OF_MAX_BYTES {
        return Err(InputError::OnBehalfOf("longer than 128 bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(InputError::OnBehalfOf("contains control characters"));
    }
    if s.trim() != s {
        return Err(InputError::OnBehalfOf(
            "has leading or trailing white space",
        ));
    }
    Ok(())
}

/// The page size of `vault_list`.
pub fn max_rows(n: i32) -> Result<(), InputError> {
    if (1..=LIST_MAX_ROWS).contains(&n) {
        Ok(())
    } else {
        Err(InputError::MaxRows(n))
    }
}

/// `json` is the metadata's text as PostgreSQL prints it.
pub fn metadata(json: &str) -> Result<(), InputError> {
    if json.len() > METADATA_MAX_BYTES {
        return Err(InputError::MetadataTooLarge {
            size: json.len(),
            limit: METADATA_MAX_BYTES,
        });
    }
    match json.trim_start().as_bytes().first() {
        Some(b'{') => Ok(()),
        Some(b'[') => Err(InputError::MetadataNotObject("an array")),
        Some(b'"') => Err(InputError::MetadataNotObject("a string")),
        Some(b'n') => Err(InputError::MetadataNotObject("null")),
        Some(b't' | b'f') => Err(InputError::MetadataNotObject("a boolean")),
        _ => Err(InputError::MetadataNotObject("a number")),
    }
}

pub const PURGE_METHODS: [&str; 3] = ["physical-delete", "crypto-shred", "retention-expire"];

pub fn purge_method(m: &str) -> Result<(), InputError> {
    if PURGE_METHODS.contains(&m) {
        Ok(())
    } else {
        Err(InputError::PurgeMethod(m.to_owned()))
    }
}

/// A retention policy always requires proofs: the vault has no way to destroy without evidence
/// (the column and the parameter stay so that 0.1.0 callers keep working with `true`).
pub fn require_purge_proof(required: bool) -> Result<(), InputError> {
    if required {
        Ok(())
    } else {
        Err(InputError::PurgeProofOptional)
    }
}

pub fn retention_days(max_retention_days: i32, default_ttl_days: i32) -> Result<(), InputError> {
    if max_retention_days <= 0 {
        return Err(InputError::Days {
            name: "max_retention_days",
            value: max_retention_days,
        });
    }
    if default_ttl_days <= 0 {
        return Err(InputError::Days {
            name: "default_ttl_days",
            value: default_ttl_days,
        });
    }
    if default_ttl_days > max_retention_days {
        return Err(InputError::TtlAboveMax {
            ttl: default_ttl_days,
            max: max_retention_days,
        });
    }
    Ok(())
}

pub fn max_retrievals(n: Option<i32>) -> Result<(), InputError> {
    match n {
        Some(v) if v <= 0 => Err(InputError::MaxRetrievals(v)),
        _ => Ok(()),
    }
}

pub fn description(d: Option<&str>) -> Result<(), InputError> {
    match d {
        Some(s) if s.chars().count() > DESCRIPTION_MAX_CHARS => Err(InputError::Description),
        _ => Ok(()),
    }
}

/// Text as it may be stored in an access record. Text with control characters (newlines,
/// carriage returns, terminal escapes, ...; valid input never has any, refused input may) is
/// stored with each of them written as `\u{XXXX}` and each backslash doubled, so that what a
/// refused caller sent can never forge lines or colours in an auditor's terminal, and the
/// original stays recoverable. Other text is stored as it is.
pub fn escape_for_log(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c.is_control() {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `details` cut to at most `limit` bytes of JSON without losing a key: strings longer than 256
/// bytes and arrays longer than 64 elements give way to their SHA-256, length and beginning.
pub fn summarize_details(details: &serde_json::Value, limit: usize) -> serde_json::Value {
    use serde_json::{json, Value};
    fn shrink(v: &Value) -> Value {
        match v {
            Value::String(t) if t.len() > 256 => {
                let mut end = 128;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                json!({"sha256": hex::encode(crate::canonical::sha256(t.as_bytes())), "bytes": t.len(),
                       "starts": &t[..end]})
            }
            Value::Array(items) if items.len() > 64 => {
                json!({"sha256": hex::encode(crate::canonical::sha256(v.to_string().as_bytes())),
                       "count": items.len(),
                       "first": items.iter().take(64).map(shrink).collect::<Vec<_>>()})
            }
            Value::Array(items) => Value::Array(items.iter().map(shrink).collect()),
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), shrink(v))).collect())
            }
            other => other.clone(),
        }
    }
    let small = shrink(details);
    if small.to_string().len() <= limit {
        small
    } else {
        json!({"summarized": true, "bytes": details.to_string().len(),
               "sha256": hex::encode(crate::canonical::sha256(details.to_string().as_bytes()))})
    }
}

/// Roles in an access policy are role names or one of these tokens, resolved per entry.
pub const ROLE_TOKENS: [&str; 2] = ["@owner", "@purpose"];

/// The five characters of a SQLSTATE as PostgreSQL packs it into an int (`MAKE_SQLSTATE`: six
/// bits per character, the first lowest).
pub fn unpack_sqlstate(mut packed: i32) -> String {
    (0..5)
        .map(|_| {
            let c = char::from(b'0' + (packed & 0x3F) as u8);
            packed >>= 6;
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_behalf_of_is_short_printable_text() {
        assert_eq!(on_behalf_of(""), Ok(()));
        assert_eq!(on_behalf_of("user:42@tenant-7"), Ok(()));
        assert_eq!(on_behalf_of(&"é".repeat(64)), Ok(()));
        assert_eq!(
            on_behalf_of(&"x".repeat(129)),
            Err(InputError::OnBehalfOf("longer than 128 bytes"))
        );
        assert_eq!(
            on_behalf_of("alice\nbob"),
            Err(InputError::OnBehalfOf("contains control characters"))
        );
        assert_eq!(
            on_behalf_of(" alice"),
            Err(InputError::OnBehalfOf(
                "has leading or trailing white space"
            ))
        );
        assert_eq!(InputError::OnBehalfOf("x").sqlstate(), "22023");
    }

    #[test]
    fn max_rows_is_a_bounded_page() {
        assert_eq!(max_rows(1), Ok(()));
        assert_eq!(max_rows(LIST_MAX_ROWS), Ok(()));
        for bad in [0, -1, LIST_MAX_ROWS + 1, i32::MIN] {
            assert_eq!(max_rows(bad), Err(InputError::MaxRows(bad)));
            assert_eq!(InputError::MaxRows(bad).sqlstate(), "22023");
        }
    }

    #[test]
    fn packed_sqlstates_unpack() {
        let pack = |s: &str| {
            s.bytes()
                .enumerate()
                .map(|(i, b)| (i32::from(b - b'0') & 0x3F) << (6 * i))
                .sum::<i32>()
        };
        for code in ["55P03", "XX000", "42501", "23505", "P0002", "00000"] {
            assert_eq!(unpack_sqlstate(pack(code)), code);
        }
    }

    #[test]
    fn purposes() {
        for ok in ["card", "a", "pan.v2", "x-1_y", &"a".repeat(63)] {
            assert_eq!(purpose(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "Card",
            " card",
            "card ",
            "_card",
            "-x",
            "a'b",
            "drop table",
            &"a".repeat(64),
            "é",
            "a\u{202e}b",
            "a\0b",
        ] {
            assert!(purpose(bad).is_err(), "{bad:?}");
            assert_eq!(purpose(bad).unwrap_err().sqlstate(), "22023");
        }
    }

    #[test]
    fn external_ids() {
        assert!(external_id("p1").is_ok());
        assert!(external_id(&"x".repeat(256)).is_ok());
        assert!(external_id(&"x".repeat(257)).is_err());
        assert!(external_id("").is_err());
        assert!(external_id("a\nb").is_err());
        assert!(external_id("a\0b").is_err());
        assert!(external_id("Ünïcødé id").is_ok());
    }

    #[test]
    fn values_and_metadata() {
        let limits = Limits { max_value_bytes: 4 };
        assert_eq!(encrypted_value(b"", limits), Err(InputError::EmptyValue));
        assert!(encrypted_value(b"abcd", limits).is_ok());
        let err = encrypted_value(b"abcde", limits).unwrap_err();
        assert_eq!(err.sqlstate(), "54000");
        assert!(metadata("{}").is_ok());
        assert!(metadata(" {\"a\": 1}").is_ok());
        for bad in ["[]", "1", "\"s\"", "null", "true"] {
            assert_eq!(metadata(bad).unwrap_err().sqlstate(), "22023", "{bad}");
        }
        let huge = format!("{{\"a\":\"{}\"}}", "x".repeat(METADATA_MAX_BYTES));
        assert_eq!(metadata(&huge).unwrap_err().sqlstate(), "54000");
    }

    #[test]
    fn log_text_is_free_of_control_characters() {
        assert_eq!(escape_for_log("card-42"), "card-42");
        assert_eq!(
            escape_for_log("a\n b\x1b[31m\r\u{85}"),
            "a\\u{000a} b\\u{001b}[31m\\u{000d}\\u{0085}"
        );
        assert_eq!(escape_for_log("back\\slash"), "back\\slash");
        assert_eq!(escape_for_log("b\\\n"), "b\\\\\\u{000a}");
        assert!(!escape_for_log("\x07\t\x00").chars().any(char::is_control));
    }

    #[test]
    fn long_details_keep_every_key() {
        let long = "d".repeat(100_000);
        let roles: Vec<String> = (0..500).map(|i| format!("role_{i}")).collect();
        let details = serde_json::json!({"name": "p1", "description": long, "roles": roles});
        let small = summarize_details(&details, 8192);
        assert!(small.to_string().len() <= 8192);
        assert_eq!(small["name"], "p1");
        assert_eq!(small["description"]["bytes"], 100_000);
        assert_eq!(
            small["description"]["sha256"],
            hex::encode(crate::canonical::sha256(long.as_bytes()))
        );
        assert_eq!(small["roles"]["count"], 500);
        assert_eq!(small["roles"]["first"][0], "role_0");
        // Too big even so: a digest of the whole remains.
        let tiny = summarize_details(&details, 64);
        assert_eq!(tiny["summarized"], true);
    }

    #[test]
    fn retention() {
        assert!(retention_days(365, 90).is_ok());
        assert!(retention_days(90, 90).is_ok());
        assert!(retention_days(0, 1).is_err());
        assert!(retention_days(10, 0).is_err());
        assert!(retention_days(10, -1).is_err());
        assert!(matches!(
            retention_days(30, 31),
            Err(InputError::TtlAboveMax { .. })
        ));
        assert!(purge_method("crypto-shred").is_ok());
        assert!(purge_method("shred").is_err());
        assert!(require_purge_proof(true).is_ok());
        assert_eq!(require_purge_proof(false).unwrap_err().sqlstate(), "22023");
        assert!(max_retrievals(None).is_ok());
        assert!(max_retrievals(Some(0)).is_err());
        assert_eq!(
            required(None::<i32>, "purpose").unwrap_err().sqlstate(),
            "22004"
        );
    }
}
