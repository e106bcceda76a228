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
//! it on one node. It looks only at what Citus would delegate: a `SELECT` whose target list or
//! `FROM` is a call of a twin, whose campaign argument is a NULL constant or a bound parameter
//! holding NULL.
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
    let refusal = null_campaign_call(parse, bound_params);
    if !refusal.is_null() {
        // The message is in PostgreSQL's memory, freed with the error; nothing of Rust's is
        // alive here.
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
    match PREVIOUS_PLANNER {
        Some(previous) => previous(parse, query_string, cursor_options, bound_params),
        None => raw_standard_planner(parse, query_string, cursor_options, bound_params),
    }
}

/// The refusal's message (in the current memory context) when `parse` calls a twin with a NULL
/// campaign; null otherwise.
#[pg_guard]
unsafe extern "C-unwind" fn null_campaign_call(
    parse: *mut pg_sys::Query,
    bound_params: pg_sys::ParamListInfo,
) -> *mut c_char {
    if parse.is_null()
        || (*parse).commandType != pg_sys::CmdType::CMD_SELECT
        || !(*parse).utilityStmt.is_null()
    {
        return std::ptr::null_mut();
    }
    // The shapes Citus delegates: `SELECT f(…)` and `SELECT … FROM f(…)`.
    let mut calls: Vec<*mut pg_sys::FuncExpr> = Vec::new();
    for entry in PgList::<pg_sys::TargetEntry>::from_pg((*parse).targetList).iter_ptr() {
        let expr = (*entry).expr as *mut pg_sys::Node;
        if is_a(expr, pg_sys::NodeTag::T_FuncExpr) {
            calls.push(expr.cast());
        }
    }
    for rte in PgList::<pg_sys::RangeTblEntry>::from_pg((*parse).rtable).iter_ptr() {
        if (*rte).rtekind == pg_sys::RTEKind::RTE_FUNCTION {
            for function in PgList::<pg_sys::RangeTblFunction>::from_pg((*rte).functions).iter_ptr()
            {
                let expr = (*function).funcexpr;
                if is_a(expr, pg_sys::NodeTag::T_FuncExpr) {
                    calls.push(expr.cast());
                }
            }
        }
    }
    for call in calls {
        if let Some(name) = twin_name((*call).funcid) {
            if campaign_is_null(call, bound_params) {
                let message = format!(
                    "invalid_argument: a campaign id is required ({name} runs on the node holding its campaign)"
                );
                return PgMemoryContexts::CurrentMemoryContext.pstrdup(&message);
            }
        }
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

/// Whether the call's first argument — every twin names its campaign first — is NULL as Citus
/// would see it: a NULL constant (under implicit casts), or a bound parameter holding NULL.
/// Named notation keeps the arguments in the call's order at this stage, each in a
/// NamedArgExpr carrying its position.
unsafe fn campaign_is_null(
    call: *mut pg_sys::FuncExpr,
    bound_params: pg_sys::ParamListInfo,
) -> bool {
    let mut first: *mut pg_sys::Node = std::ptr::null_mut();
    for (position, arg) in PgList::<pg_sys::Node>::from_pg((*call).args)
        .iter_ptr()
        .enumerate()
    {
        if is_a(arg, pg_sys::NodeTag::T_NamedArgExpr) {
            let named = arg as *mut pg_sys::NamedArgExpr;
            if (*named).argnumber == 0 {
                first = (*named).arg.cast();
            }
        } else if position == 0 {
            first = arg;
        }
    }
    if first.is_null() {
        return false;
    }
    let value = pg_sys::strip_implicit_coercions(first);
    if is_a(value, pg_sys::NodeTag::T_Const) {
        return (*(value as *mut pg_sys::Const)).constisnull;
    }
    if is_a(value, pg_sys::NodeTag::T_Param) {
        let param = value as *mut pg_sys::Param;
        if (*param).paramkind != pg_sys::ParamKind::PARAM_EXTERN || bound_params.is_null() {
            return false;
        }
        let id = (*param).paramid;
        if id < 1 || id > (*bound_params).numParams {
            return false;
        }
        let data = match (*bound_params).paramFetch {
            Some(fetch) => {
                let mut workspace = pg_sys::ParamExternData::default();
                let fetched = fetch(bound_params, id, true, &mut workspace);
                if fetched.is_null() {
                    return false;
                }
                *fetched
            }
            None => *(*bound_params).params.as_ptr().add((id - 1) as usize),
        };
        // A parameter Citus would not see as a constant (no value yet, not PARAM_FLAG_CONST)
        // is not delegated, so it is left alone.
        return data.isnull && (data.pflags as u32 & pg_sys::PARAM_FLAG_CONST) != 0;
    }
    false
}
