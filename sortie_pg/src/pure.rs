//! The pure rules of `sortie_core` as SQL functions. Refusals come back as data
//! (`{"error": {"code", "message"}}`) and the calling rule raises them through `raise()`, so
//! every error code maps to its SQLSTATE in one place.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::json;
use sortie_core::{fingerprint, metric, plan, preview as previews, steps, RuleError};

fn refusal(error: RuleError) -> JsonB {
    JsonB(json!({"error": {"code": error.code, "message": error.message}}))
}

/// Validates and flattens step JSON (SPEC §3a); see `sortie_core::steps`.
#[pg_extern(immutable, parallel_safe, name = "_expand_steps")]
pub fn expand_steps(steps: JsonB) -> JsonB {
    match steps::expand(&steps.0) {
        Ok(expansion) => JsonB(json!({"ok": expansion_json(&expansion)})),
        Err(error) => refusal(error),
    }
}

/// The expansion as the SQL side reads it, with the depth it reaches below its top level.
fn expansion_json(expansion: &steps::Expansion) -> serde_json::Value {
    let mut value = json!(expansion);
    value["max_level"] = json!(expansion.max_level());
    value
}

/// Validates a planner answer (SPEC §4) and returns it normalised, steps expanded.
#[pg_extern(immutable, parallel_safe, name = "_parse_plan")]
pub fn parse_plan(plan: JsonB) -> JsonB {
    match plan::parse_plan(&plan.0) {
        Ok(p) => JsonB(json!({"ok": {
            "new_steps": p.new_steps.as_ref().map(|e| json!({"ok": expansion_json(e)})),
            "strategy_update": p.strategy_update,
            "progress_update": p.progress_update,
            "notify": p.notify,
            "done": p.done,
            "next_delay_minutes": p.next_delay_minutes,
        }})),
        Err(error) => refusal(error),
    }
}

#[pg_extern(immutable, parallel_safe, name = "_step_fingerprint")]
pub fn step_fingerprint(action: &str, agent: Option<&str>, input: Option<JsonB>) -> String {
    fingerprint::fingerprint(action, agent, input.as_ref().map(|j| &j.0))
}

#[pg_extern(immutable, parallel_safe, name = "_preview")]
pub fn preview(step_id: i64, text: &str, head: i32, tail: i32) -> JsonB {
    JsonB(previews::preview(
        step_id,
        text,
        head.max(0) as usize,
        tail.max(0) as usize,
    ))
}

#[pg_extern(immutable, parallel_safe, name = "_read_range")]
pub fn read_range(text: &str, offset: i32, limit: i32) -> JsonB {
    JsonB(previews::read_range(
        text,
        offset.max(0) as usize,
        limit.max(0) as usize,
    ))
}

#[pg_extern(immutable, parallel_safe, name = "_parse_metric")]
pub fn parse_metric(name: &str, content: &str) -> Option<f64> {
    metric::parse_metric(name, content)
}

#[pg_extern(immutable, parallel_safe, name = "_metric_met")]
pub fn metric_met(value: f64, target: f64, direction: &str) -> bool {
    metric::metric_met(value, target, direction)
}

/// A readable campaign name from its goal.
#[pg_extern(immutable, parallel_safe, name = "_name_from_goal")]
pub fn name_from_goal(goal: &str) -> String {
    sortie_core::name_from_goal(goal)
}

/// A step on a cycle of waits among the given steps, or NULL (SPEC §13: `check_invariants()`
/// reports any dependency cycle). `ids[i]` has compound parent `parents[i]` (NULL, or a step
/// outside `ids`, for none); `dep_steps[j]` depends on `dep_on[j]`, and pairs naming a step
/// outside `ids` are ignored, as finished steps wait for nothing.
#[pg_extern(immutable, parallel_safe, name = "_wait_cycle_step")]
pub fn wait_cycle_step(
    ids: Vec<i64>,
    parents: Vec<Option<i64>>,
    dep_steps: Vec<i64>,
    dep_on: Vec<i64>,
) -> Option<i64> {
    let index: std::collections::HashMap<i64, usize> =
        ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let parent_indexes: Vec<Option<usize>> = ids
        .iter()
        .enumerate()
        .map(|(i, _)| {
            parents
                .get(i)
                .copied()
                .flatten()
                .and_then(|p| index.get(&p).copied())
        })
        .collect();
    let deps: Vec<(usize, usize)> = dep_steps
        .iter()
        .zip(&dep_on)
        .filter_map(|(s, d)| Some((*index.get(s)?, *index.get(d)?)))
        .collect();
    steps::wait_cycle(&parent_indexes, &deps).map(|i| ids[i])
}
