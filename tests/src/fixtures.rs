//! Shared fixtures: small verbs over the engine's SQL API, so tests read as the rules they prove.

use serde_json::Value;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::database::{call_on, TestDb};

pub async fn campaign(db: &TestDb, planner: &str) -> Uuid {
    let c = db
        .ok(
            "sortie.create_campaign(goal => 'test goal', planner => $1)",
            &[&planner],
        )
        .await;
    Uuid::parse_str(c["id"].as_str().unwrap()).unwrap()
}

pub async fn add(db: &TestDb, campaign: Uuid, steps: Value) -> Value {
    db.ok("sortie.add_steps($1, $2)", &[&campaign, &steps])
        .await
}

/// Ids of the top-level steps added, in order.
pub async fn add_ids(db: &TestDb, campaign: Uuid, steps: Value) -> Vec<i64> {
    ids(&add(db, campaign, steps).await["step_ids"])
}

pub fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

pub struct Claim {
    pub step_id: i64,
    pub token: Uuid,
    pub action: String,
}

pub async fn claim(db: &TestDb, campaign: Uuid) -> Option<Claim> {
    claim_on(&db.client, campaign).await
}

pub async fn claim_on(client: &Client, campaign: Uuid) -> Option<Claim> {
    let v = call_on(
        client,
        "sortie.claim_next(owner => 'test', campaign_id => $1)",
        &[&campaign],
    )
    .await
    .expect("claim_next");
    parse_claim(&v)
}

pub fn parse_claim(v: &Value) -> Option<Claim> {
    v["step_id"].as_i64().map(|step_id| Claim {
        step_id,
        token: Uuid::parse_str(v["claim_token"].as_str().unwrap()).unwrap(),
        action: v["action"].as_str().unwrap_or_default().to_string(),
    })
}

pub async fn complete(db: &TestDb, claim: &Claim, output: &str) -> Value {
    db.ok(
        "sortie.complete_step($1, $2, $3)",
        &[&claim.step_id, &claim.token, &output],
    )
    .await
}

pub async fn fail(db: &TestDb, claim: &Claim, error: &str) -> Value {
    db.ok(
        "sortie.fail_step($1, $2, $3)",
        &[&claim.step_id, &claim.token, &error],
    )
    .await
}

/// Claims and completes every ready step until none is left; returns the actions in order.
pub async fn run_all(db: &TestDb, campaign: Uuid) -> Vec<String> {
    let mut done = Vec::new();
    while let Some(c) = claim(db, campaign).await {
        complete(db, &c, &format!("out:{}", c.action)).await;
        done.push(c.action);
    }
    done
}

pub async fn status(db: &TestDb, step: i64) -> String {
    db.client
        .query_one("SELECT status FROM sortie.steps WHERE id = $1", &[&step])
        .await
        .unwrap()
        .get(0)
}

pub async fn step_field(db: &TestDb, step: i64, field: &str) -> Value {
    db.client
        .query_one(
            &format!("SELECT to_jsonb({field}) FROM sortie.steps WHERE id = $1"),
            &[&step],
        )
        .await
        .unwrap()
        .get::<_, Option<Value>>(0)
        .unwrap_or(Value::Null)
}

pub async fn campaign_status(db: &TestDb, campaign: Uuid) -> String {
    db.client
        .query_one(
            "SELECT status FROM sortie.campaigns WHERE id = $1",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn step_by_action(db: &TestDb, campaign: Uuid, action: &str) -> i64 {
    db.client
        .query_one(
            "SELECT id FROM sortie.steps WHERE campaign_id = $1 AND action = $2 ORDER BY id DESC LIMIT 1",
            &[&campaign, &action],
        )
        .await
        .unwrap()
        .get(0)
}

/// Moves the engine's clock (`sortie.fake_now`) for this connection.
pub async fn set_clock(client: &Client, offset_seconds: i64) {
    client
        .execute(
            "SELECT set_config('sortie.fake_now', (now() + make_interval(secs => $1))::text, false)",
            &[&(offset_seconds as f64)],
        )
        .await
        .unwrap();
}

pub async fn count(db: &TestDb, sql: &str) -> i64 {
    db.client.query_one(sql, &[]).await.unwrap().get(0)
}
