//! A per-backend cache of prepared SPI plans.
//!
//! The API's hot paths run the same few statements on every call; parsing and planning them each
//! time would cost more than executing them. Plans are keyed by the statement's address (each is
//! a `&'static str`) and kept for the life of the backend; PostgreSQL's plan cache re-plans them
//! when the tables they use change.

use pgrx::pg_sys;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    static PLANS: RefCell<HashMap<usize, Rc<OwnedPreparedStatement>>> = RefCell::new(HashMap::new());
    static TEXT_PLANS: RefCell<HashMap<String, Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// Argument types of a prepared statement.
pub mod types {
    use super::*;
    pub const TEXT: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
    pub const OID: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::OIDOID);
    pub const BOOL: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::BOOLOID);
    pub const INT4: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT4OID);
    pub const INT8: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT8OID);
    pub const BYTEA: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::BYTEAOID);
    pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TIMESTAMPTZOID);
    pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTARRAYOID);
    pub const INT4_ARRAY: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT4ARRAYOID);
    pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT8ARRAYOID);
    pub const BOOL_ARRAY: PgOid = PgOid::BuiltIn(pg_sys::BuiltinOid::BOOLARRAYOID);
}

/// The kept plan for `query`, preparing it on first use. `mutating` plans run read-write.
pub fn plan(
    client: &SpiClient<'_>,
    query: &'static str,
    args: &[PgOid],
    mutating: bool,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key = query.as_ptr() as usize;
    if let Some(p) = PLANS.with(|m| m.borrow().get(&key).cloned()) {
        return Ok(p);
    }
    let prepared = if mutating {
        client.prepare_mut(query, args)?
    } else {
        client.prepare(query, args)?
    };
    let kept = Rc::new(prepared.keep());
    PLANS.with(|m| m.borrow_mut().insert(key, Rc::clone(&kept)));
    Ok(kept)
}

/// Runs `query` (read-write) with `args` through a kept plan keyed by the query's text: for the
/// statements a hot path builds at run time from a few shapes (the purge-proof insert, one per
/// inclusion-path length), so that they are parsed and planned once per backend, not per call.
/// The argument types are the arguments' own.
pub fn update_with<'conn, 'mcx>(
    client: &mut SpiClient<'conn>,
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'mcx>],
) -> SpiResult<pgrx::spi::SpiTupleTable<'conn>> {
    let kept = TEXT_PLANS.with(|m| m.borrow().get(query).cloned());
    let stmt = match kept {
        Some(p) => p,
        None => {
            let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
            let kept = Rc::new(client.prepare_mut(query, &types)?.keep());
            TEXT_PLANS.with(|m| m.borrow_mut().insert(query.to_owned(), Rc::clone(&kept)));
            kept
        }
    };
    client.update(&*stmt, None, args)
}
