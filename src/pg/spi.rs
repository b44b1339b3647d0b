//! Small SPI and transaction helpers.

use pgrx::prelude::*;

/// The caller's top-level transaction id, if it has one (a put has one after its write).
pub fn current_xid() -> Option<u64> {
    // SAFETY: only reads the current transaction state (no xid is assigned); valid in any backend.
    let full = unsafe { pg_sys::GetTopFullTransactionIdIfAny() };
    (full.value != 0).then_some(full.value)
}

pub fn now_micros() -> i64 {
    // SAFETY: reads the system clock (gettimeofday); no arguments, no state, valid in any process.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// One value from a read-only query; None for no row or NULL. (pgrx's `Spi::get_one` runs as a writer and assigns the
/// transaction an xid, which would turn every read into a commit with a WAL flush.)
pub fn select_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect(|c| {
        let rows = c.select(query, Some(1), args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
}

/// One value from a statement that writes (INSERT ... RETURNING, nextval). Run without a row
/// limit: an INSERT stopped after its first RETURNING row never reaches the end of its
/// ModifyTable node, so its AFTER STATEMENT triggers (the chain's head flush on a protected
/// table) would not fire.
pub fn write_one<T: pgrx::datum::FromDatum + pgrx::datum::IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Option<T>, pgrx::spi::Error> {
    Spi::connect_mut(|c| {
        let rows = c.update(query, None, args)?;
        if rows.is_empty() {
            return Ok(None);
        }
        rows.first().get_one::<T>()
    })
}
