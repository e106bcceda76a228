//! Workflow tools (SPEC §7). The Markdown folder is read here and loaded into the extension,
//! which pins it by hash and decides every move. When a step declares no transitions the
//! extension answers `choice_required`; the planner LLM then picks one of the names the
//! extension lists, and the extension checks the pick. An LLM outage changes nothing: the
//! call fails with `unavailable` and can be made again.

use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{tool, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{schemas, tool_error, SortieServer};
use crate::db::DbError;

const CHOOSER: &str = "You are a workflow orchestrator. From the workflow definition (follow each step's Orchestrator \
Guidance), the instance's state, its recent history and the client's report on the current step, choose the next step. \
Answer with one JSON object only: {\"next_step_name\": one of the valid step names, exactly as listed, \"reasoning\": string}. \
Choose FINISH when the workflow is complete.";

#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartWorkflow {
    /// Name of the workflow (its folder under WORKFLOW_DEFINITIONS_DIR).
    pub workflow_name: String,
    /// Initial context (a JSON object).
    #[serde(default)]
    #[schemars(schema_with = "schemas::free_object")]
    pub context: Option<Value>,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct InstanceId {
    /// Workflow instance id (returned by start_workflow).
    pub instance_id: Uuid,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct AdvanceWorkflow {
    /// Workflow instance id.
    pub instance_id: Uuid,
    /// Outcome of the current step: {"step_id": current step name, "status": e.g. success, "result": ...}.
    #[schemars(schema_with = "schemas::free_object")]
    pub report: Value,
    /// Keys to merge into the instance's context.
    #[serde(default)]
    #[schemars(schema_with = "schemas::free_object")]
    pub context_updates: Option<Value>,
    /// The next step, when the current step declares no transitions; otherwise the planner LLM chooses.
    pub next_step: Option<String>,
    /// Optional: your name for this request (at most 200 characters). Repeating the call with the same
    /// request_id returns the first result with replayed: true and changes nothing; use it when you retry.
    #[schemars(length(max = 200))]
    pub request_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ResumeWorkflow {
    /// Workflow instance id.
    pub instance_id: Uuid,
    /// The step you believe is current.
    pub assumed_current_step_name: String,
    /// Your report; with a status and the right step it advances the instance.
    #[serde(default)]
    #[schemars(schema_with = "schemas::free_object")]
    pub report: Option<Value>,
    /// Keys to merge into the instance's context.
    #[serde(default)]
    #[schemars(schema_with = "schemas::free_object")]
    pub context_updates: Option<Value>,
    /// The next step, when advancing from a step that declares no transitions.
    pub next_step: Option<String>,
}

/// The workflow format, one text for the tool and for WORKFLOW_CREATOR's steps (SPEC §19).
const WORKFLOW_FORMAT: &str =
    include_str!("../../../examples/workflows/WORKFLOW_CREATOR/shared/format.md");

/// The workflows shipped in examples/workflows (SPEC §19).
const BUNDLED_WORKFLOWS: &[&str] = &[
    "CODE_REVIEW",
    "README_FRESHNESS_CHECK",
    "REFACTOR_WITH_TESTS",
    "RESEARCH_FANOUT",
    "WORKFLOW_CREATOR",
];

fn refused(code: &str, message: String) -> CallToolResult {
    tool_error(&DbError {
        code: code.into(),
        message: format!("{code}: {message}"),
    })
}

#[tool_router(router = workflow_router, vis = "pub(super)")]
impl SortieServer {
    #[tool(
        description = "How to write a Markdown workflow (SPEC §7, §19): the folder layout, the two sections of a \
step file, transitions, choices and includes. Returns {howto, examples}: the format in Markdown and the bundled \
example workflows (examples/workflows in the Sortie repository).",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn get_howto_create_workflow(&self) -> CallToolResult {
        CallToolResult::structured(json!({
            "howto": WORKFLOW_FORMAT,
            "examples": BUNDLED_WORKFLOWS,
            "workflows_dir": self.config.workflows_dir.as_ref().map(|d| d.display().to_string()),
        }))
    }

    #[tool(
        description = "The Markdown workflows available to start_workflow, with their goals and step names.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn list_workflows(&self) -> CallToolResult {
        let Some(dir) = &self.config.workflows_dir else {
            return CallToolResult::structured(
                json!({"workflows": [], "hint": "set WORKFLOW_DEFINITIONS_DIR to a folder of workflows"}),
            );
        };
        let names = match crate::workflows::list(dir) {
            Ok(names) => names,
            Err(e) => return refused("invalid_state", e),
        };
        let workflows: Vec<Value> = names
            .iter()
            .map(|name| match crate::workflows::load(dir, name) {
                Ok(def) => json!({
                    "name": name, "goal": def["goal"],
                    "steps": def["steps"].as_array().into_iter().flatten().map(|s| s["name"].clone()).collect::<Vec<_>>(),
                }),
                Err(e) => json!({"name": name, "error": e}),
            })
            .collect();
        CallToolResult::structured(json!({ "workflows": workflows }))
    }

    #[tool(
        description = "Start an instance of a workflow: its definition is pinned as it is now, and the first step's \
client instructions come back. Then do the step and call advance_workflow with your report.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn start_workflow(&self, Parameters(p): Parameters<StartWorkflow>) -> CallToolResult {
        let Some(dir) = &self.config.workflows_dir else {
            return refused(
                "invalid_state",
                "WORKFLOW_DEFINITIONS_DIR is not set: there are no workflows to start".into(),
            );
        };
        let definition = match crate::workflows::load(dir, &p.workflow_name) {
            Ok(def) => def,
            Err(e) => {
                let exists =
                    crate::workflows::list(dir).is_ok_and(|names| names.contains(&p.workflow_name));
                return refused(
                    if exists {
                        "invalid_argument"
                    } else {
                        "not_found"
                    },
                    e,
                );
            }
        };
        let context = p.context.unwrap_or_else(|| json!({}));
        self.call(
            "start_workflow(workflow_name => $1, context => $2, definition => $3, request_id => $4)",
            &[&p.workflow_name, &context, &definition, &p.request_id],
        )
        .await
    }

    #[tool(
        description = "A workflow instance: status, current step and its instructions, context, recent history.",
        annotations(read_only_hint = true, idempotent_hint = true)
    )]
    async fn get_workflow_status(&self, Parameters(p): Parameters<InstanceId>) -> CallToolResult {
        self.call(
            "_get_workflow_status_delegated(instance_id => $1)",
            &[&p.instance_id],
        )
        .await
    }

    #[tool(
        description = "Report the outcome of the current step and get the next one. A transition declared for the \
reported status decides; otherwise next_step, or the planner LLM, chooses among the workflow's steps (or FINISH).",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn advance_workflow(&self, Parameters(p): Parameters<AdvanceWorkflow>) -> CallToolResult {
        let updates = p.context_updates.unwrap_or_else(|| json!({}));
        // Named by its instance (a campaign), the advance runs on the worker holding it on
        // Citus (its twin, docs/scale-out.md); a request_id goes to the public function, which
        // serialises request ids on one node.
        let (function_call, params): (&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) =
            match &p.request_id {
                None => (
                    "_advance_workflow_delegated(instance_id => $1, report => $2, context_updates => $3, next_step => $4)",
                    vec![&p.instance_id, &p.report, &updates],
                ),
                Some(_) => (
                    "advance_workflow(instance_id => $1, report => $2, context_updates => $3, request_id => $4, next_step => $5)",
                    vec![&p.instance_id, &p.report, &updates, &p.request_id],
                ),
            };
        self.move_instance(
            function_call,
            &params,
            p.next_step,
            p.instance_id,
            &p.report,
        )
        .await
    }

    #[tool(
        description = "Reconnect to a workflow instance with the step you believe is current. The stored state wins: \
if your step is current and your report has a status, the instance advances; otherwise you get the current step back.",
        annotations(
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false
        )
    )]
    async fn resume_workflow(&self, Parameters(p): Parameters<ResumeWorkflow>) -> CallToolResult {
        let updates = p.context_updates.unwrap_or_else(|| json!({}));
        let report = p.report.clone().unwrap_or_else(|| json!({}));
        self.move_instance(
            "_resume_workflow_delegated(instance_id => $1, assumed_current_step_name => $2, report => $3, \
             context_updates => $4, next_step => $5)",
            &[
                &p.instance_id,
                &p.assumed_current_step_name,
                &p.report,
                &updates,
            ],
            p.next_step,
            p.instance_id,
            &report,
        )
        .await
    }
}

impl SortieServer {
    /// A move of an instance: `function_call` with `params` and `next_step` as its last
    /// parameter. When the extension answers `choice_required` and a planner is configured, the
    /// planner picks the next step and the same call is made again with it.
    async fn move_instance(
        &self,
        function_call: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
        next_step: Option<String>,
        instance: Uuid,
        report: &Value,
    ) -> CallToolResult {
        let mut all = params.to_vec();
        all.push(&next_step);
        let first = self.try_call(function_call, &all).await;
        let chosen = match self.chosen_step(first, instance, report).await {
            Ok(next) => Some(next),
            Err(result) => return result,
        };
        let mut all = params.to_vec();
        all.push(&chosen);
        self.call(function_call, &all).await
    }

    /// After a first advance: the planner's pick to advance with, when the extension asked for a
    /// choice and a planner is configured; otherwise (Err) the tool result to return as it is.
    async fn chosen_step(
        &self,
        first: Result<Value, DbError>,
        instance: Uuid,
        report: &Value,
    ) -> Result<String, CallToolResult> {
        let error = match first {
            Ok(value) => return Err(CallToolResult::structured(value)),
            Err(e) if e.code == "choice_required" && self.config.has_planner() => e,
            Err(e) => return Err(tool_error(&e)),
        };
        let state = self
            .try_call(
                "_get_workflow_status_delegated(instance_id => $1, with_definition => true)",
                &[&instance],
            )
            .await
            .map_err(|e| tool_error(&e))?;
        if self.config.stub_ai {
            return Ok(stub_choice(&state));
        }
        let prompt = chooser_prompt(&state, report, &error.message);
        match crate::llm::ask_json(&self.http, &self.config, CHOOSER, &prompt).await {
            Ok(answer) => match answer["next_step_name"].as_str() {
                Some(name) => Ok(name.to_string()),
                None => Err(refused(
                    "unavailable",
                    "the planner LLM gave no next_step_name; nothing changed, call again".into(),
                )),
            },
            Err(e) => Err(refused(
                "unavailable",
                format!("the planner LLM could not choose the next step ({e:#}); nothing changed, call again"),
            )),
        }
    }
}

/// The stub chooser (USE_STUB_AI_CLIENT=true): deterministic, the step after the current one
/// in the definition's order, FINISH after the last.
fn stub_choice(state: &Value) -> String {
    let names: Vec<&str> = state["definition"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    let current = state["current_step"]["step_name"]
        .as_str()
        .unwrap_or_default();
    names
        .iter()
        .position(|n| *n == current)
        .and_then(|i| names.get(i + 1))
        .map(|n| n.to_string())
        .unwrap_or_else(|| "FINISH".into())
}

fn chooser_prompt(state: &Value, report: &Value, choices: &str) -> String {
    let mut definition = String::new();
    for step in state["definition"]["steps"]
        .as_array()
        .into_iter()
        .flatten()
    {
        definition.push_str(&format!(
            "\n---\n## Step: {}\n{}\n",
            step["name"].as_str().unwrap_or_default(),
            step["text"]
                .as_str()
                .or(step["instructions"].as_str())
                .unwrap_or_default()
        ));
    }
    format!(
        "WORKFLOW: {}\nGOAL: {}\n{definition}\n---\nCURRENT STEP: {}\nCONTEXT: {}\nRECENT HISTORY: {}\nREPORT: {}\n\
         VALID NEXT STEPS: {}\n({choices})",
        state["workflow_name"],
        state["definition"]["goal"],
        state["current_step"]["step_name"],
        state["context"],
        state["history"],
        report,
        state["valid_next_steps"],
    )
}
