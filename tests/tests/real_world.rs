//! SPEC §13: the cases found by running Sortie the way users of peer systems run theirs. Each
//! test names the behaviour; the runner tests use real HTTP servers on 127.0.0.1 and real agent
//! commands, the rest call the extension's rules directly.

use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fake_http::FakeHttp;
use sortie_tests::fixtures::*;
use sortie_tests::in_process::{run_until_settled, runner};
use sortie_tests::mcp::McpClient;
use sortie_tests::{runner_process, script, wait_for, TestDb};
use uuid::Uuid;

fn uuid_of(v: &Value) -> Uuid {
    Uuid::parse_str(v.as_str().expect("a uuid")).unwrap()
}

async fn events_of(db: &TestDb, c: Uuid, kind: &str) -> Vec<Value> {
    db.client
        .query(
            "SELECT to_jsonb(e) FROM sortie.events e WHERE campaign_id = $1 AND kind = $2 ORDER BY id",
            &[&c, &kind],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

// ---- 1. A campaign that never had a step is not drained -------------------------------------

#[tokio::test]
async fn a_campaign_created_without_steps_waits_for_add_steps_while_a_runner_runs() {
    let db = TestDb::new().await;
    let agent = script(
        "echo-agent.sh",
        "#!/usr/bin/env bash\ncat >/dev/null\necho did it\n",
    );
    let mut daemon = runner_process(
        &db,
        &[],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
    );
    let mcp = McpClient::start(&db, &[]).await;
    let mut campaigns = Vec::new();
    for i in 0..3 {
        let created = mcp
            .ok("create_campaign", json!({"goal": format!("goal {i}")}))
            .await;
        campaigns.push(uuid_of(&created["id"]));
    }
    // The runner wakes on the creations; give it time to tick more than once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for c in &campaigns {
        assert_eq!(
            campaign_status(&db, *c).await,
            "active",
            "not drained before its first steps"
        );
        mcp.ok(
            "add_steps",
            json!({"campaign_id": c, "steps": [{"action": "the only step"}]}),
        )
        .await;
    }
    for c in &campaigns {
        let c = *c;
        wait_for(Duration::from_secs(30), || {
            let db = &db;
            async move { campaign_status(db, c).await != "active" }
        })
        .await;
        assert_eq!(campaign_status(&db, c).await, "done");
        let step = step_by_action(&db, c, "the only step").await;
        assert_eq!(step_field(&db, step, "output").await, "did it");
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn never_having_had_a_step_is_waiting_not_drained() {
    let db = TestDb::new().await;
    let none = campaign(&db, "none").await;
    // Resuming runs the drain rule: an empty campaign keeps waiting.
    db.ok("sortie.pause_campaign($1)", &[&none]).await;
    db.ok("sortie.resume_campaign($1)", &[&none]).await;
    assert_eq!(campaign_status(&db, none).await, "active");
    let refused = db
        .call("sortie.finish_campaign($1)", &[&none])
        .await
        .unwrap_err();
    assert_eq!(refused.code, "invalid_state");
    assert!(
        refused.message.contains("no steps yet"),
        "{}",
        refused.message
    );
    // A runner without a planner is never handed it to end; one with a planner only after the
    // plan delay.
    let planned = db
        .ok(
            "sortie.create_campaign(goal => 'planned', planner => 'llm', plan_delay => 30)",
            &[],
        )
        .await;
    let planned = uuid_of(&planned["id"]);
    let due = |configured: bool, delay: f64| {
        let db = &db;
        async move {
            db.ok(
                "to_jsonb(array(SELECT sortie.campaigns_to_plan(10, $1, $2)))",
                &[&configured, &delay],
            )
            .await
        }
    };
    assert_eq!(due(false, 0.0).await, json!([]));
    assert_eq!(due(true, 30.0).await, json!([]), "within its plan delay");
    set_clock(&db.client, 31).await;
    assert_eq!(due(true, 30.0).await, json!([planned.to_string()]));
    assert_eq!(
        due(false, 0.0).await,
        json!([]),
        "still not drained without a planner"
    );
    set_clock(&db.client, 0).await;
    // Once it has had a step and drained, it ends by the rule.
    add(&db, none, json!([{"action": "a"}])).await;
    run_all(&db, none).await;
    assert_eq!(campaign_status(&db, none).await, "done");
    db.ok("sortie.cancel_campaign($1)", &[&planned]).await;
    db.finish().await;
}

#[tokio::test]
async fn a_campaign_created_without_steps_is_not_planned_before_its_plan_delay() {
    let db = TestDb::new().await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'wait for me', plan_delay => 60)",
            &[],
        )
        .await;
    let c = uuid_of(&created["id"]);
    let next: String = db
        .client
        .query_one(
            "SELECT (next_action_at - created_at)::text FROM sortie.campaigns WHERE id = $1",
            &[&c],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        next.starts_with("00:01:00") || next.starts_with("00:00:59"),
        "{next}"
    );
    let granted = db.ok("sortie.begin_planning($1)", &[&c]).await;
    assert_eq!(granted["granted"], false);
    let with_steps = db
        .ok(
            "sortie.create_campaign(goal => 'has steps', steps => '[{\"action\": \"x\"}]'::jsonb, plan_delay => 60)",
            &[],
        )
        .await;
    let s = uuid_of(&with_steps["id"]);
    let at: bool = db
        .client
        .query_one(
            "SELECT next_action_at <= now() + interval '1 second' FROM sortie.campaigns WHERE id = $1",
            &[&s],
        )
        .await
        .unwrap()
        .get(0);
    assert!(at, "steps given at creation: nothing to wait for");
    let bad = db
        .call("sortie.create_campaign(goal => 'x', plan_delay => -1)", &[])
        .await
        .unwrap_err();
    assert_eq!(bad.code, "invalid_argument");
    for id in [c, s] {
        db.ok("sortie.cancel_campaign($1)", &[&id]).await;
    }
    db.finish().await;
}

// ---- 2. Splices are validated like add_steps ------------------------------------------------

async fn spawn(
    db: &TestDb,
    claim: &Claim,
    subtasks: Value,
) -> Result<Value, sortie_tests::DbError> {
    db.call(
        "sortie.spawn_and_continue($1, $2, $3, '\"merge\"'::jsonb)",
        &[&claim.step_id, &claim.token, &subtasks],
    )
    .await
}

#[tokio::test]
async fn a_splice_that_would_close_a_cycle_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    // A sequence: b waits for a; a subtask of a that depends on b would wait for itself.
    let seq = add(
        &db,
        c,
        json!([{"step_type": "sequence", "action": "seq", "key": "seq", "steps": [
            {"action": "a"}, {"action": "b"}]},
               {"step_type": "sequence", "action": "after", "depends_on": ["seq"], "steps": [
            {"action": "inner after"}]}]),
    )
    .await;
    let seq_id = seq["step_ids"][0].as_i64().unwrap();
    let after_id = seq["step_ids"][1].as_i64().unwrap();
    let b = step_by_action(&db, c, "b").await;
    let inner_after = step_by_action(&db, c, "inner after").await;
    let a = claim(&db, c).await.unwrap();
    assert_eq!(a.action, "a");
    let before = db.ok("sortie.get_campaign($1)", &[&c]).await;
    // A later sibling, the compound ancestor, a dependent of the ancestor, and a child of that
    // dependent: each waits for `a`.
    for target in [b, seq_id, after_id, inner_after, a.step_id] {
        let refused = spawn(&db, &a, json!([{"action": "sub", "depends_on": [target]}]))
            .await
            .unwrap_err();
        assert_eq!(
            refused.code, "cycle",
            "depending on {target}: {}",
            refused.message
        );
        assert_eq!(refused.sqlstate, "SR007");
    }
    let after = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert_eq!(before["steps"], after["steps"], "nothing changed");
    assert_eq!(
        status(&db, a.step_id).await,
        "running",
        "the spawner keeps its claim"
    );
    // A dependency that does not wait for the spawner is fine.
    let other = add_ids(&db, c, json!([{"action": "independent"}])).await[0];
    let spliced = spawn(&db, &a, json!([{"action": "sub", "depends_on": [other]}]))
        .await
        .expect("an acyclic splice");
    assert!(spliced["continuation_id"].as_i64().is_some());
    run_all(&db, c).await;
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

#[tokio::test]
async fn check_invariants_reports_a_dependency_cycle() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "x", "key": "x"}, {"action": "y", "depends_on": ["x"]}]),
    )
    .await;
    // Made by hand: no rule lets this happen any more.
    db.client
        .execute(
            "INSERT INTO sortie.step_dependencies (campaign_id, step_id, depends_on) VALUES ($1, $2, $3)",
            &[&c, &ids[0], &ids[1]],
        )
        .await
        .unwrap();
    let problems: Vec<String> = db
        .client
        .query("SELECT * FROM sortie.check_invariants($1)", &[&c])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(problems.iter().any(|p| p.contains("cycle")), "{problems:?}");
    db.client
        .execute(
            "DELETE FROM sortie.step_dependencies WHERE step_id = $1 AND depends_on = $2",
            &[&ids[0], &ids[1]],
        )
        .await
        .unwrap();
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

// ---- 3. Nested for_each ---------------------------------------------------------------------

#[tokio::test]
async fn a_nested_for_each_runs_each_inner_item_once_per_outer_item() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let added = add(
        &db,
        c,
        json!([{"step_type": "for_each", "action": "outer", "items": ["A", "B"],
                "template": {"step_type": "for_each", "action": "inner {item}", "items": ["x", "y"],
                             "template": {"action": "do {item}"}}}]),
    )
    .await;
    assert_eq!(
        added["duplicates"].as_array().unwrap().len(),
        2,
        "do x and do y repeat once each: {added}"
    );
    let mut done = run_all(&db, c).await;
    done.sort();
    assert_eq!(done, ["do x", "do x", "do y", "do y"]);
    let inner: Vec<String> = db
        .client
        .query(
            "SELECT action FROM sortie.steps WHERE campaign_id = $1 AND depth = 1 ORDER BY id",
            &[&c],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(inner, ["inner A", "inner B"]);
    db.finish().await;
}

#[tokio::test]
async fn an_empty_for_each_is_done_with_an_empty_list_as_output() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"step_type": "for_each", "action": "nothing to do", "key": "fe", "items": [],
                "template": {"action": "do {item}"}},
               {"action": "after", "depends_on": ["fe"]}]),
    )
    .await;
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "[]");
    assert_eq!(run_all(&db, c).await, ["after"]);
    db.finish().await;
}

// ---- 4. The runner never abandons a claim to the lease --------------------------------------

#[tokio::test]
async fn an_agent_that_exits_silently_or_prints_bytes_text_cannot_hold_is_settled_at_once() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "say nothing", "max_attempts": 1},
               {"action": "print a NUL"},
               {"action": "print latin-1"}]),
    )
    .await;
    let agent = script(
        "bytes-agent.sh",
        r#"#!/usr/bin/env bash
prompt=$(cat)
case $prompt in
  *"say nothing"*) exit 0 ;;
  *"print a NUL"*) printf 'before\000after\n' ;;
  *"print latin-1"*) printf 'caf\351 cr\350me\n' ;;
esac
"#,
    );
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 5).await;
    assert_eq!(
        status(&db, ids[0]).await,
        "failed",
        "no lease left to run out"
    );
    assert_eq!(
        step_field(&db, ids[0], "error").await,
        "agent exited without output or a report"
    );
    assert_eq!(
        step_field(&db, ids[1], "output").await,
        "before\u{FFFD}after"
    );
    assert_eq!(
        step_field(&db, ids[2], "output").await,
        "caf\u{FFFD} cr\u{FFFD}me"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE status = 'running'"
        )
        .await,
        0
    );
    db.finish().await;
}

#[tokio::test]
async fn a_runtime_answer_without_output_or_error_fails_the_attempt_and_tokens_are_charged() {
    let db = TestDb::new().await;
    let runtime = FakeHttp::start(|_, body| {
        let prompt = body["prompt"].as_str().unwrap_or_default();
        if prompt.contains("empty answer") {
            (200, json!({}))
        } else if prompt.contains("error answer") {
            (200, json!({"error": "model refused"}))
        } else {
            (200, json!({"output": "fine\u{0}work", "tokens_used": 1234}))
        }
    })
    .await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "empty answer", "max_attempts": 1},
               {"action": "error answer", "max_attempts": 1},
               {"action": "real answer"}]),
    )
    .await;
    // The runtime's address alone means http dispatch.
    let (mut runner, _stop) = runner(&db, &[("OPENCLAW_RUNTIME_URL", runtime.url.clone())]).await;
    run_until_settled(&mut runner, &db, c, 5).await;
    assert_eq!(status(&db, ids[0]).await, "failed");
    assert!(step_field(&db, ids[0], "error")
        .await
        .as_str()
        .unwrap()
        .contains("without output or error"));
    assert_eq!(status(&db, ids[1]).await, "failed");
    assert!(step_field(&db, ids[1], "error")
        .await
        .as_str()
        .unwrap()
        .contains("model refused"));
    assert_eq!(step_field(&db, ids[2], "output").await, "fine\u{FFFD}work");
    assert_eq!(step_field(&db, ids[2], "tokens_used").await, 1234);
    let state = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert_eq!(state["tokens_used"], 1234);
    db.finish().await;
}

// ---- 5. Capacity -----------------------------------------------------------------------------

#[tokio::test]
async fn runner_dispatches_share_one_cap_and_pull_claims_do_not_count() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "a"}, {"action": "b"}, {"action": "c"}, {"action": "d"}]),
    )
    .await;
    let claim_dispatch = |max: i32| {
        let db = &db;
        async move {
            db.ok(
                "sortie.claim_next(owner => 'runner', max_dispatched => $1)",
                &[&max],
            )
            .await
        }
    };
    // A pull-mode worker's claim uses no runner slot.
    let pulled = claim(&db, c).await.unwrap();
    assert!(claim_dispatch(2).await["step_id"].as_i64().is_some());
    assert!(claim_dispatch(2).await["step_id"].as_i64().is_some());
    let full = claim_dispatch(2).await;
    assert_eq!(full["step_id"], Value::Null);
    assert_eq!(full["reason"], "capacity");
    let blockers = db
        .ok("sortie.dispatch_blockers(max_dispatched => 2)", &[])
        .await;
    assert_eq!(blockers["ready_steps"], 1);
    assert_eq!(blockers["capacity_reached"], true);
    assert_eq!(blockers["runner_slots"]["in_use"], 2);
    // Pull claims still go through.
    assert!(claim(&db, c).await.is_some());
    complete(&db, &pulled, "done by hand").await;
    assert_eq!(
        db.call("sortie.claim_next(owner => 'r', max_dispatched => 0)", &[])
            .await
            .unwrap_err()
            .code,
        "invalid_argument"
    );
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

#[tokio::test]
async fn two_runners_never_run_more_dispatches_than_the_cap_and_pull_claims_leave_their_slots() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let steps: Vec<Value> = (0..8)
        .map(|i| json!({"action": format!("pulled {i}")}))
        .collect();
    add(&db, c, Value::Array(steps)).await;
    // Eight steps claimed by pull-mode workers and left running.
    for _ in 0..8 {
        claim(&db, c).await.unwrap();
    }
    let work: Vec<Value> = (0..6)
        .map(|i| json!({"action": format!("dispatched {i}")}))
        .collect();
    add(&db, c, Value::Array(work)).await;
    let agent = script(
        "slow-agent.sh",
        "#!/usr/bin/env bash\ncat >/dev/null\nsleep 0.5\necho ok\n",
    );
    let vars = [
        ("SORTIE_DISPATCH", "command".to_string()),
        ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ("SORTIE_MAX_CONCURRENT", "2".to_string()),
    ];
    let (mut one, _stop_one) = runner(&db, &vars).await;
    let (mut two, _stop_two) = runner(&db, &vars).await;
    let observer = db.connect().await;
    let mut most = 0i64;
    for _ in 0..40 {
        let (a, b) = tokio::join!(one.tick(), two.tick());
        a.unwrap();
        b.unwrap();
        let running: i64 = observer
            .query_one(
                "SELECT count(*) FROM sortie.steps WHERE status = 'running' AND dispatched",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        most = most.max(running);
        let done: i64 = observer
            .query_one(
                "SELECT count(*) FROM sortie.steps WHERE action LIKE 'dispatched %' AND status = 'done'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if done == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    one.wait().await;
    two.wait().await;
    assert!(most >= 1, "the pulled steps did not keep the runners idle");
    assert!(
        most <= 2,
        "{most} dispatched steps ran at once with a cap of 2"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.steps WHERE action LIKE 'dispatched %' AND status = 'done'").await,
        6
    );
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

// ---- 6. Notifications ------------------------------------------------------------------------

#[tokio::test]
async fn a_long_notification_is_cut_to_the_webhook_limit_and_a_refusal_is_not_retried() {
    let db = TestDb::new().await;
    // Discord's rule: content over 2,000 characters is refused with 400.
    let webhook = FakeHttp::start(|_, body| {
        let content = body["content"].as_str().unwrap_or_default();
        if content.chars().count() > 2000 {
            (
                400,
                json!({"content": ["Must be 2000 or fewer in length."]}),
            )
        } else if content.contains("refuse me") {
            (404, json!({"message": "Unknown Webhook"}))
        } else {
            (204, json!({}))
        }
    })
    .await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "ask"}])).await;
    let asker = claim(&db, c).await.unwrap();
    assert_eq!(asker.step_id, ids[0]);
    let question = format!("{}?", "Should we ship the release now ".repeat(82));
    assert!(question.chars().count() > 2500);
    db.ok(
        "sortie.request_input($1, $2, $3)",
        &[&asker.step_id, &asker.token, &question],
    )
    .await;
    db.client
        .execute(
            "INSERT INTO sortie.notifications (campaign_id, level, message) VALUES ($1, 'info', 'please refuse me')",
            &[&c],
        )
        .await
        .unwrap();
    let (mut runner, _stop) = runner(&db, &[("SORTIE_WEBHOOK_URL", webhook.url.clone())]).await;
    runner.tick().await.unwrap();
    runner.tick().await.unwrap();
    let long = webhook
        .requests()
        .into_iter()
        .find(|r| {
            r.body["content"]
                .as_str()
                .unwrap_or_default()
                .contains("Should we ship")
        })
        .expect("the question was posted");
    let content = long.body["content"].as_str().unwrap();
    assert!(
        content.chars().count() <= 2000,
        "{}",
        content.chars().count()
    );
    assert!(
        content.contains("more characters]"),
        "a marker says it was cut"
    );
    let delivered = count(
        &db,
        "SELECT count(*) FROM sortie.notifications WHERE delivered AND message LIKE '%Should we ship%'",
    )
    .await;
    assert_eq!(delivered, 1);
    let refused: (i32, bool) = {
        let row = db
            .client
            .query_one(
                "SELECT delivery_attempts, given_up_at IS NOT NULL FROM sortie.notifications WHERE message = 'please refuse me'",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(refused, (1, true), "a 404 is not retried");
    assert_eq!(
        webhook
            .requests()
            .iter()
            .filter(|r| r.body["content"]
                .as_str()
                .unwrap_or_default()
                .contains("refuse me"))
            .count(),
        1
    );
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

#[tokio::test]
async fn a_notification_is_given_up_after_ten_failed_attempts() {
    let db = TestDb::new().await;
    let id: i64 = db
        .client
        .query_one(
            "INSERT INTO sortie.notifications (level, message) VALUES ('info', 'never arrives') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for attempt in 1..=10 {
        let answer = db
            .ok(
                "sortie.notification_delivered(id => $1, ok => false, error => 'webhook answered 503')",
                &[&id],
            )
            .await;
        assert_eq!(answer["delivery_attempts"], attempt);
        assert_eq!(answer["given_up"], attempt == 10, "attempt {attempt}");
    }
    set_clock(&db.client, 10 * 3600).await;
    assert_eq!(db.ok("sortie.take_notifications()", &[]).await, json!([]));
    set_clock(&db.client, 0).await;
    let again = db
        .call(
            "sortie.notification_delivered(id => $1, ok => false)",
            &[&id],
        )
        .await
        .unwrap_err();
    assert_eq!(again.code, "not_found");
    db.finish().await;
}

// ---- 7. Search without words -----------------------------------------------------------------

#[tokio::test]
async fn a_query_without_searchable_words_returns_nothing_and_says_why() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let mcp = McpClient::start(&db, &[]).await;
    for note in [
        "Connection pool exhaustion caused the outage on Tuesday",
        "We pinned the TLS library because the new version drops old ciphers",
    ] {
        mcp.ok("add_note", json!({"campaign_id": c, "content": note}))
            .await;
    }
    for query in ["the and of", "?!", "— … ***", "a an the"] {
        for scope in [json!({"campaign_id": c}), json!({})] {
            let mut args = scope.clone();
            args["query"] = json!(query);
            let found = mcp.ok("search_notes", args).await;
            assert_eq!(found["results"], json!([]), "{query}: {found}");
            assert!(
                found["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("no searchable words"),
                "{query}: {found}"
            );
        }
    }
    // A query with words but nothing near it: no semantic hit below the model's floor.
    let unrelated = mcp
        .ok(
            "search_notes",
            json!({"campaign_id": c, "query": "purple elephants dancing ballet", "top_k": 5}),
        )
        .await;
    let model: String = db
        .client
        .query_one("SELECT embedding_model FROM sortie.notes LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    let floor: f64 = db
        .client
        .query_one("SELECT sortie._similarity_floor($1)", &[&model])
        .await
        .unwrap()
        .get(0);
    for hit in unrelated["results"].as_array().unwrap() {
        let similarity = hit["similarity"].as_f64().unwrap_or(1.0);
        assert!(similarity >= floor, "{model}: {hit}");
    }
    assert!(floor > 0.0, "{model} has a documented floor");
    mcp.stop().await;
    db.finish().await;
}

// ---- 9. Smaller ones ---------------------------------------------------------------------------

#[tokio::test]
async fn a_compound_step_starting_is_an_event() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"step_type": "sequence", "action": "outer", "steps": [
            {"step_type": "parallel_group", "action": "inner", "children": [{"action": "leaf"}]}]}]),
    )
    .await;
    run_all(&db, c).await;
    let started = events_of(&db, c, "step.started").await;
    let steps: Vec<i64> = started
        .iter()
        .map(|e| e["step_id"].as_i64().unwrap())
        .collect();
    let inner = step_by_action(&db, c, "inner").await;
    assert_eq!(steps.len(), 2, "{started:?}");
    assert!(
        steps.contains(&ids[0]) && steps.contains(&inner),
        "{started:?}"
    );
    db.finish().await;
}
