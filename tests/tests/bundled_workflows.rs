//! SPEC §19: every workflow shipped in examples/workflows runs to its end through the real
//! `sortie-mcp`, once with the caller choosing where a step declares no transition and once
//! with a (fake) planner LLM choosing; and `get_howto_create_workflow` explains the format
//! they are written in.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use sortie_tests::fake_http::FakeHttp;
use sortie_tests::mcp::McpClient;
use sortie_tests::TestDb;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/workflows")
        .canonicalize()
        .expect("examples/workflows")
}

/// One step of a path: the step expected, the status reported, and the next step to choose
/// when the step declares no transition for it.
type Move = (&'static str, &'static str, Option<&'static str>);

const PATHS: &[(&str, &[Move])] = &[
    (
        "CODE_REVIEW",
        &[
            ("Read Change", "success", None),
            ("Review", "changes_requested", None),
            ("Fix Findings", "done", None),
            ("Review", "approved", None),
            ("Summarize", "done", None),
        ],
    ),
    (
        "RESEARCH_FANOUT",
        &[
            ("Frame Question", "success", None),
            ("Fan Out", "done", None),
            ("Assess Coverage", "success", Some("Fan Out")),
            ("Fan Out", "done", None),
            ("Assess Coverage", "success", Some("Synthesize")),
            ("Synthesize", "done", None),
        ],
    ),
    (
        "README_FRESHNESS_CHECK",
        &[
            ("Inventory Claims", "success", None),
            ("Check Claims", "stale", None),
            ("Update README", "done", None),
            ("Verify Commands", "failed", None),
            ("Update README", "done", None),
            ("Verify Commands", "success", None),
        ],
    ),
    (
        "REFACTOR_WITH_TESTS",
        &[
            ("Baseline Tests", "passing", None),
            ("Plan Refactor", "success", None),
            ("Refactor Step", "done", None),
            ("Run Tests", "failing", None),
            ("Refactor Step", "done", None),
            ("Run Tests", "passing", None),
            ("Review Result", "success", Some("Refactor Step")),
            ("Refactor Step", "done", None),
            ("Run Tests", "passing", None),
            ("Review Result", "success", Some("FINISH")),
        ],
    ),
    (
        "WORKFLOW_CREATOR",
        &[
            ("Gather Requirements", "success", None),
            ("Design Steps", "success", None),
            ("Write Files", "done", None),
            ("Validate", "invalid", None),
            ("Write Files", "done", None),
            ("Validate", "valid", None),
        ],
    ),
];

/// Walks `path` on a new instance of `name`; with `llm`, choices are queued for the fake
/// planner instead of being passed as next_step. Returns the final status.
async fn walk(
    mcp: &McpClient,
    name: &str,
    path: &[Move],
    llm: Option<&Arc<Mutex<VecDeque<String>>>>,
) -> Value {
    let started = mcp
        .ok(
            "start_workflow",
            json!({"workflow_name": name, "context": {"branch": "feature"}}),
        )
        .await;
    let id = started["instance_id"].clone();
    let mut current = started;
    for (step, status, choice) in path {
        assert_eq!(
            current["current_step"]["step_name"], *step,
            "{name}: {current}"
        );
        assert!(
            !current["current_step"]["instructions"]
                .as_str()
                .unwrap_or_default()
                .is_empty(),
            "{name}/{step} has client instructions"
        );
        let mut args = json!({"instance_id": id, "report": {"step_id": step, "status": status}});
        if let Some(choice) = choice {
            match llm {
                Some(queue) => queue.lock().unwrap().push_back(choice.to_string()),
                None => args["next_step"] = json!(choice),
            }
        }
        current = mcp.ok("advance_workflow", args).await;
    }
    current
}

#[tokio::test]
async fn every_bundled_workflow_runs_to_its_end_with_the_caller_choosing() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(
        &db,
        &[("WORKFLOW_DEFINITIONS_DIR", examples().display().to_string())],
    )
    .await;
    let listed = mcp.ok("list_workflows", json!({})).await;
    let names: Vec<&str> = listed["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            assert!(w.get("error").is_none(), "{w}");
            w["name"].as_str().unwrap()
        })
        .collect();
    let mut tested: Vec<&str> = PATHS.iter().map(|(n, _)| *n).collect();
    tested.sort();
    assert_eq!(names, tested, "every bundled workflow has a path here");
    for (name, path) in PATHS {
        let end = walk(&mcp, name, path, None).await;
        assert_eq!(end["status"], "done", "{name}: {end}");
    }
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn every_bundled_workflow_runs_to_its_end_with_a_planner_llm_choosing() {
    let db = TestDb::new().await;
    let queue: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let answers = queue.clone();
    let llm = FakeHttp::start(move |_, _| match answers.lock().unwrap().pop_front() {
        Some(name) => (
            200,
            json!({"choices": [{"message": {"content": json!({"next_step_name": name}).to_string()}}]}),
        ),
        None => (500, json!({"error": "asked without a queued choice"})),
    })
    .await;
    let mcp = McpClient::start(
        &db,
        &[
            ("WORKFLOW_DEFINITIONS_DIR", examples().display().to_string()),
            ("LITELLM_URL", llm.url.clone()),
        ],
    )
    .await;
    for (name, path) in PATHS {
        let end = walk(&mcp, name, path, Some(&queue)).await;
        assert_eq!(end["status"], "done", "{name}: {end}");
        assert!(
            queue.lock().unwrap().is_empty(),
            "{name}: every queued choice was asked for"
        );
    }
    let choices = PATHS
        .iter()
        .flat_map(|(_, path)| path.iter())
        .filter(|(_, _, choice)| choice.is_some())
        .count();
    assert_eq!(
        llm.requests().len(),
        choices,
        "the LLM is asked only where no transition decides"
    );
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn the_stub_planner_chooses_the_next_step_in_order() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(
        &db,
        &[
            ("WORKFLOW_DEFINITIONS_DIR", examples().display().to_string()),
            ("USE_STUB_AI_CLIENT", "true".into()),
        ],
    )
    .await;
    let path: &[Move] = &[
        ("Frame Question", "success", None),
        ("Fan Out", "done", None),
        ("Assess Coverage", "success", None),
        ("Synthesize", "done", None),
    ];
    let end = walk(&mcp, "RESEARCH_FANOUT", path, None).await;
    assert_eq!(end["status"], "done", "{end}");
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn the_howto_explains_the_format_the_bundled_workflows_use() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    let howto = mcp.ok("get_howto_create_workflow", json!({})).await;
    let text = howto["howto"].as_str().unwrap();
    for part in [
        "index.md",
        "# Orchestrator Guidance",
        "# Client Instructions",
        "on <status>:",
        "FINISH",
        "`file:`",
    ] {
        assert!(text.contains(part), "the howto explains {part}");
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(examples())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().join("index.md").is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    assert_eq!(howto["examples"], json!(on_disk));
    mcp.stop().await;
    db.finish().await;
}
