//! Batches (SPEC §18): claim_next(max_steps => n) takes up to n claims in one transaction, and
//! complete_steps completes several claims in one, applying the good items and reporting the
//! refused ones.

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;
use uuid::Uuid;

fn steps(n: usize) -> Value {
    json!((0..n)
        .map(|i| json!({"action": format!("s{i}")}))
        .collect::<Vec<_>>())
}

fn claims(v: &Value) -> Vec<Claim> {
    v.as_array()
        .unwrap_or_else(|| panic!("a batch answers an array: {v}"))
        .iter()
        .map(|c| parse_claim(c).unwrap_or_else(|| panic!("a claim: {c}")))
        .collect()
}

#[tokio::test]
async fn a_batch_claims_up_to_max_steps_in_id_order_then_an_empty_array() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    let ids = add_ids(&db, c, steps(5)).await;
    let batch = |n: i32| {
        let db = &db;
        async move {
            db.ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1, max_steps => $2)",
                &[&c, &n],
            )
            .await
        }
    };
    let first = claims(&batch(3).await);
    assert_eq!(
        first.iter().map(|c| c.step_id).collect::<Vec<_>>(),
        ids[..3]
    );
    let rest = claims(&batch(10).await);
    assert_eq!(rest.iter().map(|c| c.step_id).collect::<Vec<_>>(), ids[3..]);
    assert_eq!(batch(10).await, json!([]));
    // Without max_steps the answer keeps its single-claim shape.
    assert_eq!(
        db.ok("sortie.claim_next(owner => 'w', campaign_id => $1)", &[&c])
            .await,
        json!({"step_id": null})
    );
    for claim in first.iter().chain(&rest) {
        assert_eq!(status(&db, claim.step_id).await, "running");
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT running_steps::bigint FROM sortie.campaigns WHERE id = '{c}'")
        )
        .await,
        5
    );
    db.finish().await;
}

#[tokio::test]
async fn a_runners_batch_takes_only_the_free_runner_slots() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, steps(10)).await;
    let dispatch = |n: i32| {
        let db = &db;
        async move {
            db.ok(
                "sortie.claim_next(owner => 'runner', max_dispatched => 4, max_steps => $1)",
                &[&n],
            )
            .await
        }
    };
    assert_eq!(claims(&dispatch(1).await).len(), 1);
    // One slot of four in use: a batch of ten gets three.
    assert_eq!(claims(&dispatch(10).await).len(), 3);
    assert_eq!(dispatch(10).await, json!([]));
    // The single-step shape still says why.
    assert_eq!(
        db.ok(
            "sortie.claim_next(owner => 'runner', max_dispatched => 4)",
            &[]
        )
        .await["reason"],
        "capacity"
    );
    // Pull-mode batches do not count against the runner slots.
    assert_eq!(
        claims(
            &db.ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1, max_steps => 10)",
                &[&c]
            )
            .await
        )
        .len(),
        6
    );
    db.finish().await;
}

#[tokio::test]
async fn max_steps_outside_one_to_a_thousand_is_refused() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    add(&db, c, steps(1)).await;
    for n in [0, -1, 1001] {
        let e = db
            .call(
                "sortie.claim_next(owner => 'w', campaign_id => $1, max_steps => $2)",
                &[&c, &n],
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_argument", "{e}");
    }
    assert_eq!(
        count(
            &db,
            &format!("SELECT running_steps::bigint FROM sortie.campaigns WHERE id = '{c}'")
        )
        .await,
        0
    );
    db.finish().await;
}

#[tokio::test]
async fn complete_steps_applies_the_good_items_and_reports_each_refused_one() {
    let db = TestDb::new().await;
    let c = campaign(&db, "llm").await;
    // b depends on a: completing a in the batch makes b ready.
    let ids = add_ids(
        &db,
        c,
        json!([
            {"action": "a", "key": "a"},
            {"action": "x"},
            {"action": "y"},
            {"action": "b", "depends_on": ["a"]}
        ]),
    )
    .await;
    let taken = claims(
        &db.ok(
            "sortie.claim_next(owner => 'w', campaign_id => $1, max_steps => 3)",
            &[&c],
        )
        .await,
    );
    assert_eq!(taken.len(), 3);
    let (a, x, y) = (&taken[0], &taken[1], &taken[2]);
    let items = json!([
        {"step_id": y.step_id, "claim_token": y.token, "summary": "y done", "tokens_used": 7},
        {"step_id": x.step_id, "claim_token": Uuid::new_v4(), "summary": "not mine"},
        {"step_id": a.step_id, "claim_token": a.token, "summary": "a done"},
        {"claim_token": a.token},
        {"step_id": 999_999_999, "claim_token": Uuid::new_v4()}
    ]);
    let answer = db.ok("sortie.complete_steps($1)", &[&items]).await;
    let completed: Vec<i64> = answer["completed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "done", "{r}");
            r["step_id"].as_i64().unwrap()
        })
        .collect();
    // Applied in step order, whatever the order of the items.
    assert_eq!(completed, vec![a.step_id, y.step_id]);
    let refused = answer["refused"].as_array().unwrap();
    let codes: Vec<(Value, &str)> = refused
        .iter()
        .map(|r| (r["step_id"].clone(), r["code"].as_str().unwrap()))
        .collect();
    assert!(
        codes.contains(&(json!(x.step_id), "stale_claim")),
        "{answer}"
    );
    assert!(
        codes.contains(&(Value::Null, "invalid_argument")),
        "{answer}"
    );
    assert!(
        codes.contains(&(json!(999_999_999), "not_found")),
        "{answer}"
    );
    assert_eq!(refused.len(), 3, "{answer}");
    assert_eq!(status(&db, x.step_id).await, "running");
    assert_eq!(step_field(&db, y.step_id, "output").await, "y done");
    assert_eq!(step_field(&db, y.step_id, "tokens_used").await, 7);
    assert_eq!(status(&db, ids[3]).await, "pending");
    let next = claim(&db, c).await.expect("b is ready once a is done");
    assert_eq!(next.step_id, ids[3]);
    // A repeated batch is answered as complete_step answers a repeated completion.
    let again = db
        .ok(
            "sortie.complete_steps($1)",
            &[&json!([{"step_id": y.step_id, "claim_token": y.token, "summary": "y done", "tokens_used": 7}])],
        )
        .await;
    assert_eq!(again["completed"][0]["status"], "done", "{again}");
    assert_eq!(step_field(&db, y.step_id, "tokens_used").await, 7);
    db.finish().await;
}

#[tokio::test]
async fn complete_steps_refuses_a_batch_that_is_not_an_array_of_objects() {
    let db = TestDb::new().await;
    for items in [
        json!({}),
        json!([]),
        json!([1, 2]),
        Value::Array(vec![json!({}); 1001]),
    ] {
        let e = db
            .call("sortie.complete_steps($1)", &[&items])
            .await
            .unwrap_err();
        assert_eq!(e.code, "invalid_argument", "{e}");
    }
    db.finish().await;
}
