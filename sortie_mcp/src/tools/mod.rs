//! The MCP server (SPEC §5). Each tool parses its parameters, makes one call of an extension
//! function and returns its JSON; no DAG decision is made here.

mod coordinator;
mod worker;
mod workflows;

use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{tool_handler, ErrorData, RoleServer, ServerHandler};
use serde_json::json;
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;

use crate::config::{Config, Role};
use crate::db::{Db, DbError};
use crate::embed::Embedder;

const INSTRUCTIONS: &str = "Sortie orchestrates campaigns: a goal and a DAG of steps. Coordinators create campaigns \
(create_campaign, add_steps), watch them (get_updates, get_campaign) and steer them. Workers execute one claimed step: \
get_my_context first, then add_note for findings, and finish with complete_step, fail_step, request_input, \
spawn_and_continue or abort_branch. Markdown workflows: list_workflows, start_workflow, then advance_workflow \
with a report on each step. Errors start with a stable code such as not_found or stale_claim.";

#[derive(Clone)]
pub struct SortieServer {
    config: Arc<Config>,
    db: Arc<OnceCell<Db>>,
    embedder: Arc<Embedder>,
    /// For the planner LLM (workflow choices).
    http: reqwest::Client,
    tool_router: ToolRouter<SortieServer>,
}

impl SortieServer {
    pub fn new(config: Config) -> Self {
        let mut tool_router = match config.role {
            Role::Coordinator => Self::coordinator_router() + Self::workflow_router(),
            Role::Worker => Self::worker_router(),
            Role::Both => {
                Self::coordinator_router() + Self::workflow_router() + Self::worker_router()
            }
        };
        // Pull-mode workers claim their own steps; coordinators add steps.
        if config.role == Role::Coordinator {
            tool_router.remove_route("claim_next");
        }
        let http = reqwest::Client::new();
        let embedder = Arc::new(Embedder::from_config(&config, http.clone()));
        Self {
            config: Arc::new(config),
            db: Arc::new(OnceCell::new()),
            embedder,
            http,
            tool_router,
        }
    }

    /// Connected on first use, so that initialize and tools/list never wait for the database.
    async fn db(&self) -> Result<&Db, DbError> {
        self.db
            .get_or_try_init(|| async {
                Db::connect(&self.config)
                    .await
                    .map_err(|e| DbError::unavailable(format!("{e:#}")))
            })
            .await
    }

    /// One extension call.
    async fn try_call(
        &self,
        function_call: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<serde_json::Value, DbError> {
        self.db().await?.call(function_call, params).await
    }

    /// One extension call, shaped as a tool result.
    async fn call(&self, function_call: &str, params: &[&(dyn ToSql + Sync)]) -> CallToolResult {
        match self.try_call(function_call, params).await {
            Ok(value) => CallToolResult::structured(value),
            Err(e) => tool_error(&e),
        }
    }

    fn session_step(&self, step_id: Option<i64>) -> Option<i64> {
        step_id.or(self.config.step_id)
    }

    fn session_campaign(&self, campaign_id: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
        campaign_id.or(self.config.campaign_id)
    }

    fn session_token(&self, claim_token: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
        claim_token.or(self.config.claim_token)
    }

    /// SPEC §3 depth limit: a worker session whose step is at max depth does not see
    /// spawn_and_continue. The extension refuses the splice either way.
    async fn session_at_max_depth(&self) -> bool {
        let Some(step) = self.config.step_id else {
            return false;
        };
        let Ok(db) = self.db().await else {
            return false;
        };
        let Ok(client) = db.client().await else {
            return false;
        };
        let sql = format!(
            "SELECT s.depth >= c.max_depth FROM {schema}.steps s JOIN {schema}.campaigns c ON c.id = s.campaign_id WHERE s.id = $1",
            schema = db.schema()
        );
        matches!(client.query_opt(&sql, &[&step]).await, Ok(Some(row)) if row.get::<_, bool>(0))
    }
}

pub fn tool_error(e: &DbError) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(e.to_string())]);
    result.structured_content = Some(json!({"error": {"code": e.code, "message": e.message}}));
    result
}

/// A refusal decided before calling the database (a missing session value).
pub fn missing(what: &str) -> CallToolResult {
    tool_error(&DbError {
        code: "invalid_argument".into(),
        message: format!("invalid_argument: {what}"),
    })
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SortieServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(INSTRUCTIONS.to_string())
    }

    /// Arguments that do not fit a tool's schema come back from rmcp as an untyped tool error;
    /// they get the stable code `invalid_argument` like every other refusal.
    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let call = ToolCallContext::new(self, request, context);
        Ok(match self.tool_router.call(call).await? {
            CallToolResponse::Complete(result)
                if result.is_error == Some(true) && result.structured_content.is_none() =>
            {
                let text: String = result
                    .content
                    .iter()
                    .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                    .collect();
                tool_error(&DbError {
                    code: "invalid_argument".into(),
                    message: format!("invalid_argument: {text}"),
                })
                .into()
            }
            other => other,
        })
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let mut tools = self.tool_router.list_all();
        if self.config.role != Role::Coordinator && self.session_at_max_depth().await {
            tools.retain(|t| t.name != "spawn_and_continue");
        }
        Ok(ListToolsResult::with_all_items(tools))
    }
}
