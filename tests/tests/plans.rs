//! Query plans on the hot paths (SPEC §10: index paths only, cost independent of history).
//! auto_explain reports the plans of the statements inside the extension's functions as
//! NOTICEs, so the test reads the plan the function really ran.

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;
use tokio_postgres::AsyncMessage;

#[tokio::test]
async fn claim_next_reads_the_ready_index_whatever_the_history() {
    let db = TestDb::new().await;
    // Another campaign's finished history ahead of this campaign's ready steps: the plan that
    // once walked the primary key through it took 13 ms at 10^5 steps.
    let old = campaign(&db, "llm").await;
    db.client
        .execute(
            "INSERT INTO sortie.steps (campaign_id, action, status, completed_at)
             SELECT $1, 'history ' || g, 'done', now() FROM generate_series(1, 90000) g",
            &[&old],
        )
        .await
        .unwrap();
    let c = campaign(&db, "llm").await;
    add(
        &db,
        c,
        json!((0..10_000)
            .map(|i| json!({"action": format!("r{i}")}))
            .collect::<Vec<_>>()),
    )
    .await;
    db.client.batch_execute("VACUUM ANALYZE").await.unwrap();

    let (client, mut messages) = db.connect_with_messages().await;
    // The generic plan is the one a long-lived connection ends up with.
    client
        .batch_execute(
            "SET plan_cache_mode = force_generic_plan;
             LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_level = notice;",
        )
        .await
        .unwrap();
    let claimed = client
        .query_one(
            "SELECT sortie.claim_next(owner => 'w', campaign_id => $1)",
            &[&c],
        )
        .await
        .unwrap();
    let claimed: serde_json::Value = claimed.get(0);
    assert!(claimed["step_id"].as_i64().is_some());
    drop(client);

    let mut plans = Vec::new();
    while let Some(message) = messages.recv().await {
        if let AsyncMessage::Notice(n) = message {
            plans.push(n.message().to_string());
        }
    }
    let pick = plans
        .iter()
        .find(|p| p.contains("FOR UPDATE SKIP LOCKED") && p.contains("FROM steps"))
        .unwrap_or_else(|| panic!("no plan for the ready-step pick among {plans:#?}"));
    assert!(pick.contains("steps_ready"), "{pick}");
    assert!(!pick.contains("steps_pkey"), "{pick}");
    db.ok("sortie.cancel_campaign($1)", &[&old]).await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

/// The plans of the statements one call runs, as auto_explain reports them (with the rows and
/// buffers each node touched when `analyze` is on), under the generic plan a long-lived
/// connection ends up with.
async fn plans_of(
    db: &TestDb,
    call: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    analyze: bool,
) -> (serde_json::Value, Vec<String>) {
    let (client, mut messages) = db.connect_with_messages().await;
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = force_generic_plan;
             LOAD 'auto_explain';
             SET auto_explain.log_min_duration = 0;
             SET auto_explain.log_nested_statements = on;
             SET auto_explain.log_analyze = {analyze};
             SET auto_explain.log_buffers = {analyze};
             SET auto_explain.log_level = notice;"
        ))
        .await
        .unwrap();
    let result: serde_json::Value = client.query_one(call, params).await.unwrap().get(0);
    drop(client);
    let mut plans = Vec::new();
    while let Some(message) = messages.recv().await {
        if let AsyncMessage::Notice(n) = message {
            plans.push(n.message().to_string());
        }
    }
    (result, plans)
}

/// Shared buffers a plan's top node touched (`Buffers: shared hit=… read=…`).
fn buffers(plan: &str) -> i64 {
    let line = plan
        .lines()
        .find(|l| l.trim_start().starts_with("Buffers:"))
        .unwrap_or_else(|| panic!("no Buffers line in {plan}"));
    line.split([' ', ','])
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| *k == "hit" || *k == "read")
        .map(|(_, v)| v.parse::<i64>().unwrap())
        .sum()
}

/// Heap tuples an index-only scan had to visit (`Heap Fetches: n`); 0 for other plans.
fn heap_fetches(plan: &str) -> i64 {
    plan.lines()
        .filter_map(|l| l.trim_start().strip_prefix("Heap Fetches: "))
        .map(|n| n.trim().parse::<i64>().unwrap())
        .sum()
}

#[tokio::test]
async fn claim_next_starts_past_its_own_campaigns_finished_history() {
    // SPEC §18: a claim's cost does not grow with its campaign's history. Each finished step
    // leaves a dead entry in steps_ready until VACUUM; while a snapshot older than its end is
    // open it cannot even be marked dead. A scan from the campaign's first entry walked them
    // all; the claim starts at the campaign's ready_floor, positioned there by the index.
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    // 20,000 steps that were ready (in steps_ready) and then finished, while a long
    // transaction elsewhere (a report, an idle client) holds the oldest snapshot.
    db.client
        .execute(
            "INSERT INTO sortie.steps (campaign_id, action)
             SELECT $1, 'history ' || g FROM generate_series(1, 20000) g",
            &[&c],
        )
        .await
        .unwrap();
    db.client.batch_execute("ANALYZE").await.unwrap();
    let old_reader = db.connect().await;
    old_reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM sortie.steps")
        .await
        .unwrap();
    db.client
        .execute(
            "UPDATE sortie.steps SET status = 'done', completed_at = now() WHERE campaign_id = $1",
            &[&c],
        )
        .await
        .unwrap();
    add(
        &db,
        c,
        json!((0..100)
            .map(|i| json!({"action": format!("s{i}")}))
            .collect::<Vec<_>>()),
    )
    .await;
    // The first claim raises the floor past the history; the second must not walk any of it.
    db.ok("sortie.claim_next(owner => 'w', campaign_id => $1)", &[&c])
        .await;
    let (claimed, plans) = plans_of(
        &db,
        "SELECT sortie.claim_next(owner => 'w', campaign_id => $1)",
        &[&c],
        true,
    )
    .await;
    let step = claimed["step_id"].as_i64().expect("a claim");
    let second = count(
        &db,
        &format!("SELECT id FROM sortie.steps WHERE campaign_id = '{c}' AND action = 's1'"),
    )
    .await;
    assert_eq!(step, second, "claims go in id order");
    let reads: Vec<&String> = plans
        .iter()
        .filter(|p| {
            p.contains("FROM steps")
                && p.contains("remaining_deps = 0")
                && p.contains("ORDER BY campaign_id, id")
        })
        .collect();
    assert_eq!(reads.len(), 2, "the floor read and the pick: {plans:#?}");
    for plan in reads {
        // 20,000 dead entries before the floor fill some 60 index pages and 20,000 heap
        // tuples; positioned at the floor, a read touches a few pages and tuples.
        assert!(buffers(plan) < 15, "{plan}");
        assert!(heap_fetches(plan) < 15, "{plan}");
    }
    // The contrast: from a floor of 0 (always a true floor) the same read walks the history.
    db.client
        .execute(
            "UPDATE sortie.campaigns SET ready_floor = 0 WHERE id = $1",
            &[&c],
        )
        .await
        .unwrap();
    let (_, plans) = plans_of(
        &db,
        "SELECT sortie.claim_next(owner => 'w', campaign_id => $1)",
        &[&c],
        true,
    )
    .await;
    let floor_read = plans
        .iter()
        .find(|p| {
            p.contains("remaining_deps = 0")
                && !p.contains("SKIP LOCKED")
                && p.contains("ORDER BY campaign_id, id")
        })
        .unwrap_or_else(|| panic!("no floor read among {plans:#?}"));
    assert!(heap_fetches(floor_read) > 10_000, "{floor_read}");
    old_reader.batch_execute("COMMIT").await.unwrap();
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}
