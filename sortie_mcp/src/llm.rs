//! The planner LLM: an OpenAI-compatible chat completion (LITELLM_URL) answering one JSON
//! object. Used by the runner's campaign planner and by workflow advances that need a choice.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config::Config;

/// Asks the model and returns its answer parsed as JSON.
pub async fn ask_json(
    http: &reqwest::Client,
    config: &Config,
    system: &str,
    user: &str,
) -> Result<Value> {
    let Some(base) = &config.litellm_url else {
        bail!("LITELLM_URL is not set")
    };
    let body = json!({
        "model": config.planner_model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "response_format": {"type": "json_object"},
        "temperature": 0.2,
    });
    let mut request = http
        .post(format!("{base}/v1/chat/completions"))
        .timeout(config.ai_request_timeout)
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
    json_text(content)
}

/// The model's JSON, also when wrapped in a Markdown code fence.
pub fn json_text(content: &str) -> Result<Value> {
    let trimmed = content.trim();
    let unfenced = trimmed
        .strip_prefix("```json")
        .or_else(|| trimmed.strip_prefix("```"))
        .and_then(|rest| rest.strip_suffix("```"))
        .unwrap_or(trimmed);
    serde_json::from_str(unfenced.trim()).context("planner content is not a JSON object")
}

#[cfg(test)]
mod tests {
    use super::json_text;

    #[test]
    fn fenced_and_plain_answers_parse() {
        assert_eq!(json_text("{\"done\": true}").unwrap()["done"], true);
        assert_eq!(
            json_text("```json\n{\"done\": true}\n```").unwrap()["done"],
            true
        );
        assert!(json_text("sure! here is the plan").is_err());
    }
}
