//! The step prompt (Markdown) an agent receives: goal, task, upstream previews, notes, the
//! question and answer after an input request, and the tools with their real signatures.

use serde_json::Value;

pub fn step_prompt(context: &Value, can_spawn: bool) -> String {
    let campaign = &context["campaign"];
    let step = &context["step"];
    let mut out = String::new();
    out.push_str(&format!(
        "# Campaign: {}\n\n**Goal:** {}\n\n",
        text(&campaign["name"]),
        text(&campaign["goal"])
    ));
    if let Some(strategy) = campaign["strategy"].as_str() {
        out.push_str(&format!("**Strategy:** {strategy}\n\n"));
    }
    for guidance in campaign["guidance"].as_array().into_iter().flatten() {
        out.push_str(&format!("**Guidance:** {}\n\n", text(&guidance["text"])));
    }
    out.push_str(&format!(
        "## Your task (step {})\n\n{}\n\n",
        step["id"],
        text(&step["action"])
    ));
    if !step["input"].is_null() {
        out.push_str(&format!(
            "**Input:**\n```json\n{}\n```\n\n",
            serde_json::to_string_pretty(&step["input"]).unwrap_or_default()
        ));
    }
    if let Some(question) = step["question"].as_str() {
        out.push_str(&format!(
            "**You asked:** {question}\n\n**Answer:** {}\n\n",
            text(&step["answer"])
        ));
    }
    if let Some(error) = step["last_error"].as_str() {
        out.push_str(&format!("**Previous attempt failed:** {error}\n\n"));
    }
    if let Some(continues) = context["continues"].as_object() {
        out.push_str(&format!(
            "## You continue step {}\n\nIts partial output:\n\n{}\n\n",
            text(&continues["step_id"].clone()),
            text(&continues["preview"].clone())
        ));
    }
    let upstream = context["upstream"].as_array().cloned().unwrap_or_default();
    if !upstream.is_empty() {
        out.push_str("## Upstream outputs\n\n");
        for u in &upstream {
            out.push_str(&format!(
                "### Step {} — {} ({} characters)\n\n{}\n\n",
                u["step_id"],
                text(&u["action"]),
                u["total_chars"],
                text(&u["preview"])
            ));
            if let Some(hint) = u["hint"].as_str() {
                out.push_str(&format!("_{hint}_\n\n"));
            }
        }
    }
    let notes = context["notes"].as_array().cloned().unwrap_or_default();
    if !notes.is_empty() {
        out.push_str("## Newest notes\n\n");
        for n in &notes {
            out.push_str(&format!("- {}\n", text(&n["content"])));
        }
        out.push('\n');
    }
    out.push_str("## Tools\n\n");
    out.push_str("- `get_my_context()` — this context again; `read_step_output(step_id, offset, limit)` — the rest of an output\n");
    out.push_str("- `add_note(content, tags)` — record a finding; `search_notes(query)` — find earlier ones\n");
    out.push_str("- `heartbeat()` — call every few minutes on long work\n");
    out.push_str("- `complete_step(summary)` — finish with your result\n");
    out.push_str("- `fail_step(error)` — you cannot do it; `request_input(question)` — you need a decision\n");
    out.push_str(
        "- `abort_branch(target_id, output, reason)` — end an ancestor's whole branch early\n",
    );
    if can_spawn {
        out.push_str("- `spawn_and_continue(subtasks, continuation, partial_output)` — split off subtasks first\n");
    } else {
        out.push_str("\n**You are at the maximum depth: do this step yourself; spawning is not available.**\n");
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
