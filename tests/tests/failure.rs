//! SPEC §3 fail and retry, thresholds, fail_fast, fencing, zombies, terminal states.

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;

#[tokio::test]
async fn a_failed_attempt_retries_with_exponential_back_off() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "flaky", "max_attempts": 3}])).await;
    let first = claim(&db, c).await.unwrap();
    let answer = fail(&db, &first, "timeout").await;
    assert_eq!(answer["status"], "pending");
    assert_eq!(answer["will_retry"], true);
    assert!(claim(&db, c).await.is_none(), "backing off");
    set_clock(&db.client, 11).await;
    let second = claim(&db, c).await.expect("ready after 10 s");
    fail(&db, &second, "timeout").await;
    set_clock(&db.client, 11 + 15).await;
    assert!(
        claim(&db, c).await.is_none(),
        "the second back-off is longer (20 s)"
    );
    set_clock(&db.client, 11 + 21).await;
    let third = claim(&db, c).await.unwrap();
    let last = fail(&db, &third, "timeout").await;
    assert_eq!(last["status"], "failed");
    assert_eq!(status(&db, ids[0]).await, "failed");
    assert_eq!(step_field(&db, ids[0], "attempts").await, 3);
    db.finish().await;
}

#[tokio::test]
async fn a_final_failure_skips_every_transitive_dependent() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([
        {"action": "root", "key": "root", "max_attempts": 1},
        {"action": "child", "key": "child", "depends_on": ["root"]},
        {"step_type": "sequence", "action": "grandchildren", "depends_on": ["child"], "steps": [{"action": "g1"}, {"action": "g2"}]},
        {"action": "independent"}])).await;
    let root = claim(&db, c).await.unwrap();
    fail(&db, &root, "boom").await;
    for id in &ids[1..3] {
        assert_eq!(status(&db, *id).await, "skipped");
    }
    let error = step_field(&db, ids[1], "error").await;
    assert!(
        error.as_str().unwrap().contains(&ids[0].to_string()),
        "the skip names the failed step: {error}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE action IN ('g1','g2') AND status = 'skipped'"
        )
        .await,
        2
    );
    assert_eq!(run_all(&db, c).await, vec!["independent"]);
    assert_eq!(campaign_status(&db, c).await, "failed");
    db.finish().await;
}

#[tokio::test]
async fn a_threshold_met_early_completes_the_parent_and_skips_the_rest() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"step_type": "parallel_group", "action": "race", "completion_threshold": 2,
        "children": [{"action": "1"}, {"action": "2"}, {"action": "3"}]}, {"action": "after", "depends_on": []}])).await;
    let one = claim(&db, c).await.unwrap();
    let two = claim(&db, c).await.unwrap();
    let three = claim(&db, c).await.unwrap();
    complete(&db, &one, "a").await;
    complete(&db, &three, "c").await;
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(status(&db, two.step_id).await, "skipped");
    assert_eq!(
        step_field(&db, two.step_id, "skip_cause").await,
        "threshold"
    );
    let late = complete(&db, &two, "too late").await;
    assert_eq!(late["status"], "skipped");
    assert_eq!(late["accepted"], false);
    db.finish().await;
}

#[tokio::test]
async fn an_unreachable_threshold_fails_the_parent() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"step_type": "parallel_group", "action": "need two", "completion_threshold": 2,
        "children": [{"action": "1", "max_attempts": 1}, {"action": "2", "max_attempts": 1}, {"action": "3"}]}])).await;
    let one = claim(&db, c).await.unwrap();
    let two = claim(&db, c).await.unwrap();
    fail(&db, &one, "x").await;
    assert_eq!(
        status(&db, ids[0]).await,
        "running",
        "two of three can still succeed"
    );
    fail(&db, &two, "y").await;
    assert_eq!(status(&db, ids[0]).await, "failed");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE action = '3' AND status = 'skipped'"
        )
        .await,
        1
    );
    assert_eq!(campaign_status(&db, c).await, "failed");
    db.finish().await;
}

#[tokio::test]
async fn nested_fail_fast_fails_siblings_and_parents_up_the_tree() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([
        {"step_type": "parallel_group", "action": "outer", "failure_policy": "fail_fast", "children": [
            {"step_type": "parallel_group", "action": "inner", "children": [
                {"action": "bad", "max_attempts": 1}, {"action": "slow"}]},
            {"action": "cousin"}]},
        {"action": "elsewhere", "failure_policy": "continue"}])).await;
    let mut claims = Vec::new();
    while let Some(step) = claim(&db, c).await {
        claims.push(step);
    }
    let bad = claims.iter().find(|s| s.action == "bad").unwrap();
    fail(&db, bad, "fatal").await;
    assert_eq!(status(&db, ids[0]).await, "failed");
    let inner = step_by_action(&db, c, "inner").await;
    assert_eq!(status(&db, inner).await, "failed");
    for action in ["slow", "cousin"] {
        assert_eq!(
            status(&db, step_by_action(&db, c, action).await).await,
            "skipped",
            "{action}"
        );
    }
    assert_eq!(
        campaign_status(&db, c).await,
        "failed",
        "a top-level fail_fast failure fails the campaign"
    );
    assert_eq!(status(&db, ids[1]).await, "skipped");
    db.finish().await;
}

#[tokio::test]
async fn continue_policy_lets_other_top_level_steps_finish() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "bad", "max_attempts": 1}, {"action": "good"}]),
    )
    .await;
    let bad = claim(&db, c).await.unwrap();
    let good = claim(&db, c).await.unwrap();
    fail(&db, &bad, "x").await;
    assert_eq!(campaign_status(&db, c).await, "active");
    complete(&db, &good, "ok").await;
    assert_eq!(
        campaign_status(&db, c).await,
        "failed",
        "it ends failed once drained"
    );
    db.finish().await;
}

#[tokio::test]
async fn stale_claim_cannot_complete_after_reset() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "slow"}])).await;
    let stale = call_claim(&db, c, 60).await;
    set_clock(&db.client, 61).await;
    let reset = db.ok("sortie.reset_zombies()", &[]).await;
    assert_eq!(reset["reset"], 1);
    set_clock(&db.client, 61 + 11).await;
    let fresh = claim(&db, c).await.unwrap();
    assert_eq!(fresh.step_id, ids[0]);
    for (call, params) in [
        ("sortie.complete_step($1, $2, 'late')", 0),
        ("sortie.fail_step($1, $2, 'late')", 0),
        ("sortie.heartbeat($1, $2)", 0),
        ("sortie.request_input($1, $2, 'q?')", 0),
        (
            "sortie.spawn_and_continue($1, $2, '[{\"action\": \"x\"}]', '\"c\"')",
            0,
        ),
    ] {
        let _ = params;
        let err = db
            .call(call, &[&stale.step_id, &stale.token])
            .await
            .unwrap_err();
        assert_eq!(err.code, "stale_claim", "{call}");
    }
    assert_eq!(status(&db, ids[0]).await, "running");
    complete(&db, &fresh, "fresh").await;
    assert_eq!(step_field(&db, ids[0], "output").await, "fresh");
    db.finish().await;
}

async fn call_claim(db: &TestDb, c: uuid::Uuid, lease: i32) -> Claim {
    let v = db
        .ok(
            "sortie.claim_next(owner => 'w', campaign_id => $1, lease_seconds => $2)",
            &[&c, &lease],
        )
        .await;
    parse_claim(&v).unwrap()
}

#[tokio::test]
async fn a_zombie_reset_counts_an_attempt_so_a_hanging_step_ends_failed() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "hangs", "max_attempts": 2}, {"action": "after", "depends_on": []}]),
    )
    .await;
    let mut now = 0;
    for _ in 0..2 {
        let step = call_claim(&db, c, 30).await;
        assert_eq!(step.step_id, ids[0]);
        now += 31;
        set_clock(&db.client, now).await;
        db.ok("sortie.reset_zombies()", &[]).await;
        now += 600;
        set_clock(&db.client, now).await;
    }
    assert_eq!(status(&db, ids[0]).await, "failed");
    assert_eq!(step_field(&db, ids[0], "error").await, "lease expired");
    assert_eq!(step_field(&db, ids[0], "attempts").await, 2);
    db.finish().await;
}

#[tokio::test]
async fn heartbeat_keeps_a_step_from_being_reset() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "long"}])).await;
    let step = call_claim(&db, c, 60).await;
    set_clock(&db.client, 50).await;
    db.ok(
        "sortie.heartbeat($1, $2, 120)",
        &[&step.step_id, &step.token],
    )
    .await;
    set_clock(&db.client, 100).await;
    assert_eq!(db.ok("sortie.reset_zombies()", &[]).await["reset"], 0);
    set_clock(&db.client, 171).await;
    assert_eq!(db.ok("sortie.reset_zombies()", &[]).await["reset"], 1);
    db.finish().await;
}

#[tokio::test]
async fn waiting_input_steps_are_never_reset() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "ask"}])).await;
    let step = call_claim(&db, c, 30).await;
    db.ok(
        "sortie.request_input($1, $2, 'which way?')",
        &[&step.step_id, &step.token],
    )
    .await;
    set_clock(&db.client, 100_000).await;
    assert_eq!(db.ok("sortie.reset_zombies()", &[]).await["reset"], 0);
    assert_eq!(status(&db, ids[0]).await, "waiting_input");
    db.finish().await;
}

#[tokio::test]
async fn terminal_states_are_never_reopened_by_late_calls() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "once"}, {"action": "keep open"}])).await;
    let step = claim(&db, c).await.unwrap();
    complete(&db, &step, "first").await;
    for call in [
        "sortie.complete_step($1, $2, 'again')",
        "sortie.fail_step($1, $2, 'x')",
        "sortie.heartbeat($1, $2)",
        "sortie.request_input($1, $2, 'q')",
    ] {
        let err = db
            .call(call, &[&step.step_id, &step.token])
            .await
            .unwrap_err();
        assert_eq!(err.code, "stale_claim", "{call}: {err}");
    }
    let err = db
        .call("sortie.claim_step($1, 'w')", &[&ids[0]])
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_state");
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "first");
    db.finish().await;
}

#[tokio::test]
async fn a_worker_call_without_a_token_is_refused() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let step = claim(&db, c).await.unwrap();
    let err = db
        .call("sortie.complete_step($1, NULL, 'x')", &[&step.step_id])
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_argument");
    let err = db
        .call(
            "sortie.complete_step($1, gen_random_uuid(), 'x')",
            &[&step.step_id],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, "stale_claim");
    let err = db
        .call("sortie.complete_step(987654, gen_random_uuid(), 'x')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code, "not_found");
    complete(&db, &step, "ok").await;
    db.finish().await;
}
