//! The README's main job: a small campaign run end to end on whatever database is configured
//! (the embedded default when DATABASE_URL is unset), printing progress and the final tree.

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::config::Config;
use crate::db::Db;

pub async fn run(db: &Db, config: &Config) -> Result<()> {
    let steps = json!([
        {"step_type": "for_each", "action": "survey the sources", "key": "survey",
         "items": [{"source": "arXiv"}, {"source": "ACL Anthology"}, {"source": "Semantic Scholar"}],
         "template": {"action": "summarise recent work on campaign orchestration from {item.source}",
                      "agent": "researcher", "input": {"source": "{item.source}"}},
         "collect": {"action": "merge the three summaries", "agent": "editor"}},
        {"action": "write the final report", "agent": "writer", "depends_on": ["survey"]}
    ]);
    let created = db
        .call(
            "create_campaign(goal => $1, planner => 'none', steps => $2)",
            &[
                &"Demo: survey campaign-orchestration literature and write a report",
                &steps,
            ],
        )
        .await?;
    let campaign = uuid::Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
    println!(
        "campaign {} ({}) created",
        created["name"].as_str().unwrap_or_default(),
        campaign
    );

    let owner = format!("demo-worker/{}", config.owner);
    loop {
        let claim = db
            .call(
                "claim_next(owner => $1, campaign_id => $2)",
                &[&owner, &campaign],
            )
            .await?;
        let Some(step_id) = claim["step_id"].as_i64() else {
            break;
        };
        let token = uuid::Uuid::parse_str(claim["claim_token"].as_str().unwrap_or_default())?;
        let action = claim["action"].as_str().unwrap_or_default().to_string();
        println!("  step {step_id:>3} running  {action}");
        let context = db
            .call("get_my_context(step_id => $1)", &[&step_id])
            .await?;
        let upstream = context["upstream"].as_array().map(Vec::len).unwrap_or(0);
        let output = format!(
            "{action}: done by the demo worker after reading {upstream} upstream output(s)"
        );
        db.call(
            "complete_step(step_id => $1, claim_token => $2, summary => $3, tokens_used => 100)",
            &[&step_id, &token, &output],
        )
        .await?;
        println!("  step {step_id:>3} done");
    }

    let state = db.call("get_campaign(id => $1)", &[&campaign]).await?;
    println!(
        "\ncampaign {}: {}",
        state["name"].as_str().unwrap_or_default(),
        state["status"].as_str().unwrap_or_default()
    );
    print_tree(&state["steps"]);
    if state["status"] != "done" {
        bail!("the demo campaign ended {}", state["status"]);
    }
    Ok(())
}

fn print_tree(steps: &Value) {
    let Some(steps) = steps.as_array() else {
        return;
    };
    for step in steps {
        let depth = step["depth"].as_u64().unwrap_or(0) as usize;
        let indent = "  ".repeat(depth + 1);
        println!(
            "{indent}#{:<3} {:<8} {:<15} {}",
            step["id"],
            step["status"].as_str().unwrap_or_default(),
            step["step_type"].as_str().unwrap_or_default(),
            step["action"].as_str().unwrap_or_default()
        );
    }
}
