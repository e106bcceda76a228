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
/// At most one "why nothing is dispatched" warning per this interval (SPEC §13).
const IDLE_REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// SPEC §18: how often the runner prunes ended campaigns past SORTIE_RETENTION_DAYS.
const PRUNE_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

/// The runner's duties (SPEC §6; River's maintenance services are the model). Each has its
/// own schedule, and its failures are logged and backed off on their own: one failing duty (a
/// webhook, the embedder) never holds back another, dispatch least of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duty {
    /// Steps whose lease ran out go back to pending (each a failed attempt).
    ResetZombies,
    /// Lock keys of finished or expired claims are released.
    ReapLeases,
    /// Campaigns over their token budget are paused.
    EnforceBudgets,
    /// Ready steps are claimed and handed to agents.
    Dispatch,
    /// Drained campaigns' benchmark commands are run (SPEC §17).
    Benchmarks,
    /// Drained campaigns are planned, or ended without a planner.
    Planning,
    /// Notifications go to the webhook.
    Notifications,
    /// Notes written without a vector get one.
    Embeddings,
    /// Campaigns ended long ago are removed (SPEC §18).
    Prune,
    /// Health problems are logged (SPEC §16).
    Health,
}

impl Duty {
    /// Every duty, in the order one tick runs them.
    pub const ALL: [Duty; 10] = [
        Duty::ResetZombies,
        Duty::ReapLeases,
        Duty::EnforceBudgets,
        Duty::Dispatch,
        Duty::Benchmarks,
        Duty::Planning,
        Duty::Notifications,
        Duty::Embeddings,
        Duty::Prune,
        Duty::Health,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Duty::ResetZombies => "reset_zombies",
            Duty::ReapLeases => "reap_leases",
            Duty::EnforceBudgets => "enforce_budgets",
            Duty::Dispatch => "dispatch",
            Duty::Benchmarks => "benchmarks",
            Duty::Planning => "planning",
            Duty::Notifications => "notifications",
            Duty::Embeddings => "embeddings",
            Duty::Prune => "prune",
            Duty::Health => "health",
        }
    }

    /// How often it runs when nothing wakes it.
    fn interval(self) -> Duration {
        match self {
            Duty::Prune => PRUNE_INTERVAL,
            Duty::Health => Duration::from_secs(60),
            _ => TICK,
        }
    }

    /// Whether a change in the database (a `sortie_events` wake-up) makes it due at once.
    fn woken_by_events(self) -> bool {
        matches!(
            self,
            Duty::Dispatch | Duty::Benchmarks | Duty::Planning | Duty::Notifications
        )
    }
}

/// When one duty runs next, and how often it failed in a row.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    next_due: tokio::time::Instant,
    failures: u32,
}

impl Schedule {
    fn new(now: tokio::time::Instant) -> Schedule {
        Schedule {
            next_due: now,
            failures: 0,
        }
    }

    /// After a run that worked: its interval, or POLL while a wake-up's poll window is open
    /// for a duty that events wake.
    fn succeeded(&mut self, duty: Duty, now: tokio::time::Instant, polling: bool) {
        self.failures = 0;
        self.next_due = now
            + if polling && duty.woken_by_events() {
                POLL
            } else {
                duty.interval()
            };
    }

    /// After a failed run: backed off, doubling from POLL, never past its interval.
    fn failed(&mut self, duty: Duty, now: tokio::time::Instant) {
        self.failures += 1;
        self.next_due = now + backoff(self.failures, duty.interval());
    }

    /// A wake-up makes a duty that events wake due at once, unless it is backing off.
    fn woken(&mut self, duty: Duty, now: tokio::time::Instant) {
        if duty.woken_by_events() && self.failures == 0 {
            self.next_due = self.next_due.min(now);
        }
    }
}

/// The pause after `failures` failed runs in a row of a duty with `interval`: a database that
/// is restarting is retried sooner than the safety tick, but backing off rather than at the
/// polling rate.
fn backoff(failures: u32, interval: Duration) -> Duration {
    (POLL * 2u32.pow(failures.min(16))).min(interval.max(POLL))
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
    /// When the runner last said why it dispatched nothing.
    last_idle_report: Option<std::time::Instant>,
    /// When the runner last pruned ended campaigns (SPEC §18); None: not yet, so the first
    /// tick does.
    last_prune: Option<std::time::Instant>,
    /// Each duty's schedule, in Duty::ALL's order.
    schedules: [Schedule; Duty::ALL.len()],
    /// The daemon's notification batch in flight, if any.
    notifier: Option<tokio::task::JoinHandle<()>>,
    /// When set (the demo), only this campaign is dispatched, planned or benchmarked.
    only_campaign: Option<uuid::Uuid>,
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
            last_idle_report: None,
            last_prune: None,
            schedules: [Schedule::new(tokio::time::Instant::now()); Duty::ALL.len()],
            notifier: None,
            only_campaign: None,
        })
    }

    /// Confines dispatch, planning and benchmarks to one campaign: `sortie-runner demo` runs its
    /// own campaign and leaves the others of the database alone.
    pub fn only_campaign(mut self, campaign: uuid::Uuid) -> Runner {
        self.only_campaign = Some(campaign);
        self
    }

    /// `--once`: one tick, then wait for every dispatch it started (SPEC §12: a cron runner
    /// must not exit before its dispatches are sent).
    pub async fn once(mut self) -> Result<()> {
        self.tick().await?;
        self.drain().await;
        Ok(())
    }

    /// The daemon: every duty on its own schedule (Duty), those that events wake run as soon
    /// as one arrives. A connection wakes listeners at most once per `wake_interval()`, so
    /// after a wake-up they keep polling for `listen_poll_window()`: the events held back in
    /// between are seen within one POLL.
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
        loop {
            let polling = poll_until.is_some_and(|until| until > tokio::time::Instant::now());
            for (i, duty) in Duty::ALL.into_iter().enumerate() {
                if *self.shutdown.borrow() {
                    break;
                }
                if self.schedules[i].next_due > tokio::time::Instant::now() {
                    continue;
                }
                // A webhook that hangs must not hold the loop (and dispatch) for its timeouts:
                // deliveries run beside it, one batch at a time.
                if duty == Duty::Notifications {
                    if self.notifier.as_ref().is_none_or(|t| t.is_finished()) {
                        let (db, http, config) =
                            (self.db.clone(), self.http.clone(), self.config.clone());
                        self.notifier = Some(tokio::spawn(async move {
                            if let Err(e) =
                                notifier::deliver(&db, &http, config.webhook_url.as_deref()).await
                            {
                                warn!(duty = "notifications", error = %e, "runner duty failed; the others go on");
                            }
                        }));
                    }
                    self.schedules[i].succeeded(duty, tokio::time::Instant::now(), polling);
                    continue;
                }
                let outcome = self.run_duty(duty).await;
                let now = tokio::time::Instant::now();
                match outcome {
                    Ok(()) => self.schedules[i].succeeded(duty, now, polling),
                    Err(e) => {
                        self.schedules[i].failed(duty, now);
                        warn!(duty = duty.name(), error = %e, failures = self.schedules[i].failures,
                              "runner duty failed; the others go on");
                    }
                }
            }
            self.reap_finished();
            let next = self
                .schedules
                .iter()
                .map(|s| s.next_due)
                .min()
                .unwrap_or_else(|| tokio::time::Instant::now() + TICK);
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = wake.recv() => {
                    let now = tokio::time::Instant::now();
                    poll_until = Some(now + window);
                    for (i, duty) in Duty::ALL.into_iter().enumerate() {
                        self.schedules[i].woken(duty, now);
                    }
                }
                _ = tokio::time::sleep_until(next) => {}
            }
        }
        info!("shutting down: waiting for dispatches in flight");
        self.drain().await;
        Ok(())
    }

    /// One run of one duty.
    pub async fn run_duty(&mut self, duty: Duty) -> Result<()> {
        match duty {
            Duty::ResetZombies => {
                let reset = self.db.call("reset_zombies()", &[]).await?;
                if reset["reset"].as_i64().unwrap_or(0) > 0 {
                    info!(reset = %reset["reset"], "reset steps whose lease expired");
                }
            }
            Duty::ReapLeases => {
                self.db
                    .query_value("SELECT to_jsonb({schema}.reap_leases())", &[])
                    .await?;
            }
            Duty::EnforceBudgets => {
                self.db
                    .query_value("SELECT to_jsonb({schema}.enforce_budgets())", &[])
                    .await?;
            }
            Duty::Dispatch => self.dispatch_ready().await?,
            Duty::Benchmarks => self.run_benchmarks().await?,
            Duty::Planning => self.plan_drained().await?,
            Duty::Notifications => {
                notifier::deliver(&self.db, &self.http, self.config.webhook_url.as_deref()).await?
            }
            Duty::Embeddings => {
                self.backfill_embeddings().await?;
            }
            Duty::Prune => self.prune_if_due().await,
            Duty::Health => health::warn_if_unhealthy(&self.db).await,
        }
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

    /// Every duty once, in order (`--once`, and the tests). A failing duty is logged and does
    /// not stop the ones after it; the first failure is returned once all have run.
    pub async fn tick(&mut self) -> Result<()> {
        let mut first_failure = None;
        for duty in Duty::ALL {
            if let Err(e) = self.run_duty(duty).await {
                warn!(duty = duty.name(), error = %e, "runner duty failed; the others go on");
                first_failure.get_or_insert(e.context(format!("runner duty {}", duty.name())));
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    /// SPEC §18: once a day (the first tick included), campaigns that ended more than
    /// SORTIE_RETENTION_DAYS ago are removed with their steps, events and notes, a thousand
    /// campaigns per transaction. A failure is logged and tried again the next day: retention
    /// must never stop dispatching.
    async fn prune_if_due(&mut self) {
        let days = self.config.retention_days;
        if days == 0
            || *self.shutdown.borrow()
            || self
                .last_prune
                .is_some_and(|at| at.elapsed() < PRUNE_INTERVAL)
        {
            return;
        }
        self.last_prune = Some(std::time::Instant::now());
        let older_than = format!("{days} days");
        loop {
            match self
                .db
                .call("prune(older_than => $1::text::interval)", &[&older_than])
                .await
            {
                Ok(pruned) => {
                    if pruned["campaigns"].as_i64().unwrap_or(0) > 0 {
                        info!(campaigns = %pruned["campaigns"], steps = %pruned["steps"],
                              events = %pruned["events"], notes = %pruned["notes"],
                              "pruned campaigns that ended more than {days} days ago");
                    }
                    if pruned["more"].as_bool() != Some(true) || *self.shutdown.borrow() {
                        return;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot prune ended campaigns; trying again in a day");
                    return;
                }
            }
        }
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

    /// Claims ready steps while there is capacity and hands each to the back-end. The cap is
    /// the extension's (SPEC §13): one `SORTIE_MAX_CONCURRENT` for every runner sharing the
    /// database, counting runner dispatches only; this runner's own slots keep it from
    /// starting more jobs than that itself. Each round claims as many steps as this runner has
    /// free slots in one batch (SPEC §18: `claim_next(max_steps)`, one transaction), and the
    /// extension cuts the batch to the slots free across runners.
    async fn dispatch_ready(&mut self) -> Result<()> {
        if self.config.dispatch == Dispatch::None || *self.shutdown.borrow() {
            return Ok(());
        }
        let lease = self.config.zombie_timeout.as_secs() as i32;
        let cap = self.config.max_concurrent as i32;
        let mut dispatched = 0usize;
        loop {
            let mut permits = Vec::new();
            while let Ok(permit) = self.slots.clone().try_acquire_owned() {
                permits.push(permit);
            }
            if permits.is_empty() {
                break;
            }
            let wanted = permits.len();
            let claimed = self
                .db
                .call(
                    "claim_next(owner => $1, lease_seconds => $2, max_dispatched => $3, max_steps => $4, \
                     campaign_id => $5)",
                    &[&self.config.owner, &lease, &cap, &(wanted as i32), &self.only_campaign],
                )
                .await?;
            let claims: Vec<Claim> = claimed
                .as_array()
                .map(|a| a.iter().filter_map(Claim::from_json).collect())
                .unwrap_or_default();
            let got = claims.len();
            for (claim, permit) in claims.into_iter().zip(permits.drain(..)) {
                dispatched += 1;
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
            // Slots left unused go back; fewer claims than asked means nothing more is ready now.
            drop(permits);
            if got < wanted {
                break;
            }
        }
        if dispatched == 0 {
            self.explain_idle().await;
        }
        Ok(())
    }

    /// SPEC §13: when nothing was dispatched although steps are ready, say why, at most once
    /// a minute (capacity, max_parallel, budgets, back-off, lock keys, paused campaigns).
    async fn explain_idle(&mut self) {
        if self
            .last_idle_report
            .is_some_and(|at| at.elapsed() < IDLE_REPORT_INTERVAL)
        {
            return;
        }
        let cap = self.config.max_concurrent as i32;
        let blockers = match self
            .db
            .call("dispatch_blockers(max_dispatched => $1)", &[&cap])
            .await
        {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot read why no step is dispatched");
                return;
            }
        };
        let ready = blockers["ready_steps"].as_i64().unwrap_or(0);
        if ready == 0 {
            return;
        }
        self.last_idle_report = Some(std::time::Instant::now());
        let local_busy = self.slots.available_permits() == 0;
        warn!(
            ready_steps = ready,
            held_back = %blockers["held_back"],
            runner_slots = %blockers["runner_slots"],
            this_runner_full = local_busy,
            "{}",
            idle_reason(&blockers, local_busy)
        );
    }

    /// SPEC §17: drained campaigns with a benchmark_command. Each due one is taken with a lease,
    /// its command run (`sh -c` in SORTIE_WORKDIR, SORTIE_VERIFY_TIMEOUT) beside the
    /// dispatches, and its stdout recorded; the extension judges the campaign by it.
    async fn run_benchmarks(&mut self) -> Result<()> {
        // A runner confined to one campaign (the demo) takes no other campaign's benchmark.
        if *self.shutdown.borrow() || self.only_campaign.is_some() {
            return Ok(());
        }
        let lease = (self.config.verify_timeout.as_secs() + 60).min(i32::MAX as u64) as i32;
        for _ in 0..4 {
            let taken = self
                .db
                .call("take_benchmark(lease_seconds => $1)", &[&lease])
                .await?;
            let (Some(id), Some(command)) = (
                taken["campaign_id"]
                    .as_str()
                    .and_then(|v| uuid::Uuid::parse_str(v).ok()),
                taken["benchmark_command"].as_str().map(String::from),
            ) else {
                return Ok(());
            };
            let (db, config) = (self.db.clone(), self.config.clone());
            info!(campaign = %id, command = %command, "running the campaign's benchmark");
            self.dispatches.spawn(async move {
                let run = crate::checks::run(
                    &command,
                    config.workdir.as_deref(),
                    &[],
                    false,
                    config.verify_timeout,
                )
                .await;
                let output = if run.timed_out {
                    format!("{}\n(stopped after {} s)", run.stdout, config.verify_timeout.as_secs())
                } else {
                    run.stdout.clone()
                };
                match db
                    .call(
                        "_record_benchmark_delegated(campaign_id => $1, exit_code => $2, output => $3)",
                        &[&id, &run.exit_code, &output],
                    )
                    .await
                {
                    Ok(v) => info!(campaign = %id, status = %v["status"], metric = %v["metric_value"], "benchmark recorded"),
                    // The lease runs out and the benchmark is run again.
                    Err(e) => warn!(campaign = %id, error = %e, "could not record the benchmark"),
                }
            });
        }
        Ok(())
    }

    /// Drained campaigns: the planner grows them; with no planner they end (SPEC §3, §4). A
    /// campaign that never had a step is planned only after SORTIE_PLAN_DELAY, and never
    /// ended for want of steps (SPEC §13).
    async fn plan_drained(&mut self) -> Result<()> {
        let planner_configured = self.config.has_planner();
        let plan_delay = self.config.plan_delay.as_secs_f64();
        let due = self
            .db
            .query_value(
                "SELECT to_jsonb(array(SELECT {schema}.campaigns_to_plan(20, $1, $2)))",
                &[&planner_configured, &plan_delay],
            )
            .await?;
        for id in due
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let id = uuid::Uuid::parse_str(id)?;
            if self.only_campaign.is_some_and(|only| only != id) {
                continue;
            }
            if !self.config.has_planner() {
                match self
                    .db
                    .call("_finish_campaign_delegated(id => $1)", &[&id])
                    .await
                {
                    Ok(ended) => info!(campaign = %id, status = %ended["status"], "campaign ended"),
                    Err(e) => warn!(campaign = %id, error = %e, "could not end the campaign"),
                }
                continue;
            }
            let granted = self
                .db
                .call("_begin_planning_delegated(id => $1)", &[&id])
                .await?;
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

/// The one-line reason of the idle warning, from `dispatch_blockers()`' answer.
fn idle_reason(blockers: &Value, this_runner_full: bool) -> String {
    if blockers["capacity_reached"] == true {
        return format!(
            "steps are ready but every runner slot is in use ({} of SORTIE_MAX_CONCURRENT = {} dispatched steps running, across all runners)",
            blockers["runner_slots"]["in_use"], blockers["runner_slots"]["cap"]
        );
    }
    if this_runner_full {
        return "steps are ready but this runner's own dispatches fill its SORTIE_MAX_CONCURRENT slots".into();
    }
    let held: Vec<String> = blockers["held_back"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_i64().unwrap_or(0) > 0)
        .map(|(why, n)| {
            let why = match why.as_str() {
                "budget" => "their campaign spent its token budget",
                "max_parallel" => "their campaign already runs max_parallel steps",
                "backoff" => "they are backing off after a failed attempt",
                "locks" => "their lock keys are held by running steps",
                "claimable" => "claimable (another runner or worker may be taking them)",
                "campaign_paused" => "their campaign is paused",
                other => other,
            };
            format!("{n}: {why}")
        })
        .collect();
    format!(
        "{} steps are ready but none was dispatched: {}",
        blockers["ready_steps"],
        held.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idle_reason_names_what_holds_steps_back() {
        let full = serde_json::json!({"ready_steps": 3, "capacity_reached": true,
            "runner_slots": {"in_use": 4, "cap": 4}, "held_back": {"claimable": 3}});
        assert!(idle_reason(&full, false)
            .contains("every runner slot is in use (4 of SORTIE_MAX_CONCURRENT = 4"));
        let held = serde_json::json!({"ready_steps": 3, "capacity_reached": false,
            "runner_slots": {"in_use": 0, "cap": 4}, "held_back": {"locks": 2, "budget": 1}});
        let reason = idle_reason(&held, false);
        assert!(reason.contains("2: their lock keys are held"), "{reason}");
        assert!(
            reason.contains("1: their campaign spent its token budget"),
            "{reason}"
        );
    }

    #[test]
    fn a_failing_duty_backs_off_to_its_interval_alone() {
        let pauses: Vec<u64> = (1..=9)
            .map(|n| backoff(n, TICK).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        let start = tokio::time::Instant::now();
        let mut notifications = Schedule::new(start);
        let mut dispatch = Schedule::new(start);
        for _ in 0..5 {
            notifications.failed(Duty::Notifications, start);
        }
        dispatch.succeeded(Duty::Dispatch, start, false);
        assert_eq!(notifications.next_due - start, Duration::from_millis(800));
        assert_eq!(
            dispatch.next_due - start,
            TICK,
            "dispatch keeps its own schedule"
        );
        // A wake-up brings dispatch forward, but not a duty that is backing off.
        let later = start + Duration::from_millis(10);
        dispatch.woken(Duty::Dispatch, later);
        notifications.woken(Duty::Notifications, later);
        assert_eq!(dispatch.next_due, later);
        assert_eq!(notifications.next_due - start, Duration::from_millis(800));
        // While a wake-up's poll window is open, woken duties poll; the others keep their pace.
        let mut zombies = Schedule::new(start);
        dispatch.succeeded(Duty::Dispatch, start, true);
        zombies.succeeded(Duty::ResetZombies, start, true);
        assert_eq!(dispatch.next_due - start, POLL);
        assert_eq!(zombies.next_due - start, TICK);
        // A duty that succeeds again starts its back-off over.
        notifications.succeeded(Duty::Notifications, start, false);
        assert_eq!(notifications.failures, 0);
        assert_eq!(backoff(20, PRUNE_INTERVAL), POLL * 2u32.pow(16));
    }
}
