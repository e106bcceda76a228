//! The README's main job: a small campaign run end to end on whatever database is configured
//! (the embedded default when DATABASE_URL is unset) by the real runner, dispatching each
//! step to the bundled example agent (`sortie_mcp/examples/demo-agent.sh`) through the `command`
//! back-end. The agent fans out, splices and leaves notes through `sortie-mcp`. With
//! LITELLM_URL set the planner may grow the campaign further.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::{Config, Dispatch, Env};
use crate::db::Db;
use crate::runner::Runner;

pub async fn run(db: Db, mut config: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
    let agent = demo_agent(Env::get().demo_agent.as_deref())?;
    config.dispatch = Dispatch::Command;
    config.agent_command = Some(shell_words::quote(&agent.to_string_lossy()).into_owned());
    config.zombie_timeout = Duration::from_secs(120);
    // The writer's report is a file; the step's check (SPEC §17) looks at it there.
    let workdir = std::env::temp_dir().join(format!("sortie-demo-{}", std::process::id()));
    std::fs::create_dir_all(&workdir)
        .with_context(|| format!("creating the demo's work directory {}", workdir.display()))?;
    config.workdir = Some(workdir.clone());
    let planner = if config.litellm_url.is_some() {
        "llm"
    } else {
        "none"
    };

    let steps = json!([
        {"step_type": "for_each", "action": "survey the sources", "key": "survey",
         "items": [{"source": "arXiv"}, {"source": "ACL Anthology"}, {"source": "Semantic Scholar"}],
         "template": {"action": "summarise recent work on agent orchestration from {item.source}",
                      "agent": "researcher", "input": {"source": "{item.source}"}},
         "collect": {"action": "merge the three summaries", "agent": "editor"}},
        {"action": "write the final report", "agent": "writer", "depends_on": ["survey"],
         "verify": "test -s report.md && grep -q '^# ' report.md"}
    ]);
    let created = db
        .call(
            "create_campaign(goal => $1, planner => $2, steps => $3)",
            &[
                &"Demo: survey agent-orchestration literature and write a report",
                &planner,
                &steps,
            ],
        )
        .await?;
    let campaign = uuid::Uuid::parse_str(created["id"].as_str().unwrap_or_default())?;
    println!(
        "campaign {} ({campaign}) created; dispatching to {}",
        created["name"].as_str().unwrap_or_default(),
        agent.display()
    );

    let url = db.connection_string().to_string();
    // Only the demo's campaign: a database with the user's own campaigns stays untouched.
    let mut runner =
        Runner::new(db.clone(), config, url, shutdown.clone())?.only_campaign(campaign);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        runner.tick().await?;
        let state = db
            .call(
                "_get_campaign_delegated(id => $1, steps_limit => 1)",
                &[&campaign],
            )
            .await?;
        if state["status"] != "active" || *shutdown.borrow() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the demo campaign did not finish within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    runner.wait().await;

    let state = db
        .call("_get_campaign_delegated(id => $1)", &[&campaign])
        .await?;
    println!(
        "\ncampaign {}: {}",
        state["name"].as_str().unwrap_or_default(),
        state["status"].as_str().unwrap_or_default()
    );
    print_tree(&db, &state["steps"]).await?;
    let notes = db
        .call("_get_notes_delegated(campaign_id => $1)", &[&campaign])
        .await?;
    println!("\nnotes (newest first):");
    for n in notes["notes"].as_array().into_iter().flatten() {
        println!("  - {}", n["content"].as_str().unwrap_or_default());
    }
    let report = workdir.join("report.md");
    let written = std::fs::read_to_string(&report).unwrap_or_default();
    println!(
        "\nthe report step was checked by its verify command; {} says:\n{}",
        report.display(),
        written.trim_end()
    );
    let _ = std::fs::remove_dir_all(&workdir);
    if state["status"] != "done" {
        bail!("the demo campaign ended {}", state["status"]);
    }
    Ok(())
}

/// The bundled agent script: where SORTIE_DEMO_AGENT says (`chosen`), or next to the
/// binaries' source tree.
fn demo_agent(chosen: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = chosen {
        return Ok(path.to_path_buf());
    }
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/demo-agent.sh");
    path.canonicalize()
        .with_context(|| format!("the demo agent {} is missing", path.display()))
}

/// Steps as a tree: each step followed by its children (compound members and spawned
/// subtasks) in order.
async fn print_tree(db: &Db, steps: &Value) -> Result<()> {
    let steps: Vec<&Value> = steps.as_array().into_iter().flatten().collect();
    let children = |parent: Option<i64>| -> Vec<&Value> {
        steps
            .iter()
            .copied()
            .filter(|s| s["parent_id"].as_i64() == parent)
            .collect()
    };
    let mut stack: Vec<&Value> = children(None).into_iter().rev().collect();
    while let Some(step) = stack.pop() {
        let id = step["id"].as_i64().unwrap_or_default();
        let indent = "  ".repeat(step["depth"].as_u64().unwrap_or(0) as usize + 1);
        println!(
            "{indent}#{id:<3} {:<8} {:<15} {}",
            step["status"].as_str().unwrap_or_default(),
            step["step_type"].as_str().unwrap_or_default(),
            step["action"].as_str().unwrap_or_default()
        );
        if step["step_type"] == "atomic" {
            let output = db
                .call("read_step_output(step_id => $1, \"limit\" => 120)", &[&id])
                .await?;
            if let Some(text) = output["content"].as_str().filter(|t| !t.is_empty()) {
                println!("{indent}       → {}", text.replace('\n', " "));
            }
        }
        stack.extend(children(Some(id)).into_iter().rev());
    }
    Ok(())
}
