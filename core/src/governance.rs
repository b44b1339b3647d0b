//! Key governance (issue 18): directives that retire a key reference, deny an algorithm or set a
//! cryptoperiod, and the decision a put takes against them. Pure functions over facts the
//! extension reads from `vault.key_directives`; times are compared in SQL, where the clock is,
//! and arrive here as booleans.

use crate::rules::InputError;

/// Longest directive target (a key reference, a prefix pattern or an algorithm hint), in bytes.
pub const TARGET_MAX_BYTES: usize = 256;
/// Longest reason of a directive or a revocation, in characters.
pub const REASON_MAX_CHARS: usize = 1000;

/// What a directive governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No new data under the key reference (or any reference matching the prefix pattern).
    RetireKey,
    /// No new data under the algorithm hint (compared case-insensitively).
    DenyAlgorithm,
    /// No new data under a key reference matching the pattern once that key's oldest live
    /// ciphertext in the vault is older than `max_age`.
    Cryptoperiod,
}

impl Kind {
    pub fn parse(kind: &str) -> Result<Kind, InputError> {
        match kind {
            "retire-key" => Ok(Kind::RetireKey),
            "deny-algorithm" => Ok(Kind::DenyAlgorithm),
            "cryptoperiod" => Ok(Kind::Cryptoperiod),
            other => Err(InputError::Directive(format!(
                "unknown directive kind {other:?}: expected retire-key, deny-algorithm or cryptoperiod"
            ))),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::RetireKey => "retire-key",
            Kind::DenyAlgorithm => "deny-algorithm",
            Kind::Cryptoperiod => "cryptoperiod",
        }
    }

    /// Whether the target names key references (exactly, or by a prefix pattern).
    pub fn targets_keys(self) -> bool {
        !matches!(self, Kind::DenyAlgorithm)
    }
}

/// A key reference target: one exact `key_ref`, or every `key_ref` starting with a prefix
/// (written with one trailing `*`: `kms://payments/*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPattern {
    Exact(String),
    Prefix(String),
}

impl KeyPattern {
    pub fn parse(target: &str) -> Result<KeyPattern, InputError> {
        check_target(target)?;
        match target.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err(InputError::Directive(
                "a key pattern has one '*', at its end".into(),
            )),
            Some("") => Err(InputError::Directive(
                "a key pattern needs a prefix before '*'".into(),
            )),
            Some(prefix) => Ok(KeyPattern::Prefix(prefix.to_owned())),
            None if target.contains('*') => Err(InputError::Directive(
                "a key pattern has one '*', at its end".into(),
            )),
            None => Ok(KeyPattern::Exact(target.to_owned())),
        }
    }

    pub fn matches(&self, key_ref: &str) -> bool {
        match self {
            KeyPattern::Exact(k) => k == key_ref,
            KeyPattern::Prefix(p) => key_ref.starts_with(p.as_str()),
        }
    }
}

fn check_target(target: &str) -> Result<(), InputError> {
    if target.is_empty() {
        return Err(InputError::Directive("target must not be empty".into()));
    }
    if target.len() > TARGET_MAX_BYTES {
        return Err(InputError::Directive(format!(
            "target is longer than {TARGET_MAX_BYTES} bytes"
        )));
    }
    if target.chars().any(char::is_control) {
        return Err(InputError::Directive(
            "target contains control characters".into(),
        ));
    }
    Ok(())
}

/// The arguments of `vault_key_directive`, with the signs of its intervals (computed in SQL).
#[derive(Debug, Clone, Copy)]
pub struct DirectiveArgs<'a> {
    pub kind: &'a str,
    pub target: &'a str,
    /// `grace` is given and negative.
    pub grace_negative: bool,
    /// `max_age`: absent, or whether it is positive.
    pub max_age_positive: Option<bool>,
    pub reason: Option<&'a str>,
}

/// Validates a new directive (22023 for every bad value; NULLs are refused before, 22004).
pub fn validate(args: &DirectiveArgs) -> Result<Kind, InputError> {
    let kind = Kind::parse(args.kind)?;
    if kind.targets_keys() {
        KeyPattern::parse(args.target)?;
    } else {
        check_target(args.target)?;
        if args.target.contains('*') {
            return Err(InputError::Directive(
                "deny-algorithm takes one algorithm hint, not a pattern".into(),
            ));
        }
    }
    if args.grace_negative {
        return Err(InputError::Directive("grace must not be negative".into()));
    }
    match (kind, args.max_age_positive) {
        (Kind::Cryptoperiod, None) => {
            return Err(InputError::Directive(
                "a cryptoperiod directive needs max_age".into(),
            ));
        }
        (Kind::Cryptoperiod, Some(false)) => {
            return Err(InputError::Directive("max_age must be positive".into()));
        }
        (Kind::RetireKey | Kind::DenyAlgorithm, Some(_)) => {
            return Err(InputError::Directive(format!(
                "max_age applies to cryptoperiod directives only, not {}",
                kind.as_str()
            )));
        }
        _ => {}
    }
    reason(args.reason)?;
    Ok(kind)
}

/// A directive's or a revocation's reason: optional, bounded, no control characters.
pub fn reason(r: Option<&str>) -> Result<(), InputError> {
    match r {
        Some(r) if r.chars().count() > REASON_MAX_CHARS => Err(InputError::Directive(format!(
            "reason is longer than {REASON_MAX_CHARS} characters"
        ))),
        Some(r) if r.chars().any(|c| c.is_control() && c != '\n') => Err(InputError::Directive(
            "reason contains control characters".into(),
        )),
        _ => Ok(()),
    }
}

/// One directive in force (not revoked), as a put reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveDirective {
    pub id: i64,
    pub kind: Kind,
    pub target: String,
    /// `now() >= effective_at`.
    pub in_effect: bool,
    /// `now() >= effective_at + grace` (equal to `in_effect` without a grace period).
    pub past_grace: bool,
    /// Cryptoperiod only: the put's key reference has live ciphertext in the vault older than
    /// `max_age` (for other kinds: true).
    pub age_exceeded: bool,
}

impl ActiveDirective {
    /// Whether the directive governs data under this key reference and algorithm hint.
    pub fn applies_to(&self, key_ref: Option<&str>, algorithm_hint: Option<&str>) -> bool {
        match self.kind {
            Kind::DenyAlgorithm => {
                algorithm_hint.is_some_and(|a| a.to_lowercase() == self.target.to_lowercase())
            }
            Kind::RetireKey | Kind::Cryptoperiod => {
                match (key_ref, KeyPattern::parse(&self.target)) {
                    (Some(k), Ok(p)) => p.matches(k) && self.age_exceeded,
                    _ => false,
                }
            }
        }
    }
}

/// What a put may do under the directives in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutVerdict {
    Allowed,
    /// Allowed with a warning: directives in effect whose grace period runs (their ids).
    Grace(Vec<i64>),
    /// `VV426`: refused by this directive (the lowest id of those past their grace period).
    Refused {
        id: i64,
        kind: Kind,
        target: String,
    },
}

/// Decides a put (a new entry or a re-put) under `key_ref` and `algorithm_hint`. A put under a
/// compliant key is always allowed, whatever the entry was stored under before: that is how
/// applications re-encrypt.
pub fn decide_put(
    directives: &[ActiveDirective],
    key_ref: Option<&str>,
    algorithm_hint: Option<&str>,
) -> PutVerdict {
    let mut applying: Vec<&ActiveDirective> = directives
        .iter()
        .filter(|d| d.in_effect && d.applies_to(key_ref, algorithm_hint))
        .collect();
    applying.sort_by_key(|d| d.id);
    if let Some(d) = applying.iter().find(|d| d.past_grace) {
        return PutVerdict::Refused {
            id: d.id,
            kind: d.kind,
            target: d.target.clone(),
        };
    }
    if applying.is_empty() {
        PutVerdict::Allowed
    } else {
        PutVerdict::Grace(applying.iter().map(|d| d.id).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: i64, kind: Kind, target: &str) -> ActiveDirective {
        ActiveDirective {
            id,
            kind,
            target: target.into(),
            in_effect: true,
            past_grace: true,
            age_exceeded: true,
        }
    }

    fn args<'a>(kind: &'a str, target: &'a str) -> DirectiveArgs<'a> {
        DirectiveArgs {
            kind,
            target,
            grace_negative: false,
            max_age_positive: None,
            reason: None,
        }
    }

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let p = KeyPattern::parse("kms://payments/*").unwrap();
        assert!(p.matches("kms://payments/k1"));
        assert!(p.matches("kms://payments/"));
        assert!(!p.matches("kms://payment/k1"));
        assert!(!p.matches("kms://billing/k1"));
        let e = KeyPattern::parse("kms://payments/k1").unwrap();
        assert!(e.matches("kms://payments/k1"));
        assert!(!e.matches("kms://payments/k10"));
    }

    #[test]
    fn bad_patterns_and_targets_are_refused() {
        for t in ["", "*", "kms://*/k1", "kms://**", "a*b*", "k\u{1}"] {
            let e = KeyPattern::parse(t).unwrap_err();
            assert_eq!(e.sqlstate(), "22023", "{t:?}");
        }
        assert!(KeyPattern::parse(&"k".repeat(TARGET_MAX_BYTES + 1)).is_err());
    }

    #[test]
    fn validation_of_kinds_and_intervals() {
        assert_eq!(validate(&args("retire-key", "k1")), Ok(Kind::RetireKey));
        assert_eq!(
            validate(&args("deny-algorithm", "AES-128-CBC")),
            Ok(Kind::DenyAlgorithm)
        );
        assert!(validate(&args("deny-algorithm", "AES*")).is_err());
        assert!(validate(&args("rotate", "k1")).is_err());
        assert!(
            validate(&args("cryptoperiod", "k1")).is_err(),
            "needs max_age"
        );
        let mut a = args("cryptoperiod", "kms://*x");
        a.max_age_positive = Some(true);
        assert!(validate(&a).is_err(), "star inside");
        a.target = "kms://x/*";
        assert_eq!(validate(&a), Ok(Kind::Cryptoperiod));
        a.max_age_positive = Some(false);
        assert!(validate(&a).is_err());
        let mut r = args("retire-key", "k1");
        r.max_age_positive = Some(true);
        assert!(validate(&r).is_err(), "max_age only for cryptoperiod");
        let mut g = args("retire-key", "k1");
        g.grace_negative = true;
        assert!(validate(&g).is_err());
        let long = "r".repeat(REASON_MAX_CHARS + 1);
        let mut l = args("retire-key", "k1");
        l.reason = Some(&long);
        assert!(validate(&l).is_err());
    }

    #[test]
    fn a_retired_key_refuses_after_effective_at_and_warns_during_grace() {
        let mut r = d(7, Kind::RetireKey, "kms://payments/*");
        assert_eq!(
            decide_put(std::slice::from_ref(&r), Some("kms://payments/k1"), None),
            PutVerdict::Refused {
                id: 7,
                kind: Kind::RetireKey,
                target: "kms://payments/*".into()
            }
        );
        assert_eq!(
            decide_put(std::slice::from_ref(&r), Some("kms://billing/k1"), None),
            PutVerdict::Allowed
        );
        assert_eq!(
            decide_put(std::slice::from_ref(&r), None, None),
            PutVerdict::Allowed
        );
        r.past_grace = false;
        assert_eq!(
            decide_put(std::slice::from_ref(&r), Some("kms://payments/k1"), None),
            PutVerdict::Grace(vec![7])
        );
        r.in_effect = false;
        assert_eq!(
            decide_put(&[r], Some("kms://payments/k1"), None),
            PutVerdict::Allowed
        );
    }

    #[test]
    fn algorithms_compare_case_insensitively() {
        let a = d(3, Kind::DenyAlgorithm, "AES-128-CBC");
        assert!(matches!(
            decide_put(std::slice::from_ref(&a), Some("k"), Some("aes-128-cbc")),
            PutVerdict::Refused { id: 3, .. }
        ));
        assert_eq!(
            decide_put(std::slice::from_ref(&a), Some("k"), Some("aes-256-gcm")),
            PutVerdict::Allowed
        );
        assert_eq!(decide_put(&[a], Some("k"), None), PutVerdict::Allowed);
    }

    #[test]
    fn a_cryptoperiod_applies_only_once_the_key_is_too_old() {
        let mut c = d(4, Kind::Cryptoperiod, "kms://*");
        c.age_exceeded = false;
        assert_eq!(
            decide_put(std::slice::from_ref(&c), Some("kms://k"), None),
            PutVerdict::Allowed
        );
        c.age_exceeded = true;
        assert!(matches!(
            decide_put(&[c], Some("kms://k"), None),
            PutVerdict::Refused { id: 4, .. }
        ));
    }

    #[test]
    fn the_lowest_refusing_directive_is_named_and_grace_lists_the_rest() {
        let mut g = d(2, Kind::RetireKey, "k1");
        g.past_grace = false;
        let refusing = d(9, Kind::DenyAlgorithm, "des");
        let also = d(5, Kind::RetireKey, "k*");
        assert!(matches!(
            decide_put(
                &[refusing.clone(), g.clone(), also],
                Some("k1"),
                Some("DES")
            ),
            PutVerdict::Refused { id: 5, .. }
        ));
        let mut g2 = refusing;
        g2.past_grace = false;
        assert_eq!(
            decide_put(&[g2, g], Some("k1"), Some("DES")),
            PutVerdict::Grace(vec![2, 9])
        );
    }
}
