//! Markdown workflows (SPEC §7) through the real `sortie-mcp` binary: definitions pinned by
//! hash, declared transitions machine-checked, the planner LLM choosing only valid steps, an
//! LLM outage changing nothing, and one advance per step under concurrency.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fake_http::FakeHttp;
use sortie_tests::fixtures::*;
use sortie_tests::mcp::McpClient;
use sortie_tests::{call_on, wait_for, TestDb};

/// A folder with workflow REVIEW: Read Diff (transitions), Verdict (none: a choice), Wrap Up.
fn workflows_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sortie-workflows-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let files = [
        (
            "REVIEW/index.md",
            "# Review a change\n\n# Steps\n\n- [Read Diff](steps/read.md)\n- [Verdict](steps/verdict.md)\n- [Wrap Up](steps/wrap.md)\n",
        ),
        (
            "REVIEW/steps/read.md",
            "# Orchestrator Guidance\non success: Verdict\non failed: FINISH\n\n# Client Instructions\nRead the diff. {{file:shared/tone.md}}\n",
        ),
        (
            "REVIEW/steps/verdict.md",
            "# Orchestrator Guidance\nIf the change is good, go to Wrap Up; if not, FINISH.\n\n# Client Instructions\nGive a verdict.\n",
        ),
        (
            "REVIEW/steps/wrap.md",
            "# Orchestrator Guidance\non done: FINISH\n\n# Client Instructions\nSummarise.\n",
        ),
        ("REVIEW/shared/tone.md", "Be brief."),
        ("BROKEN/index.md", "# Broken\n- [Only](steps/missing.md)\n"),
    ];
    for (path, text) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

async fn client(db: &TestDb, dir: &std::path::Path, llm: Option<&FakeHttp>) -> McpClient {
    let mut env = vec![("WORKFLOW_DEFINITIONS_DIR", dir.display().to_string())];
    if let Some(llm) = llm {
        env.push(("LITELLM_URL", llm.url.clone()));
    }
    McpClient::start(db, &env).await
}

fn instance(v: &Value) -> String {
    v["instance_id"].as_str().unwrap().to_string()
}

async fn start_review(mcp: &McpClient) -> String {
    instance(
        &mcp.ok("start_workflow", json!({"workflow_name": "REVIEW"}))
            .await,
    )
}

async fn history_len(mcp: &McpClient, id: &str) -> usize {
    mcp.ok("get_workflow_status", json!({"instance_id": id}))
        .await["history"]
        .as_array()
        .unwrap()
        .len()
}

#[tokio::test]
async fn declared_transitions_decide_and_finish_ends_the_instance() {
    let db = TestDb::new().await;
    let dir = workflows_dir();
    let mcp = client(&db, &dir, None).await;

    let listed = mcp.ok("list_workflows", json!({})).await;
    assert_eq!(listed["workflows"][1]["name"], "REVIEW");
    assert_eq!(
        listed["workflows"][1]["steps"],
        json!(["Read Diff", "Verdict", "Wrap Up"])
    );
    assert!(listed["workflows"][0]["error"]
        .as_str()
        .unwrap()
        .contains("does not exist"));

    let started = mcp
        .ok(
            "start_workflow",
            json!({"workflow_name": "REVIEW", "context": {"repo": "r"}}),
        )
        .await;
    let id = instance(&started);
    assert_eq!(started["current_step"]["step_name"], "Read Diff");
    assert_eq!(
        started["current_step"]["instructions"],
        "Read the diff. Be brief."
    );
    // The instance is pinned: editing the files does not change it.
    std::fs::write(
        dir.join("REVIEW/steps/verdict.md"),
        "# Client Instructions\nChanged.\n",
    )
    .unwrap();

    // A report for another step, or a status with no declared transition: refused, unchanged.
    let wrong = mcp
        .call(
            "advance_workflow",
            json!({"instance_id": id, "report": {"step_id": "Verdict", "status": "success"}}),
        )
        .await;
    assert_eq!(wrong.code(), "invalid_state");
    let undeclared = mcp
        .call(
            "advance_workflow",
            json!({"instance_id": id, "report": {"step_id": "Read Diff", "status": "maybe"}}),
        )
        .await;
    assert_eq!(undeclared.code(), "invalid_argument");
    assert!(
        undeclared.text.contains("failed, success"),
        "{}",
        undeclared.text
    );
    assert_eq!(history_len(&mcp, &id).await, 1);

    let moved = mcp
        .ok(
            "advance_workflow",
            json!({"instance_id": id, "report": {"step_id": "Read Diff", "status": "success"},
                                       "context_updates": {"lines": 12}}),
        )
        .await;
    assert_eq!(moved["current_step"]["step_name"], "Verdict");
    assert_eq!(moved["current_step"]["instructions"], "Give a verdict.");
    assert_eq!(moved["decided_by"], "transition");
    assert_eq!(moved["context"], json!({"repo": "r", "lines": 12}));

    // Pausing and resuming the campaign leaves a workflow instance where it was.
    let c = uuid::Uuid::parse_str(&id).unwrap();
    db.ok("sortie.pause_campaign(id => $1)", &[&c]).await;
    db.ok("sortie.resume_campaign(id => $1)", &[&c]).await;
    assert_eq!(campaign_status(&db, c).await, "active");

    // Verdict declares no transitions and no planner is configured: the caller chooses.
    let verdict = json!({"step_id": "Verdict", "status": "success"});
    let choose = mcp
        .call(
            "advance_workflow",
            json!({"instance_id": id, "report": verdict}),
        )
        .await;
    assert_eq!(choose.code(), "choice_required");
    assert!(
        choose.text.contains("Read Diff, Verdict, Wrap Up, FINISH"),
        "{}",
        choose.text
    );
    let invented = mcp
        .call(
            "advance_workflow",
            json!({"instance_id": id, "report": verdict, "next_step": "Deploy"}),
        )
        .await;
    assert_eq!(invented.code(), "invalid_argument");
    assert_eq!(history_len(&mcp, &id).await, 2);
    let chosen = mcp
        .ok(
            "advance_workflow",
            json!({"instance_id": id, "report": verdict, "next_step": "wrap up"}),
        )
        .await;
    assert_eq!(chosen["current_step"]["step_name"], "Wrap Up");
    assert_eq!(chosen["decided_by"], "choice");

    let done = mcp
        .ok(
            "advance_workflow",
            json!({"instance_id": id, "report": {"step_id": "Wrap Up", "status": "done"}}),
        )
        .await;
    assert_eq!(done["status"], "done");
    assert_eq!(done["current_step"], Value::Null);
    let history = done["history"].as_array().unwrap();
    let path: Vec<&str> = history
        .iter()
        .map(|h| h["determined_next_step"].as_str().unwrap())
        .collect();
    assert_eq!(path, ["Read Diff", "Verdict", "Wrap Up", "FINISH"]);
    // A coordinator watching updates sees each move and the end.
    let updates = mcp.ok("get_updates", json!({"id": id})).await;
    let moves: Vec<&str> = updates["workflow_moves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["to"].as_str().unwrap())
        .collect();
    assert_eq!(moves, ["Verdict", "Wrap Up", "FINISH"]);
    assert!(updates["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["event"] == "campaign.done"));
    let after = mcp
        .call(
            "advance_workflow",
            json!({"instance_id": id, "report": {"step_id": "Wrap Up", "status": "done"}}),
        )
        .await;
    assert_eq!(after.code(), "invalid_state");
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn the_planner_llm_picks_only_valid_steps_and_its_outage_changes_nothing() {
    let db = TestDb::new().await;
    let dir = workflows_dir();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    // First an outage, then an invented step, then a valid one.
    let llm = FakeHttp::start(move |_, _| {
        let pick = |name: &str| json!({"choices": [{"message": {"content": json!({"next_step_name": name}).to_string()}}]});
        match seen.fetch_add(1, Ordering::SeqCst) {
            0 => (503, json!({"error": "overloaded"})),
            1 => (200, pick("Deploy")),
            _ => (200, pick("Wrap Up")),
        }
    })
    .await;
    let mcp = client(&db, &dir, Some(&llm)).await;
    let id = start_review(&mcp).await;
    mcp.ok(
        "advance_workflow",
        json!({"instance_id": id, "report": {"step_id": "Read Diff", "status": "success"}}),
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a declared transition needs no LLM"
    );

    let verdict = json!({"instance_id": id, "report": {"step_id": "Verdict", "status": "success", "result": "good"}});
    let outage = mcp.call("advance_workflow", verdict.clone()).await;
    assert_eq!(outage.code(), "unavailable");
    let invented = mcp.call("advance_workflow", verdict.clone()).await;
    assert!(invented.is_error);
    assert!(invented.text.contains("Deploy"), "{}", invented.text);
    let status = mcp
        .ok("get_workflow_status", json!({"instance_id": id}))
        .await;
    assert_eq!(status["current_step"]["step_name"], "Verdict");
    assert_eq!(status["status"], "active");
    assert_eq!(status["history"].as_array().unwrap().len(), 2);

    let chosen = mcp.ok("advance_workflow", verdict).await;
    assert_eq!(chosen["current_step"]["step_name"], "Wrap Up");
    assert_eq!(chosen["decided_by"], "choice");
    // The LLM was shown the definition, the report and the valid names.
    let prompt = llm.requests()[2].body["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    for part in ["If the change is good", "\"result\":\"good\"", "FINISH"] {
        assert!(prompt.contains(part), "prompt lacks {part}: {prompt}");
    }
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn two_clients_advancing_from_the_same_step_move_the_instance_once() {
    let db = TestDb::new().await;
    let dir = workflows_dir();
    let mcp = client(&db, &dir, None).await;
    let id = start_review(&mcp).await;
    let c = uuid::Uuid::parse_str(&id).unwrap();

    // Both advances queue behind a held row lock, then race for it.
    let holder = db.connect().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM sortie.campaigns WHERE id = '{c}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let report = json!({"step_id": "Read Diff", "status": "success"});
    let mut racers = Vec::new();
    for _ in 0..2 {
        let (report, client) = (report.clone(), db.connect().await);
        racers.push(tokio::spawn(async move {
            call_on(
                &client,
                "sortie.advance_workflow(instance_id => $1, report => $2)",
                &[&c, &report],
            )
            .await
        }));
    }
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%advance_workflow%'";
    wait_for(Duration::from_secs(10), || async {
        count(&db, waiting).await == 2
    })
    .await;
    assert_eq!(
        count(&db, waiting).await,
        2,
        "both advances wait for the lock"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    let mut codes = Vec::new();
    for racer in racers {
        codes.push(match racer.await.unwrap() {
            Ok(v) => v["current_step"]["step_name"].as_str().unwrap().to_string(),
            Err(e) => e.code,
        });
    }
    codes.sort();
    assert_eq!(codes, ["Verdict", "invalid_state"]);
    assert_eq!(history_len(&mcp, &id).await, 2);
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn resume_hands_back_the_stored_step_and_bad_definitions_are_refused() {
    let db = TestDb::new().await;
    let dir = workflows_dir();
    let mcp = client(&db, &dir, None).await;
    let id = start_review(&mcp).await;

    let resumed = mcp
        .ok("resume_workflow", json!({"instance_id": id, "assumed_current_step_name": "Wrap Up",
                                      "report": {"note": "I think I was done"}, "context_updates": {"k": 1}}))
        .await;
    assert_eq!(resumed["reconciled"], true);
    assert_eq!(resumed["current_step"]["step_name"], "Read Diff");
    assert_eq!(resumed["context"], json!({"k": 1}));
    let unknown = mcp
        .call(
            "resume_workflow",
            json!({"instance_id": id, "assumed_current_step_name": "Nowhere"}),
        )
        .await;
    assert_eq!(unknown.code(), "invalid_argument");
    // With the right step and a status, a resume advances.
    let advanced = mcp
        .ok(
            "resume_workflow",
            json!({"instance_id": id, "assumed_current_step_name": "read diff",
                                      "report": {"status": "failed"}}),
        )
        .await;
    assert_eq!(advanced["status"], "done");

    let broken = mcp
        .call("start_workflow", json!({"workflow_name": "BROKEN"}))
        .await;
    assert_eq!(
        broken.code(),
        "invalid_argument",
        "a workflow with a missing step file"
    );
    assert!(
        broken.text.contains("steps/missing.md does not exist"),
        "{}",
        broken.text
    );
    let escape = mcp
        .call("start_workflow", json!({"workflow_name": "../REVIEW"}))
        .await;
    assert_eq!(escape.code(), "not_found");

    // The extension checks every definition, whoever loads it.
    let step = |name: &str, transitions: Value| json!({"name": name, "instructions": "do", "transitions": transitions});
    for (definition, why) in [
        (
            json!({"steps": [step("A", json!({"success": "Nowhere"}))]}),
            "not a step",
        ),
        (
            json!({"steps": [step("A", json!({})), step("a", json!({}))]}),
            "twice",
        ),
        (json!({"steps": [step("finish", json!({}))]}), "reserved"),
        (json!({"steps": []}), "no steps"),
        (json!({"steps": [{"name": "A"}]}), "no client instructions"),
        (
            json!({"steps": [{"name": "A", "instructions": "do", "transitions": ["B"]}]}),
            "must be an object",
        ),
    ] {
        let refused = db
            .call(
                "sortie.load_workflow(name => 'X', definition => $1)",
                &[&definition],
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, "invalid_argument");
        assert!(refused.message.contains(why), "{}", refused.message);
    }
    let bad_name = db
        .call(
            "sortie.load_workflow(name => '../X', definition => $1)",
            &[&json!({"steps": [step("A", json!({}))]})],
        )
        .await
        .unwrap_err();
    assert_eq!(bad_name.code, "invalid_argument");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.workflows WHERE name = 'X'"
        )
        .await,
        0
    );
    // From SQL, a definition is loaded and started in one call; a start needs one or the other.
    let definition = json!({"goal": "g", "steps": [step("Only", json!({"done": "FINISH"}))]});
    let started = db
        .ok(
            "sortie.start_workflow(workflow_name => 'SQL', definition => $1)",
            &[&definition],
        )
        .await;
    assert_eq!(started["current_step"]["step_name"], "Only");
    let hash = started["workflow_hash"].as_str().unwrap().to_string();
    let again = db
        .ok(
            "sortie.start_workflow(workflow_name => 'SQL', workflow_hash => $1)",
            &[&hash],
        )
        .await;
    assert_eq!(again["workflow_hash"], started["workflow_hash"]);
    for (call, code) in [
        (
            "sortie.start_workflow(workflow_name => 'SQL')",
            "invalid_argument",
        ),
        (
            "sortie.start_workflow(workflow_name => 'SQL', workflow_hash => 'beef')",
            "not_found",
        ),
    ] {
        assert_eq!(db.call(call, &[]).await.unwrap_err().code, code, "{call}");
    }
    let mismatch = db
        .call(
            "sortie.start_workflow(workflow_name => 'SQL', workflow_hash => 'beef', definition => $1)",
            &[&definition],
        )
        .await
        .unwrap_err();
    assert_eq!(mismatch.code, "invalid_argument");
    mcp.stop().await;
    db.finish().await;
}
