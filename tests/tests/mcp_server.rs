//! The real `sortie-mcp` binary driven by a real MCP client (rmcp) over stdio (SPEC §5).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::mcp::McpClient;
use sortie_tests::{binary, TestDb};

const COORDINATOR_TOOLS: [&str; 17] = [
    "add_steps",
    "advance_workflow",
    "cancel_campaign",
    "check_success",
    "create_campaign",
    "get_campaign",
    "get_howto_create_workflow",
    "get_updates",
    "get_workflow_status",
    "list_campaigns",
    "list_workflows",
    "pause_campaign",
    "provide_input",
    "resume_campaign",
    "resume_workflow",
    "start_workflow",
    "steer_campaign",
];
const WORKER_TOOLS: [&str; 12] = [
    "abort_branch",
    "add_note",
    "claim_next",
    "complete_step",
    "fail_step",
    "get_my_context",
    "get_notes",
    "heartbeat",
    "read_step_output",
    "request_input",
    "search_notes",
    "spawn_and_continue",
];

fn role(r: &str) -> Vec<(&'static str, String)> {
    vec![("SORTIE_ROLE", r.to_string())]
}

#[tokio::test]
async fn each_role_lists_its_own_tools() {
    let db = TestDb::new().await;
    let coordinator = McpClient::start(&db, &role("coordinator")).await;
    assert_eq!(
        coordinator.tool_names().await,
        COORDINATOR_TOOLS.map(String::from).to_vec()
    );
    let worker = McpClient::start(&db, &role("worker")).await;
    assert_eq!(
        worker.tool_names().await,
        WORKER_TOOLS.map(String::from).to_vec()
    );
    let both = McpClient::start(&db, &[]).await;
    assert_eq!(
        both.tool_names().await.len(),
        COORDINATOR_TOOLS.len() + WORKER_TOOLS.len()
    );
    let tools = both.service.list_all_tools().await.unwrap();
    let annotations = |name: &str| {
        tools
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .annotations
            .clone()
            .unwrap()
    };
    assert_eq!(annotations("get_campaign").read_only_hint, Some(true));
    assert_eq!(annotations("cancel_campaign").destructive_hint, Some(true));
    assert_eq!(annotations("heartbeat").idempotent_hint, Some(true));
    for client in [coordinator, worker, both] {
        client.stop().await;
    }
    db.finish().await;
}

#[tokio::test]
async fn a_worker_at_max_depth_does_not_see_spawn_and_continue() {
    let db = TestDb::new().await;
    let shallow = db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'none', max_depth => 0)",
            &[],
        )
        .await;
    let deep = db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'none', max_depth => 3)",
            &[],
        )
        .await;
    let mut sessions = Vec::new();
    for c in [&shallow, &deep] {
        let id = uuid::Uuid::parse_str(c["id"].as_str().unwrap()).unwrap();
        let step = add_ids(&db, id, json!([{"action": "a"}])).await[0];
        let session = McpClient::start(
            &db,
            &[
                ("SORTIE_ROLE", "worker".into()),
                ("SORTIE_STEP_ID", step.to_string()),
            ],
        )
        .await;
        sessions.push(
            session
                .tool_names()
                .await
                .contains(&"spawn_and_continue".to_string()),
        );
        session.stop().await;
        db.ok("sortie.cancel_campaign($1)", &[&id]).await;
    }
    assert_eq!(sessions, vec![false, true]);
    db.finish().await;
}

#[tokio::test]
async fn a_whole_campaign_runs_through_the_mcp_tools() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let created = mcp
        .ok(
            "create_campaign",
            json!({"goal": "Find out whether X holds", "planner": "none",
                                       "success_metric": "confidence", "success_target": 0.8}),
        )
        .await;
    let c = created["id"].as_str().unwrap().to_string();
    let added = mcp
        .ok("add_steps", json!({"campaign_id": c, "steps": [
            {"action": "research X", "key": "r"},
            {"step_type": "parallel_group", "action": "probe", "key": "g", "children": [{"action": "probe a"}, {"action": "probe b"}]},
            {"action": "write up", "depends_on": ["r", "g"], "requires_locks": ["docs/report"]}]}))
        .await;
    assert_eq!(added["created"], 5);

    // research: context, a note, then a splice.
    let research = mcp.ok("claim_next", json!({"campaign_id": c})).await;
    assert_eq!(research["action"], "research X");
    let (rid, rtoken) = (research["step_id"].clone(), research["claim_token"].clone());
    let context = mcp.ok("get_my_context", json!({"step_id": rid})).await;
    assert_eq!(context["campaign"]["goal"], "Find out whether X holds");
    mcp.ok(
        "add_note",
        json!({"campaign_id": c, "content": "X was studied in 2019", "tags": ["finding"]}),
    )
    .await;
    let spliced = mcp
        .ok("spawn_and_continue", json!({"step_id": rid, "claim_token": rtoken, "partial_output": "need sources",
                                          "subtasks": [{"action": "fetch sources"}], "continuation": "synthesise"}))
        .await;
    let cont = spliced["continuation_id"].as_i64().unwrap();

    // The probes run meanwhile: one asks for input, the other ends the branch early.
    let mut claimed = Vec::new();
    for _ in 0..3 {
        claimed.push(mcp.ok("claim_next", json!({"campaign_id": c})).await);
    }
    let by_action = |a: &str| claimed.iter().find(|s| s["action"] == a).unwrap().clone();
    let fetch = by_action("fetch sources");
    let long_output = "x".repeat(5000);
    mcp.ok("complete_step", json!({"step_id": fetch["step_id"], "claim_token": fetch["claim_token"], "summary": long_output})).await;
    let probe_a = by_action("probe a");
    mcp.ok("request_input", json!({"step_id": probe_a["step_id"], "claim_token": probe_a["claim_token"], "question": "go on?"})).await;
    let updates = mcp.ok("get_updates", json!({"id": c})).await;
    assert_eq!(updates["waiting_inputs"][0]["question"], "go on?");
    mcp.ok(
        "provide_input",
        json!({"id": c, "step_id": probe_a["step_id"], "answer": "no need"}),
    )
    .await;
    let probe_b = by_action("probe b");
    let group = added["keys"]["g"].clone();
    let aborted = mcp
        .ok("abort_branch", json!({"target_id": group, "step_id": probe_b["step_id"], "claim_token": probe_b["claim_token"],
                                    "output": "X holds", "reason": "probe b settled it"}))
        .await;
    assert_eq!(
        aborted["skipped"].as_array().unwrap().len(),
        1,
        "probe a, waiting again, is skipped"
    );

    // The continuation reads its subtask's output through a preview and a ranged read.
    let synth = mcp.ok("claim_next", json!({"campaign_id": c})).await;
    assert_eq!(synth["step_id"].as_i64().unwrap(), cont);
    let context = mcp.ok("get_my_context", json!({"step_id": cont})).await;
    let upstream = &context["upstream"][0];
    assert_eq!(upstream["total_chars"], 5000);
    assert!(upstream["hint"]
        .as_str()
        .unwrap()
        .contains("read_step_output"));
    let chunk = mcp
        .ok(
            "read_step_output",
            json!({"step_id": fetch["step_id"], "offset": 4990, "limit": 100}),
        )
        .await;
    assert_eq!(chunk["content"], "x".repeat(10));
    mcp.ok(
        "add_note",
        json!({"campaign_id": c, "content": "confidence=0.9", "tags": ["metric:confidence"]}),
    )
    .await;
    mcp.ok("complete_step", json!({"step_id": cont, "claim_token": synth["claim_token"], "summary": "X holds, with sources"})).await;

    // A step with lock keys: the claim named by its campaign leaves it to claim_next.
    let write = mcp.ok("claim_next", json!({"campaign_id": c})).await;
    assert_eq!(write["action"], "write up");
    assert!(write.get("reason").is_none(), "{write}");
    mcp.ok("complete_step", json!({"step_id": write["step_id"], "claim_token": write["claim_token"], "summary": "report"})).await;
    let success = mcp.ok("check_success", json!({"id": c})).await;
    assert_eq!(success["met"], true);
    let state = mcp.ok("get_campaign", json!({"id": c})).await;
    assert_eq!(state["status"], "done");
    let last = mcp.ok("get_updates", json!({"id": c})).await;
    assert!(last["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "campaign.done"));
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn worker_tools_fall_back_to_the_session() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "session step", "agent": "scout"}]),
    )
    .await;
    let step = claim(&db, c).await.unwrap();
    let session = McpClient::start(
        &db,
        &[
            ("SORTIE_ROLE", "worker".into()),
            ("SORTIE_STEP_ID", step.step_id.to_string()),
            ("SORTIE_CAMPAIGN_ID", c.to_string()),
            ("SORTIE_CLAIM_TOKEN", step.token.to_string()),
        ],
    )
    .await;
    let context = session.ok("get_my_context", json!({})).await;
    assert_eq!(context["step"]["action"], "session step");
    session.ok("heartbeat", json!({})).await;
    session
        .ok("add_note", json!({"content": "noted from the session"}))
        .await;
    let notes = db.ok("sortie.get_notes($1)", &[&c]).await;
    assert_eq!(
        notes["notes"][0]["step_id"], step.step_id,
        "the note records the session's step"
    );
    assert_eq!(notes["notes"][0]["agent"], "scout", "and its agent");
    session
        .ok("complete_step", json!({"summary": "done via session"}))
        .await;
    assert_eq!(status(&db, step.step_id).await, "done");
    session.stop().await;
    db.finish().await;
}

/// A session that claimed its own step (pull mode) and finished it is not held to the finished
/// claim: its notes and reads in the campaign work as before the claim (they were refused as
/// `stale_claim` with the finished token), a repeat of the completion is still answered as the
/// first, and a worker-only session is told to claim again. Every way a claim ends alike.
#[tokio::test]
async fn a_session_whose_claim_ended_reads_and_writes_notes_without_it() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "done"}, {"action": "failed", "max_attempts": 1}, {"action": "asks"}, {"action": "splits"}, {"action": "left"}]),
    )
    .await;
    let mcp = McpClient::start(&db, &[]).await;
    let ends = [
        ("complete_step", json!({"summary": "ok"})),
        ("fail_step", json!({"error": "no"})),
        ("request_input", json!({"question": "which?"})),
        (
            "spawn_and_continue",
            json!({"subtasks": [{"action": "sub"}], "continuation": "join"}),
        ),
    ];
    for (tool, args) in ends {
        let claimed = mcp.ok("claim_next", json!({"campaign_id": c})).await;
        assert!(claimed["step_id"].is_i64(), "{claimed}");
        let first = mcp.ok(tool, args.clone()).await;
        for (read, read_args) in [
            (
                "add_note",
                json!({"campaign_id": c, "content": format!("after {tool}")}),
            ),
            ("get_notes", json!({"campaign_id": c})),
            ("search_notes", json!({"campaign_id": c, "query": "after"})),
        ] {
            let outcome = mcp.call(read, read_args).await;
            assert!(!outcome.is_error, "{read} after {tool}: {}", outcome.text);
        }
        if tool == "complete_step" {
            // A lost reply's repeat, from the session: the first answer again.
            let again = mcp.ok(tool, args).await;
            assert_eq!(again["replayed"], true, "{again}");
            assert_eq!(
                (&again["step_id"], &again["status"]),
                (&first["step_id"], &first["status"]),
                "the repeat of {tool}: {again} against {first}"
            );
        }
    }
    mcp.stop().await;
    // A worker-only session that claimed and finished must claim again to see the campaign.
    let worker = McpClient::start(&db, &[("SORTIE_ROLE", "worker".into())]).await;
    let claimed = worker.ok("claim_next", json!({"campaign_id": c})).await;
    assert!(claimed["step_id"].is_i64(), "{claimed}");
    worker.ok("get_notes", json!({})).await;
    worker.ok("complete_step", json!({"summary": "ok"})).await;
    let refused = worker.call("get_notes", json!({})).await;
    assert_eq!(refused.code(), "forbidden", "{}", refused.text);
    assert!(refused.text.contains("claim_next"), "{}", refused.text);
    worker.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn a_stale_claim_is_a_tool_error_with_its_code() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let step = claim(&db, c).await.unwrap();
    let mcp = McpClient::start(&db, &[]).await;
    let outcome = mcp
        .call(
            "complete_step",
            json!({"step_id": step.step_id, "claim_token": uuid::Uuid::new_v4(), "summary": "x"}),
        )
        .await;
    assert!(outcome.is_error);
    assert_eq!(outcome.code(), "stale_claim");
    assert!(outcome.text.starts_with("stale_claim:"), "{}", outcome.text);
    assert_eq!(status(&db, step.step_id).await, "running");
    mcp.stop().await;
    complete(&db, &step, "ok").await;
    db.finish().await;
}

/// Bad input on every tool: a tool error with a stable code (or a protocol error for a call
/// that does not fit the schema), and no state change.
type Snapshot = (i64, i64, i64, String, i64);

async fn snapshot(db: &TestDb) -> Snapshot {
    let row = db
        .client
        .query_one("SELECT (SELECT count(*) FROM sortie.campaigns), (SELECT count(*) FROM sortie.steps),
                           (SELECT count(*) FROM sortie.notes), (SELECT string_agg(status, ',' ORDER BY id) FROM sortie.steps),
                           (SELECT count(*) FROM sortie.events WHERE kind <> 'step.claimed')", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

#[tokio::test]
async fn bad_input_on_every_tool_changes_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let mcp = McpClient::start(&db, &[]).await;
    let before = snapshot(&db).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let huge = "y".repeat(1_100_000);
    let hostile = "'); DROP TABLE sortie.steps; --";
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "create_campaign",
            json!({"goal": "   "}),
            "invalid_argument",
        ),
        (
            "create_campaign",
            json!({"goal": "g", "priority": "asap"}),
            "invalid_argument",
        ),
        (
            "create_campaign",
            json!({"goal": "g", "steps": [{"step_type": "loop", "action": "x"}]}),
            "invalid_argument",
        ),
        (
            "list_campaigns",
            json!({"status": "sleeping"}),
            "invalid_argument",
        ),
        (
            "list_campaigns",
            json!({"cursor": hostile}),
            "invalid_argument",
        ),
        ("get_campaign", json!({"id": unknown}), "not_found"),
        ("get_updates", json!({"id": unknown}), "not_found"),
        (
            "steer_campaign",
            json!({"id": unknown, "guidance": "x"}),
            "not_found",
        ),
        (
            "steer_campaign",
            json!({"id": c, "guidance": ""}),
            "invalid_argument",
        ),
        ("pause_campaign", json!({"id": unknown}), "not_found"),
        ("resume_campaign", json!({"id": c}), "invalid_state"),
        ("cancel_campaign", json!({"id": unknown}), "not_found"),
        (
            "provide_input",
            json!({"id": c, "step_id": 1, "answer": "a"}),
            "invalid_state",
        ),
        (
            "provide_input",
            json!({"id": c, "step_id": 999999, "answer": "a"}),
            "not_found",
        ),
        ("check_success", json!({"id": unknown}), "not_found"),
        (
            "add_steps",
            json!({"campaign_id": c, "steps": [{"action": "a", "key": "k", "depends_on": ["k"]}]}),
            "cycle",
        ),
        (
            "add_steps",
            json!({"campaign_id": c, "steps": [{"action": "a", "depends_on": [999999]}]}),
            "not_found",
        ),
        (
            "add_steps",
            json!({"campaign_id": unknown, "steps": [{"action": "a"}]}),
            "not_found",
        ),
        ("get_my_context", json!({"step_id": 999999}), "not_found"),
        ("get_my_context", json!({}), "invalid_argument"),
        ("read_step_output", json!({"step_id": 999999}), "not_found"),
        (
            "read_step_output",
            json!({"step_id": 1, "field": "secrets"}),
            "invalid_argument",
        ),
        (
            "read_step_output",
            json!({"step_id": 1, "offset": -5}),
            "invalid_argument",
        ),
        ("heartbeat", json!({"step_id": 1}), "invalid_argument"),
        (
            "heartbeat",
            json!({"step_id": 1, "claim_token": unknown}),
            "stale_claim",
        ),
        (
            "add_note",
            json!({"campaign_id": unknown, "content": "x"}),
            "not_found",
        ),
        (
            "add_note",
            json!({"campaign_id": c, "content": huge}),
            "invalid_argument",
        ),
        (
            "add_note",
            json!({"campaign_id": c, "content": ""}),
            "invalid_argument",
        ),
        ("search_notes", json!({"query": ""}), "invalid_argument"),
        ("get_notes", json!({}), "invalid_argument"),
        (
            "complete_step",
            json!({"step_id": 999999, "claim_token": unknown}),
            "not_found",
        ),
        (
            "fail_step",
            json!({"step_id": 1, "claim_token": unknown}),
            "stale_claim",
        ),
        (
            "request_input",
            json!({"step_id": 1, "claim_token": unknown, "question": "q"}),
            "stale_claim",
        ),
        (
            "spawn_and_continue",
            json!({"step_id": 1, "claim_token": unknown, "subtasks": [], "continuation": "c"}),
            "stale_claim",
        ),
        (
            "abort_branch",
            json!({"target_id": 1, "step_id": 1, "claim_token": unknown, "output": "o", "reason": "r"}),
            "stale_claim",
        ),
        (
            "claim_next",
            json!({"lease_seconds": 0}),
            "invalid_argument",
        ),
        // No WORKFLOW_DEFINITIONS_DIR here, and c is no workflow instance.
        (
            "start_workflow",
            json!({"workflow_name": "REVIEW"}),
            "invalid_state",
        ),
        (
            "get_workflow_status",
            json!({"instance_id": unknown}),
            "not_found",
        ),
        (
            "get_workflow_status",
            json!({"instance_id": c}),
            "not_found",
        ),
        (
            "advance_workflow",
            json!({"instance_id": c, "report": {"step_id": "a"}}),
            "not_found",
        ),
        (
            "resume_workflow",
            json!({"instance_id": unknown, "assumed_current_step_name": hostile}),
            "not_found",
        ),
    ];
    for (tool, args, code) in cases {
        let outcome = mcp.call(tool, args.clone()).await;
        assert!(outcome.is_error, "{tool} {args} should fail");
        assert_eq!(outcome.code(), code, "{tool} {args}: {}", outcome.text);
        assert!(
            outcome.text.starts_with(code),
            "{tool}: the text starts with the code: {}",
            outcome.text
        );
    }
    // Wrong types do not fit the tool's schema: refused before any SQL, with the same code.
    for (tool, args) in [
        ("get_campaign", json!({"id": 42})),
        ("complete_step", json!({"step_id": "one"})),
        ("get_campaign", json!({"id": "not-a-uuid"})),
        ("add_note", json!({"tags": "x"})),
    ] {
        let outcome = mcp.call(tool, args.clone()).await;
        assert!(outcome.is_error, "{tool} {args}");
        assert_eq!(
            outcome.code(),
            "invalid_argument",
            "{tool} {args}: {}",
            outcome.text
        );
    }
    // Hostile strings are data, never SQL.
    let created = mcp
        .ok(
            "create_campaign",
            json!({"goal": hostile, "name": hostile, "planner": "none"}),
        )
        .await;
    assert_eq!(created["name"], hostile);
    db.ok(
        "sortie.cancel_campaign($1)",
        &[&uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap()],
    )
    .await;
    let after = snapshot(&db).await;
    assert_eq!(
        (before.1, before.2, &before.3),
        (after.1, after.2, &after.3),
        "steps and notes unchanged"
    );
    mcp.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

/// Speaks raw JSON-RPC to the binary and returns every stdout line, each checked to be a
/// JSON-RPC message: nothing else may appear on stdout.
fn raw_session(
    env: &[(&str, &str)],
    remove_database_url: bool,
    requests: &[Value],
    answers: usize,
) -> Vec<Value> {
    let mut command = Command::new(binary("sortie-mcp"));
    if remove_database_url {
        command.env_remove("DATABASE_URL");
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drained beside stdout: with RUST_LOG=debug a full stderr pipe would block the server.
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let mut stdin = child.stdin.take().unwrap();
    for r in requests {
        writeln!(stdin, "{r}").unwrap();
    }
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut out = Vec::new();
    while out.len() < answers {
        let line = lines.next().expect("an answer").unwrap();
        let message: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON on stdout: {line}"));
        assert_eq!(message["jsonrpc"], "2.0", "{line}");
        out.push(message);
    }
    drop(stdin);
    for line in lines {
        let line = line.unwrap();
        let message: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON on stdout: {line}"));
        assert_eq!(message["jsonrpc"], "2.0", "{line}");
    }
    child.wait().unwrap();
    let _ = drain.join();
    out
}

/// Answers may come in any order: requests are served concurrently.
fn by_id(answers: &[Value], id: i64) -> &Value {
    answers
        .iter()
        .find(|a| a["id"] == id)
        .unwrap_or_else(|| panic!("no answer with id {id}: {answers:?}"))
}

fn handshake() -> Vec<Value> {
    vec![
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    ]
}

/// With no DATABASE_URL the embedded default is started (and its extension created) before the
/// server answers `initialize` (issue 17: a database problem stops the program at start).
/// Unreachable servers and missing extensions are tested in startup.rs.
#[test]
fn without_a_database_url_the_embedded_cluster_is_started_before_serving() {
    let data_dir = std::env::temp_dir().join(format!("sortie-mcp-nodb-{}", std::process::id()));
    let dir = data_dir.to_string_lossy().to_string();
    let answers = raw_session(&[("SORTIE_DATA_DIR", &dir)], true, &handshake(), 2);
    let cluster = sortie_mcp::embedded::Cluster::new(
        data_dir.clone(),
        sortie_mcp::embedded::find_bin_dir().unwrap(),
    );
    let started = data_dir.join("pgdata/PG_VERSION").is_file();
    let _ = cluster.stop("immediate");
    let _ = std::fs::remove_dir_all(&data_dir);
    assert!(started, "the embedded cluster was created before serving");
    assert_eq!(
        by_id(&answers, 1)["result"]["serverInfo"]["name"],
        "sortie_mcp"
    );
    assert_eq!(
        by_id(&answers, 2)["result"]["tools"]
            .as_array()
            .unwrap()
            .len(),
        COORDINATOR_TOOLS.len() + WORKER_TOOLS.len()
    );
}

/// `sortie-mcp --http`: streamable HTTP for remote agents, behind a bearer token.
#[tokio::test]
async fn the_http_transport_serves_tools_behind_a_bearer_token() {
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::ServiceExt;

    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = "a-test-token-long-enough";
    let mut child = Command::new(binary("sortie-mcp"))
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let http = reqwest::Client::new();
    let mut refused = None;
    for _ in 0..100 {
        if let Ok(r) = http
            .post(&url)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
        {
            refused = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(refused, Some(401), "no token, no service");
    let wrong = http
        .post(&url)
        .bearer_auth("wrong-token-wrong-token")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);

    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(url.clone()).auth_header(token),
    );
    let client = ().serve(transport).await.expect("initialize over HTTP");
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), COORDINATOR_TOOLS.len() + WORKER_TOOLS.len());
    let created = client
        .call_tool(
            rmcp::model::CallToolRequestParams::new("create_campaign").with_arguments(
                json!({"goal": "over http", "planner": "none"})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    let id = created.structured_content.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    db.ok(
        "sortie.cancel_campaign($1)",
        &[&uuid::Uuid::parse_str(&id).unwrap()],
    )
    .await;
    let _ = client.cancel().await;
    child.kill().unwrap();
    child.wait().unwrap();
    db.finish().await;
}

#[test]
fn the_http_transport_refuses_to_start_without_a_token() {
    let output = Command::new(binary("sortie-mcp"))
        .args(["--http", "127.0.0.1:0"])
        .env_remove("SORTIE_HTTP_TOKEN")
        .env("DATABASE_URL", "host=/nonexistent user=x dbname=x")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SORTIE_HTTP_TOKEN"));
    assert!(output.stdout.is_empty());
}

/// claim_next without a campaign picks the campaign first, in fair-share order, and claims
/// inside it (on Citus: the campaigns read on the coordinator, the claim run by the twin on the
/// campaign's worker). Two campaigns of equal weight take turns, every step is claimed once,
/// and nothing is left to claim after.
#[tokio::test]
async fn a_claim_without_a_campaign_takes_turns_between_campaigns_by_fair_share() {
    let db = TestDb::new().await;
    let first = campaign(&db, "none").await;
    let second = campaign(&db, "none").await;
    add(&db, first, json!([{"action": "f1"}, {"action": "f2"}])).await;
    add(&db, second, json!([{"action": "s1"}, {"action": "s2"}])).await;
    let mcp = McpClient::start(&db, &[]).await;
    let mut taken = Vec::new();
    for _ in 0..4 {
        let claim = mcp.ok("claim_next", json!({})).await;
        taken.push(claim["action"].as_str().unwrap().to_string());
        mcp.ok(
            "heartbeat",
            json!({"step_id": claim["step_id"], "claim_token": claim["claim_token"]}),
        )
        .await;
    }
    assert_eq!(taken, ["f1", "s1", "f2", "s2"], "fair share takes turns");
    let nothing = mcp.ok("claim_next", json!({})).await;
    assert_eq!(nothing["step_id"], Value::Null, "{nothing}");
    mcp.stop().await;
    for c in [first, second] {
        db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    }
    db.finish().await;
}
