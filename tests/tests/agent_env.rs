//! What an agent is given (SPEC §15): the allow-listed environment, its session and a
//! worker-only way to Sortie, never the runner's DATABASE_URL or LITELLM_KEY; and a per-step
//! `SORTIE_MCP_CONFIG` that an agent CLI built on the official MCP Python SDK, which passes its
//! servers no environment, can start sortie-mcp from.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sortie_tests::fake_http::FakeHttp;
use sortie_tests::fixtures::*;
use sortie_tests::{binary, script, TestDb};

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

#[tokio::test]
async fn a_command_agent_gets_its_session_not_the_runners_credentials_and_a_usable_mcp_config() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "inspect your environment"}])).await;
    let out = std::env::temp_dir().join(format!(
        "sortie-agent-env-{}-{}",
        std::process::id(),
        ids[0]
    ));
    std::fs::create_dir_all(&out).unwrap();
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/py_config_client.py");
    // The agent records what it was given, then does what an SDK-based agent CLI does with
    // the config file: starts sortie-mcp from it with an otherwise empty environment.
    let agent = script(
        "env-agent.sh",
        &format!(
            r#"#!/usr/bin/env bash
set -euo pipefail
cat >/dev/null
env > {out}/env.txt
cp "$SORTIE_MCP_CONFIG" {out}/mcp.json
stat -c %a "$SORTIE_MCP_CONFIG" > {out}/mode
echo "$SORTIE_MCP_CONFIG" > {out}/path
exec env -i {python} {client} "$SORTIE_MCP_CONFIG"
"#,
            out = out.display(),
            python = python().display(),
            client = client.display()
        ),
    );
    binary("sortie-mcp");
    let mut runner = sortie_tests::runner_process(
        &db,
        &["--once"],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
            ("LITELLM_KEY", "sk-runner-secret".into()),
            ("SORTIE_AGENT_ENV", "AGENT_VISIBLE".into()),
            ("AGENT_VISIBLE", "yes".into()),
            ("RUNNER_PRIVATE", "no".into()),
        ],
    );
    let exit = tokio::task::spawn_blocking(move || runner.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "sortie-runner --once: {exit}");

    let env = std::fs::read_to_string(out.join("env.txt")).unwrap();
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .map(str::to_string)
    };
    assert_eq!(var("LITELLM_KEY"), None, "{env}");
    assert_eq!(var("RUNNER_PRIVATE"), None, "{env}");
    assert_eq!(var("AGENT_VISIBLE").as_deref(), Some("yes"));
    assert!(var("PATH").is_some());
    let url = var("DATABASE_URL").expect("a worker connection");
    assert_ne!(
        url,
        db.connection_string(),
        "never the runner's DATABASE_URL"
    );
    assert!(url.contains("user=sortie_agent"), "{url}");
    assert_eq!(var("SORTIE_STEP_ID"), Some(ids[0].to_string()));
    assert_eq!(var("SORTIE_CAMPAIGN_ID"), Some(c.to_string()));
    assert_eq!(var("SORTIE_ROLE").as_deref(), Some("worker"));
    assert!(var("SORTIE_CLAIM_TOKEN").is_some());
    // Everything else the runner had is gone: only the allow-list and the session remain.
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for name in &names {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "TMPDIR",
                "TERM",
                "AGENT_VISIBLE",
                "DATABASE_URL",
                "SORTIE_MCP_CONFIG",
                "SORTIE_ROLE",
                "SORTIE_STEP_ID",
                "SORTIE_CAMPAIGN_ID",
                "SORTIE_CLAIM_TOKEN",
                "SORTIE_SCHEMA",
                "SORTIE_BIN_DIR",
                "SORTIE_WORKDIR",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(name),
            "{name} reached the agent"
        );
    }

    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("mcp.json")).unwrap()).unwrap();
    let entry = &config["mcpServers"]["sortie"];
    assert_eq!(entry["env"]["SORTIE_STEP_ID"], ids[0].to_string());
    assert_eq!(entry["env"]["DATABASE_URL"], url.as_str());
    assert!(entry["env"].get("LITELLM_KEY").is_none());
    assert_eq!(
        std::fs::read_to_string(out.join("mode")).unwrap().trim(),
        "600"
    );
    let path = std::fs::read_to_string(out.join("path")).unwrap();
    assert!(
        !Path::new(path.trim()).exists(),
        "the config file is removed after the dispatch"
    );

    // The SDK-started server reached this step (its stdout became the step's output).
    let output = step_field(&db, ids[0], "output").await;
    let seen: Value = serde_json::from_str(output.as_str().unwrap().trim())
        .unwrap_or_else(|e| panic!("{e}: {output}"));
    assert_eq!(seen["isError"], false, "{seen}");
    assert_eq!(seen["context"]["step"]["id"], ids[0], "{seen}");
    assert_eq!(seen["context"]["campaign"]["id"], c.to_string());
    assert_eq!(status(&db, ids[0]).await, "done");
    let _ = std::fs::remove_dir_all(&out);
    db.finish().await;
}

#[tokio::test]
async fn the_http_back_end_posts_the_session_but_no_database_url() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, _| (200, json!({"output": "ok"}))).await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "remote"}])).await;
    let mut runner = sortie_tests::runner_process(
        &db,
        &["--once"],
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
            ("LITELLM_KEY", "sk-runner-secret".into()),
            ("SORTIE_MCP_URL", "http://127.0.0.1:8765/mcp".into()),
        ],
    );
    let exit = tokio::task::spawn_blocking(move || runner.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    let requests = runtime.requests();
    assert_eq!(requests.len(), 1);
    let env = &requests[0].body["env"];
    assert!(env.get("DATABASE_URL").is_none(), "{env}");
    assert!(env.get("LITELLM_KEY").is_none(), "{env}");
    assert!(
        !requests[0].body.to_string().contains(&db.name),
        "no connection string anywhere"
    );
    assert_eq!(env["SORTIE_STEP_ID"], ids[0].to_string());
    assert_eq!(env["SORTIE_MCP_URL"], "http://127.0.0.1:8765/mcp");
    assert!(env["SORTIE_CLAIM_TOKEN"].as_str().is_some());
    assert_eq!(status(&db, ids[0]).await, "done");
    db.finish().await;
}
