//! Building access records and making them durable through the audit writer.

use super::queue::{self, Outcome, RawRecord};
use crate::errors::VaultError;
use crate::pg;
use crate::security::Caller;
use pgrx::prelude::*;
use vsql_vault_core::rules::{escape_for_log, summarize_details};

/// One decision of the vault, as it will appear in `vault.access_log`.
pub struct Event<'a> {
    pub caller: &'a Caller,
    pub operation: &'static str,
    pub purpose: Option<String>,
    pub external_id: Option<String>,
    pub entry_id: Option<i64>,
    pub max_retrievals: Option<i32>,
    pub details: Option<serde_json::Value>,
}

impl<'a> Event<'a> {
    pub fn new(
        caller: &'a Caller,
        operation: &'static str,
        purpose: Option<&str>,
        external_id: Option<&str>,
    ) -> Self {
        Event {
            caller,
            operation,
            purpose: purpose.map(str::to_owned),
            external_id: external_id.map(str::to_owned),
            entry_id: None,
            max_retrievals: None,
            details: None,
        }
    }

    /// The record, and its details when they are too long for the record's own field.
    fn raw(&self, granted: bool, error: Option<&VaultError>) -> (RawRecord, Option<String>) {
        let mut r = queue::empty_record();
        r.logged_at = pg::now_micros();
        r.backend_pid = self.caller.backend_pid;
        r.granted = granted;
        if let Some(id) = self.entry_id {
            r.has_entry = true;
            r.entry_id = id;
        }
        r.max_retrievals = if granted {
            self.max_retrievals.unwrap_or(0)
        } else {
            0
        };
        if let Some(xid) = pg::current_xid() {
            r.has_xid = true;
            r.caller_xid = xid;
        }
        // Names and values a caller chose reach an auditor's terminal: no control characters.
        let clean = |t: Option<&str>| t.map(|t| escape_for_log(t).into_owned());
        r.role_name
            .set(clean(Some(&self.caller.role_name)).as_deref());
        r.session_user
            .set(clean(Some(&self.caller.session_user)).as_deref());
        r.application_name
            .set(clean(self.caller.application_name.as_deref()).as_deref());
        r.client_addr.set(self.caller.client_addr.as_deref());
        r.on_behalf_of
            .set(clean(self.caller.on_behalf_of.as_deref()).as_deref());
        r.operation.set(Some(self.operation));
        r.purpose.set(clean(self.purpose.as_deref()).as_deref());
        r.external_id
            .set(clean(self.external_id.as_deref()).as_deref());
        if let Some(e) = error {
            r.sqlstate.set(Some(e.sqlstate()));
            r.reason.set(Some(&escape_for_log(&e.to_string())));
        }
        let mut large = None;
        if let Some(d) = &self.details {
            let text = d.to_string();
            if text.len() <= r.details.capacity() {
                r.details.set(Some(&text));
            } else if text.len() <= queue::LARGE_BYTES {
                large = Some(text);
            } else {
                // Only a refused call's input gets this long (a granted change is refused
                // first, see `granted`): every key stays, long values become their digest.
                large = Some(summarize_details(d, queue::LARGE_BYTES).to_string());
            }
        }
        (r, large)
    }

    /// Makes a granted decision durable. Errors when the writer could not, when the writer
    /// refused it because the entry's retrieval limit was reached (recorded by the writer), or
    /// when the record would be too large to keep whole (recorded here as a refusal). Every
    /// error it returns is already on record, or cannot be.
    pub fn granted(&self) -> Result<(), VaultError> {
        // A change whose record would lose details is not made: nothing half-recorded.
        let details_bytes = self.details.as_ref().map_or(0, |d| d.to_string().len());
        if details_bytes > queue::LARGE_BYTES {
            return Err(self.refused(VaultError::RecordTooLarge(queue::LARGE_BYTES)));
        }
        let (record, large) = self.raw(true, None);
        match super::make_durable(&record, large.as_deref())? {
            Outcome::LimitReached => Err(VaultError::Denied(format!(
                "entry has reached its max_retrievals ({})",
                self.max_retrievals.unwrap_or(0)
            ))),
            Outcome::Failed => Err(VaultError::AuditUnavailable(
                "the audit writer could not commit the record".into(),
            )),
            Outcome::Written => Ok(()),
        }
    }

    /// Makes a refusal durable and returns the error for the caller. If the refusal itself cannot
    /// be recorded the caller still gets its error, with that fact added.
    pub fn refused(&self, error: VaultError) -> VaultError {
        let (record, large) = self.raw(false, Some(&error));
        match super::make_durable(&record, large.as_deref()) {
            Ok(_) => error,
            Err(audit) => {
                pgrx::warning!("vsql_vault: a refused call could not be logged: {audit}");
                error
            }
        }
    }
}

impl Event<'_> {
    /// Records a refusal without waiting for the writer: for DDL refused while the caller holds
    /// the lock on a protected table the writer may need (the access log itself).
    pub fn refused_detached(&self, error: VaultError) -> VaultError {
        let (record, large) = self.raw(false, Some(&error));
        if let Err(audit) = queue::submit_detached(&record, large.as_deref()) {
            pgrx::warning!("vsql_vault: a refused call could not be logged: {audit}");
        }
        error
    }

    /// Records a granted decision in the caller's own transaction, through the chain trigger on
    /// one of the access log's caller chains: the record commits exactly when the change does,
    /// and a rolled-back change leaves no record. For a granted put (its one durable commit is
    /// the caller's), break-glass DDL (which may hold the access log's lock itself) and the
    /// extension's update. Refused like `granted` when its details are too large to keep whole.
    pub fn granted_in_transaction(&self) -> Result<(), VaultError> {
        let details_bytes = self.details.as_ref().map_or(0, |d| d.to_string().len());
        if details_bytes > queue::LARGE_BYTES {
            return Err(self.refused(VaultError::RecordTooLarge(queue::LARGE_BYTES)));
        }
        // Fail closed, as a call waiting for the writer does, rather than hang behind a
        // transaction that holds the log or its chain heads (LOCK TABLE, a break-glass command).
        for table in [
            "vault.access_log",
            "vault.chain_heads",
            "vault.access_daily",
        ] {
            let locked = crate::chain::vault_relation(table).is_some_and(|relid| {
                crate::chain::lock_within(
                    relid,
                    pg_sys::RowExclusiveLock,
                    crate::settings::AUDIT_TIMEOUT_MS.get(),
                )
            });
            if !locked {
                return Err(VaultError::AuditUnavailable(format!(
                    "{table} stayed locked by another transaction for vsql_vault.audit_timeout"
                )));
            }
        }
        let (r, large) = self.raw(true, None);
        let details = large.or_else(|| r.details.get());
        let _owner = crate::security::AsOwner::enter();
        let _writing = crate::chain::VaultWriting::enter();
        let has_on_behalf_of = log_has_on_behalf_of();
        let (column, value) = if has_on_behalf_of {
            (", on_behalf_of", ", $12")
        } else {
            ("", "")
        };
        let insert = format!(
            "INSERT INTO vault.access_log
                (logged_at, role_name, session_user_name, application_name, client_addr, backend_pid,
                 operation, purpose, external_id, entry_id, granted, details, caller_xid{column})
             VALUES ('2000-01-01 00:00:00+00'::pg_catalog.timestamptz
                         OPERATOR(pg_catalog.+) ($1 OPERATOR(pg_catalog.*) '1 microsecond'::pg_catalog.interval),
                     $2, $3, $4, $5::pg_catalog.inet, $6, $7, $8, $9, $10, true,
                     $11::pg_catalog.jsonb, pg_catalog.pg_current_xact_id_if_assigned(){value})
             RETURNING chain_id"
        );
        let mut args: Vec<pgrx::datum::DatumWithOid> = vec![
            r.logged_at.into(),
            r.role_name.get().unwrap_or_default().into(),
            r.session_user.get().unwrap_or_default().into(),
            r.application_name.get().into(),
            r.client_addr.get().into(),
            r.backend_pid.into(),
            r.operation.get().unwrap_or_default().into(),
            r.purpose.get().into(),
            r.external_id.get().into(),
            r.has_entry.then_some(r.entry_id).into(),
            details.into(),
        ];
        if has_on_behalf_of {
            args.push(r.on_behalf_of.get().into());
        }
        let identified = has_on_behalf_of && r.on_behalf_of.get().is_some();
        let inserting = super::daily::Inserting::enter();
        let chain = Spi::connect_mut(|c| {
            crate::pg::plans::update_with(c, &insert, &args)?
                .first()
                .get_by_name::<i32, _>("chain_id")
        })
        .map_err(|e| VaultError::Internal(format!("recording the call failed: {e}")))?;
        if inserting.left_to_caller() {
            super::daily::count(
                r.logged_at,
                &r.role_name.get().unwrap_or_default(),
                &r.purpose.get().unwrap_or_default(),
                &r.operation.get().unwrap_or_default(),
                chain.unwrap_or(0),
                identified,
            );
        }
        Ok(())
    }
}

/// Whether the access log has `on_behalf_of` (a 0.1.0 log, library updated but ALTER EXTENSION
/// UPDATE not yet run, does not). Once present it stays, so a positive answer is kept.
fn log_has_on_behalf_of() -> bool {
    thread_local! {
        static PRESENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if PRESENT.with(std::cell::Cell::get) {
        return true;
    }
    let present = crate::pg::select_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
             WHERE attrelid = pg_catalog.to_regclass('vault.access_log')
               AND attname = 'on_behalf_of' AND NOT attisdropped)",
        &[],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    PRESENT.with(|p| p.set(present));
    present
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use super::Event;
    use crate::errors::VaultError;
    use crate::security::Caller;
    use pgrx::prelude::*;

    #[pg_test]
    fn record_cuts_long_values_and_keeps_long_details_whole() {
        let caller = Caller::current();
        // 401 bytes: byte 256, the field's end, falls inside an 'é'.
        let external_id = format!("a{}", "é".repeat(200));
        let purpose = "€".repeat(30);
        let mut event = Event::new(&caller, "get", Some(&purpose), Some(&external_id));
        let details = serde_json::json!({ "input": "x".repeat(2000) });
        event.details = Some(details.clone());
        let error = VaultError::Denied("ü".repeat(400));
        let (record, large) = event.raw(false, Some(&error));
        assert_eq!(
            record.external_id.get(),
            Some(format!("a{}", "é".repeat(127)))
        );
        assert_eq!(record.purpose.get(), Some("€".repeat(21)));
        let reason = record.reason.get().unwrap();
        let capacity = record.reason.capacity();
        assert!(error.to_string().starts_with(&reason));
        assert!(reason.len() <= capacity && reason.len() > capacity - 'ü'.len_utf8());
        // Details longer than the record's field travel whole beside it.
        assert_eq!(record.details.get(), None);
        assert_eq!(large, Some(details.to_string()));
    }
}
