//! The MCP boundary (SPEC §14): every request answered, every argument understood, portable
//! schemas with output schemas, bounded results, lengths checked before work, idempotent
//! retries. The argument and schema tests are generated from `tools/list`, so a new tool is
//! covered (or the test says what it lacks) without anyone remembering to add it.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use sortie_tests::fixtures::*;
use sortie_tests::mcp::{McpClient, Outcome};
use sortie_tests::{binary, wait_for, TestDb};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// 1. Every request answered: raw lines written to the real binary's stdin.

/// A `sortie-mcp` on raw pipes: lines in, JSON-RPC answers out (read on a thread).
struct RawServer {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<Value>,
}

impl RawServer {
    fn start(db: &TestDb, env: &[(&str, &str)]) -> RawServer {
        let mut command = Command::new(binary("sortie-mcp"));
        for key in [
            "SORTIE_ROLE",
            "SORTIE_STEP_ID",
            "SORTIE_CAMPAIGN_ID",
            "SORTIE_CLAIM_TOKEN",
        ] {
            command.env_remove(key);
        }
        let mut child = command
            .env("DATABASE_URL", db.connection_string())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sortie-mcp");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let message: Value = serde_json::from_slice(&line)
                    .unwrap_or_else(|_| json!({"not_json": String::from_utf8_lossy(&line)}));
                if tx.send(message).is_err() {
                    break;
                }
            }
        });
        let mut server = RawServer {
            child,
            stdin,
            answers,
        };
        server.send_json(&json!({"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}}));
        server.answer_to(&json!("init"));
        server.send_json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        server
    }

    fn send_bytes(&mut self, line: &[u8]) {
        self.stdin.write_all(line).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    fn send_json(&mut self, message: &Value) {
        self.send_bytes(message.to_string().as_bytes());
    }

    /// The answer with this id; every other line read on the way must be JSON-RPC too.
    fn answer_to(&mut self, id: &Value) -> Value {
        loop {
            let message = self
                .answers
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no answer to request {id} within 30 s"));
            assert_eq!(
                message["jsonrpc"], "2.0",
                "not JSON-RPC on stdout: {message}"
            );
            if &message["id"] == id {
                return message;
            }
        }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool_call(id: i64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})
}

#[tokio::test]
async fn a_lone_surrogate_or_invalid_utf8_in_a_string_is_replaced_and_answered() {
    let db = TestDb::new().await;
    let mut server = RawServer::start(&db, &[]);
    // What a JavaScript client writes for an emoji cut in half, high and low halves alone.
    for (id, goal) in [(1, r#"cut emoji \ud83d"#), (2, r#"\ude00 low half"#)] {
        let line = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"create_campaign","arguments":{{"goal":"{goal}","planner":"none"}}}}}}"#
        );
        let answer = server.answer_to_line(line.as_bytes(), id);
        assert_eq!(answer["result"]["isError"], false, "{answer}");
        let campaign = answer["result"]["structuredContent"]["id"]
            .as_str()
            .unwrap();
        let stored: String = db
            .client
            .query_one(
                "SELECT goal FROM sortie.campaigns WHERE id = $1",
                &[&Uuid::parse_str(campaign).unwrap()],
            )
            .await
            .unwrap()
            .get(0);
        assert!(stored.contains('\u{FFFD}'), "{stored:?}");
    }
    // Raw bytes that are not UTF-8 inside a string (and inside the tool name).
    let mut line = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"create_campaign","arguments":{"goal":"bad "#.to_vec();
    line.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    line.extend_from_slice(br#" bytes","planner":"none"}}}"#);
    let answer = server.answer_to_line(&line, 3);
    assert_eq!(answer["result"]["isError"], false, "{answer}");
    let mut line =
        br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_campaign"#.to_vec();
    line.extend_from_slice(&[0x80]);
    line.extend_from_slice(br#"","arguments":{}}}"#);
    let answer = server.answer_to_line(&line, 4);
    assert!(
        answer.get("error").is_some() || answer["result"]["isError"] == true,
        "{answer}"
    );
    server.stop();
    for c in open_campaigns(&db).await {
        db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    }
    db.finish().await;
}

impl RawServer {
    fn answer_to_line(&mut self, line: &[u8], id: i64) -> Value {
        self.send_bytes(line);
        self.answer_to(&json!(id))
    }
}

#[tokio::test]
async fn unparseable_lines_and_invalid_requests_get_json_rpc_errors() {
    let db = TestDb::new().await;
    let mut server = RawServer::start(&db, &[]);
    // Unparseable: the id is still found where it can be, else the answer's id is null.
    let answer = server.answer_to_line(br#"{"jsonrpc":"2.0","id":11,"method":"tools/list","#, 11);
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    server.send_bytes(b"this is not json at all");
    let answer = server.answer_to(&Value::Null);
    assert_eq!(answer["error"]["code"], -32700, "{answer}");
    // Invalid requests.
    for (id, line) in [
        (12, r#"{"jsonrpc":"2.0","id":12}"#),
        (13, r#"{"jsonrpc":"1.0","id":13,"method":"tools/list"}"#),
        (14, r#"{"jsonrpc":"2.0","id":14,"method":42}"#),
    ] {
        let answer = server.answer_to_line(line.as_bytes(), id);
        assert_eq!(answer["error"]["code"], -32600, "{line}: {answer}");
    }
    for line in ["[]", "[1,2]", "42", r#""text""#, "{}"] {
        server.send_bytes(line.as_bytes());
        let answer = server.answer_to(&Value::Null);
        assert_eq!(answer["error"]["code"], -32600, "{line}: {answer}");
    }
    // And the server goes on serving.
    server.send_json(&json!({"jsonrpc": "2.0", "id": 15, "method": "tools/list"}));
    let answer = server.answer_to(&json!(15));
    assert!(answer["result"]["tools"].as_array().unwrap().len() > 20);
    server.stop();
    db.finish().await;
}

#[tokio::test]
async fn a_line_over_the_size_limit_is_answered_with_its_size_and_the_limit() {
    let db = TestDb::new().await;
    let mut server = RawServer::start(&db, &[]);
    // 17 MiB against the default 16 MiB, with the id first and with the id last.
    let filler = "x".repeat(17 * 1024 * 1024);
    let first = format!(
        r#"{{"jsonrpc":"2.0","id":21,"method":"tools/call","params":{{"name":"add_note","arguments":{{"content":"{filler}"}}}}}}"#
    );
    let answer = server.answer_to_line(first.as_bytes(), 21);
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(answer["error"]["code"].is_i64(), "{answer}");
    assert!(message.contains(&first.len().to_string()), "{message}");
    assert!(
        message.contains("16777216") && message.contains("16 MiB"),
        "{message}"
    );
    let last = format!(
        r#"{{"method":"tools/call","params":{{"name":"add_note","arguments":{{"content":"{filler}"}}}},"jsonrpc":"2.0","id":22}}"#
    );
    let answer = server.answer_to_line(last.as_bytes(), 22);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit"),
        "{answer}"
    );
    server.send_json(&json!({"jsonrpc": "2.0", "id": 23, "method": "tools/list"}));
    server.answer_to(&json!(23));
    server.stop();
    // The limit is configurable.
    let mut small = RawServer::start(&db, &[("SORTIE_MAX_REQUEST_BYTES", "1000")]);
    let answer = small.answer_to_line(
        tool_call(24, "list_campaigns", json!({"status": "x".repeat(2000)}))
            .to_string()
            .as_bytes(),
        24,
    );
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 bytes"),
        "{answer}"
    );
    small.stop();
    db.finish().await;
}

async fn open_campaigns(db: &TestDb) -> Vec<Uuid> {
    db.client
        .query(
            "SELECT id FROM sortie.campaigns WHERE status IN ('active', 'paused')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 2. Arguments, for every tool listed.

/// Valid arguments for each tool, against fresh state of its own (a new campaign with a claimed
/// step), so that every call can be compared with the same call carrying one quirk. A tool
/// missing here fails the tests: a new tool needs its arguments written down.
async fn base_arguments(db: &TestDb, tool: &str) -> Value {
    let c = campaign(db, "none").await;
    let steps = add_ids(db, c, json!([{"action": "first"}, {"action": "second"}])).await;
    let claim = claim(db, c).await.expect("a claimable step");
    let (s, t) = (claim.step_id, claim.token.to_string());
    let nowhere = Uuid::new_v4().to_string();
    let c = c.to_string();
    match tool {
        "create_campaign" => json!({"goal": "g", "planner": "none", "steps": [{"action": "a"}]}),
        "list_campaigns" => json!({"limit": 5}),
        "get_campaign" => json!({"id": c, "steps_limit": 1}),
        "get_updates" | "pause_campaign" | "resume_campaign" | "check_success" => json!({"id": c}),
        "cancel_campaign" => json!({"id": c, "reason": "done"}),
        "steer_campaign" => json!({"id": c, "guidance": "go left"}),
        "provide_input" => json!({"id": c, "step_id": steps[1], "answer": "yes"}),
        "add_steps" => json!({"campaign_id": c, "steps": [{"action": "more"}]}),
        "list_workflows" | "get_howto_create_workflow" => json!({}),
        "start_workflow" => json!({"workflow_name": "none", "context": {"k": 1}}),
        "get_workflow_status" => json!({"instance_id": nowhere}),
        "advance_workflow" => {
            json!({"instance_id": nowhere, "report": {"step_id": "x", "status": "success"}, "context_updates": {"a": 1}})
        }
        "resume_workflow" => {
            json!({"instance_id": nowhere, "assumed_current_step_name": "x", "report": {"a": 1}})
        }
        "get_my_context" => json!({"step_id": s}),
        "read_step_output" => json!({"step_id": s, "limit": 10}),
        "heartbeat" => json!({"step_id": s, "claim_token": t, "extend_leases_sec": 600}),
        "add_note" => json!({"campaign_id": c, "content": "a finding", "tags": ["finding"]}),
        "search_notes" => {
            json!({"query": "finding", "campaign_id": c, "top_k": 3, "tags": ["finding"]})
        }
        "get_notes" => json!({"campaign_id": c, "tags": ["finding"], "limit": 5}),
        "complete_step" => {
            json!({"step_id": s, "claim_token": t, "summary": "done", "tokens_used": 3})
        }
        "fail_step" => json!({"step_id": s, "claim_token": t, "error": "broke"}),
        "request_input" => json!({"step_id": s, "claim_token": t, "question": "which?"}),
        "spawn_and_continue" => json!({"step_id": s, "claim_token": t, "partial_output": "half",
            "subtasks": [{"action": "sub"}], "continuation": {"action": "merge", "agent": "writer"}}),
        "abort_branch" => {
            json!({"target_id": s, "step_id": s, "claim_token": t, "output": "o", "reason": "r"})
        }
        "claim_next" => json!({"campaign_id": c, "lease_seconds": 60}),
        other => panic!("tool {other} has no base arguments in mcp_boundary.rs: add them"),
    }
}

struct Listed {
    name: String,
    input: Map<String, Value>,
    output: Option<Map<String, Value>>,
}

async fn listed_tools(mcp: &McpClient) -> Vec<Listed> {
    mcp.service
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| Listed {
            name: t.name.to_string(),
            input: t.input_schema.as_ref().clone(),
            output: t.output_schema.map(|o| o.as_ref().clone()),
        })
        .collect()
}

fn properties(schema: &Map<String, Value>) -> Map<String, Value> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

fn required(schema: &Map<String, Value>) -> Vec<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn with(base: &Value, key: &str, value: Value) -> Value {
    let mut out = base.clone();
    out[key] = value;
    out
}

/// What must stay untouched by a refused call: rows of every table a tool writes.
async fn footprint(db: &TestDb) -> Vec<i64> {
    let mut counts = Vec::new();
    for table in [
        "campaigns",
        "steps",
        "notes",
        "events",
        "idempotency_records",
    ] {
        counts.push(count(db, &format!("SELECT count(*) FROM sortie.{table}")).await);
    }
    counts.push(
        count(
            db,
            "SELECT count(*) FROM sortie.steps WHERE status = 'running'",
        )
        .await,
    );
    counts
}

#[tokio::test]
async fn every_tool_refuses_an_unknown_parameter_naming_it_and_its_parameters_and_changes_nothing()
{
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    for tool in listed_tools(&mcp).await {
        let base = base_arguments(&db, &tool.name).await;
        // A misspelt parameter (complete_step(output=...) used to complete with no output).
        for unknown in ["output_text", "campaignid", "bogus"] {
            let before = footprint(&db).await;
            let outcome = mcp.call(&tool.name, with(&base, unknown, json!("x"))).await;
            assert!(outcome.is_error, "{} accepted {unknown}", tool.name);
            assert_eq!(
                outcome.code(),
                "invalid_argument",
                "{}: {}",
                tool.name,
                outcome.text
            );
            assert!(
                outcome.text.contains(&format!("'{unknown}'")),
                "{}: {}",
                tool.name,
                outcome.text
            );
            for name in properties(&tool.input).keys() {
                assert!(
                    outcome.text.contains(name.as_str()),
                    "{} lists {name}: {}",
                    tool.name,
                    outcome.text
                );
            }
            assert_eq!(
                before,
                footprint(&db).await,
                "{} changed something",
                tool.name
            );
        }
    }
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

async fn cancel_all(db: &TestDb) {
    for c in open_campaigns(db).await {
        db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    }
}

/// Null on every optional parameter means "not given": the call ends as the same call without
/// them does.
#[tokio::test]
async fn every_tool_takes_null_on_an_optional_parameter_as_not_given() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    for tool in listed_tools(&mcp).await {
        let base = base_arguments(&db, &tool.name).await;
        let expected = mcp.call(&tool.name, base.clone()).await;
        let required = required(&tool.input);
        for name in properties(&tool.input).keys() {
            if required.contains(name) {
                continue;
            }
            let mut args = base_arguments(&db, &tool.name).await;
            if args.get(name).is_some() {
                // Given in the base: compare with the base without it.
                continue;
            }
            args[name] = Value::Null;
            let outcome = mcp.call(&tool.name, args).await;
            assert_eq!(
                (outcome.is_error, outcome.code()),
                (expected.is_error, expected.code()),
                "{}({name}=null): {} / without it: {}",
                tool.name,
                outcome.text,
                expected.text
            );
        }
        // Every optional at once.
        let mut args = base_arguments(&db, &tool.name).await;
        for name in properties(&tool.input).keys() {
            if !required.contains(name) && args.get(name).is_none() {
                args[name] = Value::Null;
            }
        }
        let outcome = mcp.call(&tool.name, args).await;
        assert_eq!(
            outcome.code(),
            expected.code(),
            "{}: {}",
            tool.name,
            outcome.text
        );
    }
    // The case of the report: complete_step(summary=null) completes.
    let c = campaign(&db, "none").await;
    add_ids(&db, c, json!([{"action": "a"}])).await;
    let claim = claim(&db, c).await.unwrap();
    let done = mcp
        .ok("complete_step", json!({"step_id": claim.step_id, "claim_token": claim.token.to_string(), "summary": null}))
        .await;
    assert_eq!(done["status"], "done");
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

fn declared_type(property: &Value) -> &str {
    property["type"].as_str().unwrap_or("")
}

/// A structured parameter sent as JSON text is taken as the value it encodes.
#[tokio::test]
async fn every_tool_takes_json_text_of_a_structured_parameter_as_its_value() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let mut structured = 0;
    for tool in listed_tools(&mcp).await {
        let props = properties(&tool.input);
        for (name, property) in &props {
            if !matches!(
                declared_type(property),
                "array" | "object" | "integer" | "number" | "boolean"
            ) {
                continue;
            }
            let base = base_arguments(&db, &tool.name).await;
            let Some(value) = base.get(name).cloned() else {
                continue;
            };
            structured += 1;
            let expected = mcp.call(&tool.name, base.clone()).await;
            let base = base_arguments(&db, &tool.name).await;
            let value = base.get(name).cloned().unwrap_or(value);
            let outcome = mcp
                .call(&tool.name, with(&base, name, json!(value.to_string())))
                .await;
            assert_eq!(
                (outcome.is_error, outcome.code()),
                (expected.is_error, expected.code()),
                "{}({name} as text): {} / as JSON: {}",
                tool.name,
                outcome.text,
                expected.text
            );
        }
    }
    assert!(
        structured >= 10,
        "only {structured} structured parameters exercised"
    );
    // The cases of the report: subtasks as text; continuation as text keeps its agent.
    let c = campaign(&db, "none").await;
    add_ids(&db, c, json!([{"action": "a"}])).await;
    let claim = claim(&db, c).await.unwrap();
    let spawned = mcp
        .ok(
            "spawn_and_continue",
            json!({"step_id": claim.step_id, "claim_token": claim.token.to_string(),
            "subtasks": "[{\"action\": \"research\"}]",
            "continuation": "{\"action\": \"merge results\", \"agent\": \"writer\"}"}),
        )
        .await;
    assert!(spawned.is_object());
    let agent: Option<String> = db
        .client
        .query_one(
            "SELECT agent FROM sortie.steps WHERE campaign_id = $1 AND action = 'merge results'",
            &[&c],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(agent.as_deref(), Some("writer"));
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

/// A value of the wrong type is refused naming the parameter, for every parameter of every tool.
#[tokio::test]
async fn every_tool_names_the_parameter_of_a_type_error() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    for tool in listed_tools(&mcp).await {
        let base = base_arguments(&db, &tool.name).await;
        for (name, property) in properties(&tool.input) {
            let wrong = match declared_type(&property) {
                "string" => json!({"not": "a string"}),
                "integer" | "number" | "boolean" => json!("not a number or boolean"),
                "array" => json!(5),
                "object" => json!(5),
                other => panic!("{}.{name} declares type {other:?}", tool.name),
            };
            let before = footprint(&db).await;
            let outcome = mcp.call(&tool.name, with(&base, &name, wrong)).await;
            assert_eq!(
                outcome.code(),
                "invalid_argument",
                "{}.{name}: {}",
                tool.name,
                outcome.text
            );
            assert!(
                outcome.text.contains(&format!("'{name}'")),
                "{}.{name}: {}",
                tool.name,
                outcome.text
            );
            assert_eq!(
                before,
                footprint(&db).await,
                "{}.{name} changed something",
                tool.name
            );
        }
    }
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

/// Tools that name their campaign `id` also take it as `campaign_id`.
#[tokio::test]
async fn every_tool_taking_a_campaign_as_id_also_takes_campaign_id() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let mut exercised = 0;
    for tool in listed_tools(&mcp).await {
        let props = properties(&tool.input);
        if !props.contains_key("id") || props.contains_key("campaign_id") {
            continue;
        }
        exercised += 1;
        let expected = mcp
            .call(&tool.name, base_arguments(&db, &tool.name).await)
            .await;
        let mut args = base_arguments(&db, &tool.name).await;
        let id = args.as_object_mut().unwrap().remove("id").unwrap();
        args["campaign_id"] = id;
        let outcome = mcp.call(&tool.name, args).await;
        assert_eq!(
            (outcome.is_error, outcome.code()),
            (expected.is_error, expected.code()),
            "{}: {}",
            tool.name,
            outcome.text
        );
    }
    assert!(exercised >= 8, "{exercised}");
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Portable schemas, and structuredContent that validates against outputSchema.

/// The rules of SPEC §14 for one schema node; `path` names it in messages.
fn check_portable(node: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for key in ["$schema", "$ref", "$defs", "definitions"] {
        if map.contains_key(key) {
            problems.push(format!("{path}: has {key}"));
        }
    }
    if let Some(t) = map.get("type") {
        if !t.is_string() {
            problems.push(format!("{path}: type is {t}, not one type"));
        }
    }
    if let Some(format) = map.get("format") {
        if format != "date-time" {
            problems.push(format!("{path}: format {format}"));
        }
    }
    if map.get("type") == Some(&json!("object"))
        && map.get("additionalProperties") != Some(&json!(false))
    {
        problems.push(format!(
            "{path}: object without additionalProperties: false"
        ));
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, property) in props {
            if !property.get("type").is_some_and(Value::is_string) {
                problems.push(format!("{path}.{name}: no type"));
            }
            check_portable(property, &format!("{path}.{name}"), problems);
        }
    }
    if let Some(items) = map.get("items") {
        check_portable(items, &format!("{path}[]"), problems);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for (i, branch) in map
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            check_portable(branch, &format!("{path}.{key}[{i}]"), problems);
        }
    }
}

#[tokio::test]
async fn every_input_and_output_schema_is_portable() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let mut problems = Vec::new();
    for tool in listed_tools(&mcp).await {
        check_portable(
            &Value::Object(tool.input.clone()),
            &format!("{}.input", tool.name),
            &mut problems,
        );
        assert_eq!(
            tool.input.get("type"),
            Some(&json!("object")),
            "{}",
            tool.name
        );
        match &tool.output {
            Some(output) => {
                assert_eq!(output.get("type"), Some(&json!("object")), "{}", tool.name);
                check_portable(
                    &Value::Object(output.clone()),
                    &format!("{}.output", tool.name),
                    &mut problems,
                );
            }
            None => problems.push(format!("{}: no outputSchema", tool.name)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    mcp.stop().await;
    db.finish().await;
}

/// A small validator for the subset of JSON Schema the portable rules allow.
fn validate(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let fits = match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => false,
        };
        if !fits {
            errors.push(format!("{path}: {value} is not {t}"));
            return;
        }
    }
    if let Some(branches) = schema.get("anyOf").and_then(Value::as_array) {
        if !branches.iter().any(|b| {
            let mut e = Vec::new();
            validate(b, value, path, &mut e);
            e.is_empty()
        }) {
            errors.push(format!("{path}: no anyOf branch admits {value}"));
        }
    }
    if let Some(object) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !object.contains_key(name.as_str().unwrap_or_default()) {
                errors.push(format!("{path}: missing {name}"));
            }
        }
        let open = schema
            .get("patternProperties")
            .and_then(Value::as_object)
            .is_some_and(|p| {
                p.keys().all(|k| k == "^.*$" || k == ".*" || k.is_empty()) && !p.is_empty()
            });
        for (key, item) in object {
            match props.and_then(|p| p.get(key)) {
                Some(property) => validate(property, item, &format!("{path}.{key}"), errors),
                None if open => {}
                None if schema.get("additionalProperties") == Some(&json!(false)) => {
                    errors.push(format!("{path}: {key} is not admitted"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array()) {
        for (i, item) in array.iter().enumerate() {
            validate(items, item, &format!("{path}[{i}]"), errors);
        }
    }
    if let (Some(max), Some(text)) = (
        schema.get("maxLength").and_then(Value::as_u64),
        value.as_str(),
    ) {
        if text.chars().count() as u64 > max {
            errors.push(format!("{path}: longer than {max}"));
        }
    }
}

/// Every tool, called as a client would, answers with structuredContent that its own output
/// schema admits — errors too, since the TypeScript SDK validates those as well.
#[tokio::test]
async fn every_tool_result_validates_against_its_output_schema_errors_included() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let mut errors = Vec::new();
    for tool in listed_tools(&mcp).await {
        let schema = Value::Object(tool.output.clone().expect("an outputSchema"));
        let good = mcp
            .call(&tool.name, base_arguments(&db, &tool.name).await)
            .await;
        let refused = mcp.call(&tool.name, json!({"no_such_parameter": 1})).await;
        assert!(refused.is_error);
        for (label, outcome) in [("result", &good), ("refusal", &refused)] {
            assert!(
                outcome.value.is_object(),
                "{} {label} has no structuredContent: {}",
                tool.name,
                outcome.text
            );
            validate(
                &schema,
                &outcome.value,
                &format!("{}.{label}", tool.name),
                &mut errors,
            );
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Bounded results; lengths before work.

const RESULT_LIMIT: usize = 100_000;

fn size(outcome: &Outcome) -> usize {
    outcome.value.to_string().len().max(outcome.text.len())
}

#[tokio::test]
async fn large_campaigns_and_many_notes_come_back_in_pages_under_the_limit() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let c = campaign(&db, "none").await;
    let action = "a".repeat(200);
    let steps: Vec<Value> = (0..500)
        .map(|i| json!({"action": format!("{action} {i}")}))
        .collect();
    add(&db, c, json!(steps)).await;
    // Steps, a page at a time, every step once.
    let mut seen = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = json!({"id": c.to_string()});
        if let Some(cursor) = &cursor {
            args["steps_cursor"] = json!(cursor);
        }
        let page = mcp.call("get_campaign", args).await;
        assert!(!page.is_error, "{}", page.text);
        assert!(
            size(&page) < RESULT_LIMIT,
            "get_campaign page of {} chars",
            size(&page)
        );
        for step in page.value["steps"].as_array().unwrap() {
            assert!(
                seen.insert(step["id"].as_i64().unwrap()),
                "a step on two pages"
            );
        }
        match page.value["next_steps_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 500);
    // Notes: 50 of 3,000 characters.
    for i in 0..50 {
        db.ok(
            "sortie.add_note(campaign_id => $1, content => $2)",
            &[&c, &format!("note {i} {}", "word ".repeat(600))],
        )
        .await;
    }
    let mut notes = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut args = json!({"campaign_id": c.to_string()});
        if let Some(cursor) = &cursor {
            args["cursor"] = json!(cursor);
        }
        let page = mcp.call("get_notes", args).await;
        assert!(!page.is_error, "{}", page.text);
        assert!(
            size(&page) < RESULT_LIMIT,
            "get_notes page of {} chars",
            size(&page)
        );
        for note in page.value["notes"].as_array().unwrap() {
            assert!(note["content"].as_str().unwrap().len() <= 1000);
            assert!(note["content_chars"].as_i64().unwrap() > 3000);
            notes += 1;
        }
        match page.value["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(notes, 50);
    let search = mcp
        .call("search_notes", json!({"query": "note word", "top_k": 1000}))
        .await;
    assert!(!search.is_error, "{}", search.text);
    assert!(search.value["results"].as_array().unwrap().len() <= 50);
    assert!(
        size(&search) < RESULT_LIMIT,
        "search_notes of {} chars",
        size(&search)
    );
    // Steps with long actions: the default page shrinks to fit.
    let wide = campaign(&db, "none").await;
    let long_action = "w".repeat(2000);
    let steps: Vec<Value> = (0..150)
        .map(|i| json!({"action": format!("{long_action} {i}")}))
        .collect();
    add(&db, wide, json!(steps)).await;
    let page = mcp
        .call("get_campaign", json!({"id": wide.to_string()}))
        .await;
    assert!(!page.is_error, "{}", page.text);
    assert!(
        size(&page) < RESULT_LIMIT,
        "get_campaign page of {} chars",
        size(&page)
    );
    assert!(page.value["next_steps_cursor"].is_string());
    db.ok("sortie.cancel_campaign($1)", &[&wide]).await;
    let list = mcp.call("list_campaigns", json!({})).await;
    assert!(list.value.get("next_cursor").is_some());
    mcp.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

#[tokio::test]
async fn over_long_names_and_notes_are_refused_before_any_work() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let c = campaign(&db, "none").await.to_string();
    let long = "n".repeat(201);
    let cases = [
        ("create_campaign", json!({"goal": "g", "name": long})),
        (
            "create_campaign",
            json!({"goal": "g", "channel": "c".repeat(10_000_000)}),
        ),
        (
            "create_campaign",
            json!({"goal": "g", "success_metric": long}),
        ),
        ("claim_next", json!({"agent": long})),
        (
            "add_note",
            json!({"campaign_id": c, "content": "x", "tags": ["ok", long]}),
        ),
        ("get_notes", json!({"campaign_id": c, "tags": [long]})),
        (
            "add_steps",
            json!({"campaign_id": c, "steps": [{"action": "a", "children": [{"action": "b", "agent": long}]}]}),
        ),
        (
            "spawn_and_continue",
            json!({"step_id": 1, "claim_token": Uuid::new_v4().to_string(), "subtasks": [{"action": "a"}],
                   "continuation": {"action": "m", "agent": long}}),
        ),
        (
            "add_steps",
            json!({"campaign_id": c, "steps": [{"action": "a"}], "request_id": long}),
        ),
    ];
    for (tool, args) in cases {
        let before = footprint(&db).await;
        let outcome = mcp.call(tool, args).await;
        assert_eq!(
            outcome.code(),
            "invalid_argument",
            "{tool}: {}",
            outcome.text
        );
        assert!(outcome.text.contains("at most"), "{tool}: {}", outcome.text);
        assert_eq!(before, footprint(&db).await, "{tool} changed something");
    }
    // 8 MB of note is refused at once, before the embedder sees it.
    let started = std::time::Instant::now();
    let outcome = mcp
        .call(
            "add_note",
            json!({"campaign_id": c, "content": "w ".repeat(4_000_000)}),
        )
        .await;
    assert_eq!(outcome.code(), "invalid_argument", "{}", outcome.text);
    assert!(outcome.text.contains("100000"), "{}", outcome.text);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let exactly = mcp
        .call(
            "add_note",
            json!({"campaign_id": c, "content": "x".repeat(100_000)}),
        )
        .await;
    assert!(!exactly.is_error, "{}", exactly.text);
    // SQL callers get the same limit.
    let too_long = "x".repeat(100_001);
    let refused = db
        .call(
            "sortie.add_note(campaign_id => $1, content => $2)",
            &[&Uuid::parse_str(&c).unwrap(), &too_long],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "invalid_argument");
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 6. Idempotency and lost replies.

#[tokio::test]
async fn every_idempotent_tool_replays_its_first_result_and_refuses_other_arguments() {
    let db = TestDb::new().await;
    let dir = workflow_dir();
    let mcp = McpClient::start(&db, &[("WORKFLOW_DEFINITIONS_DIR", dir.clone())]).await;
    let c = campaign(&db, "none").await;
    let cs = c.to_string();
    let asking = add_ids(&db, c, json!([{"action": "ask"}])).await[0];
    let ask = claim(&db, c).await.unwrap();
    db.ok(
        "sortie.request_input(step_id => $1, claim_token => $2, question => 'which?')",
        &[&ask.step_id, &ask.token],
    )
    .await;
    add_ids(&db, c, json!([{"action": "split me"}])).await;
    let split = claim(&db, c).await.unwrap();
    let started = mcp
        .ok(
            "start_workflow",
            json!({"workflow_name": "greet", "request_id": "wf-start"}),
        )
        .await;
    let instance = started["instance_id"].as_str().unwrap().to_string();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "create_campaign",
            json!({"goal": "g", "planner": "none"}),
            "goal",
        ),
        (
            "add_steps",
            json!({"campaign_id": cs, "steps": [{"action": "x"}, {"action": "y"}]}),
            "steps",
        ),
        (
            "add_note",
            json!({"campaign_id": cs, "content": "seen once"}),
            "content",
        ),
        (
            "steer_campaign",
            json!({"id": cs, "guidance": "left"}),
            "guidance",
        ),
        (
            "provide_input",
            json!({"id": cs, "step_id": asking, "answer": "blue"}),
            "answer",
        ),
        (
            "spawn_and_continue",
            json!({"step_id": split.step_id, "claim_token": split.token.to_string(),
            "subtasks": [{"action": "part"}], "continuation": "merge"}),
            "partial_output",
        ),
        (
            "start_workflow",
            json!({"workflow_name": "greet", "context": {"who": "x"}}),
            "context",
        ),
        (
            "advance_workflow",
            json!({"instance_id": instance, "report": {"step_id": "hello", "status": "success"}}),
            "report",
        ),
    ];
    for (tool, args, changed) in cases {
        let request_id = format!("req-{tool}");
        let args = with(&args, "request_id", json!(request_id));
        let first = mcp.ok(tool, args.clone()).await;
        assert!(
            first.get("replayed").is_none_or(|r| r == false),
            "{tool}: {first}"
        );
        let before = footprint(&db).await;
        let again = mcp.ok(tool, args.clone()).await;
        assert_eq!(again["replayed"], true, "{tool}: {again}");
        let mut without = again.clone();
        without.as_object_mut().unwrap().remove("replayed");
        assert_eq!(without, first, "{tool} answers as the first time");
        assert_eq!(
            before,
            footprint(&db).await,
            "{tool}: the repeat changed something"
        );
        let other = with(
            &args,
            changed,
            if changed == "steps" {
                json!([{"action": "z"}])
            } else if changed == "context" || changed == "report" {
                json!({"step_id": "other"})
            } else {
                json!("something else")
            },
        );
        let refused = mcp.call(tool, other).await;
        assert_eq!(
            refused.code(),
            "invalid_argument",
            "{tool}: {}",
            refused.text
        );
        assert!(
            refused.text.contains("request_id"),
            "{tool}: {}",
            refused.text
        );
        assert_eq!(
            before,
            footprint(&db).await,
            "{tool}: the refusal changed something"
        );
    }
    // SQL callers get the same.
    let first = db
        .ok(
            "sortie.add_steps($1, '[{\"action\": \"sql\"}]', request_id => 'sql-1')",
            &[&c],
        )
        .await;
    let again = db
        .ok(
            "sortie.add_steps($1, '[{\"action\": \"sql\"}]', request_id => 'sql-1')",
            &[&c],
        )
        .await;
    assert_eq!(again["replayed"], true);
    assert_eq!(again["step_ids"], first["step_ids"]);
    mcp.stop().await;
    cancel_all(&db).await;
    let _ = std::fs::remove_dir_all(dir);
    db.finish().await;
}

fn workflow_dir() -> String {
    let dir = std::env::temp_dir().join(format!("sortie-boundary-wf-{}", Uuid::new_v4()));
    let greet = dir.join("greet");
    std::fs::create_dir_all(greet.join("steps")).unwrap();
    std::fs::write(
        greet.join("index.md"),
        "# Say hello\n- [hello](steps/hello.md)\n",
    )
    .unwrap();
    std::fs::write(
        greet.join("steps/hello.md"),
        "# Orchestrator Guidance\non success: FINISH\n\n# Client Instructions\nSay hello.\n",
    )
    .unwrap();
    dir.to_string_lossy().to_string()
}

#[tokio::test]
async fn a_repeated_complete_or_fail_by_the_finishing_claim_answers_as_the_first_time() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let c = campaign(&db, "none").await;
    add_ids(
        &db,
        c,
        json!([{"action": "a", "max_attempts": 1}, {"action": "b", "max_attempts": 3}]),
    )
    .await;
    for tool in ["complete_step", "fail_step"] {
        let claim = claim(&db, c).await.unwrap();
        let args = json!({"step_id": claim.step_id, "claim_token": claim.token.to_string()});
        let first = mcp.ok(tool, args.clone()).await;
        let before = footprint(&db).await;
        let again = mcp.ok(tool, args.clone()).await;
        assert_eq!(again["replayed"], true, "{tool}: {again}");
        let mut without = again.clone();
        without.as_object_mut().unwrap().remove("replayed");
        assert_eq!(without, first);
        assert_eq!(before, footprint(&db).await);
        // Another claim's token is still stale.
        let stranger = mcp
            .call(
                tool,
                json!({"step_id": claim.step_id, "claim_token": Uuid::new_v4().to_string()}),
            )
            .await;
        assert!(stranger.is_error, "{tool}: {}", stranger.text);
    }
    mcp.stop().await;
    cancel_all(&db).await;
    db.finish().await;
}

/// The backend of a call waiting on a lock, found by the text of its statement.
async fn waiting_backend(db: &TestDb, function: &str) -> Option<i32> {
    db.client
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1 LIMIT 1",
            &[&format!("%{function}(%")],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

/// The server dies after the database committed and before it answered: the client retries
/// with the same request_id on a new server, and nothing happens twice.
#[tokio::test]
async fn a_server_killed_after_commit_and_before_its_reply_is_retried_safely() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    // Few enough steps that the answer fits PostgreSQL's send buffer: the backend commits before
    // it tries to write to the dead connection.
    let steps: Vec<Value> = (0..300)
        .map(|i| json!({"action": format!("s{i}")}))
        .collect();
    let args = json!({"campaign_id": c.to_string(), "steps": steps, "request_id": "kill-add"});
    // Hold the campaign so that the call waits inside the database.
    let holder = db.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM sortie.campaigns WHERE id = $1 FOR UPDATE",
            &[&c],
        )
        .await
        .unwrap();
    let mut server = RawServer::start(&db, &[]);
    server.send_json(&tool_call(31, "add_steps", args.clone()));
    wait_for(Duration::from_secs(20), || async {
        waiting_backend(&db, "add_steps").await.is_some()
    })
    .await;
    assert!(
        waiting_backend(&db, "add_steps").await.is_some(),
        "the call reached the database"
    );
    server.stop(); // SIGKILL: no reply will ever be written
    holder.batch_execute("COMMIT").await.unwrap();
    wait_for(Duration::from_secs(20), || async {
        count(&db, "SELECT count(*) FROM sortie.steps").await == 300
    })
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.steps").await,
        300,
        "the call committed"
    );
    let mcp = McpClient::start(&db, &[]).await;
    let retried = mcp.ok("add_steps", args).await;
    assert_eq!(retried["replayed"], true, "{retried}");
    assert_eq!(retried["step_ids"].as_array().unwrap().len(), 300);
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.steps").await,
        300,
        "no step twice"
    );

    // The same for a completion: the retry by the same claim is answered, not stale_claim.
    let claim = claim(&db, c).await.unwrap();
    let holder = db.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM sortie.campaigns WHERE id = $1 FOR UPDATE",
            &[&c],
        )
        .await
        .unwrap();
    let complete = json!({"step_id": claim.step_id, "claim_token": claim.token.to_string(), "summary": "once"});
    let mut server = RawServer::start(&db, &[]);
    server.send_json(&tool_call(32, "complete_step", complete.clone()));
    wait_for(Duration::from_secs(20), || async {
        waiting_backend(&db, "complete_step").await.is_some()
    })
    .await;
    server.stop();
    holder.batch_execute("COMMIT").await.unwrap();
    wait_for(Duration::from_secs(20), || async {
        status(&db, claim.step_id).await == "done"
    })
    .await;
    let retried = mcp.ok("complete_step", complete).await;
    assert_eq!(retried["replayed"], true, "{retried}");
    assert_eq!(retried["status"], "done");
    mcp.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

/// The connection to the database is lost while a call is in flight: the answer is `in_doubt`
/// and says to repeat with the same request_id, never `unavailable`.
#[tokio::test]
async fn a_call_whose_connection_is_lost_in_flight_answers_in_doubt() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let holder = db.connect().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            "SELECT 1 FROM sortie.campaigns WHERE id = $1 FOR UPDATE",
            &[&c],
        )
        .await
        .unwrap();
    let mcp = McpClient::start(&db, &[]).await;
    let call = mcp.call(
        "steer_campaign",
        json!({"id": c.to_string(), "guidance": "left", "request_id": "doubt-1"}),
    );
    let cut = async {
        wait_for(Duration::from_secs(20), || async {
            waiting_backend(&db, "steer_campaign").await.is_some()
        })
        .await;
        let pid = waiting_backend(&db, "steer_campaign")
            .await
            .expect("the call waits");
        db.client
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .unwrap();
    };
    let (outcome, ()) = tokio::join!(call, cut);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(outcome.code(), "in_doubt", "{}", outcome.text);
    assert!(outcome.text.contains("same request_id"), "{}", outcome.text);
    // The repeat is safe either way.
    let again = mcp
        .call(
            "steer_campaign",
            json!({"id": c.to_string(), "guidance": "left", "request_id": "doubt-1"}),
        )
        .await;
    assert!(!again.is_error, "{}", again.text);
    mcp.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

// ---------------------------------------------------------------------------------------------
// 7. logging/setLevel.

#[tokio::test]
async fn the_server_accepts_logging_set_level() {
    let db = TestDb::new().await;
    let mut server = RawServer::start(&db, &[]);
    server.send_json(&json!({"jsonrpc": "2.0", "id": 41, "method": "logging/setLevel", "params": {"level": "debug"}}));
    let answer = server.answer_to(&json!(41));
    assert!(answer.get("error").is_none(), "{answer}");
    assert!(answer["result"].is_object(), "{answer}");
    server.stop();
    db.finish().await;
}

/// An HTTP request without the right token is a 401 that names the scheme (RFC 6750).
#[tokio::test]
async fn an_http_401_carries_www_authenticate_bearer() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(binary("sortie-mcp"))
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", "a-test-token-long-enough")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let http = reqwest::Client::new();
    let mut answers = Vec::new();
    for token in [None, Some("wrong-token-wrong-token")] {
        let mut response = None;
        for _ in 0..200 {
            let mut request = http
                .post(&url)
                .header("content-type", "application/json")
                .body("{}");
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            if let Ok(r) = request.send().await {
                response = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        answers.push(response.expect("the HTTP server answers"));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for response in answers {
        assert_eq!(response.status().as_u16(), 401);
        let challenge = response
            .headers()
            .get("www-authenticate")
            .expect("a WWW-Authenticate header")
            .to_str()
            .unwrap()
            .to_string();
        assert!(challenge.starts_with("Bearer"), "{challenge}");
    }
    db.finish().await;
}
