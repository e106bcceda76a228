//! The planner (SPEC §4): an OpenAI-compatible chat completion with JSON output. Its answer is
//! applied by the extension's `apply_plan`, all or nothing; a failed or malformed answer
//! changes nothing and the campaign is planned again when the planning lease runs out.

use anyhow::{bail, Context, Result};
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
    let Some(base) = &config.litellm_url else {
        bail!("LITELLM_URL is not set")
    };
    let state = db
        .call("get_campaign(id => $1, steps_limit => 200)", &[&campaign])
        .await?;
    let body = json!({
        "model": config.planner_model,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": planner_prompt(&state)}],
        "response_format": {"type": "json_object"},
        "temperature": 0.2,
    });
    let mut request = http
        .post(format!("{base}/v1/chat/completions"))
        .timeout(std::time::Duration::from_secs(120))
        .json(&body);
    if let Some(key) = &config.litellm_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.context("planner unreachable")?;
    if !response.status().is_success() {
        bail!("planner answered {}", response.status());
    }
    let answer: Value = response
        .json()
        .await
        .context("planner answer is not JSON")?;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .context("planner answer has no message content")?;
    let plan = parse_plan_text(content)?;
    let applied = db
        .call(
            "apply_plan(campaign_id => $1, plan => $2)",
            &[&campaign, &plan],
        )
        .await?;
    info!(campaign = %campaign, created = %applied["steps"]["created"], status = %applied["status"], "plan applied");
    Ok(())
}

/// The model's JSON, also when wrapped in a Markdown code fence.
pub fn parse_plan_text(content: &str) -> Result<Value> {
    let trimmed = content.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(unfenced.trim()).context("planner content is not a JSON object")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_and_plain_plans_parse() {
        assert_eq!(parse_plan_text("{\"done\": true}").unwrap()["done"], true);
        assert_eq!(
            parse_plan_text("```json\n{\"done\": true}\n```").unwrap()["done"],
            true
        );
        assert!(parse_plan_text("sure! here is the plan").is_err());
    }
}
