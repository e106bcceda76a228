//! The planner (SPEC §4): an OpenAI-compatible chat completion with JSON output. Its answer is
//! applied by the extension's `apply_plan`, all or nothing; a failed or malformed answer
//! changes nothing and the campaign is planned again when the planning lease runs out.

use anyhow::Result;
use serde_json::Value;
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
        .call("get_campaign(id => $1, steps_limit => 200)", &[&campaign])
        .await?;
    let plan = crate::llm::ask_json(http, config, SYSTEM, &planner_prompt(&state)).await?;
    let applied = db
        .call(
            "apply_plan(campaign_id => $1, plan => $2)",
            &[&campaign, &plan],
        )
        .await?;
    info!(campaign = %campaign, created = %applied["steps"]["created"], status = %applied["status"], "plan applied");
    Ok(())
}

fn planner_prompt(state: &Value) -> String {
    let steps = state["steps"].as_array().cloned().unwrap_or_default();
    let pick = |status: &str| -> Vec<String> {
        steps
            .iter()
            .rev()
            .filter(|s| s["status"] == status)
            .take(15)
            .map(|s| {
                format!(
                    "- [{}] {}{}",
                    s["id"],
                    s["action"].as_str().unwrap_or_default(),
                    s["error"]
                        .as_str()
                        .map(|e| format!(" — error: {e}"))
                        .unwrap_or_default()
                )
            })
            .collect()
    };
    let notes: Vec<String> = state["recent_notes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| format!("- {}", n["content"].as_str().unwrap_or_default()))
        .collect();
    let guidance: Vec<String> = state["guidance"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| format!("- {}", g["text"].as_str().unwrap_or_default()))
        .collect();
    format!(
        "Goal: {goal}\nStrategy: {strategy}\nProgress: {progress}\nUser guidance (follow it):\n{guidance}\n\
         Max depth: {depth}. Tokens used: {used} of {budget}.\n\nDone steps (newest first):\n{done}\n\n\
         Failed steps:\n{failed}\n\nNewest notes:\n{notes}\n\nNothing is pending, running or waiting. What next?",
        goal = state["goal"].as_str().unwrap_or_default(),
        strategy = state["strategy"].as_str().unwrap_or("(none yet)"),
        progress = state["progress"].as_str().unwrap_or("(none yet)"),
        guidance = if guidance.is_empty() { "(none)".into() } else { guidance.join("\n") },
        depth = state["max_depth"],
        used = state["tokens_used"],
        budget = state["token_budget"].as_i64().map(|b| b.to_string()).unwrap_or_else(|| "unlimited".into()),
        done = pick("done").join("\n"),
        failed = pick("failed").join("\n"),
        notes = notes.join("\n"),
    )
}
