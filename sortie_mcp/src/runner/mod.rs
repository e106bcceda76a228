//! The runner (SPEC §6): hands ready steps to agents and keeps campaigns moving. Every
//! decision — what is ready, who gets it, what a result means — is an extension call; the
//! runner only moves data between the database, agents, the planner and the webhook.

mod dispatch;
mod health;
pub mod listener;
mod notifier;
mod planner;
mod prompt;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::config::{Config, Dispatch};
use crate::db::Db;
use crate::embed::Embedder;
pub use dispatch::Claim;

/// The safety-net tick; events wake the runner sooner.
const TICK: Duration = Duration::from_secs(5);
/// How often a woken runner polls while the extension may be holding wake-ups back.
const POLL: Duration = Duration::from_millis(25);

/// How long the daemon waits before its next tick. While the database is down (a restart,
/// say) ticks fail; they are retried sooner than the safety tick, but backing off rather than
/// at the polling rate.
fn pause_after(failed_ticks: u32, polling: bool) -> Duration {
    if failed_ticks > 0 {
        (POLL * 2u32.pow(failed_ticks.min(8))).min(TICK)
    } else if polling {
        POLL
    } else {
        TICK
    }
}

pub struct Runner {
    db: Db,
    config: Arc<Config>,
    http: reqwest::Client,
    /// The connection string agents get (the embedded cluster's, or DATABASE_URL).
    database_url: String,
    slots: Arc<Semaphore>,
    embedder: Embedder,
    dispatches: JoinSet<()>,
    shutdown: watch::Receiver<bool>,
}

impl Runner {
    pub fn new(
        db: Db,
        config: Config,
        database_url: String,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Runner> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let slots = Arc::new(Semaphore::new(config.max_concurrent as usize));
        let embedder = Embedder::from_config(&config, http.clone());
        Ok(Runner {
            db,
            config: Arc::new(config),
            http,
            database_url,
            slots,
            embedder,
            dispatches: JoinSet::new(),
            shutdown,
        })
    }

    /// `--once`: one tick, then wait for every dispatch it started (SPEC §12: a cron runner
    /// must not exit before its dispatches are sent).
    pub async fn once(mut self) -> Result<()> {
        self.tick().await?;
        self.drain().await;
        Ok(())
    }

    /// The daemon: a tick whenever an event arrives or the safety-net interval passes. A
    /// connection wakes listeners at most once per `wake_interval()`, so after a wake-up the
    /// runner keeps polling for `listen_poll_window()`: the events held back in between are
    /// seen within one POLL.
    pub async fn run(mut self) -> Result<()> {
        let mut shutdown = self.shutdown.clone();
        // Like a tick, this waits out a database that is not up yet.
        let window = loop {
            match self.listen_poll_window().await {
                Ok(window) => break window,
                Err(e) => warn!(error = %e, "cannot read listen_poll_window(); retrying"),
            }
            tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                _ = tokio::time::sleep(TICK) => {}
            }
        };
        let mut wake = listener::listen(&self.database_url).await;
        let mut poll_until: Option<tokio::time::Instant> = None;
        let mut failed_ticks = 0u32;
        loop {
            match self.tick().await {
                Ok(()) => failed_ticks = 0,
                Err(e) => {
                    failed_ticks += 1;
                    warn!(error = %e, failed_ticks, "tick failed; retrying");
                }
            }
            self.reap_finished();
            let polling = poll_until.is_some_and(|until| until > tokio::time::Instant::now());
            let pause = pause_after(failed_ticks, polling);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = wake.recv() => poll_until = Some(tokio::time::Instant::now() + window),
                _ = tokio::time::sleep(pause) => {}
            }
        }
        info!("shutting down: waiting for dispatches in flight");
        self.drain().await;
        Ok(())
    }

    async fn listen_poll_window(&self) -> Result<Duration> {
        let seconds = self
            .db
            .query_value(
                "SELECT to_jsonb(extract(epoch FROM {schema}.listen_poll_window())::float8)",
                &[],
            )
            .await?;
        let seconds = seconds
            .as_f64()
            .ok_or_else(|| anyhow::anyhow!("listen_poll_window() answered {seconds}"))?;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// Waits for every dispatch in flight.
    pub async fn wait(&mut self) {
        self.drain().await;
    }

    async fn drain(&mut self) {
        while self.dispatches.join_next().await.is_some() {}
    }

    fn reap_finished(&mut self) {
        while self.dispatches.try_join_next().is_some() {}
    }

    pub async fn tick(&mut self) -> Result<()> {
        let reset = self.db.call("reset_zombies()", &[]).await?;
        if reset["reset"].as_i64().unwrap_or(0) > 0 {
            info!(reset = %reset["reset"], "reset steps whose lease expired");
        }
        self.db
            .query_value("SELECT to_jsonb({schema}.reap_leases())", &[])
            .await?;
        self.db
            .query_value("SELECT to_jsonb({schema}.enforce_budgets())", &[])
            .await?;
        self.dispatch_ready().await?;
        self.plan_drained().await?;
        notifier::deliver(&self.db, &self.http, self.config.webhook_url.as_deref()).await?;
        self.backfill_embeddings().await?;
        health::warn_if_unhealthy(&self.db).await;
        Ok(())
    }

    /// Notes written without an embedding (plain SQL, or while the service was down) get one.
    pub async fn backfill_embeddings(&self) -> Result<usize> {
        let pending = self.db.call("notes_to_embed(\"limit\" => 64)", &[]).await?;
        let notes = pending.as_array().cloned().unwrap_or_default();
        if notes.is_empty() {
            return Ok(0);
        }
        let texts: Vec<String> = notes
            .iter()
            .map(|n| n["content"].as_str().unwrap_or_default().to_string())
            .collect();
        let embedded = self.embedder.embed(&texts).await;
        for (note, vector) in notes.iter().zip(embedded.vectors) {
            let id = note["note_id"].as_i64().unwrap_or_default();
            let vector = pgvector::Vector::from(vector);
            self.db
                .call(
                    "set_note_embedding(note_id => $1, embedding => $2, embedding_model => $3)",
                    &[&id, &vector, &embedded.model],
                )
                .await?;
        }
        info!(notes = notes.len(), model = %embedded.model, "embedded notes");
        Ok(notes.len())
    }

    /// Claims ready steps while there is capacity and hands each to the back-end.
    async fn dispatch_ready(&mut self) -> Result<()> {
        if self.config.dispatch == Dispatch::None || *self.shutdown.borrow() {
            return Ok(());
        }
        let lease = self.config.zombie_timeout.as_secs() as i32;
        loop {
            let running = self
                .db
                .query_value("SELECT to_jsonb({schema}.running_count())", &[])
                .await?;
            if running.as_i64().unwrap_or(0) >= i64::from(self.config.max_concurrent) {
                return Ok(());
            }
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                return Ok(());
            };
            let claimed = self
                .db
                .call(
                    "claim_next(owner => $1, lease_seconds => $2)",
                    &[&self.config.owner, &lease],
                )
                .await?;
            let Some(claim) = Claim::from_json(&claimed) else {
                return Ok(());
            };
            info!(step = claim.step_id, campaign = %claim.campaign_id, action = %claim.action, "dispatching");
            // From here the job owns the claim: nothing below may fail and leave it unattended.
            let job = dispatch::Job {
                db: self.db.clone(),
                config: self.config.clone(),
                http: self.http.clone(),
                database_url: self.database_url.clone(),
                claim,
                shutdown: self.shutdown.clone(),
            };
            self.dispatches.spawn(async move {
                job.run().await;
                drop(permit);
            });
        }
    }

    /// Drained campaigns: the planner grows them; with no planner they end (SPEC §3, §4).
    async fn plan_drained(&mut self) -> Result<()> {
        let due = self
            .db
            .query_value(
                "SELECT to_jsonb(array(SELECT {schema}.campaigns_to_plan(20)))",
                &[],
            )
            .await?;
        for id in due
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let id = uuid::Uuid::parse_str(id)?;
            if self.config.litellm_url.is_none() {
                match self.db.call("finish_campaign(id => $1)", &[&id]).await {
                    Ok(ended) => info!(campaign = %id, status = %ended["status"], "campaign ended"),
                    Err(e) => warn!(campaign = %id, error = %e, "could not end the campaign"),
                }
                continue;
            }
            let granted = self.db.call("begin_planning(id => $1)", &[&id]).await?;
            if granted["granted"] != true {
                continue;
            }
            if let Err(e) = planner::consult(&self.db, &self.http, &self.config, id).await {
                // The planning lease runs out and the campaign is planned again later.
                warn!(campaign = %id, error = %e, "planner failed; nothing was applied");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_ticks_back_off_to_the_safety_tick() {
        let pauses: Vec<u64> = (1..=9)
            .map(|n| pause_after(n, true).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(pause_after(0, true), POLL);
        assert_eq!(pause_after(0, false), TICK);
    }
}
