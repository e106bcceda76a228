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
/// The error of an attempt whose agent neither printed output nor reported (SPEC §13).
const SILENT_AGENT: &str = "agent exited without output or a report";

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
    Output {
        text: String,
        tokens_used: i64,
    },
    /// The agent ran and produced no output: it must have reported through MCP itself
    /// (complete_step, request_input, spawn_and_continue…). If it did not, the step is failed
    /// at once rather than left to the lease (SPEC §13).
    Silent(String),
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
            // An outage: one that outlasted the runner (shutting down), or a connection lost
            // with the read in flight (a restart). Nothing was written: hand the step back.
            Err(e) if e.code == "unavailable" || e.code == "in_doubt" => {
                warn!(step = self.claim.step_id, error = %e, "cannot read the step's context; handing it back");
                Outcome::Interrupted
            }
            // A refusal (a schema older than this runner, a revoked grant, …) would refuse the
            // next claim of the step too: handed back, it was claimed again at once, forever.
            // It fails the attempt instead, so the retry rules' back-off and max_attempts
            // apply and the error is on the step for whoever looks.
            Err(e) => {
                warn!(step = self.claim.step_id, error = %e, "cannot read the step's context; failing the attempt");
                Outcome::Failed(format!("the runner could not read the step's context: {e}"))
            }
        };
        // Heartbeats go on through the record: a verify command (SPEC §17) may take a while.
        let result = self.record(&outcome).await;
        heartbeat.abort();
        let step = self.claim.step_id;
        match result {
            Ok(v) => {
                info!(step, outcome = outcome.name(), status = %v["status"], "dispatch finished")
            }
            // The agent finished through MCP already, or the claim was reset: nothing to do.
            Err(e) if settled_elsewhere(&e) => {
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
                // Named by its campaign: on Citus the read runs on the worker holding it.
                "_get_my_context_delegated(campaign_id => $1, step_id => $2, head => $3, tail => $4)",
                &[
                    &self.claim.campaign_id,
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
    ///
    /// SPEC §13: the runner never leaves its claim to the lease. A record the extension refuses
    /// for any reason but the step being settled already (by the agent through MCP, or by a
    /// reset) is followed by a failed attempt naming the refusal, and if even that is refused,
    /// by handing the step back.
    ///
    /// Completions, failures and hand-backs name the claim's campaign: on Citus they run on the
    /// worker holding it (docs/scale-out.md).
    async fn record(&self, outcome: &Outcome) -> Result<Value, DbError> {
        let (campaign, step, token) =
            (self.claim.campaign_id, self.claim.step_id, self.claim.token);
        let first = match outcome {
            Outcome::Output { text, tokens_used } => {
                match self
                    .call_through_outage(
                        "_complete_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3, summary => $4, \
                         tokens_used => $5)",
                        &[&campaign, &step, &token, text, tokens_used],
                    )
                    .await
                {
                    Ok(answer) if answer["verification"] == "pending" => self.verify(&answer).await,
                    other => other,
                }
            }
            Outcome::Failed(error) | Outcome::Silent(error) => {
                self.call_through_outage(
                    "_fail_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3, error => $4)",
                    &[&campaign, &step, &token, error],
                )
                .await
            }
            Outcome::Interrupted => {
                return self
                    .call_through_outage(
                        "_release_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3)",
                        &[&campaign, &step, &token],
                    )
                    .await
            }
        };
        let refusal = match first {
            Err(e) if !settled_elsewhere(&e) && e.code != "unavailable" => e,
            other => return other,
        };
        warn!(step, error = %refusal, "the extension refused the dispatch's record; failing the attempt instead");
        let error = format!(
            "the runner could not record the agent's result: {}",
            refusal.message
        );
        let failed = match outcome {
            Outcome::Failed(_) | Outcome::Silent(_) => Err(refusal),
            _ => {
                self.call_through_outage(
                    "_fail_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3, error => $4)",
                    &[&campaign, &step, &token, &error],
                )
                .await
            }
        };
        match failed {
            Err(e) if !settled_elsewhere(&e) && e.code != "unavailable" => {
                self.call_through_outage(
                    "_release_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3)",
                    &[&campaign, &step, &token],
                )
                .await
            }
            other => other,
        }
    }

    /// SPEC §17: the step's verify command, run in the agent's environment and in
    /// SORTIE_WORKDIR; its outcome decides whether the completion stands.
    async fn verify(&self, pending: &Value) -> Result<Value, DbError> {
        let command = pending["verify"].as_str().unwrap_or_default();
        let run = crate::checks::run(
            command,
            self.config.workdir.as_deref(),
            &self.session_env(),
            true,
            self.config.verify_timeout,
        )
        .await;
        info!(
            step = self.claim.step_id,
            passed = run.passed(),
            "verify command ran"
        );
        let (campaign, step, token, passed, report) = (
            self.claim.campaign_id,
            self.claim.step_id,
            self.claim.token,
            run.passed(),
            run.report(),
        );
        self.call_through_outage(
            "_record_verification_delegated(campaign_id => $1, step_id => $2, claim_token => $3, passed => $4, \
             output => $5)",
            &[&campaign, &step, &token, &passed, &report],
        )
        .await
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
        let campaign = self.claim.campaign_id;
        let lease = self.config.zombie_timeout.as_secs().max(3) as i32;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs((lease / 3) as u64)).await;
                // Named by its campaign: on Citus the heartbeat runs on the worker holding it.
                let beat = db
                    .call(
                        "_heartbeat_delegated(campaign_id => $1, step_id => $2, claim_token => $3, extend_leases_sec => $4)",
                        &[&campaign, &step, &token, &lease],
                    )
                    .await;
                // Through an outage the heartbeats go on; a refused one means the claim is gone.
                if beat.is_err_and(|e| e.code != "unavailable") {
                    return;
                }
            }
        })
    }

    /// SPEC §15: the agent's whole environment (crate::agent): the allow-list, the session
    /// and a worker-only way to Sortie; never this runner's DATABASE_URL or LITELLM_KEY.
    fn session_env(&self) -> Vec<(String, String)> {
        crate::agent::agent_env(
            &self.session(),
            &self.config,
            &self.agent_connection(),
            &crate::config::var,
        )
    }

    fn session(&self) -> crate::agent::Session {
        crate::agent::Session {
            step_id: self.claim.step_id,
            campaign_id: self.claim.campaign_id,
            claim_token: self.claim.token,
        }
    }

    fn agent_connection(&self) -> crate::agent::Connection {
        crate::agent::Connection::for_agents(&self.config, &self.database_url)
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
            // The session, and SORTIE_MCP_URL when set; never a database URL (SPEC §15).
            "env": crate::agent::session_vars(&self.session(), &self.config, &self.agent_connection())
                .into_iter().filter(|(k, _)| k != "DATABASE_URL")
                .map(|(k, v)| (k, Value::String(v))).collect::<serde_json::Map<_, _>>(),
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
            Ok(r) => match r.bytes().await {
                Ok(body) => runtime_answer(&body),
                Err(e) => Outcome::Failed(format!("reading the agent runtime's answer: {e}")),
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
        let connection = self.agent_connection();
        if self.config.worker_database_url.is_none() && self.config.mcp_url.is_none() {
            crate::agent::ensure_agent_login(&self.db).await;
        }
        // SPEC §15: for agent CLIs that start MCP servers with an environment of their own;
        // removed when this dispatch ends (the guard lives to the end of this function).
        let mcp_config = crate::agent::mcp_config(&self.session(), &self.config, &connection);
        let mcp_config = match crate::agent::McpConfigFile::write(self.claim.step_id, &mcp_config) {
            Ok(file) => file,
            Err(e) => {
                return Outcome::Failed(format!("could not write the agent's MCP config: {e}"))
            }
        };
        let mut command = tokio::process::Command::new(&words[0]);
        command
            .args(&words[1..])
            .env_clear()
            .envs(self.session_env())
            .env("SORTIE_MCP_CONFIG", &mcp_config.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: what it leaves running goes with it (checks::finish).
            .process_group(0)
            .kill_on_drop(true);
        // SPEC §17: verify commands run in SORTIE_WORKDIR, so the agent works there too.
        if let Some(dir) = &self.config.workdir {
            command.current_dir(dir);
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
        // Bytes, not strings: an agent printing invalid UTF-8 must not lose its whole output.
        let read_out = tokio::spawn(async move {
            let mut bytes = Vec::new();
            if let Some(o) = stdout.as_mut() {
                let _ = o.read_to_end(&mut bytes).await;
            }
            bytes
        });
        let read_err = tokio::spawn(async move {
            let mut bytes = Vec::new();
            if let Some(e) = stderr.as_mut() {
                let _ = e.read_to_end(&mut bytes).await;
            }
            bytes
        });
        let group = child.id();
        let mut shutdown = self.shutdown.clone();
        let status = tokio::select! {
            s = tokio::time::timeout(self.config.zombie_timeout, child.wait()) => s,
            _ = shutdown.changed() => {
                if let Some(pgid) = group {
                    crate::checks::kill_group(pgid);
                }
                return Outcome::Interrupted;
            }
        };
        // SPEC §13: whatever the agent left running (a server, a background job) is stopped
        // with it, so its output pipes close and the claim is recorded now.
        let (out, err) = crate::checks::finish(group, read_out, read_err).await;
        match status {
            Err(_) => Outcome::Failed(format!(
                "the agent command ran longer than the lease ({} s)",
                self.config.zombie_timeout.as_secs()
            )),
            Ok(Err(e)) => Outcome::Failed(format!("waiting for the agent command: {e}")),
            Ok(Ok(s)) if s.success() => {
                if out.trim().is_empty() && err.trim().is_empty() {
                    Outcome::Silent(SILENT_AGENT.into())
                } else if out.trim().is_empty() {
                    // What it said on stderr is the only clue of what went wrong.
                    Outcome::Silent(format!("{SILENT_AGENT}; its stderr: {}", tail(&err)))
                } else {
                    Outcome::Output {
                        text: out.trim_end().to_string(),
                        tokens_used: 0,
                    }
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
            Outcome::Output { .. } => "output",
            Outcome::Silent(_) => "silent",
            Outcome::Failed(_) => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// Whether a refused record means the step was settled without this dispatch: the agent
/// reported through MCP itself (its claim is then spent), or the claim was reset or skipped.
fn settled_elsewhere(e: &DbError) -> bool {
    matches!(e.code.as_str(), "stale_claim" | "skipped")
}

/// An agent runtime's answer (SPEC §6, §13): `output` completes the step (with the
/// `tokens_used` it reports), `error` fails the attempt, and an answer with neither — or not
/// JSON at all — fails it too rather than leaving the claim to the lease.
fn runtime_answer(body: &[u8]) -> Outcome {
    // Lossy first (SPEC §13): one byte of Latin-1 must not lose the whole answer.
    let answer: Value = match serde_json::from_str(&String::from_utf8_lossy(body)) {
        Ok(v) => v,
        Err(e) => {
            return Outcome::Failed(format!(
                "agent runtime answered with invalid JSON ({e}): {}",
                tail(&crate::checks::text(body))
            ))
        }
    };
    // A count, whether the runtime writes it as an integer, a float or a string of digits.
    let tokens_used = match answer.get("tokens_used") {
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f.round() as i64))
            .unwrap_or(0),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .map(|f| f.round() as i64)
            .unwrap_or(0),
        _ => 0,
    }
    .max(0);
    let text = |v: &Value| match v {
        Value::String(s) => Some(crate::checks::text(s.as_bytes())),
        Value::Null => None,
        other => Some(other.to_string()),
    };
    if let Some(error) = answer
        .get("error")
        .and_then(text)
        .filter(|e| !e.trim().is_empty())
    {
        return Outcome::Failed(format!("agent runtime reported an error: {}", tail(&error)));
    }
    match answer.get("output").and_then(text) {
        Some(output) if !output.trim().is_empty() => Outcome::Output {
            text: output,
            tokens_used,
        },
        _ => Outcome::Silent(
            "agent runtime answered without output or error, and the agent made no report".into(),
        ),
    }
}

/// The end of a text as an error the database can store: at most ERROR_TAIL characters,
/// U+0000 replaced.
fn tail(text: &str) -> String {
    let chars: Vec<char> = text.trim().chars().collect();
    chars[chars.len().saturating_sub(ERROR_TAIL)..]
        .iter()
        .map(|&c| if c == '\0' { '\u{FFFD}' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_bytes_become_storable_text() {
        assert_eq!(crate::checks::text(b"before\0after"), "before\u{FFFD}after");
        assert_eq!(crate::checks::text(b"caf\xe9"), "caf\u{FFFD}");
        assert_eq!(tail("a\0b"), "a\u{FFFD}b");
    }

    #[test]
    fn a_runtime_answer_needs_output_or_error() {
        match runtime_answer(br#"{"output": "done", "tokens_used": 42}"#) {
            Outcome::Output { text, tokens_used } => {
                assert_eq!((text.as_str(), tokens_used), ("done", 42))
            }
            other => panic!("{}", other.name()),
        }
        assert!(matches!(runtime_answer(b"{}"), Outcome::Silent(_)));
        assert!(matches!(
            runtime_answer(br#"{"output": null}"#),
            Outcome::Silent(_)
        ));
        match runtime_answer(br#"{"error": "refused"}"#) {
            Outcome::Failed(e) => assert!(e.contains("refused"), "{e}"),
            other => panic!("{}", other.name()),
        }
        assert!(matches!(runtime_answer(b"not json"), Outcome::Failed(_)));
        for (body, tokens) in [
            (
                &b"{\"output\": \"caf\xe9 ready\", \"tokens_used\": 1500.0}"[..],
                1500,
            ),
            (&b"{\"output\": \"x\", \"tokens_used\": \"42\"}"[..], 42),
            (&b"{\"output\": \"x\", \"tokens_used\": -5}"[..], 0),
        ] {
            match runtime_answer(body) {
                Outcome::Output { text, tokens_used } => {
                    assert!(!text.is_empty());
                    assert_eq!(tokens_used, tokens, "{}", String::from_utf8_lossy(body));
                }
                other => panic!("{}: {}", String::from_utf8_lossy(body), other.name()),
            }
        }
    }
}
