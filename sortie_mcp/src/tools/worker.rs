//! Worker tools (SPEC §5): read context, leave notes, and finish the claimed step. Ids and the
//! claim token fall back to the session (SORTIE_STEP_ID, SORTIE_CAMPAIGN_ID, SORTIE_CLAIM_TOKEN).

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{missing, schemas, tool_error, Binding, SortieServer};

const NO_STEP: &str = "step_id is required: pass it, or run the server with SORTIE_STEP_ID set";
const NO_CAMPAIGN: &str =
    "campaign_id is required: pass it, or run the server with SORTIE_CAMPAIGN_ID set";
const NO_TOKEN: &str = "claim_token is required: pass the token claim_next returned, or run with SORTIE_CLAIM_TOKEN set";

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StepOnly {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ReadStepOutput {
    /// The step to read: any step of your campaign.
    pub step_id: i64,
    /// Character offset to start at (default 0).
    pub offset: Option<i32>,
    /// Characters to return (default 8000, at most 32000).
    pub limit: Option<i32>,
    /// output (default) or input.
    pub field: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct Heartbeat {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// New lease length in seconds (default 900).
    pub extend_leases_sec: Option<i32>,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AddNote {
    /// Campaign UUID (defaults to the session's).
    pub campaign_id: Option<Uuid>,
    /// What you found. Be specific.
    #[schemars(length(max = 100000))]
    pub content: String,
    /// Tags for filtering, e.g. ["finding"], or ["metric:accuracy"] with content "accuracy=0.91".
    #[serde(default)]
    #[schemars(schema_with = "schemas::tags")]
    pub tags: Vec<String>,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct GetNotes {
    /// Campaign UUID (defaults to the session's).
    pub campaign_id: Option<Uuid>,
    /// Only notes with any of these tags.
    #[serde(default)]
    #[schemars(schema_with = "schemas::tags")]
    pub tags: Option<Vec<String>>,
    /// Only notes of this step.
    pub step_id: Option<i64>,
    /// Notes per page (default 20, at most 100).
    pub limit: Option<i32>,
    /// next_cursor from the previous page.
    pub cursor: Option<String>,
    /// Characters of each note's content to return (default 1000, at most 100000); content_chars
    /// gives the whole length.
    pub preview_chars: Option<i32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SearchNotes {
    /// What to look for, in your own words.
    pub query: String,
    /// Campaign UUID; omit to search every campaign.
    pub campaign_id: Option<Uuid>,
    /// Number of results (default 5, at most 50).
    pub top_k: Option<i32>,
    /// Only notes with any of these tags.
    #[serde(default)]
    #[schemars(schema_with = "schemas::tags")]
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CompleteStep {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// What you accomplished: this is the step's output, read by the steps after it.
    #[serde(default)]
    pub summary: String,
    /// Tokens you spent, charged to the campaign's budget.
    pub tokens_used: Option<i64>,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FailStep {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// Why it failed.
    #[serde(default)]
    pub error: String,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RequestInput {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// The decision or information you need.
    pub question: String,
    /// What you have so far, kept with the step.
    pub partial_output: Option<String>,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SpawnAndContinue {
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// What you have done so far; becomes your step's output.
    #[serde(default)]
    pub partial_output: String,
    /// The work that must happen first: [{action, agent?, input?}, ...] (add_steps shapes are accepted too).
    #[schemars(schema_with = "schemas::step_list")]
    pub subtasks: Value,
    /// The action of the step that resumes your work once every subtask is done (a string, or {action, agent?, input?}).
    #[schemars(schema_with = "schemas::continuation")]
    pub continuation: Value,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AbortBranch {
    /// The ancestor step to return from.
    pub target_id: i64,
    /// The result the target step completes with (e.g. "approach debunked by X").
    pub output: String,
    /// Why this branch is pointless; kept as a note tagged abort.
    pub reason: String,
    /// Your step id (defaults to the session's).
    pub step_id: Option<i64>,
    /// Your claim token (defaults to the session's).
    pub claim_token: Option<Uuid>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ClaimNext {
    /// Your agent name: you get steps for this agent or for no agent in particular.
    #[schemars(length(max = 200))]
    pub agent: Option<String>,
    /// Only this campaign.
    pub campaign_id: Option<Uuid>,
    /// Lease length in seconds (default 900); call heartbeat before it runs out.
    pub lease_seconds: Option<i32>,
}

/// Characters of a note shown in a search hit; get_notes(preview_chars) reads more.
const HIT_PREVIEW_CHARS: usize = 1000;

/// SPEC §14: a search result stays bounded (50 hits of 100,000-character notes would not):
/// each hit's content is cut to a preview, with its whole length beside it.
fn preview_hits(value: &mut Value) {
    for hit in value["results"].as_array_mut().into_iter().flatten() {
        let Some(content) = hit["content"].as_str() else {
            continue;
        };
        let chars = content.chars().count();
        if chars > HIT_PREVIEW_CHARS {
            let preview: String = content.chars().take(HIT_PREVIEW_CHARS).collect();
            hit["content"] = Value::String(preview);
            hit["content_chars"] = chars.into();
            hit["truncated"] = true.into();
        }
    }
}

#[tool_router(router = worker_router, vis = "pub(super)")]
impl SortieServer {
    #[tool(
        description = "Your step's context: campaign goal, your task and input, upstream outputs as previews (head + \
tail + total length; read_step_output reads the rest), any question and answer, and the newest notes. Call this first.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn get_my_context(&self, Parameters(p): Parameters<StepOnly>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let token = match self.read_token(None) {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        let (head, tail) = (self.config.preview_head, self.config.preview_tail);
        self.call_for_step(
            step,
            "_get_my_context_delegated(campaign_id => $1, step_id => $2, head => $3, tail => $4, claim_token => $5)",
            "get_my_context(step_id => $1, head => $2, tail => $3, claim_token => $4)",
            &[&step, &head, &tail, &token],
        )
        .await
    }

    #[tool(
        description = "Read a range of a step's output (or input) by character offset: the counterpart of the previews \
in get_my_context. Any step of your campaign is readable.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn read_step_output(&self, Parameters(p): Parameters<ReadStepOutput>) -> CallToolResult {
        let session = self.binding();
        let token = match self.read_token(None) {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        self.call(
            "read_step_output(step_id => $1, \"offset\" => coalesce($2, 0), \"limit\" => coalesce($3, 8000), \
             field => coalesce($4, 'output'), campaign_id => $5, reader_step_id => $6, claim_token => $7)",
            &[&p.step_id, &p.offset, &p.limit, &p.field, &session.campaign_id, &session.step_id, &token],
        )
        .await
    }

    #[tool(
        description = "Report that you are still working: extends your claim's lease (default 900 s). Long-running \
workers call this every few minutes; a step whose lease runs out is reset and your claim becomes stale.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true
        )
    )]
    async fn heartbeat(&self, Parameters(p): Parameters<Heartbeat>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        let extend = p.extend_leases_sec.unwrap_or(900);
        self.call_for_step(
            step,
            "_heartbeat_delegated(campaign_id => $1, step_id => $2, claim_token => $3, extend_leases_sec => $4)",
            "heartbeat(step_id => $1, claim_token => $2, extend_leases_sec => $3)",
            &[&step, &token, &extend],
        )
        .await
    }

    #[tool(
        description = "Record a finding. Notes are shared with every step of the campaign and searchable. Returns the \
note id. For metrics use tags ['metric:<name>'] and content '<name>=<value>'.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn add_note(&self, Parameters(p): Parameters<AddNote>) -> CallToolResult {
        let Some(campaign) = self.session_campaign(p.campaign_id) else {
            return missing(NO_CAMPAIGN);
        };
        let step = self.binding().step_id;
        let token = match self.read_token(None) {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        // SPEC §18: the note is stored at once and embedded just after, off the request path
        // (embed::BackgroundEmbedder); until then the answer's similar notes share its words.
        // Named by its campaign (on Citus it then runs on the worker holding the campaign,
        // docs/scale-out.md) when the session's claim, if any, is of that campaign; a
        // request_id goes to add_note, which serialises request ids on one node.
        let binding = self.binding();
        let named = p.request_id.is_none()
            && (token.is_none() || (step.is_some() && binding.campaign_id == Some(campaign)));
        let stored = if named {
            self.try_call(
                "_add_note_delegated(campaign_id => $1, content => $2, tags => $3, step_id => $4, claim_token => $5)",
                &[&campaign, &p.content, &p.tags, &step, &token],
            )
            .await
        } else {
            self.try_call(
                "add_note(campaign_id => $1, content => $2, tags => $3, step_id => $4, request_id => $5, \
                 claim_token => $6)",
                &[&campaign, &p.content, &p.tags, &step, &p.request_id, &token],
            )
            .await
        };
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => return tool_error(&e),
        };
        if let (Some(note_id), Some(false)) =
            (stored["note_id"].as_i64(), stored["embedded"].as_bool())
        {
            if let Ok(db) = self.db().await {
                self.background.queue(db, note_id, p.content.clone());
            }
        }
        CallToolResult::structured(stored)
    }

    #[tool(
        description = "List notes, newest first, filtered by tags (any of) or step: one page (limit, default 20) of \
previews (preview_chars, default 1000; content_chars is the whole length). When next_cursor is set, pass it as cursor \
for the next page.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn get_notes(&self, Parameters(p): Parameters<GetNotes>) -> CallToolResult {
        let Some(campaign) = self.session_campaign(p.campaign_id) else {
            return missing(NO_CAMPAIGN);
        };
        let token = match self.read_token(None) {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        let limit = p.limit.unwrap_or(20).clamp(1, 100);
        let preview = p.preview_chars.unwrap_or(1000).clamp(1, 100_000);
        // Named by its campaign: on Citus it runs on the worker holding the campaign.
        self.call(
            "_get_notes_delegated(campaign_id => $1, tags => $2, step_id => $3, \"limit\" => $4, cursor => $5, \
             preview_chars => $6, claim_token => $7)",
            &[&campaign, &p.tags, &p.step_id, &limit, &p.cursor, &preview, &token],
        )
        .await
    }

    #[tool(
        description = "Search notes by meaning and words, in one campaign or all. Returns ranked hits (at most 50), each \
with score, mode and a preview of the note (content_chars is its whole length; get_notes reads more).",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn search_notes(&self, Parameters(p): Parameters<SearchNotes>) -> CallToolResult {
        // SPEC §14: results stay bounded; 50 hits of note previews fit.
        let top_k = p.top_k.unwrap_or(5).clamp(1, 50);
        let token = match self.read_token(None) {
            Ok(token) => token,
            Err(refusal) => return refusal,
        };
        // What this server stored is searchable by meaning once its embedding landed (SPEC §18).
        self.background
            .settled(std::time::Duration::from_secs(5))
            .await;
        let embedded = self.embedder.embed(std::slice::from_ref(&p.query)).await;
        let vector = embedded
            .vectors
            .into_iter()
            .next()
            .map(pgvector::Vector::from);
        let mut result = self
            .call(
                "search_notes(query => $1, campaign_id => $2, top_k => $3, tags => $4, query_embedding => $5, embedding_model => $6, \
                 claim_token => $7)",
                &[&p.query, &p.campaign_id, &top_k, &p.tags, &vector, &embedded.model, &token],
            )
            .await;
        if result.is_error == Some(true) {
            return result;
        }
        let Some(mut value) = result.structured_content.take() else {
            return result;
        };
        if embedded.degraded {
            value["embedder"] = serde_json::json!({"model": embedded.model, "degraded": true,
                "note": "the embedding service failed; the offline embedder answered"});
        }
        preview_hits(&mut value);
        // Built again so that the text content carries the same JSON.
        CallToolResult::structured(value)
    }

    #[tool(
        description = "Finish your step with a summary of what you accomplished (its output). If the step was skipped \
while you worked, the answer says so and nothing else changes.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn complete_step(&self, Parameters(p): Parameters<CompleteStep>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        let tokens = p.tokens_used.unwrap_or(0);
        let answer = match self
            .try_call_for_step(
                step,
                "_complete_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3, summary => $4, \
                 tokens_used => $5)",
                "complete_step(step_id => $1, claim_token => $2, summary => $3, tokens_used => $4)",
                &[&step, &token, &p.summary, &tokens],
            )
            .await
        {
            Ok(answer) => answer,
            Err(e) => return tool_error(&e),
        };
        if answer["verification"] != "pending" {
            return self.claim_over(step, token, CallToolResult::structured(answer));
        }
        // SPEC §17: whoever completes runs the step's check; over MCP that is this server, in
        // the worker's environment (an agent's sortie-mcp inherits the agent's). The claim's
        // lease is first made to outlast the check, so a passing check is not lost to it.
        let lease = (self.config.verify_timeout.as_secs() + 60).min(604_800) as i32;
        if let Err(e) = self
            .try_call_for_step(
                step,
                "_heartbeat_delegated(campaign_id => $1, step_id => $2, claim_token => $3, extend_leases_sec => $4)",
                "heartbeat(step_id => $1, claim_token => $2, extend_leases_sec => $3)",
                &[&step, &token, &lease],
            )
            .await
        {
            return tool_error(&e);
        }
        let run = crate::checks::run(
            answer["verify"].as_str().unwrap_or_default(),
            self.config.workdir.as_deref(),
            &[],
            false,
            self.config.verify_timeout,
        )
        .await;
        let (passed, report) = (run.passed(), run.report());
        let recorded = self
            .call_for_step(
                step,
                "_record_verification_delegated(campaign_id => $1, step_id => $2, claim_token => $3, passed => $4, \
                 output => $5)",
                "record_verification(step_id => $1, claim_token => $2, passed => $3, output => $4)",
                &[&step, &token, &passed, &report],
            )
            .await;
        self.claim_over(step, token, recorded)
    }

    #[tool(
        description = "Report that you cannot complete your step. It is retried with back-off while attempts remain; \
then it fails and the steps depending on it are skipped.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn fail_step(&self, Parameters(p): Parameters<FailStep>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        let failed = self
            .call_for_step(
                step,
                "_fail_step_delegated(campaign_id => $1, step_id => $2, claim_token => $3, error => $4)",
                "fail_step(step_id => $1, claim_token => $2, error => $3)",
                &[&step, &token, &p.error],
            )
            .await;
        self.claim_over(step, token, failed)
    }

    #[tool(
        description = "Pause your step and ask the coordinator a question (a fork needing judgement, a risky action, \
unclear requirements). The step waits until provide_input; then it is dispatched again with the answer.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn request_input(&self, Parameters(p): Parameters<RequestInput>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        let asked = self
            .call_for_step(
                step,
                "_request_input_delegated(campaign_id => $1, step_id => $2, claim_token => $3, question => $4, \
                 partial_output => $5)",
                "request_input(step_id => $1, claim_token => $2, question => $3, partial_output => $4)",
                &[&step, &token, &p.question, &p.partial_output],
            )
            .await;
        self.claim_over(step, token, asked)
    }

    #[tool(
        description = "Split your work: spawn subtasks and a continuation that resumes once they are done. Your step \
completes with partial_output and everything that waited for it waits for the continuation. Hidden at max depth.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn spawn_and_continue(
        &self,
        Parameters(p): Parameters<SpawnAndContinue>,
    ) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        // The session's own step is named by its campaign (on Citus the splice then runs on
        // the worker holding it); a request_id goes to spawn_and_continue, which serialises
        // request ids on one node.
        let spliced = match self.own_campaign(step).filter(|_| p.request_id.is_none()) {
            Some(campaign) => {
                self.call(
                    "_spawn_and_continue_delegated(campaign_id => $1, step_id => $2, claim_token => $3, subtasks => $4, \
                     continuation => $5, partial_output => $6)",
                    &[&campaign, &step, &token, &p.subtasks, &p.continuation, &p.partial_output],
                )
                .await
            }
            None => {
                self.call(
                    "spawn_and_continue(step_id => $1, claim_token => $2, subtasks => $3, continuation => $4, \
                     partial_output => $5, request_id => $6)",
                    &[&step, &token, &p.subtasks, &p.continuation, &p.partial_output, &p.request_id],
                )
                .await
            }
        };
        self.claim_over(step, token, spliced)
    }

    #[tool(
        description = "Early return from an ancestor step when its whole branch is pointless: the target completes with \
your output, everything still open under it is skipped, your step completes with the reason (also kept as a note).",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false
        )
    )]
    async fn abort_branch(&self, Parameters(p): Parameters<AbortBranch>) -> CallToolResult {
        let Some(step) = self.session_step(p.step_id) else {
            return missing(NO_STEP);
        };
        let Some(token) = self.session_token(p.claim_token) else {
            return missing(NO_TOKEN);
        };
        let aborted = self
            .call_for_step(
                step,
                "_abort_branch_delegated(campaign_id => $1, target_id => $2, claim_token => $3, step_id => $4, output => $5, \
                 reason => $6)",
                "abort_branch(target_id => $1, claim_token => $2, step_id => $3, output => $4, reason => $5)",
                &[&p.target_id, &token, &step, &p.output, &p.reason],
            )
            .await;
        self.claim_over(step, token, aborted)
    }

    #[tool(
        description = "Pull mode: claim the best ready step for your agent name. Returns {step_id, campaign_id, action, \
agent, depth, claim_token, lease_expires_at}, or {step_id: null} when nothing is ready. Pass the claim_token to the \
worker calls for that step.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn claim_next(&self, Parameters(p): Parameters<ClaimNext>) -> CallToolResult {
        let lease = p.lease_seconds.unwrap_or(900);
        let owner = self.config.owner.clone();
        // SPEC §15: a session given a step claims only within that step's campaign, by its
        // claim (checked in the extension); a session that claimed its own step may claim again.
        let session = self.binding();
        let token = session.claim_token.filter(|_| session.assigned);
        // A claim in a known campaign is named by it: on Citus it then runs on the worker
        // holding the campaign (docs/scale-out.md). The campaign is the one asked for, or the
        // assigned session's own; a session asking for another campaign than its own goes to
        // claim_next, which refuses it. A step with lock keys is claimed through claim_next
        // (the twin says so): lock keys are serialised on the coordinator. Whatever the twins
        // leave (nothing ready in the campaigns tried, a race) claim_next settles.
        let campaign = match (p.campaign_id, token) {
            (Some(asked), Some(_)) => Some(asked).filter(|c| session.campaign_id == Some(*c)),
            (Some(asked), None) => Some(asked),
            (None, Some(_)) => session.campaign_id,
            (None, None) => None,
        };
        // Without a campaign, on Citus: the campaigns in claim_next's fair-share order first
        // (one read across campaigns), then the claim inside each in turn, on its worker.
        let candidates: Vec<Uuid> = match campaign {
            Some(campaign) => vec![campaign],
            None if self.picks_campaign_first.get() == Some(&false) => Vec::new(),
            None => match self.try_call("_claim_candidates()", &[]).await {
                Ok(serde_json::Value::Null) => {
                    let _ = self.picks_campaign_first.set(false);
                    Vec::new()
                }
                Ok(list) => {
                    let _ = self.picks_campaign_first.set(true);
                    list.as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.as_str().and_then(|c| Uuid::parse_str(c).ok()))
                        .collect()
                }
                Err(e) => return tool_error(&e),
            },
        };
        let campaign_unnamed = campaign.is_none();
        let mut delegated = None;
        for campaign in candidates {
            match self
                .try_call(
                    "_claim_next_delegated(campaign_id => $1, owner => $2, agent => $3, lease_seconds => $4, \
                     claim_token => $5)",
                    &[&campaign, &owner, &p.agent, &lease, &token],
                )
                .await
            {
                // Lock keys are claim_next's (on the coordinator).
                Ok(answer) if answer["reason"] == "lock_keys" => break,
                // Nothing for this agent there: the next campaign (a named one's answer stands).
                Ok(answer) if answer["step_id"].is_null() && campaign_unnamed => continue,
                Ok(answer) => {
                    delegated = Some(answer);
                    break;
                }
                Err(e) => return tool_error(&e),
            }
        }
        let answer = match delegated {
            Some(answer) => answer,
            None => match self
                .try_call(
                    "claim_next(owner => $1, agent => $2, campaign_id => $3, lease_seconds => $4, claim_token => $5)",
                    &[&owner, &p.agent, &p.campaign_id, &lease, &token],
                )
                .await
            {
                Ok(answer) => answer,
                Err(e) => return tool_error(&e),
            },
        };
        if let (Some(step_id), Some(campaign_id), Some(claim_token)) = (
            answer["step_id"].as_i64(),
            answer["campaign_id"]
                .as_str()
                .and_then(|c| Uuid::parse_str(c).ok()),
            answer["claim_token"]
                .as_str()
                .and_then(|t| Uuid::parse_str(t).ok()),
        ) {
            self.bind(Binding {
                step_id: Some(step_id),
                campaign_id: Some(campaign_id),
                claim_token: Some(claim_token),
                assigned: session.assigned,
                claim_over: false,
            });
        }
        CallToolResult::structured(answer)
    }
}
