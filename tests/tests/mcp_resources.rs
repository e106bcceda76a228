//! SPEC §16 through a real MCP client (rmcp over stdio against the real `sortie-mcp`):
//! resources and their templates, reading each, a subscription's updates, and the prompts.

#![allow(deprecated)] // resources/subscribe is what protocol 2025-11-25 clients use

use rmcp::model::{
    GetPromptRequestParams, ReadResourceRequestParams, ResourceContents,
    ResourceUpdatedNotificationParam, SubscribeRequestParams, UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::{binary, TestDb};
use tokio::sync::mpsc;

/// A client that passes on every `notifications/resources/updated` it receives.
struct Watcher {
    updates: mpsc::UnboundedSender<String>,
}

impl ClientHandler for Watcher {
    fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let _ = self.updates.send(params.uri);
        std::future::ready(())
    }
}

async fn client(
    db: &TestDb,
) -> (
    RunningService<RoleClient, Watcher>,
    mpsc::UnboundedReceiver<String>,
) {
    let url = db.connection_string();
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(binary("sortie-mcp")).configure(|cmd| {
            for var in sortie_mcp::config::ENV_VARS {
                cmd.env_remove(var.name);
            }
            cmd.env("DATABASE_URL", &url).env("RUST_LOG", "warn");
        }),
    )
    .expect("spawn sortie-mcp");
    let (tx, rx) = mpsc::unbounded_channel();
    let service = Watcher { updates: tx }
        .serve(transport)
        .await
        .expect("MCP initialize");
    (service, rx)
}

fn text_of(contents: &[ResourceContents]) -> (String, Option<String>) {
    match &contents[0] {
        ResourceContents::TextResourceContents {
            text, mime_type, ..
        } => (text.clone(), mime_type.clone()),
        other => panic!("not text: {other:?}"),
    }
}

async fn read(
    service: &RunningService<RoleClient, Watcher>,
    uri: &str,
) -> (String, Option<String>) {
    let result = service
        .read_resource(ReadResourceRequestParams::new(uri))
        .await
        .unwrap_or_else(|e| panic!("{uri}: {e}"));
    text_of(&result.contents)
}

#[tokio::test]
async fn resources_are_listed_with_templates_and_read() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "research", "key": "r"}, {"action": "write", "depends_on": ["r"]}]),
    )
    .await;
    let research = claim(&db, c).await.unwrap();
    complete(&db, &research, "line one\nline two of the findings").await;
    let (service, _updates) = client(&db).await;

    let info = service.peer_info().expect("server info");
    let resources_capability = info
        .capabilities
        .resources
        .clone()
        .expect("resources capability");
    assert_eq!(resources_capability.subscribe, Some(true));
    assert!(info.capabilities.prompts.is_some());

    let listed = service.list_resources(None).await.unwrap();
    let uris: Vec<&str> = listed.resources.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(uris, vec!["sortie://campaigns"]);
    let templates = service.list_resource_templates(None).await.unwrap();
    let mut patterns: Vec<&str> = templates
        .resource_templates
        .iter()
        .map(|t| t.uri_template.as_str())
        .collect();
    patterns.sort();
    assert_eq!(
        patterns,
        vec![
            "sortie://campaigns/{id}",
            "sortie://campaigns/{id}/graph",
            "sortie://steps/{id}/output"
        ]
    );

    let (campaigns, mime) = read(&service, "sortie://campaigns").await;
    assert_eq!(mime.as_deref(), Some("application/json"));
    let campaigns: Value = serde_json::from_str(&campaigns).unwrap();
    assert_eq!(campaigns["campaigns"][0]["id"], json!(c.to_string()));

    let (one, _) = read(&service, &format!("sortie://campaigns/{c}")).await;
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["steps"].as_array().unwrap().len(), 2);

    let (graph, mime) = read(&service, &format!("sortie://campaigns/{c}/graph")).await;
    assert_eq!(mime.as_deref(), Some("text/vnd.mermaid"));
    assert!(graph.starts_with("flowchart TD"), "{graph}");
    let write = step_by_action(&db, c, "write").await;
    assert!(
        graph.contains(&format!(
            "s{}[\"#{} research",
            research.step_id, research.step_id
        )),
        "{graph}"
    );
    assert!(graph.contains(":::done"), "{graph}");
    assert!(
        graph.contains(&format!("s{} --> s{write}", research.step_id)),
        "{graph}"
    );

    let (output, _) = read(
        &service,
        &format!("sortie://steps/{}/output", research.step_id),
    )
    .await;
    assert_eq!(output, "line one\nline two of the findings");

    // Unknown and malformed addresses are errors, not empty contents.
    for (uri, code) in [
        (
            format!("sortie://campaigns/{}", uuid::Uuid::new_v4()),
            -32002,
        ),
        ("sortie://campaigns/not-a-uuid".to_string(), -32602),
        ("sortie://nothing".to_string(), -32002),
        ("sortie://steps/999999999/output".to_string(), -32002),
    ] {
        let error = service
            .read_resource(ReadResourceRequestParams::new(uri.clone()))
            .await
            .expect_err(&uri);
        let text = format!("{error:?}");
        assert!(text.contains(&code.to_string()), "{uri}: {text}");
    }
    let _ = service.cancel().await;
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn a_subscribed_campaign_sends_resource_updates_when_it_changes() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let other = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    add(&db, other, json!([{"action": "elsewhere"}])).await;
    let (service, mut updates) = client(&db).await;
    let campaign_uri = format!("sortie://campaigns/{c}");
    let graph_uri = format!("sortie://campaigns/{c}/graph");
    service
        .subscribe(SubscribeRequestParams::new(campaign_uri.clone()))
        .await
        .expect("subscribe");
    service
        .subscribe(SubscribeRequestParams::new(graph_uri.clone()))
        .await
        .expect("subscribe to the graph");
    let refused = service
        .subscribe(SubscribeRequestParams::new(format!(
            "sortie://campaigns/{}",
            uuid::Uuid::new_v4()
        )))
        .await;
    assert!(refused.is_err(), "a subscription to nothing is refused");

    // Another campaign changes first; then this one.
    run_all(&db, other).await;
    let step = claim(&db, c).await.unwrap();
    complete(&db, &step, "done").await;
    let mut seen = Vec::new();
    while !(seen.contains(&campaign_uri) && seen.contains(&graph_uri)) {
        let uri = tokio::time::timeout(std::time::Duration::from_secs(30), updates.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("no update for both of {campaign_uri} and the graph; saw {seen:?}")
            })
            .expect("client running");
        seen.push(uri);
    }
    assert!(
        seen.iter().all(|u| u == &campaign_uri || u == &graph_uri),
        "only subscribed resources are announced: {seen:?}"
    );
    // After the update the resource reads as changed.
    let (graph, _) = read(&service, &graph_uri).await;
    assert!(
        graph.contains(&format!(
            "s{}[\"#{} a<br/>done\"]:::done",
            step.step_id, step.step_id
        )),
        "{graph}"
    );

    service
        .unsubscribe(UnsubscribeRequestParams::new(graph_uri.clone()))
        .await
        .expect("unsubscribe");
    while updates.try_recv().is_ok() {}
    let last = claim(&db, c).await.unwrap();
    complete(&db, &last, "done").await;
    let next = tokio::time::timeout(std::time::Duration::from_secs(30), updates.recv())
        .await
        .expect("an update for the campaign still subscribed")
        .unwrap();
    assert_eq!(next, campaign_uri);
    let _ = service.cancel().await;
    db.finish().await;
}

#[tokio::test]
async fn prompts_plan_a_campaign_and_brief_a_worker() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "summarise the logs", "input": {"path": "/var/log/app"}}]),
    )
    .await;
    let step = claim(&db, c).await.unwrap();
    let (service, _updates) = client(&db).await;
    let listed = service.list_prompts(None).await.unwrap();
    let mut names: Vec<&str> = listed.prompts.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["plan_campaign", "worker_briefing"]);

    let args = |v: Value| v.as_object().unwrap().clone();
    let plan = service
        .get_prompt(
            GetPromptRequestParams::new("plan_campaign").with_arguments(args(
                json!({"goal": "migrate the config format", "constraints": "two agents"}),
            )),
        )
        .await
        .unwrap();
    let text = serde_json::to_string(&plan.messages).unwrap();
    for needle in [
        "migrate the config format",
        "two agents",
        "depends_on",
        "add_steps",
        "parallel_group",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    let missing_goal = service
        .get_prompt(GetPromptRequestParams::new("plan_campaign"))
        .await;
    assert!(format!("{:?}", missing_goal.unwrap_err()).contains("invalid_argument"));

    let briefing = service
        .get_prompt(
            GetPromptRequestParams::new("worker_briefing")
                .with_arguments(args(json!({"step_id": step.step_id}))),
        )
        .await
        .unwrap();
    let text = serde_json::to_string(&briefing.messages).unwrap();
    for needle in [
        "get_my_context",
        "complete_step",
        "heartbeat",
        "summarise the logs",
        "/var/log/app",
    ] {
        assert!(text.contains(needle), "{needle} missing: {text}");
    }
    let unknown = service
        .get_prompt(GetPromptRequestParams::new("write_poem"))
        .await;
    assert!(unknown.is_err());
    let _ = service.cancel().await;
    complete(&db, &step, "ok").await;
    db.finish().await;
}

/// Protocol 2026-07-28: the same updates through `subscriptions/listen`.
#[tokio::test]
async fn a_listen_subscription_announces_changes_of_its_campaign() {
    use rmcp::model::{ProtocolVersion, ServerNotification, SubscriptionFilter};
    use rmcp::service::{serve_client_with_lifecycle, ClientLifecycleMode};

    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let other = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    add(&db, other, json!([{"action": "elsewhere"}])).await;
    let url = db.connection_string();
    let transport = TokioChildProcess::new(
        tokio::process::Command::new(binary("sortie-mcp")).configure(|cmd| {
            for var in sortie_mcp::config::ENV_VARS {
                cmd.env_remove(var.name);
            }
            cmd.env("DATABASE_URL", &url).env("RUST_LOG", "warn");
        }),
    )
    .expect("spawn sortie-mcp");
    let (tx, _rx) = mpsc::unbounded_channel();
    let service = serve_client_with_lifecycle(
        Watcher { updates: tx },
        transport,
        ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        },
    )
    .await
    .expect("server/discover");
    let uri = format!("sortie://campaigns/{c}");
    let mut subscription = service
        .peer()
        .listen(
            SubscriptionFilter::builder()
                .resource_subscription(uri.clone())
                .resource_subscription("sortie://nowhere")
                .build(),
        )
        .await
        .expect("subscriptions/listen");
    assert_eq!(
        subscription.acknowledged().resource_subscriptions,
        Some(vec![uri.clone()]),
        "only well-formed addresses are accepted"
    );
    run_all(&db, other).await;
    run_all(&db, c).await;
    let notification =
        tokio::time::timeout(std::time::Duration::from_secs(30), subscription.next())
            .await
            .expect("an update within 30 s")
            .expect("subscription open")
            .expect("a notification");
    match notification {
        ServerNotification::ResourceUpdatedNotification(n) => assert_eq!(n.params.uri, uri),
        other => panic!("unexpected {other:?}"),
    }
    let _ = service.cancel().await;
    db.finish().await;
}
