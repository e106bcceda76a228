//! The harness itself: a real cluster, the real extension, a database per test.

use sortie_tests::fixtures::*;
use sortie_tests::TestDb;

#[tokio::test]
async fn extension_creates_every_table_in_its_schema() {
    let db = TestDb::new().await;
    let rows = db
        .client
        .query("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'sortie' ORDER BY 1", &[])
        .await
        .unwrap();
    let tables: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for expected in [
        "campaigns",
        "cursors",
        "events",
        "notes",
        "notifications",
        "resource_leases",
        "step_dependencies",
        "steps",
        "workflows",
    ] {
        assert!(
            tables.contains(&expected.to_string()),
            "missing table {expected}: {tables:?}"
        );
    }
    db.finish().await;
}

#[tokio::test]
async fn check_constraints_refuse_bogus_states() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    for sql in [
        "INSERT INTO sortie.steps (campaign_id, action, status) VALUES ($1, 'a', 'bogus')",
        "INSERT INTO sortie.steps (campaign_id, action, step_type) VALUES ($1, 'a', 'loop')",
        "INSERT INTO sortie.steps (campaign_id, action, failure_policy) VALUES ($1, 'a', 'explode')",
        "UPDATE sortie.campaigns SET priority = 'whenever' WHERE id = $1",
        "UPDATE sortie.campaigns SET status = 'sleeping' WHERE id = $1",
    ] {
        let err = db.client.execute(sql, &[&c]).await.expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("23514"), "{sql}: {err}");
    }
    db.finish().await;
}

#[tokio::test]
async fn extension_installs_into_a_named_schema_and_drops_cleanly() {
    let db = TestDb::new().await;
    db.client
        .batch_execute(
            "DROP EXTENSION sortie; CREATE SCHEMA other; CREATE EXTENSION sortie SCHEMA other",
        )
        .await
        .unwrap();
    let v: serde_json::Value = db
        .client
        .query_one(
            "SELECT other.create_campaign(goal => 'in other schema')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v["status"], "active");
    let leftovers: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'sortie'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leftovers, 0,
        "DROP EXTENSION removes the sortie schema it created"
    );
    db.client
        .batch_execute("DROP EXTENSION sortie; CREATE EXTENSION sortie")
        .await
        .unwrap();
    db.finish().await;
}

#[tokio::test]
async fn callers_search_path_does_not_change_what_rules_read() {
    let db = TestDb::new().await;
    db.client
        .batch_execute("CREATE TABLE public.steps (id int); SET search_path = public")
        .await
        .unwrap();
    let c = campaign(&db, "none").await;
    add(&db, c, serde_json::json!([{"action": "a"}])).await;
    assert!(claim(&db, c).await.is_some());
    db.client.batch_execute("RESET search_path").await.unwrap();
    db.finish().await;
}
