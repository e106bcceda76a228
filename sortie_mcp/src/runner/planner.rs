//! The planner (SPEC §4): an OpenAI-compatible chat completion with JSON output. Its answer is
//! applied by the extension's `apply_plan`, all or nothing; a failed or malformed answer
//! changes nothing and the campaign is planned again when the planning lease runs out.

use anyhow::Result;
use serde_json::{json, Value};
use tracing::info;

use crate::config::Config;
use crate::db::Db;

const SYSTEM: &str = "You plan the next steps of a campaign run by AI agents. Answer with one JSON object only: \
{\"new_steps\": [step objects], \"strategy_update\": string?, \"progress_update\": string?, \
\"notify\": {\"level\": \"milestone|info\", \"message\": string}?, \"done\": boolean, \"next_delay_minutes\": number?}. \
Step objects: {\"action\", \"agent\"?, \"input\"?, \"key\"?, \"depends_on\"?: [keys or step ids]}, or \
{\"step_type\": \"sequence\", \"action\", \"steps\": [...]}, {\"step_type\": \"parallel_group\", \"action\", \"children\": [...]}, \
{\"step_type\": \"for_each\", \"action\", \"items\": [...], \"template\": {step using {item}}, \"collect\"?: {step}}. \
Set done to true, with no new_steps, when the goal is met or cannot be met. Do not repeat steps already done.";

pub async fn consult(
    db: &Db,
    http: &reqwest::Client,
    config: &Config,
    campaign: uuid::Uuid,
) -> Result<()> {
    let state = db
        .call(
            "_planner_context_delegated(campaign_id => $1)",
            &[&campaign],
        )
        .await?;
    let plan = if config.stub_ai {
        stub_plan(&state)
    } else {
        crate::llm::ask_json(http, config, SYSTEM, &planner_prompt(&state)).await?
    };
    let applied = db
        .call(
            "_apply_plan_delegated(campaign_id => $1, plan => $2)",
            &[&campaign, &plan],
        )
        .await?;
    info!(campaign = %campaign, created = %applied["steps"]["created"], status = %applied["status"], "plan applied");
    Ok(())
}

/// The planner's prompt from `planner_context()`: goal, scope, guidance, the newest done,
/// failed and open steps, notes, and the duplicate warnings (SPEC §4, §13).
pub(crate) fn planner_prompt(state: &Value) -> String {
    let list = |field: &str, line: &dyn Fn(&Value) -> String| -> String {
        let lines: Vec<String> = state[field]
            .as_array()
            .into_iter()
            .flatten()
            .map(line)
            .collect();
        if lines.is_empty() {
            "(none)".into()
        } else {
            lines.join("\n")
        }
    };
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let step = |s: &Value| format!("- [{}] {}", s["id"], text(&s["action"]));
    let failed = |s: &Value| {
        format!(
            "- [{}] {} — error: {}",
            s["id"],
            text(&s["action"]),
            text(&s["error"])
        )
    };
    let open = |s: &Value| {
        format!(
            "- [{}] {} ({})",
            s["id"],
            text(&s["action"]),
            text(&s["status"])
        )
    };
    let duplicate = |d: &Value| {
        format!(
            "- step {} ({}, {}) repeats step {} ({}): do not add this work again",
            d["step_id"],
            text(&d["action"]),
            text(&d["status"]),
            d["duplicate_of"],
            text(&d["duplicate_status"])
        )
    };
    let note = |n: &Value| format!("- {}", text(&n["content"]));
    let guidance = |g: &Value| format!("- {}", text(&g["text"]));
    format!(
        "Goal: {goal}\nScope (stay within it): {scope}\nStrategy: {strategy}\nProgress: {progress}\n\
         User guidance (follow it):\n{guidance}\n\
         Max depth: {depth}. Tokens used: {used} of {budget}.\n\n\
         Done steps (newest first):\n{done}\n\nFailed steps:\n{failed}\n\nOpen steps:\n{open}\n\n\
         Duplicate warnings:\n{duplicates}\n\nNewest notes:\n{notes}\n\n\
         Nothing is pending, running or waiting. What next?",
        goal = text(&state["goal"]),
        scope = state["scope"].as_str().unwrap_or("(not limited)"),
        strategy = state["strategy"].as_str().unwrap_or("(none yet)"),
        progress = state["progress"].as_str().unwrap_or("(none yet)"),
        guidance = list("guidance", &guidance),
        depth = state["max_depth"],
        used = state["tokens_used"],
        budget = state["token_budget"]
            .as_i64()
            .map(|b| b.to_string())
            .unwrap_or_else(|| "unlimited".into()),
        done = list("done", &step),
        failed = list("failed", &failed),
        open = list("open", &open),
        duplicates = list("duplicates", &duplicate),
        notes = list("recent_notes", &note),
    )
}

/// How many steps the stub planner adds before it calls a campaign done.
const STUB_ROUNDS: usize = 3;

/// The stub planner (USE_STUB_AI_CLIENT=true): deterministic, for trying Sortie without a
/// model. An empty campaign gets one step toward its goal; a campaign whose success contract
/// is not met (SPEC §17) gets one step to improve the metric, up to STUB_ROUNDS done steps;
/// otherwise it is done.
pub(crate) fn stub_plan(state: &Value) -> Value {
    let goal = state["goal"].as_str().unwrap_or("the goal");
    let done = state["done"].as_array().map_or(0, Vec::len);
    let failed = state["failed"].as_array().map_or(0, Vec::len);
    let unmet = state["success"]["met"] == false;
    if done + failed == 0 {
        return json!({"new_steps": [{"action": format!("Work toward the goal: {goal}")}],
                      "strategy_update": "stub planner: one step toward the goal"});
    }
    if unmet && done < STUB_ROUNDS {
        return json!({"new_steps": [{"action": format!(
                          "Improve {} (round {}): {}", state["success_metric"].as_str().unwrap_or("the metric"),
                          done + 1, state["success"]["reason"].as_str().unwrap_or("not met yet"))}],
                      "progress_update": format!("stub planner: {done} steps done, contract not met")});
    }
    json!({"done": true, "progress_update": format!("stub planner: {done} steps done, {failed} failed")})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_stub_planner_starts_retries_an_unmet_contract_and_stops() {
        let empty = stub_plan(&json!({"goal": "ship"}));
        assert_eq!(
            empty["new_steps"][0]["action"],
            "Work toward the goal: ship"
        );
        let unmet = stub_plan(
            &json!({"goal": "ship", "done": [{"id": 1}], "success_metric": "acc",
                                      "success": {"met": false, "reason": "acc = 0.7 does not meet 0.9"}}),
        );
        assert!(unmet["new_steps"][0]["action"]
            .as_str()
            .unwrap()
            .starts_with("Improve acc (round 2)"));
        let met =
            stub_plan(&json!({"goal": "ship", "done": [{"id": 1}], "success": {"met": true}}));
        assert_eq!(met["done"], true);
        let spent = stub_plan(
            &json!({"done": [{"id": 1}, {"id": 2}, {"id": 3}], "success": {"met": false}}),
        );
        assert_eq!(spent["done"], true);
    }

    #[test]
    fn the_prompt_shows_scope_and_duplicate_warnings() {
        let prompt = planner_prompt(&json!({
            "goal": "ship it", "scope": "only the docs folder", "max_depth": 4, "tokens_used": 0,
            "done": [{"id": 1, "action": "write intro"}],
            "duplicates": [{"step_id": 3, "action": "write intro", "status": "pending",
                            "duplicate_of": 1, "duplicate_status": "done"}]
        }));
        assert!(
            prompt.contains("Scope (stay within it): only the docs folder"),
            "{prompt}"
        );
        assert!(
            prompt.contains("step 3 (write intro, pending) repeats step 1 (done)"),
            "{prompt}"
        );
        assert!(prompt.contains("Failed steps:\n(none)"), "{prompt}");
    }
}
