//! Compliance evidence: the signed compliance report and the Prometheus metrics. The auditor
//! views themselves are plain SQL (`sql/compliance.sql`); this module holds what needs the
//! signing key or the shared-memory counters.

// pgrx reads result columns from the signature itself, so they cannot be behind a type alias.
#![allow(clippy::type_complexity)]

use crate::audited_call::{audited_call, refusals_recorded};
use crate::errors::{status, VaultError};
use crate::pg::select_one;
use crate::security::{has_role, require, AsOwner};

/// Who may read the evidence.
pub const AUDITORS: &[&str] = &["vault_auditor", "vault_admin"];
use pgrx::prelude::*;
use std::fmt::Write as _;
use vsql_vault_core::canonical::report_message;

/// Adds `signing_key_id` and an Ed25519 `signature` over the canonical JSON of everything else,
/// the encoding `vsql-vault verify-report` checks.
pub fn sign(report: &mut serde_json::Value) -> Result<(), VaultError> {
    let key = crate::keys::current()?;
    let key_id = crate::keys::register(&key).map_err(|e| VaultError::Internal(e.to_string()))?;
    report["signing_key_id"] = serde_json::json!(key_id);
    let signature =
        vsql_vault_core::keys::SignEvidence::sign_evidence(&key, &report_message(report))?;
    report["signature"] = serde_json::json!(hex::encode(signature));
    Ok(())
}

/// One pass over the entries (grouping sets by purpose and by key reference), indexed lookups
/// for the rest, and the daily access counters instead of the log: the report stays fast with
/// millions of entries and tens of millions of access rows.
const COMPLIANCE_REPORT: &str = r#"
WITH e AS (
    SELECT GROUPING(e.purpose) AS by_key, e.purpose, e.key_ref,
           count(*) FILTER (WHERE e.purged_at IS NULL AND e.expires_at > now()) AS active,
           count(*) FILTER (WHERE e.purged_at IS NULL AND e.expires_at <= now()) AS expired,
           count(*) FILTER (WHERE e.purged_at IS NULL AND e.expires_at > now()
                                  AND e.expires_at <= now() + interval '30 days') AS expiring,
           count(*) FILTER (WHERE e.purged_at IS NULL AND e.expires_at > now()
                                  AND e.expires_at > e.updated_at + make_interval(days => rp.max_retention_days))
               AS beyond_policy,
           count(*) FILTER (WHERE e.purged_at IS NOT NULL) AS shredded,
           min(e.updated_at) FILTER (WHERE e.purged_at IS NULL) AS oldest_write
      FROM vault.entries e JOIN vault.retention_policies rp ON rp.purpose = e.purpose
     GROUP BY GROUPING SETS ((e.purpose), (e.key_ref))
),
p AS (SELECT * FROM e WHERE by_key = 0),
k AS (SELECT * FROM e WHERE by_key = 1 AND (active + expired) > 0),
last_sweep AS (
    SELECT s.id, s.started_at, s.finished_at, s.entries_purged, s.errors
      FROM vault.sweep_runs s WHERE s.finished_at IS NOT NULL ORDER BY s.id DESC LIMIT 1
),
last_verification AS (
    SELECT l.logged_at, l.role_name, l.details
      FROM vault.access_log l WHERE l.operation = 'verify_audit' AND l.granted
     ORDER BY l.id DESC LIMIT 1
),
last_checkpoint AS (
    SELECT c.checkpointed_at, c.key_id FROM vault.audit_checkpoints c ORDER BY c.id DESC LIMIT 1
),
access AS (
    SELECT coalesce(sum(d.calls), 0) AS total,
           coalesce(sum(d.calls) FILTER (WHERE NOT d.granted), 0) AS denied,
           coalesce(sum(d.identified), 0) AS identified
      FROM vault.access_daily d
     WHERE d.day > (now() AT TIME ZONE 'UTC')::date - 30
)
SELECT jsonb_build_object(
  'report', 'vsql_vault compliance report',
  'database', current_database(),
  'generated_at', now(),
  'summary', jsonb_build_object(
      'total_entries', (SELECT coalesce(sum(active + expired), 0) FROM p),
      'active_entries', (SELECT coalesce(sum(active), 0) FROM p),
      'expired_pending_purge', (SELECT coalesce(sum(expired), 0) FROM p),
      'crypto_shredded_tombstones', (SELECT coalesce(sum(shredded), 0) FROM p),
      'purged_last_30_days',
          (SELECT count(*) FROM vault.purge_log WHERE purged_at > now() - interval '30 days')),
  'by_purpose', (SELECT coalesce(jsonb_object_agg(rp.purpose, jsonb_build_object(
          'active', coalesce(p.active, 0),
          'expired_pending_purge', coalesce(p.expired, 0),
          'entries_expiring_next_30_days', coalesce(p.expiring, 0),
          'entries_beyond_policy_maximum', coalesce(p.beyond_policy, 0),
          'retention_policy', format('%s days max, %s day default TTL', rp.max_retention_days,
                                     rp.default_ttl_days),
          'max_retention_days', rp.max_retention_days,
          'default_ttl_days', rp.default_ttl_days,
          'purge_method', rp.purge_method)), '{}')
        FROM vault.retention_policies rp LEFT JOIN p ON p.purpose = rp.purpose),
  'retention_findings', jsonb_build_object(
      'past_expiry_not_purged', (SELECT coalesce(sum(expired), 0) FROM p),
      'expiry_beyond_policy_maximum', (SELECT coalesce(sum(beyond_policy), 0) FROM p)),
  'purge_compliance', jsonb_build_object(
      'purge_sweep_last_run', (SELECT finished_at FROM last_sweep),
      'purge_sweep_last_duration_ms',
          (SELECT (extract(epoch FROM finished_at - started_at) * 1000)::bigint FROM last_sweep),
      'entries_purged_last_sweep', (SELECT entries_purged FROM last_sweep),
      'last_sweep_errors', (SELECT errors FROM last_sweep),
      'purge_proof_available', (SELECT s.entries_purged =
          (SELECT count(*) FROM vault.purge_log g WHERE g.sweep_id = s.id) FROM last_sweep s),
      'purge_proofs_total', (SELECT count(*) FROM vault.purge_log)),
  'access_summary', jsonb_build_object(
      'total_accesses_last_30_days', (SELECT total FROM access),
      'denied_accesses_last_30_days', (SELECT denied FROM access),
      'identified_accesses_last_30_days', (SELECT identified FROM access),
      'window', 'the last 30 UTC days, today included'),
  'audit_integrity', jsonb_build_object(
      'protected_tables', (SELECT count(*) FROM vault.protected_tables),
      'last_verification', (SELECT jsonb_build_object(
          'at', v.logged_at, 'by', v.role_name, 'scope', v.details->'scope',
          'ok', v.details->'ok', 'chains', v.details->'chains',
          'rows_checked', v.details->'rows_checked', 'failed_chains', v.details->'failed_chains',
          'failed', v.details->'failed') FROM last_verification v),
      'last_checkpoint', (SELECT jsonb_build_object('at', c.checkpointed_at, 'key_id', c.key_id)
                            FROM last_checkpoint c)),
  'key_staleness', (SELECT coalesce(jsonb_agg(jsonb_build_object(
          'key_ref', k.key_ref, 'entries', k.active + k.expired,
          'oldest_write', k.oldest_write,
          'oldest_age_days', floor(extract(epoch FROM now() - k.oldest_write) / 86400)::bigint)
          ORDER BY k.oldest_write, k.key_ref), '[]') FROM k),
  'replication_scope', jsonb_build_object(
      'excluded_columns', (SELECT coalesce(jsonb_agg(jsonb_build_object(
          'table', x.table_name, 'column', x.column_name, 'since', x.excluded_at,
          'by', x.excluded_by) ORDER BY x.table_name, x.column_name), '[]')
          FROM vault.sync_exclusions x),
      'slots', (SELECT coalesce(jsonb_agg(s.slot_name ORDER BY s.slot_name), '[]')
                  FROM pg_replication_slots s WHERE s.plugin = 'vsql_vault'))
)"#;

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn compliance_report_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(report, Option<String>),
    ),
> {
    let result = audited_call("compliance_report", None, None, |event| {
        require(event.caller, AUDITORS)?;
        let mut report = {
            let _owner = AsOwner::enter();
            select_one::<pgrx::JsonB>(COMPLIANCE_REPORT, &[])?
                .map(|j| j.0)
                .unwrap_or_default()
        };
        report["extension_version"] = serde_json::json!(env!("CARGO_PKG_VERSION"));
        report["replication_scope"]["kek_ids"] = serde_json::json!(crate::decoding::kek_ids());
        if crate::governance::installed()? {
            report["key_directives"] = crate::governance::directives()?;
        }
        {
            let _owner = AsOwner::enter();
            sign(&mut report)?;
        }
        Ok(report.to_string())
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}

/// KEK versions the replication stream can use (identifiers only), for the key inventory view.
#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn replication_kek_ids() -> Vec<String> {
    crate::decoding::kek_ids()
}

/// A label value in the exposition format: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn sample(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        self.add(labels, value);
        self
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels = if labels.is_empty() {
            String::new()
        } else {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        };
        self.samples.push((labels, value));
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, value) in &self.samples {
            let _ = writeln!(out, "{}{} {}", self.name, labels, value);
        }
    }
}

const METRIC_ROWS: &str = r#"
SELECT 'operations' AS family, operation AS a, CASE WHEN granted THEN 'granted' ELSE 'denied' END AS b,
       sum(calls)::float8 AS v
  FROM vault.access_daily GROUP BY operation, granted
UNION ALL
SELECT 'entries', rp.purpose, s.state, coalesce(count(e.id), 0)::float8
  FROM vault.retention_policies rp
 CROSS JOIN (VALUES ('active'), ('expired_pending_purge')) AS s(state)
  LEFT JOIN vault.entries e ON e.purpose = rp.purpose AND e.purged_at IS NULL
       AND (e.expires_at > now()) = (s.state = 'active')
 GROUP BY rp.purpose, s.state
UNION ALL
(SELECT 'last_sweep', extract(epoch FROM finished_at)::text,
        extract(epoch FROM finished_at - started_at)::text, entries_purged::float8
   FROM vault.sweep_runs WHERE finished_at IS NOT NULL ORDER BY id DESC LIMIT 1)
UNION ALL
(SELECT 'last_verification', extract(epoch FROM logged_at)::text,
        CASE WHEN (details->>'ok')::bool THEN '1' ELSE '0' END, NULL
   FROM vault.access_log WHERE operation = 'verify_audit' AND granted ORDER BY id DESC LIMIT 1)
UNION ALL
(SELECT 'last_checkpoint', extract(epoch FROM checkpointed_at)::text, NULL, NULL
   FROM vault.audit_checkpoints ORDER BY id DESC LIMIT 1)
UNION ALL
SELECT 'purge_proofs', NULL, NULL, count(*)::float8 FROM vault.purge_log
"#;

/// Rows of the key directives' family (a 0.1.0 schema, before ALTER EXTENSION UPDATE, has none).
const DIRECTIVE_METRIC_ROWS: &str = r#"
SELECT 'key_directive' AS family, d.id::text AS a, d.kind || ' ' || d.target AS b,
       count(m.entry_id) FILTER (WHERE now() >= m.effective_at)::float8 AS v
  FROM vault.key_directives d
  LEFT JOIN vault.key_directive_matches m ON m.directive_id = d.id
 WHERE d.kind <> 'revoke'
   AND NOT EXISTS (SELECT 1 FROM vault.key_directives r WHERE r.revokes = d.id)
 GROUP BY d.id, d.kind, d.target
"#;

/// One row of METRIC_ROWS: a family and its labels or values, by family.
struct MetricRow {
    family: String,
    a: Option<String>,
    b: Option<String>,
    v: Option<f64>,
}

fn read_metric_rows() -> Result<Vec<MetricRow>, VaultError> {
    let mut rows = read_rows(METRIC_ROWS)?;
    if crate::governance::installed()? {
        rows.extend(read_rows(DIRECTIVE_METRIC_ROWS)?);
    }
    Ok(rows)
}

fn read_rows(query: &str) -> Result<Vec<MetricRow>, VaultError> {
    let _owner = AsOwner::enter();
    Spi::connect(|c| {
        c.select(query, None, &[])?
            .map(|r| {
                Ok(MetricRow {
                    family: r.get_by_name::<String, _>("family")?.unwrap_or_default(),
                    a: r.get_by_name("a")?,
                    b: r.get_by_name("b")?,
                    v: r.get_by_name("v")?,
                })
            })
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
    })
    .map_err(|e| VaultError::Internal(e.to_string()))
}

/// The metric families filled from METRIC_ROWS.
struct Families {
    operations: Family,
    entries: Family,
    sweep_time: Family,
    sweep_duration: Family,
    sweep_purged: Family,
    verification_time: Family,
    verification_ok: Family,
    checkpoint_time: Family,
    proofs: Family,
    directives: Family,
    expired: f64,
}

impl Families {
    fn new() -> Families {
        Families {
            operations: Family::new(
                    "vsql_vault_operations_total",
            "counter",
            "Decisions recorded in the access log, by operation and outcome.",
            ),
            entries: Family::new(
                    "vsql_vault_entries",
            "gauge",
            "Stored entries not yet destroyed, by purpose and state.",
            ),
            sweep_time: Family::new(
                    "vsql_vault_last_sweep_timestamp_seconds",
            "gauge",
            "When the last finished retention sweep ended (Unix time).",
            ),
            sweep_duration: Family::new(
                    "vsql_vault_last_sweep_duration_seconds",
            "gauge",
            "How long the last finished retention sweep took.",
            ),
            sweep_purged: Family::new(
                    "vsql_vault_last_sweep_entries_purged",
            "gauge",
            "Entries destroyed by the last finished retention sweep.",
            ),
            verification_time: Family::new(
                    "vsql_vault_last_verification_timestamp_seconds",
            "gauge",
            "When vault_verify_audit last ran (Unix time).",
            ),
            verification_ok: Family::new(
                    "vsql_vault_last_verification_ok",
            "gauge",
            "1 when the last vault_verify_audit (of any scope) found every chain it checked intact, 0 when not.",
            ),
            checkpoint_time: Family::new(
                    "vsql_vault_last_checkpoint_timestamp_seconds",
            "gauge",
            "When the chain heads were last signed (Unix time).",
            ),
            proofs: Family::new(
                    "vsql_vault_purge_proofs",
            "gauge",
            "Signed purge proofs held in vault.purge_log.",
            ),
            directives: Family::new(
                "vsql_vault_key_directive_noncompliant_entries",
                "gauge",
                "Live entries under a key or algorithm a key directive in effect governs, per directive in force.",
            ),
            expired: 0.0,
        }
    }

    fn add(&mut self, row: &MetricRow) {
        let number = |t: &Option<String>| {
            t.as_deref()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let a_text = row.a.as_deref().unwrap_or("");
        let b_text = row.b.as_deref().unwrap_or("");
        let v = row.v.unwrap_or(0.0);
        match row.family.as_str() {
            "operations" => self
                .operations
                .add(&[("operation", a_text), ("outcome", b_text)], v),
            "entries" => {
                if b_text == "expired_pending_purge" {
                    self.expired += v;
                }
                self.entries
                    .add(&[("purpose", a_text), ("state", b_text)], v)
            }
            "last_sweep" => {
                self.sweep_time.add(&[], number(&row.a));
                self.sweep_duration.add(&[], number(&row.b));
                self.sweep_purged.add(&[], v);
            }
            "last_verification" => {
                self.verification_time.add(&[], number(&row.a));
                self.verification_ok.add(&[], number(&row.b));
            }
            "last_checkpoint" => self.checkpoint_time.add(&[], number(&row.a)),
            "purge_proofs" => self.proofs.add(&[], v),
            "key_directive" => {
                let (kind, target) = b_text.split_once(' ').unwrap_or((b_text, ""));
                self.directives.add(
                    &[("directive", a_text), ("kind", kind), ("target", target)],
                    v,
                )
            }
            _ => {}
        }
    }

    fn render(&self) -> String {
        let pending = Family::new(
            "vsql_vault_expired_pending_purge",
            "gauge",
            "Entries past their expiry that the retention worker has not destroyed yet.",
        )
        .sample(&[], self.expired);
        let sealed = Family::new(
            "vsql_vault_replication_batches_sealed_total",
            "counter",
            "Replication batches sealed by the output plugin since the server started.",
        )
        .sample(&[], crate::decoding::batches_sealed().unwrap_or(0) as f64);
        let mut out = String::new();
        for f in [
            &self.operations,
            &self.entries,
            &pending,
            &self.sweep_time,
            &self.sweep_duration,
            &self.sweep_purged,
            &self.verification_time,
            &self.verification_ok,
            &self.checkpoint_time,
            &self.proofs,
            &self.directives,
            &sealed,
        ] {
            f.write(&mut out);
        }
        out
    }
}

fn metrics() -> Result<String, VaultError> {
    let mut families = Families::new();
    for row in &read_metric_rows()? {
        families.add(row);
    }
    let mut health = Family::new(
        "vsql_vault_health_status",
        "gauge",
        "vault_health() per component: 0 ok, 1 warning, 2 failing.",
    );
    for c in crate::health::components()? {
        let level = match c.status {
            "ok" => 0.0,
            "warning" => 1.0,
            _ => 2.0,
        };
        health.add(&[("component", c.name)], level);
    }
    let mut out = families.render();
    health.write(&mut out);
    Ok(out)
}

#[pg_extern(volatile, parallel_unsafe, schema = "vault")]
#[search_path(pg_catalog, pg_temp)]
fn metrics_impl() -> TableIterator<
    'static,
    (
        name!(sqlstate, Option<String>),
        name!(message, Option<String>),
        name!(metrics, Option<String>),
    ),
> {
    // Scrapes are not logged (they read counters, never an entry); refusals are.
    let result = refusals_recorded("metrics", |event| {
        if !has_role(event.caller, "pg_monitor") {
            require(event.caller, AUDITORS)?;
        }
        metrics()
    });
    let (s, m) = status(&result);
    TableIterator::once((s, m, result.ok()))
}
