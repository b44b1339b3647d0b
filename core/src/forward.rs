//! Access records a hot standby forwards to its primary (README, "High availability and read
//! replicas"): which calls a standby may serve, the record as it travels, and what the primary
//! accepts. Pure, so the standby and the primary apply the same rules.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The audited calls a hot standby serves, each only once the primary has made its record
/// durable. They read and never write; every other audited call fails there with 25006.
pub const SERVED_ON_STANDBY: &[&str] = &["get", "head", "list", "verify_audit"];

/// Whether a hot standby may serve `operation` (forwarding its record to the primary).
pub fn served_on_standby(operation: &str) -> bool {
    SERVED_ON_STANDBY.contains(&operation)
}

/// The longest text a forwarded field may carry: the widths of the standby's own record fields
/// (`access_log::queue::RawRecord`), with room for multibyte characters cut at a boundary.
const MAX_NAME: usize = 64;
const MAX_TEXT: usize = 320;
const MAX_EXTERNAL_ID: usize = 256;
const MAX_ON_BEHALF_OF: usize = 128;
/// Below the primary's 128 KiB of record details: room for the origin it adds.
const MAX_DETAILS: usize = 120 * 1024;
/// The longest standby name recorded.
pub const MAX_STANDBY_NAME: usize = 64;

/// One access record as a standby sends it: the fields of the access log a caller's session
/// determines. The primary adds where it came from and decides `max_retrievals` itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedRecord {
    /// Microseconds since 2000-01-01 UTC (PostgreSQL's epoch), on the standby's clock.
    pub logged_at_us: i64,
    pub role_name: String,
    pub session_user: String,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    /// The standby backend's process id.
    pub backend_pid: i32,
    pub operation: String,
    pub purpose: Option<String>,
    pub external_id: Option<String>,
    pub entry_id: Option<i64>,
    /// The entry's limit as the standby read it; the primary uses its own when it has the entry.
    pub max_retrievals: Option<i32>,
    pub granted: bool,
    pub sqlstate: Option<String>,
    pub reason: Option<String>,
    /// A JSON object (the call's details), or none.
    pub details: Option<serde_json::Value>,
    pub on_behalf_of: Option<String>,
}

/// Why the primary refuses a forwarded record.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ForwardError {
    #[error("a standby may forward records of vault_get, vault_head, vault_list and vault_verify_audit only, not \"{0}\"")]
    Operation(String),
    #[error("forwarded record: {0} is longer than {1} bytes")]
    TooLong(&'static str, usize),
    #[error("forwarded record: {0} is empty")]
    Empty(&'static str),
    #[error("forwarded record: sqlstate must be five characters 0-9 or A-Z")]
    Sqlstate,
    #[error("forwarded record: a granted record carries no sqlstate or reason, a refused one carries both")]
    Outcome,
    #[error("forwarded record: details must be a JSON object")]
    Details,
    #[error("forwarded record: client_addr is not an IP address")]
    ClientAddr,
    #[error(
        "forwarded record: the standby name must be 1 to {MAX_STANDBY_NAME} printable characters"
    )]
    StandbyName,
    #[error("forwarded record is not valid JSON of the expected shape: {0}")]
    Shape(String),
}

impl ForwardError {
    /// invalid_parameter_value: the standby sent something no standby of this version sends.
    pub fn sqlstate(&self) -> &'static str {
        "22023"
    }
}

fn bounded(name: &'static str, v: Option<&str>, max: usize) -> Result<(), ForwardError> {
    match v {
        Some(t) if t.len() > max => Err(ForwardError::TooLong(name, max)),
        Some(t) if t.chars().any(char::is_control) => Err(ForwardError::Shape(format!(
            "{name} contains a control character"
        ))),
        _ => Ok(()),
    }
}

/// Parses and checks a record a standby sent. It accepts exactly what a standby's own audited
/// call would record: an operation a standby serves, fields no longer than the standby's record
/// fields, a consistent outcome, details that are an object.
pub fn parse(json: &str) -> Result<ForwardedRecord, ForwardError> {
    let r: ForwardedRecord =
        serde_json::from_str(json).map_err(|e| ForwardError::Shape(e.to_string()))?;
    validate(&r)?;
    Ok(r)
}

pub fn validate(r: &ForwardedRecord) -> Result<(), ForwardError> {
    if !served_on_standby(&r.operation) {
        return Err(ForwardError::Operation(r.operation.clone()));
    }
    if r.role_name.is_empty() {
        return Err(ForwardError::Empty("role_name"));
    }
    if r.session_user.is_empty() {
        return Err(ForwardError::Empty("session_user"));
    }
    bounded("role_name", Some(&r.role_name), MAX_NAME)?;
    bounded("session_user", Some(&r.session_user), MAX_NAME)?;
    bounded("application_name", r.application_name.as_deref(), MAX_NAME)?;
    bounded("purpose", r.purpose.as_deref(), MAX_NAME)?;
    bounded("external_id", r.external_id.as_deref(), MAX_EXTERNAL_ID)?;
    bounded("reason", r.reason.as_deref(), MAX_TEXT)?;
    bounded("on_behalf_of", r.on_behalf_of.as_deref(), MAX_ON_BEHALF_OF)?;
    if let Some(addr) = &r.client_addr {
        // `inet_client_addr()::text`: an address, with its prefix length.
        let (ip, prefix) = addr.split_once('/').unwrap_or((addr, "0"));
        if ip.parse::<std::net::IpAddr>().is_err() || prefix.parse::<u8>().map_or(true, |p| p > 128)
        {
            return Err(ForwardError::ClientAddr);
        }
    }
    if let Some(s) = &r.sqlstate {
        if s.len() != 5
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
        {
            return Err(ForwardError::Sqlstate);
        }
    }
    if r.granted != (r.sqlstate.is_none() && r.reason.is_none())
        || (!r.granted && (r.sqlstate.is_none() || r.reason.is_none()))
    {
        return Err(ForwardError::Outcome);
    }
    match &r.details {
        None => {}
        Some(d) if !d.is_object() => return Err(ForwardError::Details),
        Some(d) if d.to_string().len() > MAX_DETAILS => {
            return Err(ForwardError::TooLong("details", MAX_DETAILS));
        }
        Some(_) => {}
    }
    Ok(())
}

/// Checks the name a standby gives for itself (its `cluster_name`).
pub fn validate_standby_name(name: &str) -> Result<(), ForwardError> {
    if name.is_empty() || name.len() > MAX_STANDBY_NAME || name.chars().any(char::is_control) {
        return Err(ForwardError::StandbyName);
    }
    Ok(())
}

/// The details the primary records: the standby's details with where the record was served
/// (`served_by_standby`) and the primary session that forwarded it (`forwarded_by`). The details
/// column is part of the hash chain's canonical row, so these two facts are chained evidence
/// and the record format is unchanged. A standby's own keys of these names are overwritten.
pub fn recorded_details(
    details: Option<&serde_json::Value>,
    standby: &str,
    forwarded_by: &str,
) -> serde_json::Value {
    let mut d = details
        .filter(|d| d.is_object())
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    d["served_by_standby"] = serde_json::json!(standby);
    d["forwarded_by"] = serde_json::json!(forwarded_by);
    d
}

/// What the primary answers for a forwarded record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Durable as sent.
    Written,
    /// A granted get of an entry whose `max_retrievals` the primary's log has reached: durable as
    /// a denial, and the standby must not return the data.
    LimitReached,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Written => "written",
            Verdict::LimitReached => "limit_reached",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        match s {
            "written" => Some(Verdict::Written),
            "limit_reached" => Some(Verdict::LimitReached),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted_get() -> ForwardedRecord {
        ForwardedRecord {
            logged_at_us: 1,
            role_name: "app".into(),
            session_user: "app".into(),
            application_name: Some("psql".into()),
            client_addr: Some("127.0.0.1/32".into()),
            backend_pid: 42,
            operation: "get".into(),
            purpose: Some("it.card".into()),
            external_id: Some("c-1".into()),
            entry_id: Some(7),
            max_retrievals: None,
            granted: true,
            sqlstate: None,
            reason: None,
            details: None,
            on_behalf_of: None,
        }
    }

    #[test]
    fn only_reads_are_served_on_a_standby() {
        for op in ["get", "head", "list", "verify_audit"] {
            assert!(served_on_standby(op), "{op}");
        }
        for op in [
            "put",
            "delete",
            "compliance_report",
            "purge_sweep",
            "set_access_policy",
            "",
        ] {
            assert!(!served_on_standby(op), "{op}");
        }
    }

    #[test]
    fn a_record_round_trips_and_is_accepted() {
        let r = granted_get();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(parse(&json), Ok(r));
    }

    #[test]
    fn records_no_standby_call_makes_are_refused() {
        let mut r = granted_get();
        r.operation = "put".into();
        assert_eq!(validate(&r), Err(ForwardError::Operation("put".into())));

        let mut r = granted_get();
        r.external_id = Some("x".repeat(257));
        assert_eq!(validate(&r), Err(ForwardError::TooLong("external_id", 256)));

        let mut r = granted_get();
        r.role_name = String::new();
        assert_eq!(validate(&r), Err(ForwardError::Empty("role_name")));

        let mut r = granted_get();
        r.client_addr = Some("not an address".into());
        assert_eq!(validate(&r), Err(ForwardError::ClientAddr));

        // A grant with a reason, a refusal without one, a malformed SQLSTATE.
        let mut r = granted_get();
        r.reason = Some("why".into());
        assert_eq!(validate(&r), Err(ForwardError::Outcome));
        let mut r = granted_get();
        r.granted = false;
        assert_eq!(validate(&r), Err(ForwardError::Outcome));
        r.sqlstate = Some("42501".into());
        r.reason = Some("permission denied".into());
        assert_eq!(validate(&r), Ok(()));
        r.sqlstate = Some("4250".into());
        assert_eq!(validate(&r), Err(ForwardError::Sqlstate));

        let mut r = granted_get();
        r.details = Some(serde_json::json!([1]));
        assert_eq!(validate(&r), Err(ForwardError::Details));

        let mut r = granted_get();
        r.purpose = Some("a\nb".into());
        assert!(matches!(validate(&r), Err(ForwardError::Shape(_))));

        // Unknown fields (a chain position, a forged `logged_by`) are not accepted.
        let mut v = serde_json::to_value(granted_get()).unwrap();
        v["seq"] = serde_json::json!(1);
        assert!(matches!(parse(&v.to_string()), Err(ForwardError::Shape(_))));
    }

    #[test]
    fn the_origin_is_added_to_the_details_and_overrides_a_standbys_claim() {
        let d = serde_json::json!({"found": true, "served_by_standby": "forged"});
        let out = recorded_details(Some(&d), "replica-1", "fwd");
        assert_eq!(
            out,
            serde_json::json!({"found": true, "served_by_standby": "replica-1", "forwarded_by": "fwd"})
        );
        assert_eq!(
            recorded_details(None, "r", "f"),
            serde_json::json!({"served_by_standby": "r", "forwarded_by": "f"})
        );
    }

    #[test]
    fn standby_names_and_verdicts() {
        assert!(validate_standby_name("replica-1").is_ok());
        assert!(validate_standby_name("").is_err());
        assert!(validate_standby_name(&"x".repeat(65)).is_err());
        assert!(validate_standby_name("a\u{7}").is_err());
        for v in [Verdict::Written, Verdict::LimitReached] {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
        }
        assert_eq!(Verdict::parse("granted"), None);
    }
}
