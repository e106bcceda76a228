//! The runner's tick (SPEC §6): zombies, leases, budgets, and campaigns that ran dry.

use std::time::Duration;

use anyhow::Result;
use tracing::info;

use crate::config::Config;
use crate::db::Db;

pub async fn run(db: &Db, config: &Config, once: bool) -> Result<()> {
    loop {
        tick(db, config).await?;
        if once {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

pub async fn tick(db: &Db, config: &Config) -> Result<()> {
    let reset = db.call("reset_zombies()", &[]).await?;
    if reset["reset"].as_i64().unwrap_or(0) > 0 {
        info!(reset = %reset["reset"], "reset zombie steps");
    }
    db.query_value("SELECT to_jsonb({schema}.reap_leases())", &[])
        .await?;
    db.query_value("SELECT to_jsonb({schema}.enforce_budgets())", &[])
        .await?;
    // With no planner configured, drained campaigns end by the done/failed rule (SPEC §3).
    if config.litellm_url.is_none() {
        let drained = db
            .query_value(
                "SELECT to_jsonb(array(SELECT {schema}.campaigns_to_plan(100)))",
                &[],
            )
            .await?;
        for id in drained
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
        {
            let id = uuid::Uuid::parse_str(id)?;
            let ended = db.call("finish_campaign(id => $1)", &[&id]).await?;
            info!(campaign = %id, status = %ended["status"], "campaign ended");
        }
    }
    Ok(())
}
