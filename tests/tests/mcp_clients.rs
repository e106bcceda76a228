//! sortie-mcp driven over stdio by two real clients nobody here wrote (SPEC §14): the official
//! MCP Python SDK and the official TypeScript SDK. Both validate a tool's structuredContent
//! against its outputSchema by themselves (the TypeScript one error results too): a result
//! they do not admit makes the call throw, and the test reports it. `scripts/setup` installs
//! both; nothing is downloaded here, and a missing client fails the test rather than skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use sortie_tests::{binary, TestDb};

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients")
}

fn python() -> PathBuf {
    let venv =
        std::env::var("SORTIE_CLIENTS_DIR").unwrap_or_else(|_| "/var/cache/sortie/clients".into());
    let python = Path::new(&venv).join("venv/bin/python");
    assert!(
        python.is_file(),
        "the MCP Python SDK is not installed at {}: run scripts/setup (it creates that venv)",
        python.display()
    );
    python
}

fn node() -> &'static str {
    let sdk = clients_dir().join("node_modules/@modelcontextprotocol/sdk/package.json");
    assert!(
        sdk.is_file(),
        "the MCP TypeScript SDK is not installed in {}: run scripts/setup (it runs npm ci there)",
        clients_dir().display()
    );
    "node"
}

/// Runs a client script against a fresh sortie-mcp on `db`; returns what it printed.
fn run_client(db: &TestDb, program: &Path, script: &str) -> Value {
    let output = Command::new(program)
        .arg(clients_dir().join(script))
        .current_dir(clients_dir())
        .env("SORTIE_MCP", binary("sortie-mcp"))
        .env("DATABASE_URL", db.connection_string())
        .env_remove("SORTIE_ROLE")
        .env_remove("SORTIE_STEP_ID")
        .env_remove("SORTIE_CAMPAIGN_ID")
        .env_remove("SORTIE_CLAIM_TOKEN")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{script} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no JSON ({e}):\n{stdout}"))
}

/// What both clients must have seen.
fn check(client: &str, seen: &Value) {
    let tools = seen["tools"].as_array().unwrap();
    assert!(tools.len() >= 28, "{client}: {} tools", tools.len());
    for tool in tools {
        assert_eq!(tool["hasOutputSchema"], true, "{client}: {tool}");
    }
    assert_eq!(seen["setLevel"], true, "{client}");
    let calls = seen["calls"].as_object().unwrap();
    for (label, call) in calls {
        assert!(
            call.get("threw").is_none(),
            "{client} {label} threw: {call}"
        );
    }
    let ok = |label: &str| {
        let call = &calls[label];
        assert_eq!(call["ok"], true, "{client} {label}: {call}");
        &call["structured"]
    };
    let created = ok("create");
    let again = ok("create_again");
    assert_eq!(again["replayed"], true, "{client}: {again}");
    assert_eq!(again["id"], created["id"], "{client}");
    assert_eq!(ok("add_steps_as_text")["created"], 2, "{client}");
    assert_eq!(
        ok("get_campaign")["steps"].as_array().unwrap().len(),
        1,
        "{client}"
    );
    assert!(
        ok("get_campaign")["next_steps_cursor"].is_string(),
        "{client}"
    );
    assert_eq!(
        ok("get_campaign_by_campaign_id")["id"],
        created["id"],
        "{client}"
    );
    ok("list_campaigns");
    ok("get_updates");
    assert!(ok("claim")["step_id"].is_i64(), "{client}");
    assert!(ok("add_note")["note_id"].is_i64(), "{client}");
    assert!(
        !ok("get_notes")["notes"].as_array().unwrap().is_empty(),
        "{client}"
    );
    assert!(
        ok("search_notes")["results"].as_array().unwrap().len() <= 50,
        "{client}"
    );
    ok("list_workflows");
    ok("cancel");
    for (label, code) in [
        ("not_found", "not_found"),
        ("unknown_parameter", "invalid_argument"),
    ] {
        let call = &calls[label];
        assert_eq!(call["isError"], true, "{client} {label}: {call}");
        assert_eq!(
            call["structured"]["error"]["code"], code,
            "{client} {label}: {call}"
        );
    }
    let message = calls["unknown_parameter"]["structured"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(
        message.contains("'output'") && message.contains("summary"),
        "{client}: {message}"
    );
}

#[tokio::test]
async fn the_official_python_sdk_drives_every_kind_of_call() {
    let db = TestDb::new().await;
    let seen = run_client(&db, &python(), "py_client.py");
    check("python", &seen);
    db.finish().await;
}

#[tokio::test]
async fn the_official_typescript_sdk_validates_results_and_errors_against_output_schemas() {
    let db = TestDb::new().await;
    let seen = run_client(&db, Path::new(node()), "ts_client.mjs");
    check("typescript", &seen);
    // The TypeScript SDK validated the domain errors too: they did not throw.
    assert_eq!(
        seen["calls"]["type_error"]["isError"], true,
        "{}",
        seen["calls"]["type_error"]
    );
    db.finish().await;
}
