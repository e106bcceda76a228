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
        // The rules that tie columns of a row together.
        "UPDATE sortie.campaigns SET status = 'done' WHERE id = $1",
        "UPDATE sortie.campaigns SET completed_at = now() WHERE id = $1",
        "INSERT INTO sortie.steps (campaign_id, action, status) VALUES ($1, 'a', 'running')",
        "INSERT INTO sortie.steps (campaign_id, action, claim_token) VALUES ($1, 'a', gen_random_uuid())",
        "INSERT INTO sortie.steps (campaign_id, action, status, completed_at) VALUES ($1, 'a', 'skipped', now())",
        "INSERT INTO sortie.steps (campaign_id, action, status) VALUES ($1, 'a', 'done')",
        "INSERT INTO sortie.steps (campaign_id, action, members) VALUES ($1, 'a', 2)",
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

/// The embedded default's cluster: two processes (here, threads) starting it at once create
/// one cluster, not a corrupted one; a second start finds it running.
#[test]
fn concurrent_starts_of_the_embedded_cluster_make_one_cluster() {
    use sortie_mcp::embedded::{find_bin_dir, Cluster};
    let root = std::path::PathBuf::from("/tmp")
        .join(format!("sortie-embedded-race-{}", std::process::id()));
    let cluster = Cluster::new(root.clone(), find_bin_dir().unwrap());
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let c = cluster.clone();
            std::thread::spawn(move || c.ensure_running())
        })
        .collect();
    for s in starts {
        s.join().unwrap().expect("both starts succeed");
    }
    assert!(root.join("pgdata/PG_VERSION").is_file());
    cluster
        .ensure_running()
        .expect("a third start finds it running");
    let pid_file = std::fs::read_to_string(root.join("pgdata/postmaster.pid")).unwrap();
    assert!(
        pid_file.contains(&root.join("run").display().to_string()),
        "it listens on its own socket directory"
    );
    cluster.stop("immediate").unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}
