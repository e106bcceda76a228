//! Dispatch back-ends (SPEC §6): `http` posts the step to an agent runtime, `command` runs a
//! local agent per step. Results go back through the step's claim token, so a dispatch whose
//! claim was reset meanwhile changes nothing (SPEC §12: no auto-complete bypassing fencing).

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::{info, warn};

use super::prompt;
use crate::config::{Config, Dispatch};
use crate::db::{Db, DbError};

const TOOLS: &[&str] = &[
    "get_my_context",
    "read_step_output",
    "heartbeat",
    "add_note",
    "search_notes",
    "get_notes",
    "complete_step",
    "fail_step",
    "request_input",
    "abort_branch",
];
/// Only the tail of a failing agent's stderr is kept as the step's error.
const ERROR_TAIL: usize = 2000;

#[derive(Debug, Clone)]
pub struct Claim {
    pub step_id: i64,
    pub campaign_id: uuid::Uuid,
    pub action: String,
    pub agent: Option<String>,
    pub depth: i64,
    pub token: uuid::Uuid,
}

impl Claim {
    pub fn from_json(v: &Value) -> Option<Claim> {
        Some(Claim {
            step_id: v["step_id"].as_i64()?,
            campaign_id: uuid::Uuid::parse_str(v["campaign_id"].as_str()?).ok()?,
            action: v["action"].as_str()?.to_string(),
            agent: v["agent"].as_str().map(String::from),
            depth: v["depth"].as_i64().unwrap_or(0),
            token: uuid::Uuid::parse_str(v["claim_token"].as_str()?).ok()?,
        })
    }
}

/// One claimed step, from its claim to the record of how it ended. Once a step is claimed its
/// job owns it and ends by completing, failing or releasing it, through outages too: only a
/// database that stays away for the whole lease (or past the runner's shutdown) leaves the
/// claim for the lease to clean up.
pub struct Job {
    pub db: Db,
    pub config: Arc<Config>,
    pub http: reqwest::Client,
    pub database_url: String,
    pub claim: Claim,
    pub shutdown: watch::Receiver<bool>,
}

/// What the agent is handed: the step's prompt, and whether it may split the step.
struct Brief {
    prompt: String,
    /// Whether spawn_and_continue is offered (the extension's verdict on the depth limit).
    can_spawn: bool,
}

/// How a dispatch ended, as far as the runner can tell.
enum Outcome {
    /// The agent produced output; complete the step with it unless the agent already did.
    Output(String),
    /// The agent ran and reported through MCP itself (or said nothing to report).
    Reported,
    Failed(String),
    /// The runner is shutting down: hand the step back untouched.
    Interrupted,
}

impl Job {
    pub async fn run(self) {
        let heartbeat = self.keep_alive();
        let outcome = match self.brief().await {
            Ok(brief) => match self.config.dispatch {
                Dispatch::Http => self.post(&brief).await,
                Dispatch::Command => self.command(&brief).await,
                Dispatch::None => Outcome::Interrupted,
            },
            Err(e) => {
                warn!(step = self.claim.step_id, error = %e, "cannot read the step's context; handing it back");
                Outcome::Interrupted
            }
        };
        heartbeat.abort();
        let result = self.record(&outcome).await;
        let step = self.claim.step_id;
        match result {
            Ok(v) => {
                info!(step, outcome = outcome.name(), status = %v["status"], "dispatch finished")
            }
            // The agent finished through MCP already, or the claim was reset: nothing to do.
            Err(e) if e.code == "stale_claim" || e.code == "skipped" => {
                info!(
                    step,
                    outcome = outcome.name(),
                    "dispatch finished; the step was settled elsewhere"
                )
            }
            Err(e) => warn!(step, error = %e, "could not record the dispatch's outcome"),
        }
    }

    async fn brief(&self) -> Result<Brief, DbError> {
        let config = &self.config;
        let context = self
            .call_through_outage(
                "get_my_context(step_id => $1, head => $2, tail => $3)",
                &[
                    &self.claim.step_id,
                    &config.preview_head,
                    &config.preview_tail,
                ],
            )
            .await?;
        let can_spawn = context["step"]["can_spawn"] == true;
        Ok(Brief {
            prompt: prompt::step_prompt(&context, can_spawn),
            can_spawn,
        })
    }

    /// Records how the dispatch ended. An outage does not lose the agent's work: the record is
    /// retried through it, and a late record is refused by fencing if the step was reset
    /// meanwhile.
    async fn record(&self, outcome: &Outcome) -> Result<Value, DbError> {
        let (sql, text) = match outcome {
            Outcome::Output(output) => (
                "complete_step(step_id => $1, claim_token => $2, summary => $3)",
                Some(output),
            ),
            Outcome::Failed(error) => (
                "fail_step(step_id => $1, claim_token => $2, error => $3)",
                Some(error),
            ),
            Outcome::Interrupted => ("release_step(step_id => $1, claim_token => $2)", None),
            Outcome::Reported => return Ok(Value::Null),
        };
        let (step, token) = (self.claim.step_id, self.claim.token);
        match text {
            Some(text) => self.call_through_outage(sql, &[&step, &token, text]).await,
            None => self.call_through_outage(sql, &[&step, &token]).await,
        }
    }

    /// Makes an extension call, and makes it again while the database is unreachable
    /// (restarting, say), until the step's lease would have run out or the runner is shutting
    /// down.
    async fn call_through_outage(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Value, DbError> {
        let give_up = tokio::time::Instant::now() + self.config.zombie_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            match self.db.call(sql, params).await {
                Err(e)
                    if e.code == "unavailable"
                        && tokio::time::Instant::now() + pause < give_up
                        && !*self.shutdown.borrow() =>
                {
                    warn!(step = self.claim.step_id, error = %e, "the database is unreachable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
                result => return result,
            }
        }
    }

    /// Heartbeats on the agent's behalf while the dispatch runs, a third of the lease apart.
    fn keep_alive(&self) -> tokio::task::JoinHandle<()> {
        let (db, step, token) = (self.db.clone(), self.claim.step_id, self.claim.token);
        let lease = self.config.zombie_timeout.as_secs().max(3) as i32;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs((lease / 3) as u64)).await;
                let beat = db
                    .call(
                        "heartbeat(step_id => $1, claim_token => $2, extend_leases_sec => $3)",
                        &[&step, &token, &lease],
                    )
                    .await;
                // Through an outage the heartbeats go on; a refused one means the claim is gone.
                if beat.is_err_and(|e| e.code != "unavailable") {
                    return;
                }
            }
        })
    }

    fn session_env(&self) -> Vec<(String, String)> {
        vec![
            ("SORTIE_ROLE".into(), "worker".into()),
            ("SORTIE_STEP_ID".into(), self.claim.step_id.to_string()),
            (
                "SORTIE_CAMPAIGN_ID".into(),
                self.claim.campaign_id.to_string(),
            ),
            ("SORTIE_CLAIM_TOKEN".into(), self.claim.token.to_string()),
            ("SORTIE_SCHEMA".into(), self.config.schema.clone()),
            ("DATABASE_URL".into(), self.database_url.clone()),
        ]
    }

    async fn post(&self, brief: &Brief) -> Outcome {
        let Some(base) = &self.config.runtime_url else {
            return Outcome::Failed("OPENCLAW_RUNTIME_URL is not set".into());
        };
        let mut tools: Vec<&str> = TOOLS.to_vec();
        if brief.can_spawn {
            tools.push("spawn_and_continue");
        }
        let body = json!({
            "agent": self.claim.agent, "prompt": brief.prompt, "step_id": self.claim.step_id,
            "campaign_id": self.claim.campaign_id, "tools": tools,
            "env": self.session_env().into_iter().map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
        });
        let request = self
            .http
            .post(format!("{base}/api/agent/execute"))
            .timeout(self.config.zombie_timeout)
            .json(&body)
            .send();
        let mut shutdown = self.shutdown.clone();
        let response = tokio::select! {
            r = request => r,
            _ = shutdown.changed() => return Outcome::Interrupted,
        };
        match response {
            Err(e) => Outcome::Failed(format!("agent runtime unreachable: {e}")),
            Ok(r) if !r.status().is_success() => {
                let status = r.status();
                let text = r.text().await.unwrap_or_default();
                Outcome::Failed(format!("agent runtime answered {status}: {}", tail(&text)))
            }
            Ok(r) => match r.json::<Value>().await {
                Ok(answer) => match answer.get("output").and_then(Value::as_str) {
                    Some(output) => Outcome::Output(output.to_string()),
                    None => Outcome::Reported,
                },
                Err(e) => Outcome::Failed(format!("agent runtime answered with invalid JSON: {e}")),
            },
        }
    }

    /// Runs SORTIE_AGENT_COMMAND with the prompt on stdin and the session in its environment.
    async fn command(&self, brief: &Brief) -> Outcome {
        let Some(line) = &self.config.agent_command else {
            return Outcome::Failed("SORTIE_AGENT_COMMAND is not set".into());
        };
        let words = match shell_words::split(line) {
            Ok(w) if !w.is_empty() => w,
            _ => return Outcome::Failed("SORTIE_AGENT_COMMAND is not a valid command line".into()),
        };
        let mut command = tokio::process::Command::new(&words[0]);
        command
            .args(&words[1..])
            .envs(self.session_env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.to_path_buf()))
        {
            command.env("SORTIE_BIN_DIR", dir);
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failed(format!(
                    "could not start the agent command {:?}: {e}",
                    words[0]
                ))
            }
        };
        let mut stdin = child.stdin.take();
        let prompt = brief.prompt.clone();
        tokio::spawn(async move {
            if let Some(stdin) = stdin.as_mut() {
                let _ = stdin.write_all(prompt.as_bytes()).await;
            }
        });
        let mut stdout = child.stdout.take();
        let mut stderr = child.stderr.take();
        let read_out = tokio::spawn(async move {
            let mut s = String::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_string(&mut s).await;
            }
            s
        });
        let read_err = tokio::spawn(async move {
            let mut s = String::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_string(&mut s).await;
            }
            s
        });
        let mut shutdown = self.shutdown.clone();
        let status = tokio::select! {
            s = tokio::time::timeout(self.config.zombie_timeout, child.wait()) => s,
            _ = shutdown.changed() => {
                let _ = child.kill().await;
                return Outcome::Interrupted;
            }
        };
        let out = read_out.await.unwrap_or_default();
        let err = read_err.await.unwrap_or_default();
        match status {
            Err(_) => {
                let _ = child.kill().await;
                Outcome::Failed(format!(
                    "the agent command ran longer than the lease ({} s)",
                    self.config.zombie_timeout.as_secs()
                ))
            }
            Ok(Err(e)) => Outcome::Failed(format!("waiting for the agent command: {e}")),
            Ok(Ok(s)) if s.success() => {
                if out.trim().is_empty() {
                    Outcome::Reported
                } else {
                    Outcome::Output(out.trim_end().to_string())
                }
            }
            Ok(Ok(s)) => Outcome::Failed(format!(
                "the agent command exited with {s}: {}",
                tail(if err.trim().is_empty() { &out } else { &err })
            )),
        }
    }
}

impl Outcome {
    fn name(&self) -> &'static str {
        match self {
            Outcome::Output(_) => "output",
            Outcome::Reported => "reported",
            Outcome::Failed(_) => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

fn tail(text: &str) -> String {
    let chars: Vec<char> = text.trim().chars().collect();
    chars[chars.len().saturating_sub(ERROR_TAIL)..]
        .iter()
        .collect()
}
