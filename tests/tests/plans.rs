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
