//! Concurrency claims as tests (SPEC §11): racing workers on real connections.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::{call_on, TestDb};
use tokio::sync::Barrier;

/// 16 connections race claim_next over 10,000 steps in several campaigns (2,000 on Citus,
/// where each call is about ten times slower and the race is the same): every step is claimed
/// exactly once and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_workers_claim_thousands_of_steps_exactly_once() {
    let db = TestDb::new().await;
    let mut all = HashSet::new();
    let per_campaign = if sortie_tests::on_citus() { 500 } else { 2500 };
    for _ in 0..4 {
        let c = campaign(&db, "none").await;
        // Chains of 5 so that completions activate successors while others claim.
        let steps: Vec<_> = (0..per_campaign)
            .map(|i| if i % 5 == 0 { json!({"action": format!("s{i}"), "key": format!("k{i}")}) }
                 else { json!({"action": format!("s{i}"), "key": format!("k{i}"), "depends_on": [format!("k{}", i - 1)]}) })
            .collect();
        let added = add(&db, c, serde_json::Value::Array(steps)).await;
        all.extend(ids(&added["step_ids"]));
    }
    let claimed = race(&db, 16, |_, _| Action::Complete).await;
    let unique: HashSet<i64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a step was claimed twice");
    assert_eq!(unique, all, "every step was claimed");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE status <> 'done'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.campaigns WHERE status <> 'done'"
        )
        .await,
        0
    );
    db.finish().await;
}

/// The same race while workers splice and abort: no step runs twice, nothing is stuck.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_workers_with_splices_and_aborts_lose_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let groups: Vec<_> = (0..40)
        .map(|g| json!({"step_type": "parallel_group", "action": format!("group {g}"),
                        "children": (0..25).map(|i| json!({"action": format!("g{g} c{i}")})).collect::<Vec<_>>()}))
        .collect();
    add(&db, c, serde_json::Value::Array(groups)).await;
    let claimed = race(&db, 16, |n, depth| match n % 50 {
        7 if depth == 1 => Action::Splice,
        13 if depth >= 1 => Action::Abort,
        _ => Action::Complete,
    })
    .await;
    let unique: HashSet<i64> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a step was claimed twice");
    assert_eq!(count(&db, "SELECT count(*) FROM sortie.steps WHERE status IN ('pending','running','waiting_input')").await, 0);
    assert_eq!(campaign_status(&db, c).await, "done");
    assert!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE continuation_of IS NOT NULL"
        )
        .await
            > 0,
        "splices happened"
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE skip_cause = 'abort'"
        )
        .await
            > 0,
        "aborts happened"
    );
    db.finish().await;
}

#[derive(Clone, Copy)]
enum Action {
    Complete,
    Splice,
    Abort,
}

/// Runs `workers` connections that claim until nothing is ready anywhere; returns every
/// claimed step id. `choose(n, depth)` decides what the worker does with its n-th claim.
async fn race(db: &TestDb, workers: usize, choose: fn(usize, i64) -> Action) -> Vec<i64> {
    let barrier = Arc::new(Barrier::new(workers));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = db.connect().await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            let mut idle = 0;
            let mut n = w;
            while idle < 3 {
                let v = call_on(&client, "sortie.claim_next(owner => 'racer')", &[]).await.expect("claim_next");
                let Some(step) = parse_claim(&v) else {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                idle = 0;
                n += 1;
                mine.push(step.step_id);
                let depth = v["depth"].as_i64().unwrap_or(0);
                let result = match choose(n, depth) {
                    Action::Complete => call_on(&client, "sortie.complete_step($1, $2, 'ok')", &[&step.step_id, &step.token]).await,
                    Action::Splice => call_on(&client,
                        "sortie.spawn_and_continue($1, $2, '[{\"action\": \"sub a\"}, {\"action\": \"sub b\"}]', '\"cont\"', 'half')",
                        &[&step.step_id, &step.token]).await,
                    Action::Abort => {
                        let parent: Option<i64> = client
                            .query_one("SELECT parent_id FROM sortie.steps WHERE id = $1", &[&step.step_id])
                            .await.unwrap().get(0);
                        call_on(&client, "sortie.abort_branch($1, $2, $3, 'enough', 'found the answer early')",
                                &[&parent.unwrap(), &step.token, &step.step_id]).await
                    }
                };
                match result {
                    Ok(_) => {}
                    // Another worker's abort or threshold may have skipped this step meanwhile.
                    Err(e) if e.code == "skipped" || e.code == "invalid_state" => {
                        call_on(&client, "sortie.complete_step($1, $2, 'ok')", &[&step.step_id, &step.token]).await.ok();
                    }
                    Err(e) => panic!("worker {w}: {e}"),
                }
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for t in tasks {
        claimed.extend(t.await.unwrap());
    }
    claimed
}

/// Runs two calls at once on two connections, returning both outcomes.
async fn both(
    db: &TestDb,
    a: (
        &str,
        Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
    ),
    b: (
        &str,
        Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
    ),
) -> (
    Result<serde_json::Value, sortie_tests::DbError>,
    Result<serde_json::Value, sortie_tests::DbError>,
) {
    let ca = db.connect().await;
    let cb = db.connect().await;
    let barrier = Arc::new(Barrier::new(2));
    let (ba, bb) = (barrier.clone(), barrier);
    let (sa, sb) = (a.0.to_string(), b.0.to_string());
    let (pa, pb) = (a.1, b.1);
    let ta = tokio::spawn(async move {
        ba.wait().await;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = pa
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        call_on(&ca, &sa, &refs).await
    });
    let tb = tokio::spawn(async move {
        bb.wait().await;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = pb
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        call_on(&cb, &sb, &refs).await
    });
    (ta.await.unwrap(), tb.await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_vs_claim_gives_a_step_to_exactly_one() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    for _ in 0..20 {
        let id = add_ids(&db, c, json!([{"action": "contested"}])).await[0];
        let (a, b) = both(
            &db,
            ("sortie.claim_step($1, 'a')", vec![Box::new(id)]),
            ("sortie.claim_step($1, 'b')", vec![Box::new(id)]),
        )
        .await;
        assert!(a.is_ok() ^ b.is_ok(), "exactly one claim wins: {a:?} {b:?}");
        let loser = if a.is_ok() { b } else { a };
        assert_eq!(loser.unwrap_err().code, "invalid_state");
        let token: uuid::Uuid = db
            .client
            .query_one("SELECT claim_token FROM sortie.steps WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        db.ok("sortie.complete_step($1, $2, 'x')", &[&id, &token])
            .await;
    }
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_vs_zombie_reset_has_one_winner() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    for round in 0..20 {
        let id = add_ids(&db, c, json!([{"action": format!("r{round}")}])).await[0];
        let v = db.ok("sortie.claim_step($1, 'w', 1)", &[&id]).await;
        let token = uuid::Uuid::parse_str(v["claim_token"].as_str().unwrap()).unwrap();
        db.client.execute("UPDATE sortie.steps SET lease_expires_at = now() - interval '1 second' WHERE id = $1", &[&id]).await.unwrap();
        let (done, reset) = both(
            &db,
            (
                "sortie.complete_step($1, $2, 'finished')",
                vec![Box::new(id), Box::new(token)],
            ),
            ("sortie.reset_zombies()", vec![]),
        )
        .await;
        let reset = reset.unwrap();
        match done {
            Ok(_) => {
                assert_eq!(reset["reset"], 0, "completed first: nothing to reset");
                assert_eq!(status(&db, id).await, "done");
            }
            Err(e) => {
                assert_eq!(
                    e.code, "stale_claim",
                    "reset first: the late completion is refused"
                );
                assert_eq!(reset["reset"], 1);
                assert_eq!(status(&db, id).await, "pending");
                db.client
                    .execute(
                        "UPDATE sortie.steps SET not_before = '-infinity' WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                let again = db.ok("sortie.claim_step($1, 'w')", &[&id]).await;
                let token = uuid::Uuid::parse_str(again["claim_token"].as_str().unwrap()).unwrap();
                db.ok("sortie.complete_step($1, $2, 'second try')", &[&id, &token])
                    .await;
            }
        }
    }
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_vs_zombie_reset_never_double_dispatches() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!((0..30)
            .map(|i| json!({"action": format!("s{i}")}))
            .collect::<Vec<_>>()),
    )
    .await;
    let mut tokens = Vec::new();
    for _ in 0..10 {
        tokens.push(
            parse_claim(
                &db.ok("sortie.claim_next(owner => 'old', lease_seconds => 1)", &[])
                    .await,
            )
            .unwrap(),
        );
    }
    db.client.execute("UPDATE sortie.steps SET lease_expires_at = now() - interval '1 second' WHERE status = 'running'", &[]).await.unwrap();
    let (claimed, reset) = both(
        &db,
        ("sortie.claim_next(owner => 'new')", vec![]),
        ("sortie.reset_zombies()", vec![]),
    )
    .await;
    let claimed = parse_claim(&claimed.unwrap()).unwrap();
    assert_eq!(reset.unwrap()["reset"], 10);
    assert!(
        !tokens.iter().any(|t| t.step_id == claimed.step_id),
        "a retrying step backs off; a fresh one is handed out"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM sortie.steps WHERE status = 'running'"
        )
        .await,
        1
    );
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_vs_cancel_leaves_no_live_claim() {
    let db = TestDb::new().await;
    for _ in 0..20 {
        let c = campaign(&db, "none").await;
        add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
        let (claimed, cancelled) = both(
            &db,
            (
                "sortie.claim_next(owner => 'w', campaign_id => $1)",
                vec![Box::new(c)],
            ),
            ("sortie.cancel_campaign($1)", vec![Box::new(c)]),
        )
        .await;
        cancelled.unwrap();
        let claimed = claimed.unwrap();
        assert_eq!(count(&db, &format!("SELECT count(*) FROM sortie.steps WHERE campaign_id = '{c}' AND status = 'running'")).await, 0);
        if let Some(step) = parse_claim(&claimed) {
            let late = db
                .ok(
                    "sortie.complete_step($1, $2, 'late')",
                    &[&step.step_id, &step.token],
                )
                .await;
            assert_eq!(
                late["accepted"], false,
                "a claim taken before the cancel is revoked"
            );
        }
    }
    db.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_vs_abort_is_consistent_either_way() {
    let db = TestDb::new().await;
    for _ in 0..15 {
        let c = campaign(&db, "none").await;
        let ids = add_ids(&db, c, json!([{"step_type": "parallel_group", "action": "g", "children": [{"action": "splicer"}, {"action": "aborter"}]}])).await;
        let first = claim(&db, c).await.unwrap();
        let second = claim(&db, c).await.unwrap();
        let (splicer, aborter) = if first.action == "splicer" {
            (first, second)
        } else {
            (second, first)
        };
        let (spliced, aborted) = both(
            &db,
            (
                "sortie.spawn_and_continue($1, $2, '[{\"action\": \"sub\"}]', '\"cont\"')",
                vec![Box::new(splicer.step_id), Box::new(splicer.token)],
            ),
            (
                "sortie.abort_branch($1, $2, $3, 'out', 'why')",
                vec![
                    Box::new(ids[0]),
                    Box::new(aborter.token),
                    Box::new(aborter.step_id),
                ],
            ),
        )
        .await;
        aborted.expect("the abort always succeeds: the splicer is inside the branch");
        if let Err(e) = spliced {
            assert_eq!(e.code, "skipped", "abort first: the splicer was skipped");
        }
        assert_eq!(status(&db, ids[0]).await, "done");
        assert_eq!(count(&db, &format!("SELECT count(*) FROM sortie.steps WHERE campaign_id = '{c}' AND status IN ('pending','running')")).await, 0);
        assert_eq!(campaign_status(&db, c).await, "done");
    }
    db.finish().await;
}

/// SPEC §10 delta reads: readers paging get_updates while workers claim, complete and add notes
/// in three campaigns are handed every completion and every note exactly once, each campaign's
/// in its own commit order (the order of the numbers its events carry), and nothing after the
/// last read is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_racing_writers_get_every_event_once_in_each_campaigns_order() {
    let db = TestDb::new().await;
    let mut campaigns = Vec::new();
    let mut all = HashSet::new();
    for _ in 0..3 {
        let c = campaign(&db, "none").await;
        let steps: Vec<_> = (0..40)
            .map(|i| json!({"action": format!("s{i}")}))
            .collect();
        all.extend(ids(
            &add(&db, c, serde_json::Value::Array(steps)).await["step_ids"]
        ));
        campaigns.push(c);
    }
    // Every reader starts at the end of the log as it is now.
    let first = campaigns[0];
    db.ok("sortie.get_updates(NULL, 'all')", &[]).await;
    db.ok("sortie.get_updates($1, 'one')", &[&first]).await;

    let writing = Arc::new(std::sync::atomic::AtomicUsize::new(6));
    let mut writers = Vec::new();
    for w in 0..6 {
        let client = db.connect().await;
        let writing = writing.clone();
        writers.push(tokio::spawn(async move {
            let mut idle = 0;
            while idle < 3 {
                let v = call_on(&client, "sortie.claim_next(owner => 'writer')", &[])
                    .await
                    .expect("claim_next");
                let Some(step) = parse_claim(&v) else {
                    idle += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                idle = 0;
                let campaign = uuid::Uuid::parse_str(v["campaign_id"].as_str().unwrap()).unwrap();
                // A note in its own transaction, numbered among the campaign's other events.
                call_on(
                    &client,
                    "sortie.add_note($1, $2, step_id => $3, claim_token => $4)",
                    &[
                        &campaign,
                        &format!("note of {} by {w}", step.step_id),
                        &step.step_id,
                        &step.token,
                    ],
                )
                .await
                .expect("add_note");
                call_on(
                    &client,
                    "sortie.complete_step($1, $2, 'ok')",
                    &[&step.step_id, &step.token],
                )
                .await
                .expect("complete_step");
            }
            writing.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    let mut readers = Vec::new();
    for (consumer, id) in [("all", None), ("one", Some(first))] {
        let client = db.connect().await;
        let writing = writing.clone();
        readers.push(tokio::spawn(async move {
            let mut completed: Vec<(String, i64)> = Vec::new();
            let mut notes: Vec<i64> = Vec::new();
            loop {
                let done = writing.load(std::sync::atomic::Ordering::SeqCst) == 0;
                let page = call_on(
                    &client,
                    "sortie.get_updates($1, $2, \"limit\" => 7)",
                    &[&id, &consumer],
                )
                .await
                .expect("get_updates");
                for c in page["completed"].as_array().unwrap() {
                    completed.push((
                        c["campaign_id"].as_str().unwrap().to_string(),
                        c["step_id"].as_i64().unwrap(),
                    ));
                }
                notes.extend(
                    page["notes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|n| n["note_id"].as_i64().unwrap()),
                );
                if done && page["events_read"] == 0 {
                    break;
                }
            }
            (completed, notes)
        }));
    }
    for t in writers {
        t.await.unwrap();
    }
    let (all_done, all_notes) = readers.remove(0).await.unwrap();
    let (one_done, one_notes) = readers.remove(0).await.unwrap();

    // Once each, all of them.
    let steps: Vec<i64> = all_done.iter().map(|(_, s)| *s).collect();
    assert_eq!(
        steps.len(),
        all.len(),
        "a completion handed out twice or lost"
    );
    assert_eq!(steps.iter().copied().collect::<HashSet<_>>(), all);
    assert_eq!(all_notes.len(), all.len());
    assert_eq!(all_notes.iter().collect::<HashSet<_>>().len(), all.len());
    // Each campaign's completions in the order its events are numbered.
    let client = db.connect().await;
    for c in &campaigns {
        let logged: Vec<i64> = client
            .query("SELECT step_id FROM sortie.events WHERE campaign_id = $1 AND kind = 'step.done' ORDER BY seq", &[c])
            .await.unwrap().iter().map(|r| r.get(0)).collect();
        let handed: Vec<i64> = all_done
            .iter()
            .filter(|(x, _)| *x == c.to_string())
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(
            handed, logged,
            "campaign {c}: the all-campaign reader's order"
        );
        if *c == first {
            let one: Vec<i64> = one_done.iter().map(|(_, s)| *s).collect();
            assert_eq!(one, logged, "the one-campaign reader's order");
            assert_eq!(one_notes.len(), 40);
        }
    }
    db.finish().await;
}
