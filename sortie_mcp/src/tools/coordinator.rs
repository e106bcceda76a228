//! Coordinator tools (SPEC §5): create and steer campaigns, give them steps, watch them.

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{schemas, SortieServer};

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CreateCampaign {
    /// What this campaign should accomplish.
    pub goal: String,
    /// Short display name; generated from the goal when omitted.
    #[schemars(length(max = 200))]
    pub name: Option<String>,
    /// Notification channel (for example a Discord channel) for milestones and the end.
    #[schemars(length(max = 200))]
    pub channel: Option<String>,
    /// urgent, high, normal (default), low or background: its share of dispatch slots.
    pub priority: Option<String>,
    /// Deepest nesting spawn_and_continue may reach (default 4).
    pub max_depth: Option<i32>,
    /// Token limit; the campaign pauses when it is used up. Omit for no limit.
    pub token_budget: Option<i64>,
    /// Create it paused, for review; resume_campaign starts it.
    #[serde(default)]
    pub dry_run: bool,
    /// Metric name workers report with notes tagged metric:<name> (for check_success).
    #[schemars(length(max = 200))]
    pub success_metric: Option<String>,
    /// Value the metric must reach.
    pub success_target: Option<f64>,
    /// max (default: higher is better) or min.
    pub success_direction: Option<String>,
    /// Command that measures the metric, for the workers' reference.
    pub benchmark_command: Option<String>,
    /// What is in and out of scope.
    pub scope: Option<String>,
    /// Most measuring rounds to spend.
    pub max_iterations: Option<i32>,
    /// Most steps of this campaign running at once; omit for no cap.
    pub max_parallel: Option<i32>,
    /// llm (default): a planner grows the DAG when it runs dry; none: it ends when its steps are done.
    pub planner: Option<String>,
    /// continue (default) or fail_fast: whether one failure fails the siblings and parent at once.
    pub failure_policy: Option<String>,
    /// Initial steps, in the add_steps format.
    #[serde(default)]
    #[schemars(schema_with = "schemas::step_list")]
    pub steps: Option<Value>,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListCampaigns {
    /// active, paused, done, failed or cancelled; omit for all.
    pub status: Option<String>,
    /// Page size (default 20, at most 200).
    pub limit: Option<i32>,
    /// next_cursor from the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CampaignId {
    /// Campaign UUID.
    pub id: Uuid,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct GetCampaign {
    /// Campaign UUID.
    pub id: Uuid,
    /// Steps per page (default 100, at most 500), in id order.
    pub steps_limit: Option<i32>,
    /// next_steps_cursor from the previous page.
    pub steps_cursor: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct GetUpdates {
    /// Campaign UUID; omit for updates across all campaigns.
    pub id: Option<Uuid>,
    /// Your reader name: each consumer has its own cursor (default "coordinator").
    pub consumer: Option<String>,
    /// Events to read at most (default 100, at most 1000); has_more says there are more.
    pub limit: Option<i32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct SteerCampaign {
    /// Campaign UUID.
    pub id: Uuid,
    /// New direction, constraints or focus; kept beside the planner's strategy, never overwritten.
    pub guidance: String,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct CancelCampaign {
    /// Campaign UUID.
    pub id: Uuid,
    /// Why (kept as the status reason).
    pub reason: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ProvideInput {
    /// Campaign UUID.
    pub id: Uuid,
    /// The step waiting for input (listed by get_updates under waiting_inputs).
    pub step_id: i64,
    /// Your decision or the information the worker asked for.
    pub answer: String,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AddSteps {
    /// Campaign UUID.
    pub campaign_id: Uuid,
    /// Step objects. Atomic: {action, agent?, input?, key?, depends_on?, failure_policy?, max_attempts?,
    /// requires_locks?}. Compound: {step_type: "sequence", action, steps: [...]},
    /// {step_type: "parallel_group", action, children: [...], completion_threshold?},
    /// {step_type: "for_each", action, items: [...], template: {step with {item} / {item.field}}, collect?: {step}}.
    /// depends_on holds keys of steps in this call (strings) or ids of existing steps (integers).
    #[schemars(schema_with = "schemas::step_list")]
    pub steps: Value,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[tool_router(router = coordinator_router, vis = "pub(super)")]
impl SortieServer {
    #[tool(
        description = "Create a campaign for long-running, multi-step work. Returns its id, name and status. \
Next: add_steps to give it a DAG (or let the planner grow one), then get_updates to follow it.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn create_campaign(&self, Parameters(p): Parameters<CreateCampaign>) -> CallToolResult {
        self.call(
            "create_campaign(goal => $1, name => $2, channel => $3, priority => coalesce($4, 'normal'), \
             max_depth => coalesce($5, 4), token_budget => $6, dry_run => $7, success_metric => $8, \
             success_target => $9, success_direction => coalesce($10, 'max'), benchmark_command => $11, scope => $12, \
             max_iterations => $13, max_parallel => $14, planner => coalesce($15, 'llm'), \
             failure_policy => coalesce($16, 'continue'), steps => $17, plan_delay => $18, request_id => $19)",
            &[&p.goal, &p.name, &p.channel, &p.priority, &p.max_depth, &p.token_budget, &p.dry_run, &p.success_metric,
              &p.success_target, &p.success_direction, &p.benchmark_command, &p.scope, &p.max_iterations,
              &p.max_parallel, &p.planner, &p.failure_policy, &p.steps, &self.config.plan_delay.as_secs_f64(), &p.request_id],
        )
        .await
    }

    #[tool(
        description = "List campaigns, newest first, optionally by status. Returns {campaigns: [{id, name, status, \
priority, progress, open_steps}], next_cursor}; pass next_cursor back for the next page.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn list_campaigns(&self, Parameters(p): Parameters<ListCampaigns>) -> CallToolResult {
        self.call(
            "list_campaigns(status => $1, \"limit\" => coalesce($2, 20), cursor => $3)",
            &[&p.status, &p.limit, &p.cursor],
        )
        .await
    }

    #[tool(
        description = "Full campaign state: goal, strategy, guidance, progress, counters, one page of the step tree \
(steps_limit, default 100) and the newest notes. When next_steps_cursor is set, pass it as steps_cursor for the next page.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn get_campaign(&self, Parameters(p): Parameters<GetCampaign>) -> CallToolResult {
        let mut limit = p.steps_limit.unwrap_or(100).clamp(1, 500);
        loop {
            let result = self
                .call(
                    "_get_campaign_delegated(id => $1, steps_limit => $2, steps_cursor => $3)",
                    &[&p.id, &limit, &p.steps_cursor],
                )
                .await;
            // SPEC §14: by default a page stays under 100,000 characters, however long the
            // steps' actions are; a smaller page is asked for until it does.
            let chars = result
                .structured_content
                .as_ref()
                .map_or(0, |v| v.to_string().len());
            if p.steps_limit.is_some() || chars <= super::RESULT_LIMIT_CHARS || limit == 1 {
                return result;
            }
            limit /= 2;
        }
    }

    #[tool(
        description = "What happened since your last call: completed, failed, retrying and skipped steps, new notes, \
campaign events, and every step waiting for your input. Omit id for all campaigns.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn get_updates(&self, Parameters(p): Parameters<GetUpdates>) -> CallToolResult {
        // SPEC §14: a page of 100 events keeps the answer bounded (previews are at most a few
        // hundred characters each); has_more says to call again.
        let limit = p.limit.unwrap_or(100).clamp(1, 1000);
        // An absent consumer stays absent: the extension's default decides.
        match &p.consumer {
            Some(consumer) => {
                self.call(
                    "get_updates(id => $1, consumer => $2, \"limit\" => $3)",
                    &[&p.id, consumer, &limit],
                )
                .await
            }
            None => {
                self.call("get_updates(id => $1, \"limit\" => $2)", &[&p.id, &limit])
                    .await
            }
        }
    }

    #[tool(
        description = "Change a campaign's direction: your guidance is kept for the planner and never overwritten by it.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn steer_campaign(&self, Parameters(p): Parameters<SteerCampaign>) -> CallToolResult {
        self.call_twin_unless_request(
            "_steer_campaign_delegated(id => $1, guidance => $2)",
            "steer_campaign(id => $1, guidance => $2, request_id => $3)",
            &[&p.id, &p.guidance],
            &p.request_id,
        )
        .await
    }

    #[tool(
        description = "Pause a campaign: running steps finish, no new ones start. resume_campaign continues it.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn pause_campaign(&self, Parameters(p): Parameters<CampaignId>) -> CallToolResult {
        self.call("_pause_campaign_delegated(id => $1)", &[&p.id])
            .await
    }

    #[tool(
        description = "Resume a paused campaign.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn resume_campaign(&self, Parameters(p): Parameters<CampaignId>) -> CallToolResult {
        self.call("_resume_campaign_delegated(id => $1)", &[&p.id])
            .await
    }

    #[tool(
        description = "Cancel a campaign: every step not yet finished is skipped and running workers lose their claims.",
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false
        )
    )]
    async fn cancel_campaign(&self, Parameters(p): Parameters<CancelCampaign>) -> CallToolResult {
        self.call(
            "_cancel_campaign_delegated(id => $1, reason => $2)",
            &[&p.id, &p.reason],
        )
        .await
    }

    #[tool(
        description = "Answer a step that asked for input (see get_updates.waiting_inputs). The step is dispatched \
again with its original input, the question and your answer.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn provide_input(&self, Parameters(p): Parameters<ProvideInput>) -> CallToolResult {
        self.call_twin_unless_request(
            "_provide_input_delegated(id => $1, step_id => $2, answer => $3)",
            "provide_input(id => $1, step_id => $2, answer => $3, request_id => $4)",
            &[&p.id, &p.step_id, &p.answer],
            &p.request_id,
        )
        .await
    }

    #[tool(
        description = "Evaluate the campaign's success contract: {met, reason, metric_value, target, iterations_used, \
max_iterations}. Workers report the metric with add_note(tags=['metric:<name>'], content='<name>=<value>').",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn check_success(&self, Parameters(p): Parameters<CampaignId>) -> CallToolResult {
        self.call("_check_success_delegated(id => $1)", &[&p.id])
            .await
    }

    #[tool(
        description = "Give a campaign steps: atomic, sequence, parallel_group and for_each, with dependencies. The whole \
call is validated first; unknown types, missing actions, unknown dependencies and cycles change nothing. Returns \
{step_ids, keys, created, duplicates}.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn add_steps(&self, Parameters(p): Parameters<AddSteps>) -> CallToolResult {
        self.call_twin_unless_request(
            "_add_steps_delegated(campaign_id => $1, steps => $2)",
            "add_steps(campaign_id => $1, steps => $2, request_id => $3)",
            &[&p.campaign_id, &p.steps],
            &p.request_id,
        )
        .await
    }
}
