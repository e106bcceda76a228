//! SPEC §3 campaign rules: end, cancel, budget, input requests, success contract, get_updates,
//! notes, the planner's plan, fair share.

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;

#[tokio::test]
async fn a_campaign_without_planner_ends_done_when_every_step_is_done() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    run_all(&db, c).await;
    assert_eq!(campaign_status(&db, c).await, "done");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.campaigns WHERE completed_at IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE level = 'done'"
        )
        .await,
        1
    );
    db.finish().await;
}

#[tokio::test]
async fn a_planned_campaign_stays_active_when_drained_and_announces_it() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, json!([{"action": "a"}])).await;
    run_all(&db, c).await;
    assert_eq!(campaign_status(&db, c).await, "active");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.events WHERE kind = 'campaign.drained'"
        )
        .await,
        1
    );
    let ended = db.ok("sortie.finish_campaign($1)", &[&c]).await;
    assert_eq!(ended["status"], "done");
    db.finish().await;
}

#[tokio::test]
async fn finish_campaign_refuses_while_steps_are_open() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, json!([{"action": "a"}])).await;
    assert_eq!(
        db.call("sortie.finish_campaign($1)", &[&c])
            .await
            .unwrap_err()
            .code,
        "invalid_state"
    );
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn cancel_skips_everything_open_and_revokes_claims() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "running"}, {"action": "asking"}, {"action": "pending", "depends_on": []},
                       {"step_type": "sequence", "action": "seq", "steps": [{"action": "s1"}, {"action": "s2"}]}])).await;
    let running = claim(&db, c).await.unwrap();
    let asking = claim(&db, c).await.unwrap();
    db.ok(
        "sortie.request_input($1, $2, 'ok?')",
        &[&asking.step_id, &asking.token],
    )
    .await;
    let answer = db
        .ok("sortie.cancel_campaign($1, 'changed my mind')", &[&c])
        .await;
    assert_eq!(answer["status"], "cancelled");
    assert_eq!(campaign_status(&db, c).await, "cancelled");
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps WHERE status IN ('pending','running','waiting_input')").await, 0);
    let late = complete(&db, &running, "late").await;
    assert_eq!(late["accepted"], false);
    let err = db
        .call(
            "sortie.heartbeat($1, $2)",
            &[&running.step_id, &running.token],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, "skipped");
    assert_eq!(
        db.call("sortie.cancel_campaign($1)", &[&c])
            .await
            .unwrap_err()
            .code,
        "invalid_state"
    );
    assert_eq!(
        db.call("sortie.add_steps($1, '[{\"action\": \"x\"}]')", &[&c])
            .await
            .unwrap_err()
            .code,
        "invalid_state"
    );
    db.finish().await;
}

#[tokio::test]
async fn an_exhausted_token_budget_pauses_the_campaign() {
    let db = TestDb::new().await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'budget', planner => 'none', token_budget => 1000)",
            &[],
        )
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    let a = claim(&db, c).await.unwrap();
    db.ok(
        "sortie.complete_step($1, $2, 'x', 1500)",
        &[&a.step_id, &a.token],
    )
    .await;
    assert_eq!(campaign_status(&db, c).await, "paused");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.campaigns WHERE status_reason = 'budget_exhausted'"
        )
        .await,
        1
    );
    assert!(claim(&db, c).await.is_none(), "nothing new is dispatched");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.notifications WHERE message LIKE '%budget%'"
        )
        .await,
        1
    );
    assert_eq!(
        db.call("sortie.resume_campaign($1)", &[&c])
            .await
            .unwrap_err()
            .code,
        "budget_exhausted"
    );
    db.client
        .execute(
            "UPDATE sortie.campaigns SET token_budget = 5000 WHERE id = $1",
            &[&c],
        )
        .await
        .unwrap();
    db.ok("sortie.resume_campaign($1)", &[&c]).await;
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn an_answer_is_stored_beside_the_question_and_the_original_input() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "decide", "input": {"options": ["a", "b"]}}]),
    )
    .await;
    let step = claim(&db, c).await.unwrap();
    db.ok(
        "sortie.request_input($1, $2, 'a or b?', 'looked at both')",
        &[&step.step_id, &step.token],
    )
    .await;
    assert!(claim(&db, c).await.is_none());
    let err = db
        .call("sortie.provide_input($1, $2, '')", &[&c, &ids[0]])
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_argument");
    db.ok("sortie.provide_input($1, $2, 'b')", &[&c, &ids[0]])
        .await;
    let again = claim(&db, c).await.unwrap();
    assert_eq!(again.step_id, ids[0]);
    let context = db.ok("sortie.get_my_context($1)", &[&ids[0]]).await;
    assert_eq!(context["step"]["input"]["options"], json!(["a", "b"]));
    assert_eq!(context["step"]["question"], "a or b?");
    assert_eq!(context["step"]["answer"], "b");
    let err = db
        .call("sortie.provide_input($1, $2, 'again')", &[&c, &ids[0]])
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_state");
    complete(&db, &again, "chose b").await;
    db.finish().await;
}

#[tokio::test]
async fn get_updates_lists_waiting_steps_and_finished_campaigns_once() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "ask"}, {"action": "work"}])).await;
    let ask = claim(&db, c).await.unwrap();
    let work = claim(&db, c).await.unwrap();
    db.ok(
        "sortie.request_input($1, $2, 'go?')",
        &[&ask.step_id, &ask.token],
    )
    .await;
    complete(&db, &work, "result").await;
    let first = db
        .ok("sortie.get_updates(id => $1, consumer => 'me')", &[&c])
        .await;
    assert_eq!(first["completed"].as_array().unwrap().len(), 1);
    assert_eq!(first["waiting_inputs"][0]["question"], "go?");
    let second = db
        .ok("sortie.get_updates(id => $1, consumer => 'me')", &[&c])
        .await;
    assert_eq!(
        second["completed"].as_array().unwrap().len(),
        0,
        "a cursor never repeats"
    );
    assert_eq!(
        second["waiting_inputs"].as_array().unwrap().len(),
        1,
        "waiting steps are listed while they wait"
    );
    let other = db
        .ok(
            "sortie.get_updates(id => $1, consumer => 'someone else')",
            &[&c],
        )
        .await;
    assert_eq!(
        other["completed"].as_array().unwrap().len(),
        1,
        "each consumer has its own cursor"
    );
    db.ok("sortie.provide_input($1, $2, 'yes')", &[&c, &ask.step_id])
        .await;
    run_all(&db, c).await;
    let last = db.ok("sortie.get_updates(consumer => 'me')", &[]).await;
    let events: Vec<&str> = last["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"campaign.done"), "{events:?}");
    db.finish().await;
}

#[tokio::test]
async fn get_updates_never_skips_an_event_committed_late() {
    let db = TestDb::new().await;
    // Two campaigns: a transaction holds its campaign's lock until it ends.
    let c = campaign(&db, "none").await;
    let d = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    add(&db, d, json!([{"action": "b"}])).await;
    db.ok("sortie.get_updates(consumer => 'reader')", &[]).await;
    // A transaction that writes an event and stays open while a later one commits.
    let slow = db.connect().await;
    slow.batch_execute("BEGIN").await.unwrap();
    let a = claim_on(&slow, c).await.unwrap();
    let b = claim(&db, d).await.unwrap();
    complete(&db, &b, "b").await;
    // Each campaign numbers its own events: d's do not wait for c's open transaction.
    let during = db.ok("sortie.get_updates(consumer => 'reader')", &[]).await;
    assert_eq!(during["completed"][0]["step_id"], b.step_id, "{during}");
    slow.batch_execute("COMMIT").await.unwrap();
    // c's claim, committed after d's events were read, is handed out now.
    let after = db.ok("sortie.get_updates(consumer => 'reader')", &[]).await;
    assert_eq!(after["events_read"], 1, "{after}");
    assert_eq!(after["completed"], json!([]), "{after}");
    complete(&db, &a, "a").await;
    let last = db.ok("sortie.get_updates(consumer => 'reader')", &[]).await;
    assert_eq!(last["completed"].as_array().unwrap().len(), 1);
    db.finish().await;
}

#[tokio::test]
async fn notes_come_newest_first() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    for text in ["first", "second", "third"] {
        db.ok("sortie.add_note($1, $2, ARRAY['finding'])", &[&c, &text])
            .await;
    }
    let notes = db.ok("sortie.get_notes($1)", &[&c]).await;
    let order: Vec<&str> = notes["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["content"].as_str().unwrap())
        .collect();
    assert_eq!(order, vec!["third", "second", "first"]);
    let state = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert_eq!(state["recent_notes"][0]["content"], "third");
    db.finish().await;
}

#[tokio::test]
async fn check_success_compares_the_newest_metric_with_the_target() {
    let db = TestDb::new().await;
    let created = db
        .ok("sortie.create_campaign(goal => 'tune', planner => 'none', success_metric => 'acc', success_target => 0.9, max_iterations => 5)", &[])
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    let before = db.ok("sortie.check_success($1)", &[&c]).await;
    assert_eq!(before["met"], false);
    db.ok(
        "sortie.add_note($1, 'acc=0.85', ARRAY['metric:acc'])",
        &[&c],
    )
    .await;
    let low = db.ok("sortie.check_success($1)", &[&c]).await;
    assert_eq!(
        (low["met"].clone(), low["metric_value"].clone()),
        (json!(false), json!(0.85))
    );
    db.ok("sortie.add_note($1, '0.93', ARRAY['metric:acc'])", &[&c])
        .await;
    db.ok(
        "sortie.add_note($1, 'loss=0.1', ARRAY['metric:acc'])",
        &[&c],
    )
    .await;
    let met = db.ok("sortie.check_success($1)", &[&c]).await;
    assert_eq!(met["met"], true);
    assert_eq!(met["metric_value"], 0.93);
    assert_eq!(met["iterations_used"], 2);
    assert_eq!(met["max_iterations"], 5);
    db.finish().await;
}

#[tokio::test]
async fn a_malformed_plan_changes_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    let bad = json!({"strategy_update": "new", "new_steps": [{"action": "ok"}, {"step_type": "bogus", "action": "x"}]});
    assert_eq!(
        db.call("sortie.apply_plan($1, $2)", &[&c, &bad])
            .await
            .unwrap_err()
            .code,
        "invalid_argument"
    );
    let state = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert!(state["strategy"].is_null());
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps").await, 0);
    let good = json!({"strategy_update": "go wide", "progress_update": "planned", "new_steps": [{"action": "ok"}],
                      "notify": {"level": "milestone", "message": "planned"}});
    let applied = db.ok("sortie.apply_plan($1, $2)", &[&c, &good]).await;
    assert_eq!(applied["steps"]["created"], 1);
    run_all(&db, c).await;
    let done = db
        .ok("sortie.apply_plan($1, '{\"done\": true}')", &[&c])
        .await;
    assert_eq!(done["status"], "done");
    db.finish().await;
}

#[tokio::test]
async fn the_planner_never_overwrites_user_guidance() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    db.ok("sortie.steer_campaign($1, 'focus on 2024 papers')", &[&c])
        .await;
    db.ok(
        "sortie.apply_plan($1, '{\"strategy_update\": \"planner strategy\"}')",
        &[&c],
    )
    .await;
    let state = db.ok("sortie.get_campaign($1)", &[&c]).await;
    assert_eq!(state["guidance"][0]["text"], "focus on 2024 papers");
    assert_eq!(state["strategy"], "planner strategy");
    db.finish().await;
}

#[tokio::test]
async fn a_campaign_is_planned_by_one_runner_at_a_time() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, json!([{"action": "a"}])).await;
    assert_eq!(
        db.ok("sortie.begin_planning($1)", &[&c]).await["granted"],
        false,
        "work in flight"
    );
    run_all(&db, c).await;
    assert_eq!(
        db.ok("sortie.begin_planning($1)", &[&c]).await["granted"],
        true
    );
    assert_eq!(
        db.ok("sortie.begin_planning($1)", &[&c]).await["granted"],
        false,
        "the lease is held"
    );
    db.ok("sortie.apply_plan($1, '{\"done\": true}')", &[&c])
        .await;
    db.finish().await;
}

#[tokio::test]
async fn fair_share_hands_the_next_step_to_the_least_served_campaign() {
    let db = TestDb::new().await;
    let busy = campaign(&db, "none").await;
    let fresh = campaign(&db, "none").await;
    add(
        &db,
        busy,
        json!([{"action": "b1"}, {"action": "b2"}, {"action": "b3"}]),
    )
    .await;
    let first =
        sortie_tests::fixtures::parse_claim(&db.ok("sortie.claim_next(owner => 'w')", &[]).await)
            .unwrap();
    assert_eq!(first.action, "b1");
    add(&db, fresh, json!([{"action": "f1"}])).await;
    let second =
        sortie_tests::fixtures::parse_claim(&db.ok("sortie.claim_next(owner => 'w')", &[]).await)
            .unwrap();
    assert_eq!(
        second.action, "f1",
        "the busy campaign already holds a slot"
    );
    for step in [first, second] {
        complete(&db, &step, "x").await;
    }
    run_all(&db, busy).await;
    db.finish().await;
}

#[tokio::test]
async fn a_capped_campaign_does_not_block_the_others() {
    let db = TestDb::new().await;
    let created = db.ok("sortie.create_campaign(goal => 'capped', planner => 'none', priority => 'urgent', max_parallel => 1)", &[]).await;
    let capped = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(
        &db,
        capped,
        json!([{"action": "c1"}, {"action": "c2"}, {"action": "c3"}]),
    )
    .await;
    let mut others = Vec::new();
    for _ in 0..3 {
        let c = campaign(&db, "none").await;
        add(&db, c, json!([{"action": "o"}])).await;
        others.push(c);
    }
    let mut claimed = Vec::new();
    while let Some(step) =
        sortie_tests::fixtures::parse_claim(&db.ok("sortie.claim_next(owner => 'w')", &[]).await)
    {
        claimed.push(step);
    }
    let from_capped = claimed.iter().filter(|s| s.action.starts_with('c')).count();
    assert_eq!(from_capped, 1, "max_parallel = 1");
    assert_eq!(claimed.len(), 4, "every other campaign still got its step");
    for step in &claimed {
        complete(&db, step, "x").await;
    }
    run_all(&db, capped).await;
    db.finish().await;
}

/// Events carry no foreign key (a key check per event would lock the campaign row again);
/// deleting a campaign still takes its events, steps and notes with it.
#[tokio::test]
/// Removing a campaign is prune()'s work (SPEC §18): a raw `DELETE` of the campaign row would
/// leave its events, which carry no foreign key (docs/decisions.md, "Scale-out on Citus").
async fn removing_a_campaign_removes_everything_it_owns() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let keep = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    add(&db, keep, json!([{"action": "k"}])).await;
    let keep_events = count(
        &db,
        &format!("SELECT count(*) FROM sortie.events WHERE campaign_id = '{keep}'"),
    )
    .await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.ok("sortie.prune(older_than => interval '0 seconds')", &[])
        .await;
    for table in ["events", "steps", "step_dependencies", "notes"] {
        let left = count(
            &db,
            &format!("SELECT count(*) FROM sortie.{table} WHERE campaign_id = '{c}'"),
        )
        .await;
        assert_eq!(left, 0, "{table} of the deleted campaign");
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM sortie.events WHERE campaign_id = '{keep}'")
        )
        .await,
        keep_events
    );
    db.ok("sortie.cancel_campaign($1)", &[&keep]).await;
    db.finish().await;
}
