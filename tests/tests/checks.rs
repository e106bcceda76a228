//! SPEC §17: done means checked. A campaign's benchmark command decides whether its success
//! contract is met; a step's verify command decides whether its completion stands. Real
//! commands, a real runner, the stub planner, and a real MCP client.

use serde_json::{json, Value};
use sortie_mcp::runner::Runner;
use sortie_tests::fixtures::*;
use sortie_tests::in_process::{self, run_until_settled};
use sortie_tests::mcp::McpClient;
use sortie_tests::{script, TestDb};
use tokio::sync::watch;
use uuid::Uuid;

/// The harness's runner with command dispatch to an agent that prints "work done".
async fn runner(db: &TestDb, vars: &[(&str, String)]) -> (Runner, watch::Sender<bool>) {
    let agent = script(
        "done-agent.sh",
        "#!/usr/bin/env bash\ncat >/dev/null\necho work done\n",
    );
    let mut all = vec![
        ("SORTIE_DISPATCH", "command".to_string()),
        ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
    ];
    all.extend(vars.iter().cloned());
    in_process::runner(db, &all).await
}

/// A benchmark that prints each of `values` in turn, one per run.
fn benchmark(name: &str, values: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("sortie-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = values.join(" ");
    let path = script(
        &format!("{name}.sh"),
        &format!(
            "#!/usr/bin/env bash\nruns=$(cat {dir}/runs 2>/dev/null || echo 0)\necho $((runs + 1)) > {dir}/runs\n\
             values=({list})\necho \"epoch 1 done\"\necho \"accuracy=0.1\"\necho \"accuracy=${{values[$runs]}}\"\necho \"loss=0.3\"\n",
            dir = dir.display()
        ),
    );
    path.display().to_string()
}

async fn contract_campaign(
    db: &TestDb,
    command: &str,
    planner: &str,
    max_iterations: Option<i32>,
) -> Uuid {
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'classify', planner => $1, success_metric => 'accuracy', \
             success_target => 0.9, benchmark_command => $2, max_iterations => $3, plan_delay => 0, \
             steps => '[{\"action\": \"train a model\"}]'::jsonb)",
            &[&planner, &command, &max_iterations],
        )
        .await;
    Uuid::parse_str(created["id"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_campaign_ends_done_only_after_its_benchmark_meets_the_target() {
    let db = TestDb::new().await;
    let command = benchmark("improving", &["0.7", "0.93"]);
    let c = contract_campaign(&db, &command, "llm", Some(5)).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("USE_STUB_AI_CLIENT", "true".into()),
            ("SORTIE_PLAN_DELAY", "0".into()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 20).await;
    let success = db.ok("sortie.check_success($1)", &[&c]).await;
    assert_eq!(campaign_status(&db, c).await, "done", "{success}");
    assert_eq!(success["metric_value"], 0.93);
    assert_eq!(
        success["iterations_used"], 2,
        "one iteration per benchmark run"
    );
    assert_eq!(success["last_run"]["exit_code"], 0);
    assert_eq!(
        success["last_run"]["metric_line"], "accuracy=0.93",
        "the last matching line"
    );
    let reason: String = db
        .client
        .query_one(
            "SELECT status_reason FROM sortie.campaigns WHERE id = $1",
            &[&c],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.starts_with("success contract met"), "{reason}");
    // After the first run (0.7) the planner was asked for more: a second step ran.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE status = 'done'"
        )
        .await,
        2
    );
    let metrics = db
        .ok("sortie.get_notes($1, ARRAY['metric:accuracy'])", &[&c])
        .await;
    let values: Vec<&str> = metrics["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["content"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["accuracy=0.93", "accuracy=0.7"]);
    db.finish().await;
}

#[tokio::test]
async fn spent_iterations_end_the_campaign_failed_with_the_contract_unmet() {
    let db = TestDb::new().await;
    let command = benchmark("stuck", &["0.7", "0.7", "0.7"]);
    let c = contract_campaign(&db, &command, "llm", Some(1)).await;
    let (mut runner, _stop) = runner(
        &db,
        &[
            ("USE_STUB_AI_CLIENT", "true".into()),
            ("SORTIE_PLAN_DELAY", "0".into()),
        ],
    )
    .await;
    run_until_settled(&mut runner, &db, c, 10).await;
    assert_eq!(campaign_status(&db, c).await, "failed");
    let reason: String = db
        .client
        .query_one(
            "SELECT status_reason FROM sortie.campaigns WHERE id = $1",
            &[&c],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.starts_with("success contract not met"), "{reason}");
    assert_eq!(
        db.ok("sortie.check_success($1)", &[&c]).await["iterations_used"],
        1
    );
    db.finish().await;
}

#[tokio::test]
async fn without_a_planner_an_unmet_contract_fails_and_a_met_one_is_done() {
    let db = TestDb::new().await;
    let unmet = contract_campaign(&db, &benchmark("low", &["0.5"]), "none", None).await;
    let met = contract_campaign(&db, &benchmark("high", &["0.95"]), "none", None).await;
    let (mut runner, _stop) = runner(&db, &[]).await;
    for c in [unmet, met] {
        run_until_settled(&mut runner, &db, c, 10).await;
    }
    assert_eq!(campaign_status(&db, unmet).await, "failed");
    assert_eq!(campaign_status(&db, met).await, "done");
    // A contract without a benchmark is judged on the metric notes the workers wrote.
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'none', success_metric => 'acc', success_target => 0.9)",
            &[],
        )
        .await;
    let c = Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "measure"}])).await;
    db.ok("sortie.add_note($1, 'acc=0.4', ARRAY['metric:acc'])", &[&c])
        .await;
    run_all(&db, c).await;
    assert_eq!(campaign_status(&db, c).await, "failed");
    // Refusals: no benchmark due.
    assert_eq!(
        db.call("sortie.record_benchmark($1, 0, 'acc=1')", &[&c])
            .await
            .unwrap_err()
            .code,
        "invalid_state"
    );
    db.finish().await;
}

#[tokio::test]
async fn a_step_whose_check_fails_is_retried_with_the_output_then_done_when_it_passes() {
    let db = TestDb::new().await;
    let marker = std::env::temp_dir().join(format!("sortie-verify-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let check = script(
        "check.sh",
        &format!(
            "#!/usr/bin/env bash\nif [ -f {m} ]; then echo 'all 12 tests passed'; exit 0; fi\n\
             touch {m}\necho '3 of 12 tests failed: test_parse_dates' >&2\nexit 1\n",
            m = marker.display()
        ),
    );
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "fix the date parser", "verify": check.display().to_string()}]),
    )
    .await;
    let (mut runner, _stop) = runner(&db, &[]).await;
    runner.tick().await.unwrap();
    runner.wait().await;
    assert_eq!(
        status(&db, ids[0]).await,
        "pending",
        "the failed check is a failed attempt"
    );
    let error = step_field(&db, ids[0], "error").await;
    let error = error.as_str().unwrap();
    assert!(
        error.contains("verification failed") && error.contains("3 of 12 tests failed"),
        "{error}"
    );
    // The retry's prompt shows the agent what failed.
    let token: Value = db.ok("sortie.get_my_context($1)", &[&ids[0]]).await;
    assert!(
        token.to_string().contains("3 of 12 tests failed"),
        "{token}"
    );
    db.client
        .execute(
            "UPDATE sortie.steps SET not_before = '-infinity' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    run_until_settled(&mut runner, &db, c, 5).await;
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "work done");
    assert!(step_field(&db, ids[0], "verification")
        .await
        .as_str()
        .unwrap()
        .contains("all 12 tests passed"));
    assert_eq!(campaign_status(&db, c).await, "done");
    let _ = std::fs::remove_file(&marker);
    db.finish().await;
}

#[tokio::test]
async fn a_stale_claim_cannot_finish_a_verified_step() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "checked", "verify": "true"}])).await;
    let first = claim(&db, c).await.unwrap();
    let pending = complete(&db, &first, "my summary").await;
    assert_eq!(pending["verification"], "pending");
    assert_eq!(pending["verify"], "true");
    assert_eq!(
        status(&db, ids[0]).await,
        "running",
        "running until the check passed"
    );
    // The lease runs out; the step is claimed again by someone else.
    set_clock(&db.client, 100_000).await;
    db.ok("sortie.reset_zombies()", &[]).await;
    set_clock(&db.client, 0).await;
    db.client
        .execute(
            "UPDATE sortie.steps SET not_before = '-infinity' WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    let second = claim(&db, c).await.unwrap();
    for call in [
        "sortie.record_verification($1, $2, true, 'ok')",
        "sortie.complete_step($1, $2, 'late')",
    ] {
        let err = db
            .call(call, &[&first.step_id, &first.token])
            .await
            .unwrap_err();
        assert_eq!(err.code, "stale_claim", "{call}: {err}");
    }
    // The new claim has no verification pending until it completes.
    assert_eq!(
        db.call(
            "sortie.record_verification($1, $2, true, 'ok')",
            &[&second.step_id, &second.token]
        )
        .await
        .unwrap_err()
        .code,
        "invalid_state"
    );
    complete(&db, &second, "second summary").await;
    let done = db
        .ok(
            "sortie.record_verification($1, $2, true, 'exit 0')",
            &[&second.step_id, &second.token],
        )
        .await;
    assert_eq!(done["status"], "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "second summary");
    db.finish().await;
}

#[tokio::test]
async fn over_mcp_the_server_runs_the_check_of_the_step_it_completes() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "passes", "verify": "echo checked; exit 0"},
               {"action": "fails", "verify": "echo nope >&2; exit 2", "max_attempts": 1}]),
    )
    .await;
    let mcp = McpClient::start(&db, &[]).await;
    for (id, expected) in [(ids[0], "done"), (ids[1], "failed")] {
        let claimed = db.ok("sortie.claim_step($1, 'pull-worker')", &[&id]).await;
        let answer = mcp
            .call(
                "complete_step",
                json!({"step_id": id, "claim_token": claimed["claim_token"], "summary": "did it"}),
            )
            .await;
        assert_eq!(status(&db, id).await, expected, "{answer:?}");
    }
    assert!(step_field(&db, ids[1], "error")
        .await
        .as_str()
        .unwrap()
        .contains("nope"));
    mcp.stop().await;
    db.finish().await;
}

#[tokio::test]
async fn workers_metric_notes_do_not_spend_a_benchmark_campaigns_iterations() {
    let db = TestDb::new().await;
    let c = contract_campaign(&db, "make bench", "llm", Some(3)).await;
    for value in ["0.2", "0.3", "0.4"] {
        db.ok(
            "sortie.add_note($1, $2, ARRAY['metric:accuracy'])",
            &[&c, &format!("accuracy={value}")],
        )
        .await;
    }
    let success = db.ok("sortie.check_success($1)", &[&c]).await;
    assert_eq!(
        success["iterations_used"], 0,
        "only benchmark runs count: {success}"
    );
    assert_eq!(success["iterations_exhausted"], false);
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}
