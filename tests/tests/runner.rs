//! The runner (SPEC §4, §6) against a real database, with real HTTP servers on 127.0.0.1
//! standing in for the agent runtime, the LLM and the webhook.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fake_http::FakeHttp;
use sortie_tests::fixtures::*;
use sortie_tests::in_process::{run_until_settled, runner};
use sortie_tests::{binary, runner_process, script, wait_for, TestDb};

/// A campaign without steps that its planner may plan at once (SPEC §13: plan delay 0).
async fn campaign_to_plan_now(db: &TestDb) -> uuid::Uuid {
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'test goal', planner => 'llm', plan_delay => 0)",
            &[],
        )
        .await;
    uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn http_dispatch_completes_steps_with_the_runtime_output() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, body| (200, json!({"output": format!("did: {}", body["prompt"].as_str().unwrap_or("").lines().find(|l| l.starts_with("summarise") || l.starts_with("write")).unwrap_or("?"))}))).await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "summarise A", "key": "a"}, {"action": "write report", "depends_on": ["a"], "agent": "writer"}])).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 10).await;
    assert_eq!(campaign_status(&db, c).await, "done");
    let requests = runtime.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.path, "/api/agent/execute");
    assert!(first.body["prompt"].as_str().unwrap().contains("test goal"));
    let tools: Vec<&str> = first.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for tool in [
        "heartbeat",
        "read_step_output",
        "complete_step",
        "spawn_and_continue",
    ] {
        assert!(tools.contains(&tool), "{tool} missing from {tools:?}");
    }
    assert!(first.body["env"]["SORTIE_CLAIM_TOKEN"].as_str().is_some());
    assert_eq!(requests[1].body["agent"], "writer");
    assert!(
        requests[1].body["prompt"]
            .as_str()
            .unwrap()
            .contains("did: summarise A"),
        "upstream output in the prompt"
    );
    let write = step_by_action(&db, c, "write report").await;
    assert_eq!(step_field(&db, write, "output").await, "did: write report");
    db.finish().await;
}

#[tokio::test]
async fn a_step_at_max_depth_is_dispatched_without_spawn_and_continue() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, _| (200, json!({"output": "ok"}))).await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'flat', planner => 'none', max_depth => 0)",
            &[],
        )
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "only"}])).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 5).await;
    let request = &runtime.requests()[0];
    assert!(!request.body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == "spawn_and_continue"));
    assert!(request.body["prompt"]
        .as_str()
        .unwrap()
        .contains("maximum depth"));
    db.finish().await;
}

#[tokio::test]
async fn runtime_errors_are_retried_then_fail_the_step() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, _| (500, json!({"error": "runtime on fire"}))).await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "doomed", "max_attempts": 2}])).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    )
    .await;
    runner.tick().await.unwrap();
    runner.wait().await;
    assert_eq!(
        status(&db, ids[0]).await,
        "pending",
        "retrying after back-off"
    );
    assert!(step_field(&db, ids[0], "error")
        .await
        .as_str()
        .unwrap()
        .contains("500"));
    db.client
        .execute(
            "UPDATE sortie.steps SET not_before = '-infinity' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    run_until_settled(&mut runner, &db, c, 5).await;
    assert_eq!(status(&db, ids[0]).await, "failed");
    assert_eq!(runtime.requests().len(), 2);
    assert_eq!(campaign_status(&db, c).await, "failed");
    db.finish().await;
}

fn mcp_agent() -> PathBuf {
    let mcp = binary("sortie-mcp");
    script(
        "mcp-agent.sh",
        &format!(
            r#"#!/usr/bin/env bash
set -euo pipefail
prompt=$(cat)
if [[ $prompt == *"through mcp"* ]]; then
    coproc MCP {{ {mcp} 2>/dev/null; }}
    printf '%s\n' '{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-06-18","capabilities":{{}},"clientInfo":{{"name":"a","version":"1"}}}}}}' \
        '{{"jsonrpc":"2.0","method":"notifications/initialized"}}' \
        '{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"complete_step","arguments":{{"summary":"completed via mcp"}}}}}}' >&"${{MCP[1]}}"
    while IFS= read -r line <&"${{MCP[0]}}"; do case $line in *'"id":2'*) break ;; esac; done
    exec {{MCP[1]}}>&-
    exit 0
elif [[ $prompt == *"explode"* ]]; then
    echo "cannot do this" >&2
    exit 3
fi
echo "stdout result for step $SORTIE_STEP_ID"
"#,
            mcp = mcp.display()
        ),
    )
}

#[tokio::test]
async fn command_dispatch_completes_through_stdout_and_through_mcp() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "answer on stdout"}, {"action": "answer through mcp"},
                                      {"action": "explode", "max_attempts": 1}]),
    )
    .await;
    let agent = mcp_agent();
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 10).await;
    assert_eq!(
        step_field(&db, ids[0], "output").await,
        format!("stdout result for step {}", ids[0])
    );
    assert_eq!(step_field(&db, ids[1], "output").await, "completed via mcp");
    assert_eq!(status(&db, ids[2]).await, "failed");
    assert!(step_field(&db, ids[2], "error")
        .await
        .as_str()
        .unwrap()
        .contains("cannot do this"));
    assert_eq!(campaign_status(&db, c).await, "failed");
    db.finish().await;
}

#[tokio::test]
async fn the_planner_grows_a_drained_campaign_and_ends_it() {
    let db = TestDb::new().await;
    let llm = FakeHttp::start(|_, body| {
        let prompt = body["messages"][1]["content"].as_str().unwrap_or_default();
        let plan = if prompt.contains("planned step") {
            json!({"done": true, "progress_update": "all done"})
        } else {
            json!({"new_steps": [{"action": "planned step"}], "strategy_update": "one step will do"})
        };
        (200, json!({"choices": [{"message": {"role": "assistant", "content": plan.to_string()}}]}))
    })
    .await;
    let runtime = FakeHttp::start(|_, _| (200, json!({"output": "planned work done"}))).await;
    let c = campaign_to_plan_now(&db).await;
    db.ok("sortie.steer_campaign($1, 'keep it short')", &[&c])
        .await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("LITELLM_URL", llm.url.clone()),
            ("SORTIE_PLAN_DELAY", "0".into()),
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 10).await;
    assert_eq!(campaign_status(&db, c).await, "done");
    let asks = llm.requests();
    assert_eq!(
        asks.len(),
        2,
        "asked once when empty, once when drained again"
    );
    assert_eq!(asks[0].path, "/v1/chat/completions");
    let prompt = asks[0].body["messages"][1]["content"].as_str().unwrap();
    assert!(
        prompt.contains("test goal") && prompt.contains("keep it short"),
        "{prompt}"
    );
    assert_eq!(asks[0].body["response_format"]["type"], "json_object");
    let state = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert_eq!(state["strategy"], "one step will do");
    assert_eq!(state["guidance"][0]["text"], "keep it short");
    db.finish().await;
}

#[tokio::test]
async fn a_malformed_plan_leaves_nothing_and_is_not_asked_again_at_once() {
    let db = TestDb::new().await;
    let llm = FakeHttp::start(|_, _| (200, json!({"choices": [{"message": {"content":
        "{\"new_steps\": [{\"action\": \"fine\"}, {\"step_type\": \"nonsense\", \"action\": \"x\"}]}"}}]}))).await;
    let c = campaign_to_plan_now(&db).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("LITELLM_URL", llm.url.clone()),
            ("SORTIE_PLAN_DELAY", "0".into()),
        ],
    )
    .await;
    runner.tick().await.unwrap();
    runner.tick().await.unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.steps").await,
        0,
        "nothing of the plan was applied"
    );
    assert_eq!(campaign_status(&db, c).await, "active");
    assert_eq!(
        llm.requests().len(),
        1,
        "the planning lease holds off a second ask"
    );
    db.finish().await;
}

#[tokio::test]
async fn without_a_planner_a_drained_campaign_ends_by_the_rule() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, json!([{"action": "a"}])).await;
    run_all(&db, c).await;
    assert_eq!(campaign_status(&db, c).await, "active");
    let (mut runner, _stop) = runner(&db, &[]).await;
    runner.tick().await.unwrap();
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

#[tokio::test]
async fn notifications_reach_the_webhook_and_failures_are_retried() {
    let db = TestDb::new().await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = calls.clone();
    let webhook = FakeHttp::start(move |_, _| {
        if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            (503, json!({}))
        } else {
            (204, json!({}))
        }
    })
    .await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'notify me', planner => 'none', channel => 'ops')",
            &[],
        )
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "a"}])).await;
    run_all(&db, c).await;
    let (mut runner, _stop) = runner(&db, &[("SORTIE_WEBHOOK_URL", webhook.url.clone())]).await;
    runner.tick().await.unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE delivered"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE delivery_attempts = 1"
        )
        .await,
        1
    );
    db.client
        .execute(
            "UPDATE sortie.notifications SET next_attempt_at = now()",
            &[],
        )
        .await
        .unwrap();
    runner.tick().await.unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE delivered"
        )
        .await,
        1
    );
    let request = &webhook.requests()[1];
    assert_eq!(request.body["channel"], "ops");
    assert!(request.body["content"]
        .as_str()
        .unwrap()
        .contains("Campaign done"));
    db.finish().await;
}

#[tokio::test]
async fn once_exits_only_after_its_dispatches_finish() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "slow one"}, {"action": "slow two"}]),
    )
    .await;
    let slow = script(
        "slow-agent.sh",
        "#!/bin/sh\ncat >/dev/null\nsleep 1\necho finished late\n",
    );
    let mut child = runner_process(
        &db,
        &["--once"],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", slow.display().to_string()),
        ],
    );
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    for id in ids {
        assert_eq!(status(&db, id).await, "done");
        assert_eq!(step_field(&db, id, "output").await, "finished late");
    }
    db.finish().await;
}

#[tokio::test]
async fn two_runners_dispatch_each_step_once() {
    let db = TestDb::new().await;
    let runtime =
        FakeHttp::start(|_, body| (200, json!({"output": format!("step {}", body["step_id"])})))
            .await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        Value::Array(
            (0..40)
                .map(|i| json!({"action": format!("s{i}")}))
                .collect(),
        ),
    )
    .await;
    let env = [
        ("SORTIE_DISPATCH", "http".to_string()),
        ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ("SORTIE_MAX_CONCURRENT", "8".to_string()),
    ];
    let mut first = runner_process(&db, &[], &env);
    let mut second = runner_process(&db, &[], &env);
    wait_for(Duration::from_secs(30), || async {
        campaign_status(&db, c).await != "active"
    })
    .await;
    for child in [&mut first, &mut second] {
        sortie_tests::terminate(child);
    }
    first.wait().unwrap();
    second.wait().unwrap();
    assert_eq!(campaign_status(&db, c).await, "done");
    let mut dispatched: Vec<i64> = runtime
        .requests()
        .iter()
        .map(|r| r.body["step_id"].as_i64().unwrap())
        .collect();
    assert_eq!(dispatched.len(), 40, "each step dispatched once");
    dispatched.sort();
    dispatched.dedup();
    assert_eq!(dispatched.len(), 40);
    db.finish().await;
}

#[tokio::test]
async fn sigterm_hands_back_the_steps_in_flight() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "endless"}])).await;
    let endless = script("endless-agent.sh", "#!/bin/sh\ncat >/dev/null\nsleep 60\n");
    let mut child = runner_process(
        &db,
        &[],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", endless.display().to_string()),
        ],
    );
    wait_for(Duration::from_secs(10), || async {
        status(&db, ids[0]).await == "running"
    })
    .await;
    assert_eq!(status(&db, ids[0]).await, "running");
    sortie_tests::terminate(&child);
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
    assert_eq!(
        status(&db, ids[0]).await,
        "pending",
        "released, not half-claimed"
    );
    assert_eq!(
        step_field(&db, ids[0], "attempts").await,
        0,
        "a release is not a failed attempt"
    );
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

/// A connection wakes listeners at most once per `wake_interval()`; what it holds back is
/// found by the woken runner's polling, not left for the 5 s safety tick.
#[tokio::test]
async fn work_whose_wake_up_is_held_back_is_dispatched_by_polling() {
    let db = TestDb::new().await;
    // No output: the steps stay running (the agent would report through MCP).
    let runtime = FakeHttp::start(|_, _| (200, json!({}))).await;
    let c = campaign(&db, "none").await;
    let mut child = runner_process(
        &db,
        &[],
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    );
    let dispatched = |n: usize| {
        let runtime = &runtime;
        async move {
            wait_for(Duration::from_secs(10), || async {
                runtime.requests().len() >= n
            })
            .await;
            runtime.requests().len() >= n
        }
    };
    // Once one step has gone out the runner is up and listening; past the interval, the next
    // change wakes it.
    add(&db, c, json!([{"action": "first"}])).await;
    assert!(dispatched(1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    add(&db, c, json!([{"action": "second"}])).await;
    assert!(dispatched(2).await);

    // As if this connection had just woken listeners: this change sends no NOTIFY.
    db.client
        .batch_execute("SELECT set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false)")
        .await
        .unwrap();
    add(&db, c, json!([{"action": "third"}])).await;
    let added = std::time::Instant::now();
    assert!(dispatched(3).await);
    let waited = runtime.requests()[2].at.duration_since(added);
    assert!(
        waited < Duration::from_secs(2),
        "dispatched after {waited:?}: the safety tick, not polling"
    );

    sortie_tests::terminate(&child);
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

/// The runner's duties are separate services (issue 12): one that fails — here the lock-key
/// reaper, whose function is made unreachable — is reported, and the others still run, dispatch
/// included, in the same tick.
#[tokio::test]
async fn a_failing_duty_does_not_hold_back_dispatch() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, _| (200, json!({"output": "dispatched anyway"}))).await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "only"}])).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "http".into()),
            ("OPENCLAW_RUNTIME_URL", runtime.url.clone()),
        ],
    )
    .await;
    // After the start-up check, which would refuse a schema without it.
    db.client
        .batch_execute("ALTER FUNCTION sortie.reap_leases() RENAME TO reap_leases_away")
        .await
        .unwrap();
    let failed = runner
        .tick()
        .await
        .expect_err("the reaper's failure is reported");
    assert!(format!("{failed:#}").contains("reap_leases"), "{failed:#}");
    runner.wait().await;
    assert_eq!(step_field(&db, ids[0], "output").await, "dispatched anyway");
    db.client
        .batch_execute("ALTER FUNCTION sortie.reap_leases_away() RENAME TO reap_leases")
        .await
        .unwrap();
    runner.tick().await.expect("every duty works again");
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

/// A dispatch whose context cannot be read for a reason that will not pass (here a function
/// this runner calls is dropped after it started; a schema lacking it from the start is refused
/// by the start-up check) fails its attempt, with the error on the step and the retry back-off
/// before the next claim; handed back instead, the step was claimed again at once in a loop
/// (about 8,000 events in 5 minutes).
#[tokio::test]
async fn a_dispatch_whose_context_cannot_be_read_fails_its_attempt_instead_of_spinning() {
    // One node also under SORTIE_TEST_CITUS: Citus does not carry the extension membership's
    // removal to the workers, and this is about the runner, not the distribution.
    let db = TestDb::single_node().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "a", "max_attempts": 3}])).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", "true".into()),
        ],
    )
    .await;
    db.client
        .batch_execute(
            "ALTER EXTENSION sortie DROP FUNCTION sortie._get_my_context_delegated(uuid, bigint, integer, integer, uuid);
             DROP FUNCTION sortie._get_my_context_delegated(uuid, bigint, integer, integer, uuid);",
        )
        .await
        .unwrap();
    // One tick, as `--once` runs it.
    let _ = runner.tick().await;
    runner.wait().await;
    let row = db
        .client
        .query_one(
            "SELECT status::text, attempts::int, error::text, not_before > now() FROM sortie.steps WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let (status, attempts, error, backing_off): (String, i32, Option<String>, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((status.as_str(), attempts), ("pending", 1), "{error:?}");
    let error = error.unwrap_or_default();
    assert!(
        error.contains("could not read the step's context") && error.contains("does not exist"),
        "{error}"
    );
    assert!(backing_off, "the next claim waits for the back-off");
    let claims: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM sortie.events WHERE step_id = $1 AND kind = 'step.claimed'",
            &[&ids[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(claims, 1, "claimed once, not in a loop");
    db.finish().await;
}

/// Without SORTIE_WEBHOOK_URL the runner's log is the notifications' sink: a tick marks them
/// delivered, and a default install's health() reports none undelivered.
#[tokio::test]
async fn without_a_webhook_notifications_go_to_the_runners_log() {
    let db = TestDb::new().await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'quiet', planner => 'none')",
            &[],
        )
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "a"}])).await;
    run_all(&db, c).await;
    let waiting = count(
        &db,
        "SELECT count(*) FROM sortie.notifications WHERE NOT delivered",
    )
    .await;
    assert!(waiting > 0, "the campaign's end left a notification");
    let (mut runner, _stop) = runner(&db, &[]).await;
    runner.tick().await.unwrap();
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE NOT delivered"
        )
        .await,
        0
    );
    let health = db.ok("sortie.health()", &[]).await;
    assert_eq!(health["undelivered_notifications"]["count"], 0, "{health}");
    db.finish().await;
}
