//! MCP resources and prompts (SPEC §16). Resources are views of extension calls:
//! `sortie://campaigns` (list_campaigns), `sortie://campaigns/{id}` (get_campaign),
//! `sortie://campaigns/{id}/graph` (campaign_graph drawn as Mermaid) and
//! `sortie://steps/{id}/output` (read_step_output). A subscription to any of them is answered
//! with `notifications/resources/updated` when the event log says it changed.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    GetPromptResult, ListPromptsResult, ListResourceTemplatesResult, ListResourcesResult, Prompt,
    PromptArgument, PromptMessage, ReadResourceResult, Resource, ResourceContents,
    ResourceTemplate, ResourceUpdatedNotificationParam, Role, SubscriptionFilter,
};
use rmcp::service::{Peer, SubscriptionContext};
use rmcp::{ErrorData, RoleServer};
use serde_json::{json, Value};

use crate::db::{Db, DbError};
use crate::view::graph::{mermaid, Graph};

pub const CAMPAIGNS: &str = "sortie://campaigns";
const MERMAID: &str = "text/vnd.mermaid";

/// A resource address, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Campaigns,
    Campaign(uuid::Uuid),
    Graph(uuid::Uuid),
    StepOutput(i64),
}

impl Address {
    pub fn parse(uri: &str) -> Result<Address, ErrorData> {
        let unknown = || {
            ErrorData::resource_not_found(
                format!("not_found: no resource {uri:?}; see resources/templates/list"),
                Some(json!({"uri": uri})),
            )
        };
        let rest = uri.strip_prefix("sortie://").ok_or_else(unknown)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let campaign = |raw: &str| {
            uuid::Uuid::parse_str(raw).map_err(|_| {
                ErrorData::invalid_params(
                    format!("invalid_argument: {raw:?} is not a campaign id (a UUID)"),
                    Some(json!({"uri": uri})),
                )
            })
        };
        match parts.as_slice() {
            ["campaigns"] => Ok(Address::Campaigns),
            ["campaigns", id] => Ok(Address::Campaign(campaign(id)?)),
            ["campaigns", id, "graph"] => Ok(Address::Graph(campaign(id)?)),
            ["steps", id, "output"] => id
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .map(Address::StepOutput)
                .ok_or_else(|| {
                    ErrorData::invalid_params(
                        format!("invalid_argument: {id:?} is not a step id"),
                        Some(json!({"uri": uri})),
                    )
                }),
            _ => Err(unknown()),
        }
    }

    /// Whether an event (its campaign, step and kind) changes this resource.
    pub fn changed_by(&self, campaign: Option<&str>, step: Option<i64>, kind: &str) -> bool {
        match self {
            Address::Campaigns => kind.starts_with("campaign."),
            Address::Campaign(id) | Address::Graph(id) => campaign == Some(id.to_string().as_str()),
            Address::StepOutput(id) => step == Some(*id),
        }
    }
}

fn db_error(uri: &str, e: DbError) -> ErrorData {
    let data = Some(json!({"uri": uri, "code": e.code}));
    match e.code.as_str() {
        "not_found" => ErrorData::resource_not_found(e.to_string(), data),
        "invalid_argument" => ErrorData::invalid_params(e.to_string(), data),
        _ => ErrorData::internal_error(e.to_string(), data),
    }
}

pub fn list() -> ListResourcesResult {
    ListResourcesResult::with_all_items(vec![Resource::new(CAMPAIGNS, "campaigns")
        .with_description("Campaigns, newest first (list_campaigns)")
        .with_mime_type("application/json")])
}

pub fn templates() -> ListResourceTemplatesResult {
    ListResourceTemplatesResult::with_all_items(vec![
        ResourceTemplate::new("sortie://campaigns/{id}", "campaign")
            .with_description("A campaign with its steps and recent notes (get_campaign)")
            .with_mime_type("application/json"),
        ResourceTemplate::new("sortie://campaigns/{id}/graph", "campaign graph")
            .with_description("A campaign's DAG as a Mermaid flowchart: statuses as classes, compound steps as subgraphs, spawned subtasks and continuations labelled")
            .with_mime_type(MERMAID),
        ResourceTemplate::new("sortie://steps/{id}/output", "step output")
            .with_description("A step's full output (read_step_output, first 32,000 characters)")
            .with_mime_type("text/plain"),
    ])
}

pub async fn read(db: &Db, uri: &str) -> Result<ReadResourceResult, ErrorData> {
    let address = Address::parse(uri)?;
    let content = match address {
        Address::Campaigns => {
            let answer = db
                .call("list_campaigns(\"limit\" => 200)", &[])
                .await
                .map_err(|e| db_error(uri, e))?;
            ResourceContents::text(pretty(&answer), uri).with_mime_type("application/json")
        }
        Address::Campaign(id) => {
            let answer = db
                .call("_get_campaign_delegated($1)", &[&id])
                .await
                .map_err(|e| db_error(uri, e))?;
            ResourceContents::text(pretty(&answer), uri).with_mime_type("application/json")
        }
        Address::Graph(id) => {
            let answer = db
                .call("_campaign_graph_delegated($1)", &[&id])
                .await
                .map_err(|e| db_error(uri, e))?;
            let graph = Graph::from_json(&answer)
                .map_err(|m| ErrorData::internal_error(m, Some(json!({"uri": uri}))))?;
            ResourceContents::text(mermaid(&graph), uri).with_mime_type(MERMAID)
        }
        Address::StepOutput(step) => {
            let answer = db
                .call("read_step_output($1, \"limit\" => 32000)", &[&step])
                .await
                .map_err(|e| db_error(uri, e))?;
            ResourceContents::text(answer["content"].as_str().unwrap_or_default(), uri)
                .with_mime_type("text/plain")
        }
    };
    Ok(ReadResourceResult::new(vec![content]))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// One session's subscriptions. Each MCP session has its own server value, and a clone is a
/// new session (`sortie-mcp --http` clones its template server per session), so cloning
/// starts with no subscriptions rather than sharing another session's.
#[derive(Default)]
pub struct Subscriptions {
    state: Arc<Mutex<Watch>>,
}

#[derive(Default)]
struct Watch {
    addresses: HashSet<String>,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Clone for Subscriptions {
    fn clone(&self) -> Self {
        Subscriptions::default()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.abort();
        }
    }
}

impl Subscriptions {
    /// `resources/subscribe`: the resource must exist; the session's watcher starts with its
    /// first subscription.
    pub async fn subscribe(
        &self,
        db: &Db,
        uri: &str,
        peer: Peer<RoleServer>,
    ) -> Result<(), ErrorData> {
        // Reading it proves it exists and the id is well-formed.
        read(db, uri).await?;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.addresses.insert(uri.to_string());
        if state.watcher.as_ref().is_none_or(|w| w.is_finished()) {
            let weak = Arc::downgrade(&self.state);
            let db = db.clone();
            state.watcher = Some(tokio::spawn(async move { watch(db, peer, weak).await }));
        }
        Ok(())
    }

    pub fn unsubscribe(&self, uri: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.addresses.remove(uri);
    }
}

/// A session's legacy subscriptions (`resources/subscribe`): followed until the session's
/// server value is dropped or the client stops answering.
async fn watch(db: Db, peer: Peer<RoleServer>, state: std::sync::Weak<Mutex<Watch>>) {
    follow(
        db,
        move || {
            let state = state.upgrade()?;
            let addresses = state.lock().unwrap_or_else(|e| e.into_inner());
            Some(addresses.addresses.iter().cloned().collect())
        },
        move |uri| {
            let peer = peer.clone();
            async move {
                peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
}

/// Protocol 2026-07-28 (`subscriptions/listen`): the well-formed resource addresses among
/// those requested; the rest of the filter (list changes) is not offered.
pub fn accepted_filter(requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
    let mut accepted = SubscriptionFilter::new();
    accepted.resource_subscriptions = requested.resource_subscriptions.as_ref().map(|uris| {
        uris.iter()
            .filter(|uri| Address::parse(uri).is_ok())
            .cloned()
            .collect()
    });
    Some(accepted)
}

/// One `subscriptions/listen` stream, until the client cancels it.
pub async fn listen(db: &Db, context: SubscriptionContext) -> Result<(), ErrorData> {
    let uris: Vec<String> = context
        .accepted()
        .resource_subscriptions
        .clone()
        .unwrap_or_default();
    let sink = context.sink().clone();
    tokio::select! {
        _ = context.cancelled() => {}
        _ = follow(
            db.clone(),
            move || Some(uris.clone()),
            move |uri| {
                let sink = sink.clone();
                async move { sink.notify_resource_updated(uri).await.is_ok() }
            },
        ) => {}
    }
    Ok(())
}

/// Follows the event log (woken by `sortie_events`, polling a second after each wake-up since
/// the extension wakes listeners at most once per `wake_interval()` a connection, and every
/// few seconds in case a wake-up was lost) and announces each of `addresses()` an event
/// changed. Ends when `addresses()` answers None or an announcement cannot be sent.
async fn follow<F>(
    db: Db,
    addresses: impl Fn() -> Option<Vec<String>>,
    announce: impl Fn(String) -> F,
) where
    F: std::future::Future<Output = bool>,
{
    let mut wake = crate::runner::listener::listen(db.connection_string()).await;
    let mut after: Option<String> = match db.call("events(\"limit\" => 1)", &[]).await {
        // A position that holds on every node (on Citus too): `next_after`.
        Ok(page) => page["next_after"].as_str().map(String::from),
        Err(_) => None,
    };
    let mut poll_until = tokio::time::Instant::now();
    loop {
        let pause = if tokio::time::Instant::now() < poll_until {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            woke = wake.recv() => {
                if woke.is_none() {
                    return;
                }
                poll_until = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            _ = tokio::time::sleep(pause) => {}
        }
        let Ok(page) = db
            .call("events(after => $1, \"limit\" => 1000)", &[&after])
            .await
        else {
            continue;
        };
        if let Some(next) = page["next_after"].as_str() {
            after = Some(next.to_string());
        }
        let Some(subscribed) = addresses() else {
            return;
        };
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for uri in subscribed {
            let Ok(address) = Address::parse(&uri) else {
                continue;
            };
            let changed = events.iter().any(|e| {
                address.changed_by(
                    e["campaign_id"].as_str(),
                    e["step_id"].as_i64(),
                    e["kind"].as_str().unwrap_or(""),
                )
            });
            if changed && !announce(uri).await {
                return; // the client is gone
            }
        }
    }
}

pub fn prompts() -> ListPromptsResult {
    ListPromptsResult::with_all_items(vec![
        Prompt::new(
            "plan_campaign",
            Some("Turn a goal into the add_steps JSON of a campaign plan"),
            Some(vec![
                PromptArgument::new("goal")
                    .with_description("What the campaign must achieve")
                    .with_required(true),
                PromptArgument::new("constraints").with_description(
                    "Limits to respect: agents available, budget, deadlines, what not to touch",
                ),
            ]),
        ),
        Prompt::new(
            "worker_briefing",
            Some("How to work a claimed step, with the step's context when step_id is given"),
            Some(vec![PromptArgument::new("step_id").with_description(
                "The claimed step (its context is included)",
            )]),
        ),
    ])
}

const STEP_JSON_GUIDE: &str = "Answer with one JSON array of steps, nothing else. Each step is an object:
- \"action\" (required): one instruction an agent can carry out alone, with a checkable result.
- \"key\": a short name other steps use in \"depends_on\": [\"key\", ...]; steps without a dependency run in parallel.
- \"agent\": which kind of agent should take it (omit for any).
- \"input\": any JSON the agent needs.
- \"max_attempts\" (default 3), \"requires_locks\": [\"repo/path\"] for exclusive resources.
- Compound steps: {\"step_type\": \"sequence\", \"action\": ..., \"steps\": [...]} runs its steps in order;
  {\"step_type\": \"parallel_group\", \"action\": ..., \"children\": [...], \"completion_threshold\": n} runs them together;
  {\"step_type\": \"for_each\", \"action\": ..., \"items\": [...], \"template\": {...}} runs the template per item ({{item}} is substituted).
Prefer 3 to 12 steps; a step can split itself later with spawn_and_continue, so do not plan every detail.
Example:
[{\"action\": \"List the modules that read the config file\", \"key\": \"survey\"},
 {\"step_type\": \"parallel_group\", \"action\": \"Migrate each module\", \"key\": \"migrate\", \"depends_on\": [\"survey\"],
  \"children\": [{\"action\": \"Migrate the CLI module\"}, {\"action\": \"Migrate the server module\"}]},
 {\"action\": \"Run the test suite and report failures\", \"depends_on\": [\"migrate\"]}]
Then call add_steps(campaign_id, steps) with this array (or create_campaign(goal, steps => this array)).";

const WORKER_GUIDE: &str = "You are working one claimed step of a Sortie campaign.
1. Call get_my_context first: the step's action and input, the campaign's goal, the outputs of the steps it depends on (previews; read_step_output for more) and recent notes.
2. Do the work the action asks for, nothing beyond it. Record findings other steps need with add_note (short, tagged).
3. Long work: call heartbeat before the lease runs out, or the step is given to someone else.
4. Finish with exactly one of:
   - complete_step(summary): the result, self-contained; later steps read it.
   - fail_step(error): what went wrong and what was tried; it is retried up to max_attempts.
   - request_input(question): a person must decide; the step waits for provide_input.
   - spawn_and_continue(subtasks, continuation): the work splits into parallel subtasks; the continuation runs after them with their outputs.
   - abort_branch(target_id, output, reason): an ancestor's question is already answered; the rest of that branch is skipped.
Errors start with a stable code: stale_claim or skipped mean the step is no longer yours — stop working on it.";

pub async fn prompt(
    db: Result<&Db, DbError>,
    name: &str,
    arguments: Option<&serde_json::Map<String, Value>>,
) -> Result<GetPromptResult, ErrorData> {
    let argument = |key: &str| {
        arguments
            .and_then(|a| a.get(key))
            .and_then(|v| match v {
                Value::String(s) => Some(s.trim().to_string()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .filter(|s| !s.is_empty())
    };
    match name {
        "plan_campaign" => {
            let goal = argument("goal").ok_or_else(|| {
                ErrorData::invalid_params("invalid_argument: plan_campaign needs a goal", None)
            })?;
            let mut text = format!("Plan a Sortie campaign for this goal:\n\n{goal}\n\n");
            if let Some(constraints) = argument("constraints") {
                text.push_str(&format!("Constraints:\n{constraints}\n\n"));
            }
            text.push_str(STEP_JSON_GUIDE);
            Ok(GetPromptResult::new(vec![PromptMessage::new_text(Role::User, text)])
                .with_description("A goal → add_steps JSON"))
        }
        "worker_briefing" => {
            let mut messages = vec![PromptMessage::new_text(Role::User, WORKER_GUIDE)];
            if let Some(raw) = argument("step_id") {
                let step: i64 = raw.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    ErrorData::invalid_params(
                        format!("invalid_argument: step_id {raw:?} is not a step id"),
                        None,
                    )
                })?;
                let db = db.map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
                let context = db
                    .call("get_my_context($1)", &[&step])
                    .await
                    .map_err(|e| db_error(&format!("step {step}"), e))?;
                messages.push(PromptMessage::new_text(
                    Role::User,
                    format!("Your step's context (get_my_context):\n{}", pretty(&context)),
                ));
            }
            Ok(GetPromptResult::new(messages).with_description("How to work a claimed step"))
        }
        other => Err(ErrorData::invalid_params(
            format!("invalid_argument: no prompt {other:?}; prompts are plan_campaign and worker_briefing"),
            None,
        )),
    }
}

/// The database could not be reached: an internal error with the stable code in its data.
pub fn unavailable(e: DbError) -> ErrorData {
    ErrorData::internal_error(e.to_string(), Some(json!({"code": e.code})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_say_which_events_change_them() {
        let id = uuid::Uuid::new_v4();
        assert_eq!(Address::parse(CAMPAIGNS).unwrap(), Address::Campaigns);
        let graph = Address::parse(&format!("sortie://campaigns/{id}/graph")).unwrap();
        assert_eq!(graph, Address::Graph(id));
        assert_eq!(
            Address::parse("sortie://steps/12/output").unwrap(),
            Address::StepOutput(12)
        );
        assert!(Address::parse("sortie://campaigns/nope").is_err());
        assert!(Address::parse("sortie://steps/0/output").is_err());
        assert!(Address::parse("https://example.com").is_err());
        let id_text = id.to_string();
        assert!(graph.changed_by(Some(&id_text), Some(3), "step.done"));
        assert!(!graph.changed_by(Some("other"), Some(3), "step.done"));
        assert!(Address::Campaigns.changed_by(None, None, "campaign.created"));
        assert!(!Address::Campaigns.changed_by(Some(&id_text), Some(1), "step.done"));
        assert!(Address::StepOutput(3).changed_by(Some(&id_text), Some(3), "step.done"));
    }
}
