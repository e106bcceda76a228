//! Events and NOTIFY (SPEC §2 events, §10): every state change is logged; NOTIFY on
//! `sortie_events` is a hint that wakes listeners, sent by a connection at most once per
//! `wake_interval()` because PostgreSQL serialises every notifying commit.

use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client};

/// A connection LISTENing on `sortie_events`; keep the client for as long as you listen.
async fn start_listening(db: &TestDb) -> (Client, mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, messages) = db.connect_with_messages().await;
    client.batch_execute("LISTEN sortie_events").await.unwrap();
    (client, messages)
}

/// The payloads of the notifications that arrive within `wait`.
async fn received(rx: &mut mpsc::UnboundedReceiver<AsyncMessage>, wait: Duration) -> Vec<Value> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        if let AsyncMessage::Notification(n) = message {
            all.push(serde_json::from_str(n.payload()).expect("json payload"));
        }
    }
    all
}

#[tokio::test]
async fn a_quiet_connection_wakes_listeners_with_its_first_change() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let (_listener, mut rx) = start_listening(&db).await;
    tokio::time::sleep(Duration::from_millis(150)).await; // past create_campaign's wake-up
    add(&db, c, json!([{"action": "a"}])).await;
    let got = received(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["campaign_id"], json!(c.to_string()));
    assert_eq!(got[0]["kind"], json!("steps.added"));
    assert!(got[0]["id"].as_i64().is_some());
    let logged = count(
        &db,
        &format!("SELECT count(*) FROM sortie.events WHERE campaign_id = '{c}'"),
    )
    .await;
    assert!(
        logged >= 2,
        "campaign.created and the added step are logged"
    );
    db.finish().await;
}

#[tokio::test]
async fn a_busy_connection_wakes_listeners_once_per_interval_and_logs_every_change() {
    let db = TestDb::new().await;
    let x = campaign(&db, "none").await;
    let y = campaign(&db, "none").await;
    let other = db.connect().await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_listener, mut rx) = start_listening(&db).await;
    let before = count(&db, "SELECT count(*) FROM sortie.events").await;

    // Several changes in one transaction (so well within one interval), of two campaigns.
    db.client.batch_execute("BEGIN").await.unwrap();
    for i in 0..3 {
        add(&db, x, json!([{"action": format!("x{i}")}])).await;
    }
    add(&db, y, json!([{"action": "y"}])).await;
    db.client.batch_execute("COMMIT").await.unwrap();
    // Another connection is not held back by this one.
    other
        .execute(
            "SELECT sortie.add_steps($1, '[{\"action\": \"y2\"}]')",
            &[&y],
        )
        .await
        .unwrap();
    let got = received(&mut rx, Duration::from_millis(500)).await;
    let campaigns: Vec<&str> = got
        .iter()
        .map(|n| n["campaign_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        campaigns,
        vec![x.to_string(), y.to_string()],
        "one wake-up per connection"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM sortie.events").await - before,
        5,
        "every change is still logged"
    );

    // After the interval, the first connection wakes listeners again.
    tokio::time::sleep(Duration::from_millis(150)).await;
    add(&db, x, json!([{"action": "x again"}])).await;
    let got = received(&mut rx, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["campaign_id"], json!(x.to_string()));
    db.ok("sortie.cancel_campaign($1)", &[&x]).await;
    db.ok("sortie.cancel_campaign($1)", &[&y]).await;
    db.finish().await;
}
