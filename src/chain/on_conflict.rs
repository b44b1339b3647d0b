//! `INSERT ... ON CONFLICT DO NOTHING` (and `DO UPDATE ... WHERE`) into a chained table is
//! refused when the statement starts.
//!
//! The chain trigger is a BEFORE INSERT row trigger: it gives each row its place in the chain
//! (sequence number and link) before PostgreSQL checks the arbiter index. A row the arbiter then
//! skips leaves its place empty, and every later row links to a row that does not exist: a gap
//! that verification reports as tampering. PostgreSQL tells a row trigger nothing about whether
//! the row will be skipped, so the statement is refused instead (0A000), before any row is
//! chained. A plain `DO UPDATE` is left alone: on a conflict its update is refused by the
//! append-only trigger and the whole statement rolls back, leaving no gap.

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;

static mut PREVIOUS_HOOK: pg_sys::ExecutorStart_hook_type = None;

/// Installs the executor-start hook in this process (from `_PG_init`).
pub fn install() {
    // SAFETY: _PG_init runs once per process, on its only thread, before any statement starts;
    // the previous hook is kept and called, as PostgreSQL's hook protocol asks.
    unsafe {
        PREVIOUS_HOOK = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query: *mut pg_sys::QueryDesc, eflags: i32) {
    // SAFETY: PostgreSQL passes a valid QueryDesc whose plannedstmt lives for the whole call.
    let explain_only = eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 != 0;
    if !explain_only {
        // SAFETY: as above; the plan tree is only read.
        if let Some(table) = unsafe { skipping_insert_into_chained_table((*query).plannedstmt) } {
            pgrx::ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "INSERT ... ON CONFLICT DO NOTHING (or DO UPDATE ... WHERE) into protected table {table} is refused: a row skipped after the chain trigger placed it would leave a gap in the chain"
                ),
                "Insert only rows that are new (INSERT ... SELECT ... WHERE NOT EXISTS), or run a plain INSERT and handle unique_violation (23505)."
            );
        }
    }
    // SAFETY: the previous hook, or the standard function, with the arguments we were given.
    unsafe {
        match PREVIOUS_HOOK {
            Some(previous) => previous(query, eflags),
            None => pg_sys::standard_ExecutorStart(query, eflags),
        }
    }
}

/// The name of a chained table that a ModifyTable node of `stmt` inserts into with an ON
/// CONFLICT clause that can skip rows (the top plan, and every subplan: writable CTEs).
///
/// # Safety
/// `stmt` is a valid PlannedStmt, read inside a transaction.
unsafe fn skipping_insert_into_chained_table(stmt: *mut pg_sys::PlannedStmt) -> Option<String> {
    // SAFETY: by the caller's guarantee the lists and plans are valid; PgList handles NIL.
    unsafe {
        let rtable = PgList::<pg_sys::RangeTblEntry>::from_pg((*stmt).rtable);
        let check = |plan: *mut pg_sys::Plan| {
            if plan.is_null() || (*plan).type_ != pg_sys::NodeTag::T_ModifyTable {
                return None;
            }
            let m = plan.cast::<pg_sys::ModifyTable>();
            if !can_skip_rows(&*m) {
                return None;
            }
            PgList::<i32>::from_pg((*m).resultRelations)
                .iter_int()
                .filter_map(|index| rtable.get_ptr(usize::try_from(index).ok()?.checked_sub(1)?))
                .find_map(|rte| chained_table_name((*rte).relid))
        };
        check((*stmt).planTree).or_else(|| {
            PgList::<pg_sys::Plan>::from_pg((*stmt).subplans)
                .iter_ptr()
                .find_map(check)
        })
    }
}

fn can_skip_rows(m: &pg_sys::ModifyTable) -> bool {
    m.onConflictAction == pg_sys::OnConflictAction::ONCONFLICT_NOTHING
        || (m.onConflictAction == pg_sys::OnConflictAction::ONCONFLICT_UPDATE
            && !m.onConflictWhere.is_null())
}

/// The qualified name of `relid` when it has an enabled chain trigger (a trigger running
/// `vault.chain_row`, found by the function's OID, not by the trigger's name).
fn chained_table_name(relid: pg_sys::Oid) -> Option<String> {
    if relid == pg_sys::Oid::INVALID {
        return None;
    }
    // SAFETY: inside a transaction, on a relation the planner has locked; the relcache entry is
    // pinned by RelationIdGetRelation and released below, its trigger array read in between.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return None;
        }
        let desc = (*rel).trigdesc;
        let chained = !desc.is_null()
            && (0..usize::try_from((*desc).numtriggers).unwrap_or(0)).any(|i| {
                let trigger = &*(*desc).triggers.add(i);
                trigger.tgenabled as u8 != pg_sys::TRIGGER_DISABLED && is_chain_row(trigger.tgfoid)
            });
        pg_sys::RelationClose(rel);
        chained.then(|| qualified_name(relid))
    }
}

fn is_chain_row(function: pg_sys::Oid) -> bool {
    // SAFETY: syscache lookups inside a transaction; get_func_name returns a palloc'd copy or
    // NULL, read before anything else runs.
    unsafe {
        let name = pg_sys::get_func_name(function);
        if name.is_null() || std::ffi::CStr::from_ptr(name) != c"chain_row" {
            return false;
        }
        let namespace = pg_sys::get_func_namespace(function);
        namespace != pg_sys::Oid::INVALID
            && namespace == pg_sys::get_namespace_oid(c"vault".as_ptr(), true)
    }
}

fn qualified_name(relid: pg_sys::Oid) -> String {
    // SAFETY: syscache lookups inside a transaction, each returning a palloc'd copy or NULL,
    // copied before anything else runs.
    unsafe {
        let text = |p: *mut std::ffi::c_char| {
            (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let table = text(pg_sys::get_rel_name(relid));
        let schema = text(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid)));
        match (schema, table) {
            (Some(schema), Some(table)) => format!("{schema}.{table}"),
            _ => format!("with OID {}", relid.to_u32()),
        }
    }
}
