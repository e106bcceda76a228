//! The Citus cluster of the scale-out tests (issue 19): a coordinator and two workers.

use sortie_tests::citus::CitusDb;

#[tokio::test]
async fn coordinator_sees_both_workers_active() {
    let db = CitusDb::new().await;
    let active: i64 = db
        .client
        .query_one("SELECT count(*) FROM citus_get_active_worker_nodes()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 2);
    // Every worker answers on its own port with citus in the test's database.
    for index in 0..2 {
        let version: String = db
            .connect_worker(index)
            .await
            .query_one("SELECT citus_version()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(version.starts_with("Citus 13.2.2 "), "{version}");
    }
}
