//! The MCP server (SPEC §5). Each tool parses its parameters, makes one call of an extension
//! function and returns its JSON; no DAG decision is made here.

pub mod arguments;
mod coordinator;
pub mod schemas;
mod worker;
mod workflows;

use std::collections::HashMap;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
// SPEC §14 asks for logging/setLevel, which the protocol has since deprecated (SEP-2577).
#[allow(deprecated)]
use rmcp::model::SetLevelRequestParams;
use rmcp::service::RequestContext;
use rmcp::{tool_handler, ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;

use crate::config::{Config, Role};
use crate::db::{Db, DbError};
use crate::embed::{BackgroundEmbedder, Embedder};

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
    /// Embeds stored notes off the request path (SPEC §18).
    background: Arc<BackgroundEmbedder>,
    /// For the planner LLM (workflow choices).
    http: reqwest::Client,
    tool_router: ToolRouter<SortieServer>,
    /// Each tool's input schema as schemars wrote it: what `arguments::prepare` reads.
    raw_schemas: Arc<HashMap<String, serde_json::Map<String, serde_json::Value>>>,
    /// This session's resource subscriptions (SPEC §16, crate::resources).
    subscriptions: crate::resources::Subscriptions,
    /// The step this session works on (SPEC §15): from SORTIE_STEP_ID, SORTIE_CAMPAIGN_ID and
    /// SORTIE_CLAIM_TOKEN (or an HTTP claim-token bearer), else from its last claim_next.
    binding: Arc<std::sync::Mutex<Binding>>,
    /// Whether a claim without a campaign picks its campaign first and claims inside it with
    /// the twin (on Citus, docs/scale-out.md): unknown until the first such claim asks.
    picks_campaign_first: Arc<OnceCell<bool>>,
}

/// A worker session's step, campaign and claim token; each may be unset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Binding {
    pub step_id: Option<i64>,
    pub campaign_id: Option<uuid::Uuid>,
    pub claim_token: Option<uuid::Uuid>,
    /// The step was given to the session (environment or claim-token bearer), not claimed by
    /// it: claim_next then stays within that step's campaign.
    pub assigned: bool,
    /// The session's own claim has ended (its step completed, failed, waiting for input,
    /// spliced): its reads no longer present the token, which every read would refuse as
    /// `stale_claim`; the step's own calls still do, so a repeat is answered as the first.
    pub claim_over: bool,
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
        // Clients see portable schemas (SPEC §14); the raw ones drive the argument pre-pass.
        let mut raw_schemas = HashMap::new();
        for route in tool_router.map.values_mut() {
            let raw = route.attr.input_schema.as_ref().clone();
            route.attr.input_schema = Arc::new(schemas::portable(&raw));
            route.attr.output_schema = Some(Arc::new(schemas::output_schema(&route.attr.name)));
            raw_schemas.insert(route.attr.name.to_string(), raw);
        }
        let http = reqwest::Client::new();
        let embedder = Arc::new(Embedder::from_config(&config, http.clone()));
        let binding = Binding {
            step_id: config.step_id,
            campaign_id: config.campaign_id,
            claim_token: config.claim_token,
            assigned: config.claim_token.is_some(),
            claim_over: false,
        };
        Self {
            config: Arc::new(config),
            db: Arc::new(OnceCell::new()),
            background: Arc::new(BackgroundEmbedder::new(embedder.clone())),
            embedder,
            http,
            tool_router,
            raw_schemas: Arc::new(raw_schemas),
            subscriptions: Default::default(),
            binding: Arc::new(std::sync::Mutex::new(binding)),
            picks_campaign_first: Arc::new(OnceCell::new()),
        }
    }

    /// A server for one HTTP session opened with a claim token as its bearer (SPEC §15): a
    /// worker bound to that step, sharing the server's database pool.
    pub fn bound_worker(&self, binding: Binding) -> Self {
        let mut config = (*self.config).clone();
        config.role = Role::Worker;
        config.step_id = binding.step_id;
        config.campaign_id = binding.campaign_id;
        config.claim_token = binding.claim_token;
        let mut server = SortieServer::new(config);
        server.db = self.db.clone();
        server
    }

    /// A server whose sessions get the tools of `role` (an HTTP bearer token's role), sharing
    /// this server's database pool.
    pub fn for_role(&self, role: Role) -> Self {
        let mut config = (*self.config).clone();
        config.role = role;
        let mut server = SortieServer::new(config);
        server.db = self.db.clone();
        server
    }

    /// This server for a new session: the same tools and pool, a binding of its own.
    pub fn new_session(&self) -> Self {
        let mut server = self.clone();
        let binding = Binding {
            step_id: self.config.step_id,
            campaign_id: self.config.campaign_id,
            claim_token: self.config.claim_token,
            assigned: self.config.claim_token.is_some(),
            claim_over: false,
        };
        server.binding = Arc::new(std::sync::Mutex::new(binding));
        server
    }

    fn binding(&self) -> Binding {
        *self.binding.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After claim_next, the session works on what it claimed (SPEC §15).
    fn bind(&self, binding: Binding) {
        *self.binding.lock().unwrap_or_else(|e| e.into_inner()) = binding;
    }

    /// Connects and checks the database now (the binary's start-up check), so a bad
    /// DATABASE_URL or a missing extension stops the program before it serves anything.
    pub async fn connect_now(&self) -> anyhow::Result<()> {
        let db = Db::connect(&self.config).await?;
        let _ = self.db.set(db);
        Ok(())
    }

    /// The database, for the web view (SPEC §16) served beside MCP.
    pub async fn database(&self) -> Result<Db, DbError> {
        self.db().await.cloned()
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

    /// A call of one campaign: without a request id, `twin(…)` with `params`, which on Citus
    /// runs on the worker holding the campaign (docs/scale-out.md); with one, `public(…)` with
    /// `params` and the request id after them (its last placeholder), since request ids are
    /// serialised on the coordinator.
    async fn call_twin_unless_request(
        &self,
        twin: &str,
        public: &str,
        params: &[&(dyn ToSql + Sync)],
        request_id: &Option<String>,
    ) -> CallToolResult {
        match request_id {
            None => self.call(twin, params).await,
            Some(_) => {
                let mut with_request = params.to_vec();
                with_request.push(request_id);
                self.call(public, &with_request).await
            }
        }
    }

    /// A call about `step`: for the session's own step, `twin(campaign_id => $1, …)` (the
    /// campaign first, the other parameters from $2 on), which on Citus runs on the worker
    /// holding the campaign (docs/scale-out.md); for any other step, `public(…)` with the same
    /// parameters from $1.
    async fn try_call_for_step(
        &self,
        step: i64,
        twin: &str,
        public: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<serde_json::Value, DbError> {
        match self.own_campaign(step) {
            Some(campaign) => {
                let mut with_campaign: Vec<&(dyn ToSql + Sync)> = vec![&campaign];
                with_campaign.extend_from_slice(params);
                match self.try_call(twin, &with_campaign).await {
                    // The session's campaign is not its step's (SORTIE_CAMPAIGN_ID and
                    // SORTIE_STEP_ID disagree): the call by step id answers.
                    Err(e) if e.code == "not_found" => self.try_call(public, params).await,
                    other => other,
                }
            }
            None => self.try_call(public, params).await,
        }
    }

    /// `try_call_for_step`, shaped as a tool result.
    async fn call_for_step(
        &self,
        step: i64,
        twin: &str,
        public: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> CallToolResult {
        match self.try_call_for_step(step, twin, public, params).await {
            Ok(value) => CallToolResult::structured(value),
            Err(e) => tool_error(&e),
        }
    }

    /// After a call that ends the claim (completion, failure, a question, a splice, an early
    /// return) succeeded: a session that claimed the step itself no longer presents its token
    /// in reads (`Binding::claim_over`); it claims again with claim_next. A session given its
    /// step (assigned) stays bound to it (SPEC §15). Answers `result`.
    fn claim_over(&self, step: i64, token: uuid::Uuid, result: CallToolResult) -> CallToolResult {
        if result.is_error != Some(true) {
            let mut binding = self.binding.lock().unwrap_or_else(|e| e.into_inner());
            if !binding.assigned
                && binding.step_id == Some(step)
                && binding.claim_token == Some(token)
            {
                binding.claim_over = true;
            }
        }
        result
    }

    fn session_step(&self, step_id: Option<i64>) -> Option<i64> {
        step_id.or(self.binding().step_id)
    }

    fn session_campaign(&self, campaign_id: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
        campaign_id.or(self.binding().campaign_id)
    }

    /// The campaign of `step` when it is this session's own step (its campaign is known):
    /// calls about it then go to the delegated twins, which on Citus run on the worker holding
    /// the campaign (docs/scale-out.md). None for any other step, which goes by its id.
    fn own_campaign(&self, step: i64) -> Option<uuid::Uuid> {
        let binding = self.binding();
        binding
            .campaign_id
            .filter(|_| binding.step_id == Some(step))
    }

    fn session_token(&self, claim_token: Option<uuid::Uuid>) -> Option<uuid::Uuid> {
        claim_token.or(self.binding().claim_token)
    }

    /// SPEC §15: the campaign resources (every campaign, any step's output) are not a worker's.
    #[allow(clippy::result_large_err)]
    fn campaign_views_allowed(&self) -> Result<(), ErrorData> {
        if self.config.role == Role::Worker {
            return Err(ErrorData::invalid_request(
                "forbidden: a worker session reads its campaign through its tools (get_my_context, read_step_output), not through resources",
                None,
            ));
        }
        Ok(())
    }

    /// The claim token a worker read presents (SPEC §15): the extension confines the call to
    /// that claim's campaign. A worker-only session without one is refused here, whatever the
    /// server's own database login may see.
    fn read_token(
        &self,
        claim_token: Option<uuid::Uuid>,
    ) -> Result<Option<uuid::Uuid>, CallToolResult> {
        let binding = self.binding();
        let token = claim_token.or(binding.claim_token.filter(|_| !binding.claim_over));
        if token.is_none() && self.config.role == Role::Worker {
            return Err(tool_error(&DbError {
                code: "forbidden".into(),
                message: "forbidden: a worker session sees only the campaign of the step it holds: claim one with claim_next, or pass its claim_token".into(),
            }));
        }
        Ok(token)
    }

    /// SPEC §3 depth limit: a worker session whose step is at max depth does not see
    /// spawn_and_continue. The extension refuses the splice either way.
    async fn session_at_max_depth(&self) -> bool {
        let Some(step) = self.binding().step_id else {
            return false;
        };
        let Ok(db) = self.db().await else {
            return false;
        };
        // The depth rule is the extension's (can_spawn), not re-derived from its tables.
        matches!(
            db.query_value(
                "SELECT to_jsonb({schema}.can_spawn(step_id => $1))",
                &[&step]
            )
            .await,
            Ok(Value::Bool(false))
        )
    }
}

pub fn tool_error(e: &DbError) -> CallToolResult {
    let mut result = CallToolResult::error(vec![ContentBlock::text(e.to_string())]);
    result.structured_content = Some(json!({"error": {"code": e.code, "message": e.message}}));
    result
}

/// SPEC §14: no result exceeds this many characters by default.
pub const RESULT_LIMIT_CHARS: usize = 100_000;

/// A refusal of the arguments, decided before any work.
pub fn refuse(sentence: String) -> CallToolResult {
    tool_error(&DbError {
        code: "invalid_argument".into(),
        message: format!("invalid_argument: {sentence}"),
    })
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
    #[allow(deprecated)] // enable_logging: see SetLevelRequestParams above
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_logging()
                .enable_prompts()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
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
        mut request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        if let Some(schema) = self.raw_schemas.get(request.name.as_ref()) {
            match arguments::prepare(&request.name, schema, request.arguments.take()) {
                Ok(prepared) => request.arguments = Some(prepared),
                Err(refusal) => return Ok(refuse(refusal).into()),
            }
        }
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

    /// SPEC §14: `logging/setLevel` is accepted. Logs go to stderr (never stdout), filtered by
    /// RUST_LOG; the level a client asks for is acknowledged and recorded.
    #[allow(deprecated)]
    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        tracing::info!(level = ?request.level, "client set the logging level");
        Ok(())
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

    // SPEC §16: resources and prompts live in crate::resources.
    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourcesResult, ErrorData> {
        Ok(crate::resources::list())
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListResourceTemplatesResult, ErrorData> {
        Ok(crate::resources::templates())
    }

    async fn read_resource(
        &self,
        request: rmcp::model::ReadResourceRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ReadResourceResponse, ErrorData> {
        self.campaign_views_allowed()?;
        let db = self.db().await.map_err(crate::resources::unavailable)?;
        Ok(crate::resources::read(db, &request.uri).await?.into())
    }

    #[allow(deprecated)]
    async fn subscribe(
        &self,
        request: rmcp::model::SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.campaign_views_allowed()?;
        let db = self.db().await.map_err(crate::resources::unavailable)?;
        self.subscriptions
            .subscribe(db, &request.uri, context.peer.clone())
            .await
    }

    /// Protocol 2026-07-28's subscriptions (resources only).
    fn accepted_subscription_filter(
        &self,
        requested: &rmcp::model::SubscriptionFilter,
    ) -> Option<rmcp::model::SubscriptionFilter> {
        crate::resources::accepted_filter(requested)
    }

    async fn listen(&self, context: rmcp::service::SubscriptionContext) -> Result<(), ErrorData> {
        let db = self.db().await.map_err(crate::resources::unavailable)?;
        crate::resources::listen(db, context).await
    }

    #[allow(deprecated)]
    async fn unsubscribe(
        &self,
        request: rmcp::model::UnsubscribeRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.subscriptions.unsubscribe(&request.uri);
        Ok(())
    }

    async fn list_prompts(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListPromptsResult, ErrorData> {
        Ok(crate::resources::prompts())
    }

    async fn get_prompt(
        &self,
        request: rmcp::model::GetPromptRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::GetPromptResponse, ErrorData> {
        // SPEC §15: a worker's briefing is of its own step only.
        if self.config.role == Role::Worker {
            let asked = request
                .arguments
                .as_ref()
                .and_then(|a| a.get("step_id"))
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string())
                });
            if let Some(asked) = asked {
                if Some(asked.trim().to_string()) != self.binding().step_id.map(|s| s.to_string()) {
                    return Err(ErrorData::invalid_request(
                        "forbidden: a worker session is briefed on its own step only",
                        None,
                    ));
                }
            }
        }
        let prompt =
            crate::resources::prompt(self.db().await, &request.name, request.arguments.as_ref());
        Ok(prompt.await?.into())
    }
}
