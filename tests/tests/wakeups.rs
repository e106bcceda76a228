//! Events and NOTIFY (SPEC §2 events, §10): every state change is logged; NOTIFY on
//! `sortie_events` is a hint that wakes listeners, sent by a connection at most once per
//! `wake_interval()` because PostgreSQL serialises every notifying commit.

use std::time::Duration;

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

/// A connection LISTENing on `sortie_events`; yields each notification's payload.
async fn start_listening(db: &TestDb) -> mpsc::UnboundedReceiver<Value> {
    let (client, mut connection) = tokio_postgres::connect(&db.connection_string(), NoTls)
        .await
        .expect("listener connection");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        let pump = async {
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send(serde_json::from_str::<Value>(n.payload()).expect("json"));
                }
            }
        };
        let listen = async {
            client.batch_execute("LISTEN sortie_events").await.unwrap();
            let _ = ready_tx.send(());
            // Keep the client alive for as long as the pump runs.
            std::future::pending::<()>().await;
        };
        tokio::select! { _ = pump => {}, _ = listen => {} }
    });
    ready_rx.await.expect("LISTEN issued");
    rx
}

/// Everything that arrives within `wait`.
async fn received(rx: &mut mpsc::UnboundedReceiver<Value>, wait: Duration) -> Vec<Value> {
    let mut all = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(v)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        all.push(v);
    }
    all
}

#[tokio::test]
async fn a_quiet_connection_wakes_listeners_with_its_first_change() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let mut rx = start_listening(&db).await;
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
    let mut rx = start_listening(&db).await;
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
