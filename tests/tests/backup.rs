//! Backups: pg_dump of a Sortie database carries its campaigns, and pg_restore into an empty
//! database brings them back, running, with the id sequences where they were.

use std::process::Command;

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::{call_on, database_without_extension, TestDb};

fn pg_tool(name: &str) -> String {
    format!("/usr/lib/postgresql/15/bin/{name}")
}

#[tokio::test]
async fn a_dump_restores_every_campaign_and_it_runs_on() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "before the backup"}, {"action": "after the restore", "key": "later"}]),
    )
    .await;
    let first = claim(&db, c).await.unwrap();
    complete(&db, &first, "done before").await;
    db.ok("sortie.add_note($1, 'a finding to keep')", &[&c])
        .await;

    let file = std::env::temp_dir().join(format!("sortie-backup-{}.dump", std::process::id()));
    let dumped = Command::new(pg_tool("pg_dump"))
        .args([
            "-Fc",
            "-f",
            file.to_str().unwrap(),
            "-d",
            &db.connection_string(),
        ])
        .output()
        .expect("pg_dump");
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );

    let target = database_without_extension().await;
    let restored = Command::new(pg_tool("pg_restore"))
        .args(["--exit-on-error", "-d", &target, file.to_str().unwrap()])
        .output()
        .expect("pg_restore");
    let _ = std::fs::remove_file(&file);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );

    let (client, connection) = tokio_postgres::connect(&target, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let count = |table: &'static str| {
        let client = &client;
        async move {
            client
                .query_one(&format!("SELECT count(*) FROM sortie.{table}"), &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count("campaigns").await, 1, "the campaign is in the dump");
    assert_eq!(count("steps").await, 2);
    assert_eq!(count("notes").await, 1);
    assert!(count("events").await > 0);
    // It runs on, and new rows take new ids (the sequences were restored too).
    let added = call_on(
        &client,
        "sortie.add_steps($1, '[{\"action\": \"new after restore\"}]')",
        &[&c],
    )
    .await
    .expect("add_steps on the restored database");
    let new_id = added["step_ids"][0].as_i64().unwrap();
    assert!(new_id > first.step_id + 1, "{added}");
    loop {
        let claimed = call_on(
            &client,
            "sortie.claim_next(owner => 'w', campaign_id => $1)",
            &[&c],
        )
        .await
        .unwrap();
        let Some(step) = claimed["step_id"].as_i64() else {
            break;
        };
        call_on(
            &client,
            "sortie.complete_step($1, $2::text::uuid, 'ok')",
            &[&step, &claimed["claim_token"].as_str().unwrap()],
        )
        .await
        .unwrap();
    }
    let status: String = client
        .query_one("SELECT status FROM sortie.campaigns WHERE id = $1", &[&c])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "done");
    let problems = client
        .query("SELECT * FROM sortie.check_invariants()", &[])
        .await
        .unwrap();
    assert!(problems.is_empty());
    db.finish().await;
}
