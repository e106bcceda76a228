//! A planner hook that refuses a delegated twin called without its campaign, before Citus plans
//! the call (SPEC §2 scale-out rule; docs/scale-out.md, "Where the rules run").
//!
//! Citus delegates a call of a distributed function to the worker holding its distribution
//! argument: it hashes the argument to find the shard. Citus 13.2 hashes a NULL argument too
//! and crashes the backend (citusdata/citus#7242, open), and the postmaster then restarts every
//! session of the node. Sortie's twins (`sortie._<rule>_delegated`, their campaign first) are
//! the distributed functions; `sortie.distribute()` makes every session of the database load
//! this library (`session_preload_libraries`), whose hook runs before Citus's planner and
//! refuses such a call with `invalid_argument` (SQLSTATE SR005), as the twin itself refuses
//! it on one node.
//!
//! Citus decides on the statement as PostgreSQL's planner has left it: constants folded
//! (`NULL::text::uuid`, `nullif(u, u)`), bound parameters substituted, subqueries, CTEs and SQL
//! functions pulled up and inlined. So the hook decides on the same thing: a statement that
//! calls a twin anywhere, or a SQL function that may inline into one (any outside
//! `pg_catalog` and Sortie's schema), is first planned as a copy by PostgreSQL's planner,
//! and the copy is looked at with Citus's own test — a `SELECT` without `WHERE` whose one
//! target, or whose one `FROM` item, is the call — for a twin whose campaign (its first
//! argument) is the NULL constant. Other statements pass untouched, at the cost of a walk of
//! their tree.
//!
//! The hook is installed only where Citus is loaded (its `citus.shard_count` setting exists):
//! a single-node database plans exactly as without it.
//!
//! Errors raised while planning (by Citus, by the planner) pass through this hook as they pass
//! through a C hook: it keeps no Rust value alive across the calls that may raise, so that the
//! error reaches PostgreSQL with its own SQLSTATE (pgrx's guard would turn a code it does not
//! know, such as Sortie's SRxxx, into XX000).

use pgrx::pg_sys;
use pgrx::{is_a, pg_guard, PgList, PgMemoryContexts};
use std::ffi::{c_char, c_int, CStr};

// The PostgreSQL functions the hook calls at its boundary, declared raw: an error they raise
// unwinds (longjmp) through the hook's frame to PostgreSQL's handler unchanged.
unsafe extern "C-unwind" {
    #[link_name = "standard_planner"]
    fn raw_standard_planner(
        parse: *mut pg_sys::Query,
        query_string: *const c_char,
        cursor_options: c_int,
        bound_params: pg_sys::ParamListInfo,
    ) -> *mut pg_sys::PlannedStmt;
    #[link_name = "copyObjectImpl"]
    fn raw_copy_object(from: *const std::ffi::c_void) -> *mut std::ffi::c_void;
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errcode(sqlerrcode: c_int) -> c_int;
    fn errmsg(fmt: *const c_char, ...) -> c_int;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
}

static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;

/// Sortie's `invalid_argument` (sql/bootstrap.sql, `_raise`): SQLSTATE SR005.
const SR005: c_int = sqlstate(b"SR005");

const fn sqlstate(code: &[u8; 5]) -> c_int {
    // PostgreSQL's MAKE_SQLSTATE: six bits a character, the first lowest.
    let mut value = 0;
    let mut i = 0;
    while i < 5 {
        value |= ((code[i] as c_int - b'0' as c_int) & 0x3F) << (6 * i);
        i += 1;
    }
    value
}

/// Installs the hook in this backend when Citus is loaded in it; called from `_PG_init`.
pub fn install() {
    // SAFETY: _PG_init runs once per process, on PostgreSQL's one thread; the hook chain is
    // process-global state that every C extension sets the same way.
    unsafe {
        if pg_sys::GetConfigOption(c"citus.shard_count".as_ptr(), true, false).is_null() {
            return;
        }
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(plan);
    }
}

/// The hook: refuses a twin's call without its campaign, then plans as the previous hook (Citus)
/// or PostgreSQL would.
unsafe extern "C-unwind" fn plan(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    if may_call_a_twin(parse) {
        // Planned as Citus will see it; an error of this planning is the statement's own.
        let copy = raw_copy_object(parse as *const std::ffi::c_void) as *mut pg_sys::Query;
        raw_standard_planner(copy, query_string, cursor_options, bound_params);
        let refusal = null_campaign_call(copy);
        if !refusal.is_null() {
            // The message is in PostgreSQL's memory, freed with the error; nothing of Rust's
            // is alive here.
            if errstart(pg_sys::PGERROR as c_int, std::ptr::null()) {
                errcode(SR005);
                errmsg(c"%s".as_ptr(), refusal);
                errfinish(
                    c"delegation_guard.rs".as_ptr(),
                    line!() as c_int,
                    c"plan".as_ptr(),
                );
            }
            unreachable!("errfinish returns only below ERROR");
        }
    }
    match PREVIOUS_PLANNER {
        Some(previous) => previous(parse, query_string, cursor_options, bound_params),
        None => raw_standard_planner(parse, query_string, cursor_options, bound_params),
    }
}

/// Whether a `SELECT` calls a twin, or a SQL function that may inline into a call of one,
/// anywhere in its tree (subqueries and CTEs included).
#[pg_guard]
unsafe extern "C-unwind" fn may_call_a_twin(parse: *mut pg_sys::Query) -> bool {
    if parse.is_null()
        || (*parse).commandType != pg_sys::CmdType::CMD_SELECT
        || !(*parse).utilityStmt.is_null()
    {
        return false;
    }
    let mut found = false;
    pg_sys::query_tree_walker(
        parse,
        Some(find_candidate),
        (&mut found as *mut bool).cast(),
        0,
    );
    found
}

#[pg_guard]
unsafe extern "C-unwind" fn find_candidate(
    node: *mut pg_sys::Node,
    found: *mut std::ffi::c_void,
) -> bool {
    if node.is_null() {
        return false;
    }
    if is_a(node, pg_sys::NodeTag::T_Query) {
        return pg_sys::query_tree_walker(node.cast(), Some(find_candidate), found, 0);
    }
    if is_a(node, pg_sys::NodeTag::T_FuncExpr)
        && is_candidate((*(node as *mut pg_sys::FuncExpr)).funcid)
    {
        *(found as *mut bool) = true;
        return true;
    }
    pg_sys::expression_tree_walker(node, Some(find_candidate), found)
}

/// PostgreSQL's `sql` language (pg_language's fixed OID): the functions the planner inlines.
const SQL_LANGUAGE: pg_sys::Oid = pg_sys::Oid::from_u32(14);

/// A twin, or a SQL function outside `pg_catalog` and Sortie's own schema (Sortie's SQL
/// functions call no twin), which may wrap one.
unsafe fn is_candidate(funcid: pg_sys::Oid) -> bool {
    let tuple = pg_sys::SearchSysCache1(
        pg_sys::SysCacheIdentifier::PROCOID as c_int,
        pg_sys::Datum::from(funcid),
    );
    if tuple.is_null() {
        return false;
    }
    let header = (*tuple).t_data;
    let form = (header as *mut u8).add((*header).t_hoff as usize) as *mut pg_sys::FormData_pg_proc;
    let (language, namespace) = ((*form).prolang, (*form).pronamespace);
    let name = CStr::from_ptr((*form).proname.data.as_ptr()).to_bytes();
    let twin = name.starts_with(b"_") && name.ends_with(b"_delegated");
    pg_sys::ReleaseSysCache(tuple);
    if twin {
        return true;
    }
    if language != SQL_LANGUAGE || namespace == pg_sys::PG_CATALOG_NAMESPACE.into() {
        return false;
    }
    let schema = pg_sys::get_namespace_name(namespace);
    schema.is_null() || CStr::from_ptr(schema).to_bytes() != b"sortie"
}

/// The refusal's message (in the current memory context) when the planned statement `planned`
/// is a call Citus would delegate — a `SELECT` without `WHERE` whose one target, or whose one
/// `FROM` item, is a function call (function_call_delegation.c) — of a twin whose campaign is
/// the NULL constant; null otherwise.
#[pg_guard]
unsafe extern "C-unwind" fn null_campaign_call(planned: *mut pg_sys::Query) -> *mut c_char {
    let tree = (*planned).jointree;
    if tree.is_null() || !(*tree).quals.is_null() {
        return std::ptr::null_mut();
    }
    let mut from_call: *mut pg_sys::FuncExpr = std::ptr::null_mut();
    let from = PgList::<pg_sys::Node>::from_pg((*tree).fromlist);
    if from.len() > 1 {
        return std::ptr::null_mut();
    }
    if let Some(item) = from.get_ptr(0) {
        if !is_a(item, pg_sys::NodeTag::T_RangeTblRef) {
            return std::ptr::null_mut();
        }
        let index = (*(item as *mut pg_sys::RangeTblRef)).rtindex as usize;
        let Some(rte) =
            PgList::<pg_sys::RangeTblEntry>::from_pg((*planned).rtable).get_ptr(index - 1)
        else {
            return std::ptr::null_mut();
        };
        match (*rte).rtekind {
            pg_sys::RTEKind::RTE_RESULT => {}
            pg_sys::RTEKind::RTE_FUNCTION => {
                if let Some(function) =
                    PgList::<pg_sys::RangeTblFunction>::from_pg((*rte).functions).get_ptr(0)
                {
                    let expr = (*function).funcexpr;
                    if is_a(expr, pg_sys::NodeTag::T_FuncExpr) {
                        from_call = expr.cast();
                    }
                }
            }
            _ => return std::ptr::null_mut(),
        }
    }
    let targets = PgList::<pg_sys::TargetEntry>::from_pg((*planned).targetList);
    let mut target_call: *mut pg_sys::FuncExpr = std::ptr::null_mut();
    if targets.len() == 1 {
        let expr = (*targets.get_ptr(0).unwrap()).expr as *mut pg_sys::Node;
        if is_a(expr, pg_sys::NodeTag::T_FuncExpr) {
            target_call = expr.cast();
        }
    }
    let call = match (target_call.is_null(), from_call.is_null()) {
        (false, true) => target_call,
        (true, false) => from_call,
        _ => return std::ptr::null_mut(),
    };
    let Some(name) = twin_name((*call).funcid) else {
        return std::ptr::null_mut();
    };
    // Planned: the arguments are in their positional order, defaults filled in.
    let Some(first) = PgList::<pg_sys::Node>::from_pg((*call).args).get_ptr(0) else {
        return std::ptr::null_mut();
    };
    let value = pg_sys::strip_implicit_coercions(first);
    if is_a(value, pg_sys::NodeTag::T_Const) && (*(value as *mut pg_sys::Const)).constisnull {
        let message = format!(
            "invalid_argument: a campaign id is required ({name} runs on the node holding its campaign)"
        );
        return PgMemoryContexts::CurrentMemoryContext.pstrdup(&message);
    }
    std::ptr::null_mut()
}

/// `schema.name` of a function of the sortie extension named `_…_delegated`.
unsafe fn twin_name(funcid: pg_sys::Oid) -> Option<String> {
    let name = pg_sys::get_func_name(funcid);
    if name.is_null() {
        return None;
    }
    let name = CStr::from_ptr(name).to_string_lossy().into_owned();
    if !(name.starts_with('_') && name.ends_with("_delegated")) {
        return None;
    }
    let sortie = pg_sys::get_extension_oid(c"sortie".as_ptr(), true);
    if sortie == pg_sys::InvalidOid
        || pg_sys::getExtensionOfObject(pg_sys::ProcedureRelationId, funcid) != sortie
    {
        return None;
    }
    let schema = pg_sys::get_namespace_name(pg_sys::get_func_namespace(funcid));
    let schema = if schema.is_null() {
        String::new()
    } else {
        format!("{}.", CStr::from_ptr(schema).to_string_lossy())
    };
    Some(format!("{schema}{name}"))
}
