//! SPEC §3 DAG splice (spawn_and_continue), branch abort and the depth limit.

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;

async fn spawn(
    db: &TestDb,
    step: &Claim,
    subtasks: serde_json::Value,
    continuation: &str,
) -> Result<serde_json::Value, sortie_tests::DbError> {
    db.call(
        "sortie.spawn_and_continue(step_id => $1, claim_token => $2, subtasks => $3, continuation => to_jsonb($4::text), partial_output => 'half')",
        &[&step.step_id, &step.token, &subtasks, &continuation],
    )
    .await
}

#[tokio::test]
async fn a_splice_rewires_dependents_to_the_continuation() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([{"action": "research", "key": "r"}, {"action": "write", "depends_on": ["r"]}]),
    )
    .await;
    let research = claim(&db, c).await.unwrap();
    let answer = spawn(
        &db,
        &research,
        json!([{"action": "read paper A"}, {"action": "read paper B", "agent": "reader"}]),
        "synthesise",
    )
    .await
    .unwrap();
    let subtasks = sortie_tests::fixtures::ids(&answer["subtask_ids"]);
    let continuation = answer["continuation_id"].as_i64().unwrap();
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "half");
    assert_eq!(step_field(&db, subtasks[0], "parent_id").await, ids[0]);
    assert_eq!(step_field(&db, subtasks[0], "depth").await, 1);
    assert_eq!(step_field(&db, continuation, "depth").await, 0);
    assert_eq!(
        step_field(&db, continuation, "continuation_of").await,
        ids[0]
    );
    let deps: i64 = db
        .client
        .query_one(
            "SELECT depends_on FROM sortie.step_dependencies WHERE step_id = $1",
            &[&ids[1]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        deps, continuation,
        "write now waits for the continuation, not the spliced half"
    );
    let order = run_all(&db, c).await;
    assert_eq!(
        order,
        vec!["read paper A", "read paper B", "synthesise", "write"]
    );
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

#[tokio::test]
async fn a_later_dependency_on_a_spliced_step_resolves_to_the_newest_continuation() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "work"}])).await;
    let first = claim(&db, c).await.unwrap();
    let cont1 = spawn(&db, &first, json!([{"action": "sub 1"}]), "continue 1")
        .await
        .unwrap()["continuation_id"]
        .as_i64()
        .unwrap();
    let sub1 = claim(&db, c).await.unwrap();
    complete(&db, &sub1, "s1").await;
    let second = claim(&db, c).await.unwrap();
    assert_eq!(second.step_id, cont1);
    let cont2 = spawn(&db, &second, json!([{"action": "sub 2"}]), "continue 2")
        .await
        .unwrap()["continuation_id"]
        .as_i64()
        .unwrap();
    let later = add_ids(&db, c, json!([{"action": "later", "depends_on": [ids[0]]}])).await;
    let dep: i64 = db
        .client
        .query_one(
            "SELECT depends_on FROM sortie.step_dependencies WHERE step_id = $1",
            &[&later[0]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dep, cont2);
    assert_eq!(run_all(&db, c).await, vec!["sub 2", "continue 2", "later"]);
    db.finish().await;
}

#[tokio::test]
async fn a_parent_threshold_counts_the_continuation_not_the_spliced_half() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"step_type": "parallel_group", "action": "group", "children": [{"action": "a"}, {"action": "b"}]}])).await;
    let a = claim(&db, c).await.unwrap();
    let b = claim(&db, c).await.unwrap();
    spawn(&db, &a, json!([{"action": "a.sub"}]), "a.cont")
        .await
        .unwrap();
    complete(&db, &b, "b done").await;
    assert_eq!(
        status(&db, ids[0]).await,
        "running",
        "the group waits for a's continuation"
    );
    assert_eq!(run_all(&db, c).await, vec!["a.sub", "a.cont"]);
    assert_eq!(status(&db, ids[0]).await, "done");
    let output: serde_json::Value =
        serde_json::from_str(step_field(&db, ids[0], "output").await.as_str().unwrap()).unwrap();
    let outputs: Vec<&str> = output
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["output"].as_str().unwrap())
        .collect();
    assert_eq!(
        outputs,
        vec!["out:a.cont", "b done"],
        "the continuation takes the spliced step's position"
    );
    db.finish().await;
}

#[tokio::test]
async fn an_empty_splice_is_refused_and_changes_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let a = claim(&db, c).await.unwrap();
    for subtasks in [json!([]), json!(null), json!({"action": "x"})] {
        let err = spawn(&db, &a, subtasks.clone(), "cont").await.unwrap_err();
        assert_eq!(err.code, "invalid_argument", "{subtasks}");
    }
    let err = spawn(&db, &a, json!([{"action": "x"}]), "  ")
        .await
        .unwrap_err();
    assert_eq!(err.code, "invalid_argument");
    assert_eq!(status(&db, a.step_id).await, "running");
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps").await, 1);
    complete(&db, &a, "ok").await;
    db.finish().await;
}

#[tokio::test]
async fn only_the_claimed_running_step_may_splice() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    let a = claim(&db, c).await.unwrap();
    let err = db
        .call(
            "sortie.spawn_and_continue($1, $2, '[{\"action\": \"x\"}]', '\"c\"')",
            &[&ids[1], &a.token],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, "stale_claim", "another step's token does not fit");
    complete(&db, &a, "done").await;
    let err = spawn(&db, &a, json!([{"action": "x"}]), "c")
        .await
        .unwrap_err();
    assert_eq!(err.code, "stale_claim", "a finished step cannot splice");
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps").await, 2);
    let b = claim(&db, c).await.unwrap();
    complete(&db, &b, "ok").await;
    db.finish().await;
}

#[tokio::test]
async fn splicing_beyond_max_depth_is_refused() {
    let db = TestDb::new().await;
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'deep', planner => 'none', max_depth => 1)",
            &[],
        )
        .await;
    let c = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    add(&db, c, json!([{"action": "top"}])).await;
    let top = claim(&db, c).await.unwrap();
    let nested = json!([{"step_type": "sequence", "action": "s", "steps": [{"action": "x"}]}]);
    let err = spawn(&db, &top, nested, "cont").await.unwrap_err();
    assert_eq!(
        err.code, "depth_limit",
        "a nested subtask would reach depth 2"
    );
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps").await, 1);
    let answer = spawn(&db, &top, json!([{"action": "level 1"}]), "cont")
        .await
        .unwrap();
    let level1 = claim(&db, c).await.unwrap();
    assert_eq!(
        level1.step_id,
        sortie_tests::fixtures::ids(&answer["subtask_ids"])[0]
    );
    let err = spawn(&db, &level1, json!([{"action": "level 2"}]), "cont")
        .await
        .unwrap_err();
    assert_eq!(err.code, "depth_limit");
    assert_eq!(status(&db, level1.step_id).await, "running");
    complete(&db, &level1, "ok").await;
    assert_eq!(run_all(&db, c).await, vec!["cont"]);
    db.finish().await;
}

#[tokio::test]
async fn abort_skips_the_open_subtree_and_completes_target_and_caller() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([
        {"step_type": "parallel_group", "action": "branch", "key": "branch", "children": [
            {"action": "prober"},
            {"action": "asker"},
            {"step_type": "sequence", "action": "pipeline", "steps": [{"action": "p1"}, {"action": "p2"}]}]},
        {"action": "after branch", "depends_on": ["branch"]}])).await;
    let mut running = Vec::new();
    while let Some(step) = claim(&db, c).await {
        running.push(step);
    }
    let prober = running.iter().find(|s| s.action == "prober").unwrap();
    let asker = running.iter().find(|s| s.action == "asker").unwrap();
    let p1 = running.iter().find(|s| s.action == "p1").unwrap();
    db.ok(
        "sortie.request_input($1, $2, 'keep going?')",
        &[&asker.step_id, &asker.token],
    )
    .await;

    let answer = db
        .ok("sortie.abort_branch(target_id => $1, claim_token => $2, step_id => $3, output => 'approach debunked', reason => 'paper X refutes it')",
            &[&ids[0], &prober.token, &prober.step_id])
        .await;
    assert_eq!(status(&db, ids[0]).await, "done");
    assert_eq!(step_field(&db, ids[0], "output").await, "approach debunked");
    assert_eq!(status(&db, prober.step_id).await, "done");
    assert_eq!(
        step_field(&db, prober.step_id, "output").await,
        "paper X refutes it"
    );
    for action in ["asker", "pipeline", "p1", "p2"] {
        let id = step_by_action(&db, c, action).await;
        assert_eq!(status(&db, id).await, "skipped", "{action}");
        assert_eq!(step_field(&db, id, "skip_cause").await, "abort");
    }
    assert_eq!(answer["skipped"].as_array().unwrap().len(), 4);
    let note = db.ok("sortie.get_notes($1, ARRAY['abort'])", &[&c]).await;
    assert!(note["notes"][0]["content"]
        .as_str()
        .unwrap()
        .contains("paper X refutes it"));
    let late = complete(&db, p1, "late work").await;
    assert_eq!(late["status"], "skipped");
    assert_eq!(
        step_field(&db, p1.step_id, "output").await,
        "late work",
        "late output is kept for audit"
    );
    assert_eq!(run_all(&db, c).await, vec!["after branch"]);
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

#[tokio::test]
async fn abort_needs_an_ancestor_target_and_the_callers_claim() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(
        &db,
        c,
        json!([
        {"step_type": "parallel_group", "action": "g1", "children": [{"action": "in g1"}]},
        {"step_type": "parallel_group", "action": "g2", "children": [{"action": "in g2"}]}]),
    )
    .await;
    let in_g1 = claim(&db, c).await.unwrap();
    let in_g2 = claim(&db, c).await.unwrap();
    let abort = "sortie.abort_branch(target_id => $1, claim_token => $2, step_id => $3, output => 'o', reason => 'r')";
    let err = db
        .call(abort, &[&ids[1], &in_g1.token, &in_g1.step_id])
        .await
        .unwrap_err();
    assert_eq!(
        err.code, "invalid_argument",
        "g2 is not an ancestor of g1's child"
    );
    let err = db
        .call(abort, &[&in_g1.step_id, &in_g1.token, &in_g1.step_id])
        .await
        .unwrap_err();
    assert_eq!(
        err.code, "invalid_argument",
        "a step is not its own strict ancestor"
    );
    let err = db
        .call(abort, &[&ids[0], &in_g2.token, &in_g1.step_id])
        .await
        .unwrap_err();
    assert_eq!(
        err.code, "stale_claim",
        "the caller must present its own token"
    );
    let err = db
        .call(abort, &[&ids[0], &uuid::Uuid::new_v4(), &in_g1.step_id])
        .await
        .unwrap_err();
    assert_eq!(err.code, "stale_claim");
    assert_eq!(status(&db, ids[0]).await, "running");
    complete(&db, &in_g1, "ok").await;
    complete(&db, &in_g2, "ok").await;
    db.finish().await;
}

#[tokio::test]
async fn a_terminal_target_cannot_be_aborted() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "top"}])).await;
    let top = claim(&db, c).await.unwrap();
    let answer = spawn(&db, &top, json!([{"action": "child"}]), "cont")
        .await
        .unwrap();
    let child = claim(&db, c).await.unwrap();
    assert_eq!(
        child.step_id,
        sortie_tests::fixtures::ids(&answer["subtask_ids"])[0]
    );
    let err = db
        .call("sortie.abort_branch(target_id => $1, claim_token => $2, step_id => $3, output => 'o', reason => 'r')",
              &[&ids[0], &child.token, &child.step_id])
        .await
        .unwrap_err();
    assert_eq!(
        err.code, "invalid_state",
        "the spliced parent is already done"
    );
    complete(&db, &child, "ok").await;
    run_all(&db, c).await;
    db.finish().await;
}

/// The splice named by its campaign (`_spawn_and_continue_delegated`, sortie-mcp's for its own
/// step; on Citus it runs on the worker holding the campaign) splices as spawn_and_continue
/// does; a step of another campaign or a stale claim is refused and changes nothing.
#[tokio::test]
async fn the_splice_named_by_its_campaign_splices_as_spawn_and_continue() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "big", "key": "big"}, {"action": "after", "depends_on": ["big"]}]),
    )
    .await;
    let big = claim(&db, c).await.unwrap();
    let other = campaign(&db, "none").await;
    let steps_before = count(&db, "SELECT count(*) FROM sortie.steps").await;
    let splice = "sortie._spawn_and_continue_delegated($1, $2, $3, '[{\"action\": \"part 1\"}, {\"action\": \"part 2\"}]', \
                  '\"join\"', 'started')";
    let wrong = db
        .call(splice, &[&other, &big.step_id, &big.token])
        .await
        .unwrap_err();
    assert_eq!(wrong.code, "not_found", "{wrong:?}");
    let stale = db
        .call(splice, &[&c, &big.step_id, &uuid::Uuid::new_v4()])
        .await
        .unwrap_err();
    assert_eq!(stale.code, "stale_claim", "{stale:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.steps").await,
        steps_before,
        "refused splices add nothing"
    );
    let spliced = db.ok(splice, &[&c, &big.step_id, &big.token]).await;
    assert_eq!(spliced["status"], "done", "{spliced}");
    assert_eq!(spliced["subtask_ids"].as_array().map(Vec::len), Some(2));
    let cont = spliced["continuation_id"].as_i64().unwrap();
    // The rest of the campaign runs as after any splice: parts, join, then what waited for big.
    let order = run_all(&db, c).await;
    assert_eq!(order, ["part 1", "part 2", "join", "after"], "{order:?}");
    assert_eq!(status(&db, cont).await, "done");
    db.finish().await;
}
