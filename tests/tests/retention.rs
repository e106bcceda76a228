//! Retention (SPEC §18): prune() removes campaigns that ended before a cut-off with everything
//! they own, and the runner does it once a day with SORTIE_RETENTION_DAYS.

use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::{runner_process, TestDb};
use uuid::Uuid;

/// A campaign of two steps (one depending on the other) run to its end, with a note; moved
/// `ended_days_ago` into the past.
async fn ended_campaign(db: &TestDb, ended_days_ago: i32) -> Uuid {
    let c = campaign(db, "none").await;
    add(
        db,
        c,
        json!([{"action": "a", "key": "a"}, {"action": "b", "depends_on": ["a"]}]),
    )
    .await;
    db.ok(
        "sortie.add_note(campaign_id => $1, content => 'a finding worth keeping')",
        &[&c],
    )
    .await;
    run_all(db, c).await;
    assert_eq!(campaign_status(db, c).await, "done");
    db.client
        .execute(
            "UPDATE sortie.campaigns SET completed_at = now() - make_interval(days => $2) WHERE id = $1",
            &[&c, &ended_days_ago],
        )
        .await
        .unwrap();
    c
}

async fn rows(db: &TestDb, c: Uuid) -> [i64; 4] {
    let mut out = [0; 4];
    for (i, table) in ["campaigns", "steps", "events", "notes"].iter().enumerate() {
        let column = if *table == "campaigns" {
            "id"
        } else {
            "campaign_id"
        };
        out[i] = count(
            db,
            &format!("SELECT count(*) FROM sortie.{table} WHERE {column} = '{c}'"),
        )
        .await;
    }
    out
}

#[tokio::test]
async fn prune_removes_campaigns_that_ended_before_the_cut_off_with_all_they_own() {
    let db = TestDb::new().await;
    let old = ended_campaign(&db, 40).await;
    let recent = ended_campaign(&db, 5).await;
    // An active campaign created long ago is not ended: it stays whatever its age.
    let active = campaign(&db, "none").await;
    add(&db, active, json!([{"action": "still to do"}])).await;
    db.client
        .execute(
            "UPDATE sortie.campaigns SET created_at = now() - interval '400 days' WHERE id = $1",
            &[&active],
        )
        .await
        .unwrap();
    let before = rows(&db, old).await;
    assert_eq!(before[0], 1);
    assert!(before[2] > 0 && before[3] == 1, "{before:?}");
    let recent_before = rows(&db, recent).await;

    let pruned = db
        .ok("sortie.prune(older_than => interval '30 days')", &[])
        .await;
    assert_eq!(pruned["campaigns"], 1, "{pruned}");
    assert_eq!(pruned["steps"], before[1], "{pruned}");
    assert_eq!(pruned["events"], before[2], "{pruned}");
    assert_eq!(pruned["notes"], 1, "{pruned}");
    assert_eq!(pruned["more"], false, "{pruned}");
    assert_eq!(rows(&db, old).await, [0, 0, 0, 0]);
    assert_eq!(
        count(
            &db,
            &format!("SELECT count(*) FROM sortie.step_dependencies WHERE campaign_id = '{old}'")
        )
        .await,
        0
    );
    assert_eq!(rows(&db, recent).await, recent_before);
    assert_eq!(rows(&db, active).await[0], 1);
    // Nothing is left to prune at that cut-off; a shorter one takes the recent campaign.
    assert_eq!(
        db.ok("sortie.prune(older_than => interval '30 days')", &[])
            .await["campaigns"],
        0
    );
    assert_eq!(
        db.ok("sortie.prune(older_than => interval '1 day')", &[])
            .await["campaigns"],
        1
    );
    db.finish().await;
}

#[tokio::test]
async fn prune_takes_the_oldest_first_up_to_its_limit_and_says_when_more_remain() {
    let db = TestDb::new().await;
    let older = ended_campaign(&db, 50).await;
    let old = ended_campaign(&db, 40).await;
    let first = db
        .ok(
            "sortie.prune(older_than => interval '30 days', \"limit\" => 1)",
            &[],
        )
        .await;
    assert_eq!(first["campaigns"], 1);
    assert_eq!(first["more"], true);
    assert_eq!(rows(&db, older).await[0], 0, "the oldest end goes first");
    assert_eq!(rows(&db, old).await[0], 1);
    let second = db
        .ok(
            "sortie.prune(older_than => interval '30 days', \"limit\" => 1)",
            &[],
        )
        .await;
    assert_eq!(
        (second["campaigns"].clone(), second["more"].clone()),
        (json!(1), json!(false))
    );
    db.finish().await;
}

#[tokio::test]
async fn prune_refuses_a_negative_cut_off_or_a_limit_out_of_range() {
    let db = TestDb::new().await;
    for call in [
        "sortie.prune(older_than => interval '-1 day')",
        "sortie.prune(older_than => NULL)",
        "sortie.prune(\"limit\" => 0)",
        "sortie.prune(\"limit\" => 10001)",
    ] {
        let e = db.call(call, &[]).await.unwrap_err();
        assert_eq!(e.code, "invalid_argument", "{call}: {e}");
    }
    db.finish().await;
}

#[tokio::test]
async fn the_runner_prunes_past_sortie_retention_days_and_keeps_everything_at_zero() {
    let db = TestDb::new().await;
    let old = ended_campaign(&db, 10).await;
    let run_once = |days: &str| {
        let mut child = runner_process(
            &db,
            &["--once"],
            &[("SORTIE_RETENTION_DAYS", days.to_string())],
        );
        async move {
            let exit = tokio::task::spawn_blocking(move || child.wait())
                .await
                .unwrap()
                .unwrap();
            assert!(exit.success());
        }
    };
    run_once("0").await;
    assert_eq!(rows(&db, old).await[0], 1, "0 keeps everything");
    run_once("30").await;
    assert_eq!(rows(&db, old).await[0], 1, "ended 10 days ago, kept for 30");
    run_once("7").await;
    assert_eq!(rows(&db, old).await, [0, 0, 0, 0]);
    db.finish().await;
}
