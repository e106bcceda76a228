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

// ---------------------------------------------------------------------------------------------
// Batch against one-at-a-time (SPEC §18: a batch gives exactly what the equivalent sequence of
// single calls gives). Each test builds the same campaigns in two fresh databases, so step ids
// are equal in both: the batch runs in one, the single calls in the other, and the answers and
// the state they leave (steps, counters, leases, finished claims, events) are compared.
// ---------------------------------------------------------------------------------------------

use std::collections::HashMap;

/// The same campaigns, built step for step in two databases: `b` takes the batches, `s` the
/// equivalent single calls.
struct Pair {
    b: TestDb,
    s: TestDb,
    cb: Vec<Uuid>,
    cs: Vec<Uuid>,
}

async fn build(db: &TestDb, campaigns: &[(&str, Value)]) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for (args, steps) in campaigns {
        let c = db
            .ok(
                &format!("sortie.create_campaign(goal => 'g', planner => 'none'{args})"),
                &[],
            )
            .await;
        let id = Uuid::parse_str(c["id"].as_str().unwrap()).unwrap();
        if steps.as_array().is_some_and(|a| !a.is_empty()) {
            add(db, id, steps.clone()).await;
        }
        ids.push(id);
    }
    ids
}

impl Pair {
    /// `campaigns`: (extra create_campaign arguments such as ", max_parallel => 2", steps).
    async fn new(campaigns: &[(&str, Value)]) -> Pair {
        let b = TestDb::new().await;
        let s = TestDb::new().await;
        let cb = build(&b, campaigns).await;
        let cs = build(&s, campaigns).await;
        Pair { b, s, cb, cs }
    }

    /// Runs `sql` on both databases, `{c0}`, `{c1}`, ... naming each one's campaigns.
    async fn both(&self, sql: &str) {
        for (db, cs) in [(&self.b, &self.cb), (&self.s, &self.cs)] {
            let mut text = sql.to_string();
            for (i, c) in cs.iter().enumerate() {
                text = text.replace(&format!("{{c{i}}}"), &c.to_string());
            }
            db.client
                .batch_execute(&text)
                .await
                .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        }
    }

    async fn clock(&self, offset_seconds: i64) {
        set_clock(&self.b.client, offset_seconds).await;
        set_clock(&self.s.client, offset_seconds).await;
    }

    /// Single claims in both databases (test setup, not compared).
    async fn claim_both(&self, campaign: usize, n: usize) {
        claim_singles(&self.b, self.cb[campaign], n, None).await;
        claim_singles(&self.s, self.cs[campaign], n, None).await;
    }

    /// claim_next(max_steps => n) in `b` against n single claim_next calls in `s`; the claims
    /// must be the same. Returns the batch's claims.
    async fn compare_claims(&self, campaign: usize, n: i32, agent: Option<&str>) -> Value {
        let batch = self
            .b
            .ok(
                "sortie.claim_next(owner => 'w', agent => $3, campaign_id => $1, max_steps => $2)",
                &[&self.cb[campaign], &n, &agent],
            )
            .await;
        let singles = claim_singles(&self.s, self.cs[campaign], n as usize, agent).await;
        assert_eq!(
            normalise_claims(&batch),
            normalise_claims(&singles),
            "claim_next(max_steps => {n}) against {n} single claims"
        );
        batch
    }

    /// complete_steps(items) in `b` against complete_step on each item, in (campaign, step id,
    /// item position) order, in `s`. `items` builds the batch from a database's claim tokens by
    /// step id (taken before either call). Returns the batch's answer.
    async fn compare_completion(&self, items: impl Fn(&HashMap<i64, Uuid>) -> Value) -> Value {
        let (tb, ts) = (tokens(&self.b).await, tokens(&self.s).await);
        self.compare_completion_with(&items(&tb), &items(&ts)).await
    }

    async fn compare_completion_with(&self, items_b: &Value, items_s: &Value) -> Value {
        let order = item_order(&self.b, items_b).await;
        let batch = self.b.ok("sortie.complete_steps($1)", &[items_b]).await;
        let reference = one_at_a_time(&self.s, items_s, &order).await;
        assert_eq!(
            batch, reference,
            "complete_steps({items_b}) against complete_step item by item"
        );
        batch
    }

    /// Both databases must be in the same state; `ordered_events` also compares the order of
    /// the event log, otherwise its events as a multiset.
    async fn assert_same_state(&self, ordered_events: bool) {
        let (b, s) = (
            state(&self.b, ordered_events).await,
            state(&self.s, ordered_events).await,
        );
        for key in ["campaigns", "steps", "leases", "finished_claims", "events"] {
            assert_eq!(
                b[key], s[key],
                "{key}: batch (left) against one at a time (right)"
            );
        }
    }

    async fn finish(self) {
        self.b.finish().await;
        self.s.finish().await;
    }
}

async fn claim_singles(db: &TestDb, campaign: Uuid, n: usize, agent: Option<&str>) -> Value {
    let mut out = Vec::new();
    for _ in 0..n {
        let v = db
            .ok(
                "sortie.claim_next(owner => 'w', agent => $2, campaign_id => $1)",
                &[&campaign, &agent],
            )
            .await;
        if !v["step_id"].is_null() {
            out.push(v);
        }
    }
    Value::Array(out)
}

/// A claim without what differs between two equal claims: its token, lease end and campaign id.
fn normalise_claims(v: &Value) -> Value {
    Value::Array(
        v.as_array()
            .unwrap_or_else(|| panic!("an array of claims: {v}"))
            .iter()
            .map(|c| {
                let mut c = c.clone();
                let o = c.as_object_mut().unwrap();
                for k in ["claim_token", "lease_expires_at", "campaign_id"] {
                    assert!(o.remove(k).is_some(), "a claim has {k}: {v}");
                }
                c
            })
            .collect(),
    )
}

/// The claim token of every step that holds one, by step id.
async fn tokens(db: &TestDb) -> HashMap<i64, Uuid> {
    db.client
        .query(
            "SELECT id, claim_token FROM sortie.steps WHERE claim_token IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The documented order of a batch's items (campaign, step id, item position): 1-based
/// positions in the array.
async fn item_order(db: &TestDb, items: &Value) -> Vec<i64> {
    db.client
        .query(
            "SELECT e.ordinality
               FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY e
               LEFT JOIN sortie.steps s
                 ON s.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                     AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                THEN (e.value ->> 'step_id')::numeric::bigint END
              ORDER BY s.campaign_id, s.id, e.ordinality",
            &[items],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// What complete_steps' contract says a batch answers: complete_step on each item in `order`,
/// each in a transaction of its own, a refused item reported with the code complete_step raised.
async fn one_at_a_time(db: &TestDb, items: &Value, order: &[i64]) -> Value {
    let (mut completed, mut refused) = (Vec::new(), Vec::new());
    for &pos in order {
        let item = &items[(pos - 1) as usize];
        let step_id = item.get("step_id").cloned().unwrap_or(Value::Null);
        if !step_id.is_number() || !item["claim_token"].is_string() {
            refused.push(json!({"step_id": step_id, "code": "invalid_argument",
                "message": "step_id (a number) and claim_token (a string) are required"}));
            continue;
        }
        match db
            .call(
                "sortie.complete_step(($1::jsonb ->> 'step_id')::bigint, ($1::jsonb ->> 'claim_token')::uuid,
                                      coalesce($1::jsonb ->> 'summary', ''),
                                      coalesce(($1::jsonb ->> 'tokens_used')::bigint, 0))",
                &[item],
            )
            .await
        {
            Ok(answer) => completed.push(answer),
            Err(e) => {
                let (code, message) = match e.message.split_once(": ") {
                    Some((code, rest))
                        if !code.is_empty()
                            && code.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_') =>
                    {
                        (code.to_string(), rest.to_string())
                    }
                    _ => ("invalid_argument".to_string(), e.message.clone()),
                };
                refused.push(json!({"step_id": step_id, "code": code, "message": message}));
            }
        }
    }
    json!({"completed": completed, "refused": refused})
}

/// Everything a claim or completion changes, without ids that differ between databases
/// (campaigns are numbered in creation order) or times.
async fn state(db: &TestDb, ordered_events: bool) -> Value {
    let v: Value = db
        .client
        .query_one(
            "WITH c AS (SELECT id, row_number() OVER (ORDER BY created_at, id) AS n FROM sortie.campaigns)
             SELECT jsonb_build_object(
               'campaigns', (SELECT jsonb_agg(jsonb_build_array(c.n, x.status, x.status_reason, x.open_steps,
                                    x.running_steps, x.ready_steps, x.tokens_used) ORDER BY c.n)
                               FROM sortie.campaigns x JOIN c USING (id)),
               'steps', (SELECT jsonb_agg(jsonb_build_array(s.id, c.n, s.parent_id, s.action, s.status, s.output,
                                s.tokens_used, s.remaining_deps, s.attempts, s.claim_owner,
                                s.claim_token IS NOT NULL, s.lease_expires_at IS NOT NULL, s.claimed_at IS NOT NULL,
                                s.started_at IS NOT NULL, s.completed_at IS NOT NULL, s.dispatched,
                                s.verification_requested_at IS NOT NULL, s.skip_cause, s.error,
                                s.members_resolved) ORDER BY s.id)
                           FROM sortie.steps s JOIN c ON c.id = s.campaign_id),
               'leases', (SELECT coalesce(jsonb_agg(jsonb_build_array(l.step_id, l.key, l.mode) ORDER BY l.step_id, l.key), '[]')
                            FROM sortie.resource_leases l),
               'finished_claims', (SELECT coalesce(jsonb_agg(jsonb_build_array(f.step_id, f.call, f.result - 'not_before', f.arguments_hash)
                                          ORDER BY f.step_id), '[]')
                                     FROM sortie.finished_claims f),
               'events', (SELECT jsonb_agg(jsonb_build_array(c.n, e.step_id, e.kind,
                                 (SELECT coalesce(jsonb_object_agg(k, v), '{}') FROM jsonb_each(e.payload) p(k, v)
                                   WHERE k NOT LIKE '%\\_at' AND k NOT IN ('not_before', 'until')))
                                 ORDER BY e.id)
                            FROM sortie.events e JOIN c ON c.id = e.campaign_id))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut v = v;
    if !ordered_events {
        if let Some(events) = v["events"].as_array_mut() {
            events.sort_by_key(|e| e.to_string());
        }
    }
    v
}

fn item(step: i64, token: &Uuid, summary: &str) -> Value {
    json!({"step_id": step, "claim_token": token, "summary": summary})
}

// --- claims -----------------------------------------------------------------------------------

#[tokio::test]
async fn a_claim_batch_mixing_plain_and_compound_members_claims_as_single_calls_do() {
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "a"},
            {"step_type": "parallel_group", "action": "g", "children": [
                {"action": "m1"}, {"action": "m2"}]},
            {"step_type": "sequence", "action": "q", "steps": [
                {"action": "q1"}, {"action": "q2"}]},
            {"step_type": "for_each", "action": "f", "items": [1, 2],
             "template": {"action": "f{item}"}},
            {"action": "b"}
        ]),
    )])
    .await;
    for n in [3, 10, 10] {
        p.compare_claims(0, n, None).await;
        p.assert_same_state(false).await;
    }
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_writes_its_events_in_the_order_single_claims_write_them() {
    // a (plain), g (parallel_group) with m1, m2, b (plain): single claims log
    // claimed a, started g, claimed m1, claimed m2, claimed b; the batch logs
    // started g, claimed m1, claimed m2, claimed a, claimed b.
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "a"},
            {"step_type": "parallel_group", "action": "g", "children": [
                {"action": "m1"}, {"action": "m2"}]},
            {"action": "b"}
        ]),
    )])
    .await;
    p.compare_claims(0, 4, None).await;
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_respects_max_parallel_smaller_than_max_steps() {
    let p = Pair::new(&[(", max_parallel => 3", steps(10))]).await;
    // One already running: two slots left.
    p.claim_both(0, 1).await;
    assert_eq!(
        p.compare_claims(0, 10, None)
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(p.compare_claims(0, 10, None).await, json!([]));
    p.assert_same_state(true).await;
    // A completion frees one slot.
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE id = (SELECT min(id) FROM sortie.steps WHERE status = 'running') ORDER BY id LOOP PERFORM sortie.complete_step(r.id, r.claim_token, 'x'); END LOOP; END $d$")
        .await;
    assert_eq!(
        p.compare_claims(0, 5, None).await.as_array().unwrap().len(),
        1
    );
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_with_an_agent_takes_its_own_and_unassigned_steps() {
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "x1", "agent": "x"},
            {"action": "y1", "agent": "y"},
            {"action": "any1"},
            {"action": "y2", "agent": "y"},
            {"action": "x2", "agent": "x"},
            {"step_type": "parallel_group", "action": "g", "children": [
                {"action": "gy", "agent": "y"}, {"action": "gx", "agent": "x"}]},
            {"action": "any2"}
        ]),
    )])
    .await;
    let got = p.compare_claims(0, 3, Some("x")).await;
    assert_eq!(got.as_array().unwrap().len(), 3);
    p.compare_claims(0, 10, Some("x")).await;
    p.compare_claims(0, 10, Some("x")).await;
    p.compare_claims(0, 10, Some("y")).await;
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_passes_over_steps_backing_off() {
    let p = Pair::new(&[("", steps(6))]).await;
    // Steps 2 and 4 fail once: pending again, backing off.
    p.claim_both(0, 6).await;
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE action IN ('s1', 's3') ORDER BY id LOOP PERFORM sortie.fail_step(r.id, r.claim_token, 'boom'); END LOOP; END $d$")
        .await;
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE action IN ('s0', 's5') ORDER BY id LOOP PERFORM sortie.complete_step(r.id, r.claim_token, 'x'); END LOOP; END $d$")
        .await;
    assert_eq!(p.compare_claims(0, 10, None).await, json!([]));
    p.assert_same_state(true).await;
    // Back-off over: both are claimable again.
    p.clock(7 * 24 * 3600).await;
    assert_eq!(
        p.compare_claims(0, 10, None)
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_respects_lock_keys_within_the_batch_and_across_campaigns() {
    let p = Pair::new(&[
        (
            "",
            json!([{"action": "holder", "requires_locks": ["db/orders"]}]),
        ),
        (
            "",
            json!([
                {"action": "p1"},
                {"action": "needs db", "requires_locks": ["db"]},
                {"action": "needs db/users", "requires_locks": ["db/users"]},
                {"action": "shared cache 1", "requires_locks": ["shared:cache"]},
                {"action": "shared cache 2", "requires_locks": ["shared:cache"]},
                {"action": "excl cache", "requires_locks": ["cache"]},
                {"action": "p2"},
                {"action": "users again", "requires_locks": ["db/users"]},
                {"step_type": "parallel_group", "action": "g", "children": [
                    {"action": "g cache", "requires_locks": ["cache/x"]},
                    {"action": "g plain"}]},
                {"action": "p3"}
            ]),
        ),
    ])
    .await;
    // Another campaign's running step holds db/orders.
    p.claim_both(0, 1).await;
    let got = p.compare_claims(1, 3, None).await;
    assert_eq!(got.as_array().unwrap().len(), 3);
    p.assert_same_state(false).await;
    p.compare_claims(1, 100, None).await;
    p.assert_same_state(false).await;
    // The holder and the db/users step finish: what they held becomes claimable.
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE action IN ('holder', 'needs db/users') ORDER BY id LOOP PERFORM sortie.complete_step(r.id, r.claim_token, 'x'); END LOOP; END $d$")
        .await;
    p.compare_claims(1, 100, None).await;
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_over_many_lock_busy_steps_looks_further_in_rounds() {
    let mut s: Vec<Value> = (0..20)
        .map(|i| json!({"action": format!("l{i}"), "requires_locks": ["one"]}))
        .collect();
    s.extend((0..5).map(|i| json!({"action": format!("p{i}")})));
    let p = Pair::new(&[("", Value::Array(s))]).await;
    for n in [3, 1, 2, 10] {
        p.compare_claims(0, n, None).await;
        p.assert_same_state(false).await;
    }
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_of_a_paused_or_spent_campaign_is_empty() {
    let p = Pair::new(&[("", steps(3)), (", token_budget => 10", steps(3))]).await;
    p.both("SELECT sortie.pause_campaign('{c0}')").await;
    assert_eq!(p.compare_claims(0, 5, None).await, json!([]));
    p.claim_both(1, 1).await;
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE status = 'running' ORDER BY id LOOP PERFORM sortie.complete_step(r.id, r.claim_token, 'x', 10); END LOOP; END $d$")
        .await;
    assert_eq!(p.compare_claims(1, 5, None).await, json!([]));
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_claim_batch_of_a_thousand_claims_as_a_thousand_single_calls() {
    let p = Pair::new(&[("", steps(1000))]).await;
    let got = p.compare_claims(0, 1000, None).await;
    assert_eq!(got.as_array().unwrap().len(), 1000);
    p.assert_same_state(true).await;
    p.finish().await;
}

// --- completions ------------------------------------------------------------------------------

impl Pair {
    /// claim_next(max_steps => n) in both databases (setup; compared by the claim tests).
    async fn claim_batch_both(&self, campaign: usize, n: i32) {
        for (db, c) in [(&self.b, self.cb[campaign]), (&self.s, self.cs[campaign])] {
            db.ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1, max_steps => $2)",
                &[&c, &n],
            )
            .await;
        }
    }
}

#[tokio::test]
async fn duplicate_items_for_one_step_are_answered_as_repeated_single_calls() {
    let p = Pair::new(&[("", steps(7))]).await;
    p.claim_both(0, 7).await;
    let answer = p
        .compare_completion(|t| {
            let stale = Uuid::nil();
            json!([
                // 5: right token first, then a stale one.
                item(5, &t[&5], "five"),
                // 1: the same claim twice, same summary: the second is a replay.
                item(1, &t[&1], "one"),
                // 2: the same claim twice, other summary: the second is refused.
                item(2, &t[&2], "two"),
                item(1, &t[&1], "one"),
                // 3: a stale token first, then the claim's own.
                item(3, &stale, "three?"),
                item(2, &t[&2], "two again"),
                item(3, &t[&3], "three"),
                item(5, &stale, "five?"),
                // 4: same summary, other tokens_used.
                {"step_id": 4, "claim_token": t[&4], "summary": "four", "tokens_used": 3},
                {"step_id": 4, "claim_token": t[&4], "summary": "four", "tokens_used": 4},
                // 6: three times the same.
                item(6, &t[&6], "six"), item(6, &t[&6], "six"), item(6, &t[&6], "six")
            ])
        })
        .await;
    assert_eq!(answer["completed"].as_array().unwrap().len(), 9, "{answer}");
    assert_eq!(answer["completed"][1]["replayed"], true, "{answer}");
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn malformed_items_are_refused_or_applied_as_complete_step_takes_them() {
    let p = Pair::new(&[("", steps(22))]).await;
    p.claim_both(0, 21).await;
    let answer = p
        .compare_completion(|t| {
            let tok = |i: i64| t[&i].to_string();
            json!([
                {"step_id": 1, "claim_token": tok(1).to_uppercase(), "summary": "upper"},
                {"step_id": 2, "claim_token": format!("{{{}}}", tok(2)), "summary": "braced"},
                {"step_id": 3, "claim_token": t[&3].simple().to_string(), "summary": "no hyphens"},
                {"step_id": 4, "claim_token": "not-a-uuid", "summary": "bad"},
                {"step_id": 5, "claim_token": 5, "summary": "number token"},
                {"step_id": 6, "claim_token": tok(6), "tokens_used": "7"},
                {"step_id": 7, "claim_token": tok(7), "tokens_used": -1},
                {"step_id": 8, "claim_token": tok(8), "tokens_used": 2.5},
                {"step_id": 9, "claim_token": tok(9), "tokens_used": 1e30},
                {"step_id": 10, "claim_token": tok(10), "tokens_used": 7.0},
                {"step_id": 11, "claim_token": tok(11)},
                {"step_id": 12, "claim_token": tok(12), "summary": null, "tokens_used": null},
                {"step_id": 13, "claim_token": tok(13), "summary": 42},
                {"step_id": 14, "claim_token": tok(14), "summary": {"a": [1, "x"]}},
                {"step_id": "15", "claim_token": tok(15)},
                {"step_id": 16.0, "claim_token": tok(16)},
                {"step_id": 17.5, "claim_token": tok(17)},
                {"step_id": 18, "claim_token": tok(18), "tokens_used": 1_000_000_000_000_000_000i64},
                {"step_id": 19, "claim_token": tok(19), "tokens_used": true},
                {"step_id": 20},
                {"step_id": 21, "claim_token": tok(21), "summary": "fine", "tokens_used": 5},
                {"step_id": 0, "claim_token": tok(21)},
                {"step_id": -1, "claim_token": tok(21)},
                {"step_id": 9_223_372_036_854_775_807i64, "claim_token": tok(21)},
                {"step_id": 1e25, "claim_token": tok(21)},
                {"claim_token": tok(21)},
                {"step_id": null, "claim_token": tok(21)}
            ])
        })
        .await;
    assert!(
        !answer["refused"].as_array().unwrap().is_empty(),
        "{answer}"
    );
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn the_first_of_two_items_for_a_step_wins_even_with_a_braced_token() {
    // Items [{1, "{token}", "first"}, {1, token, "second"}]: complete_step in item order
    // completes step 1 with "first" and refuses the second item (stale_claim); the batch
    // completes it with "second" and refuses the first.
    let p = Pair::new(&[("", steps(2))]).await;
    p.claim_both(0, 2).await;
    p.compare_completion(|t| {
        json!([
            {"step_id": 1, "claim_token": format!("{{{}}}", t[&1]), "summary": "first"},
            item(1, &t[&1], "second")
        ])
    })
    .await;
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn the_first_of_two_items_for_a_step_wins_even_with_tokens_used_as_a_string() {
    // Items [{1, token, "first", tokens_used: "5"}, {1, token, "second", tokens_used: 6}]:
    // one at a time gives output "first", 5 tokens; the batch gives "second", 6 tokens.
    let p = Pair::new(&[("", steps(2))]).await;
    p.claim_both(0, 2).await;
    p.compare_completion(|t| {
        json!([
            {"step_id": 1, "claim_token": t[&1], "summary": "first", "tokens_used": "5"},
            {"step_id": 1, "claim_token": t[&1], "summary": "second", "tokens_used": 6}
        ])
    })
    .await;
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_batch_that_ends_its_campaign_answers_each_item_as_single_calls_do() {
    let p = Pair::new(&[("", steps(3))]).await;
    p.claim_both(0, 3).await;
    let answer = p
        .compare_completion(|t| {
            json!([
                item(1, &t[&1], "a"),
                item(2, &t[&2], "b"),
                item(3, &t[&3], "c")
            ])
        })
        .await;
    assert_eq!(answer["completed"][2]["campaign_status"], "done");
    assert_eq!(campaign_status(&p.b, p.cb[0]).await, "done");
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_batch_ending_its_campaign_ends_it_done() {
    // What holds of the above: the campaign ends 'done', the counters and events are right,
    // and the last answer says 'done'.
    let p = Pair::new(&[("", steps(3)), ("", steps(1))]).await;
    p.claim_both(0, 3).await;
    let tb = tokens(&p.b).await;
    let answer =
        p.b.ok(
            "sortie.complete_steps($1)",
            &[&json!([
                item(3, &tb[&3], "c"),
                item(1, &tb[&1], "a"),
                item(2, &tb[&2], "b")
            ])],
        )
        .await;
    assert_eq!(answer["refused"], json!([]));
    assert_eq!(
        answer["completed"][2]["campaign_status"], "done",
        "{answer}"
    );
    assert_eq!(campaign_status(&p.b, p.cb[0]).await, "done");
    assert_eq!(campaign_status(&p.b, p.cb[1]).await, "active");
    assert_eq!(
        count(&p.b, &format!("SELECT count(*) FROM sortie.events WHERE campaign_id = '{}' AND kind = 'step.done'", p.cb[0])).await,
        3
    );
    assert_eq!(
        count(&p.b, &format!("SELECT count(*) FROM sortie.events WHERE campaign_id = '{}' AND kind = 'campaign.done'", p.cb[0])).await,
        1
    );
    p.finish().await;
}

#[tokio::test]
async fn an_item_overflowing_the_campaigns_tokens_is_refused_alone() {
    // Ten items of 999999999999999999 tokens: nine fit in a bigint, the tenth does not.
    // One at a time: nine completed, the tenth refused (invalid_argument). The batch: ERROR
    // "bigint out of range" from _complete_many's campaign update, nothing applied.
    let p = Pair::new(&[("", steps(10))]).await;
    p.claim_both(0, 10).await;
    let (tb, ts) = (tokens(&p.b).await, tokens(&p.s).await);
    let items = |t: &HashMap<i64, Uuid>| {
        Value::Array(
            (1..=10)
                .map(|i| json!({"step_id": i, "claim_token": t[&i], "tokens_used": 999_999_999_999_999_999i64}))
                .collect(),
        )
    };
    let reference = one_at_a_time(&p.s, &items(&ts), &(1..=10).collect::<Vec<_>>()).await;
    assert_eq!(reference["completed"].as_array().unwrap().len(), 9);
    let batch = p.b.call("sortie.complete_steps($1)", &[&items(&tb)]).await;
    match batch {
        Ok(answer) => assert_eq!(answer, reference),
        Err(e) => panic!("complete_steps failed as a whole: {e}; one at a time: {reference}"),
    }
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn items_of_several_campaigns_interleaved_complete_as_single_calls() {
    let p = Pair::new(&[("", steps(4)), ("", steps(4)), ("", steps(4))]).await;
    for c in 0..3 {
        p.claim_both(c, 3).await;
    }
    // Steps 1-4 are campaign 0's, 5-8 campaign 1's, 9-12 campaign 2's; 4, 8, 12 unclaimed.
    p.compare_completion(|t| {
        json!([
            item(10, &t[&10], "c2"),
            item(1, &t[&1], "c0"),
            item(5, &t[&5], "c1"),
            item(4, &Uuid::new_v4(), "unclaimed"),
            item(9, &t[&1], "another step's token"),
            item(11, &t[&11], "c2"),
            item(2, &t[&2], "c0"),
            item(6, &Uuid::new_v4(), "stale"),
            item(424242, &t[&3], "no such step"),
            item(7, &t[&7], "c1"),
            item(10, &t[&10], "c2"),
            item(9, &t[&9], "c2")
        ])
    })
    .await;
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_campaign_with_a_token_budget_pauses_where_single_calls_pause_it() {
    let p = Pair::new(&[(", token_budget => 10", steps(5)), ("", steps(3))]).await;
    p.claim_both(0, 4).await;
    p.claim_both(1, 2).await;
    let answer = p
        .compare_completion(|t| {
            Value::Array(
                [1, 6, 2, 3, 7, 4]
                    .iter()
                    .map(|&i| json!({"step_id": i, "claim_token": t[&i], "summary": format!("s{i}"), "tokens_used": 4}))
                    .collect(),
            )
        })
        .await;
    assert_eq!(campaign_status(&p.b, p.cb[0]).await, "paused", "{answer}");
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_paused_or_cancelled_campaigns_running_steps_complete_as_single_calls() {
    let p = Pair::new(&[("", steps(3)), ("", steps(3)), ("", steps(2))]).await;
    for c in 0..3 {
        p.claim_both(c, 3).await;
    }
    p.both("SELECT sortie.pause_campaign('{c0}'); SELECT sortie.cancel_campaign('{c1}', 'stop')")
        .await;
    // Campaign 0 (paused) ends when its last step is done; campaign 1's steps were skipped.
    p.compare_completion(|t| {
        json!([
            item(1, &t[&1], "a"),
            item(4, &t[&4], "d"),
            item(2, &t[&2], "b"),
            item(5, &t[&5], "e"),
            item(7, &t[&7], "g")
        ])
    })
    .await;
    p.assert_same_state(true).await;
    p.compare_completion_with(
        &json!([item(3, &tokens(&p.b).await[&3], "c")]),
        &json!([item(3, &tokens(&p.s).await[&3], "c")]),
    )
    .await;
    assert_eq!(campaign_status(&p.b, p.cb[0]).await, "done");
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn members_of_groups_and_sequences_mixed_with_top_level_steps_complete_as_single_calls() {
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "t1", "key": "t1"},
            {"step_type": "parallel_group", "action": "g", "key": "g", "children": [
                {"action": "m1"}, {"action": "m2"}]},
            {"step_type": "sequence", "action": "q", "steps": [{"action": "q1"}, {"action": "q2"}]},
            {"step_type": "parallel_group", "action": "race", "completion_threshold": 1, "children": [
                {"action": "r1"}, {"action": "r2"}]},
            {"action": "t2"},
            {"action": "after g and t1", "depends_on": ["g", "t1"]},
            {"action": "left open"}
        ]),
    )])
    .await;
    p.claim_batch_both(0, 8).await;
    let running: Vec<i64> = {
        let mut v: Vec<i64> = tokens(&p.b).await.keys().copied().collect();
        v.sort();
        v
    };
    // Everything claimed except "left open" (the last one), most recent first.
    let last_open = *running.last().unwrap();
    p.compare_completion(|t| {
        Value::Array(
            running
                .iter()
                .rev()
                .filter(|&&i| i != last_open)
                .map(|&i| item(i, &t[&i], &format!("out {i}")))
                .collect(),
        )
    })
    .await;
    p.assert_same_state(false).await;
    // What the completions released is claimed alike.
    p.compare_claims(0, 10, None).await;
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_batch_of_members_and_top_level_steps_writes_events_in_step_order() {
    // g (parallel_group, #1) with m (#2), then t (#3), all claimed; items [m, t]. One at a
    // time: step.done m, step.done g, step.done t, campaign.done, and t's answer says 'done'.
    // The batch: step.done t first, then m, g, campaign.done; t's answer says 'active' and m's
    // says 'done'.
    let p = Pair::new(&[(
        "",
        json!([
            {"step_type": "parallel_group", "action": "g", "children": [{"action": "m"}]},
            {"action": "t"}
        ]),
    )])
    .await;
    p.claim_both(0, 2).await;
    p.compare_completion(|t| json!([item(2, &t[&2], "m"), item(3, &t[&3], "t")]))
        .await;
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_batch_writes_its_step_done_events_in_step_order() {
    // Items [{1, stale token}, {1, its token}, {2, its token}], step 3 left running. One at a
    // time: step.done 1, step.done 2. The batch: step.done 2 (set-wise), then step.done 1 (its
    // first item was stale, so the step went one at a time).
    let p = Pair::new(&[("", steps(3))]).await;
    p.claim_both(0, 3).await;
    p.compare_completion(|t| {
        json!([
            item(1, &Uuid::new_v4(), "stale"),
            item(1, &t[&1], "a"),
            item(2, &t[&2], "b")
        ])
    })
    .await;
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn lock_keys_are_released_by_a_batch_as_by_single_completions() {
    let p = Pair::new(&[
        (
            "",
            json!([
                {"action": "db", "requires_locks": ["db"]},
                {"action": "cache", "requires_locks": ["shared:cache"]},
                {"action": "cache 2", "requires_locks": ["shared:cache"]},
                {"action": "plain"},
                {"action": "waits for db", "requires_locks": ["db/x"]},
                {"action": "waits for cache", "requires_locks": ["cache"]}
            ]),
        ),
        (
            "",
            json!([{"action": "other campaign db", "requires_locks": ["db"]}]),
        ),
    ])
    .await;
    p.claim_batch_both(0, 10).await;
    p.claim_batch_both(1, 10).await;
    p.assert_same_state(false).await;
    p.compare_completion(|t| {
        json!([
            item(2, &t[&2], "c"),
            item(1, &t[&1], "db"),
            item(4, &t[&4], "p")
        ])
    })
    .await;
    p.assert_same_state(false).await;
    // db is free: the other campaign's db step or "waits for db" may run; cache is still
    // shared by "cache 2".
    p.compare_claims(0, 10, None).await;
    p.compare_claims(1, 10, None).await;
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_step_with_a_verify_command_stays_running_in_a_batch() {
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "plain 1"},
            {"action": "checked", "verify": "true"},
            {"action": "plain 2"}
        ]),
    )])
    .await;
    p.claim_both(0, 3).await;
    let answer = p
        .compare_completion(|t| {
            json!([
                item(3, &t[&3], "p2"),
                {"step_id": 2, "claim_token": t[&2], "summary": "checked", "tokens_used": 9},
                item(1, &t[&1], "p1"),
                item(2, &t[&2], "checked again")
            ])
        })
        .await;
    assert_eq!(status(&p.b, 2).await, "running", "{answer}");
    assert_eq!(campaign_status(&p.b, p.cb[0]).await, "active");
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_diamond_completed_in_one_batch_releases_its_join() {
    let p = Pair::new(&[(
        "",
        json!([
            {"action": "a", "key": "a"},
            {"action": "b", "key": "b", "depends_on": ["a"]},
            {"action": "c", "key": "c", "depends_on": ["a"]},
            {"action": "d", "key": "d", "depends_on": ["b", "c"]},
            {"action": "e", "depends_on": ["b"]},
            {"step_type": "parallel_group", "action": "g", "depends_on": ["b", "c"], "children": [
                {"action": "g1", "key": "g1"}, {"action": "g2", "depends_on": ["g1"]}]},
            {"action": "z", "depends_on": ["d"]}
        ]),
    )])
    .await;
    p.claim_both(0, 1).await;
    p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE id = 1 ORDER BY id LOOP PERFORM sortie.complete_step(1, r.claim_token, 'a'); END LOOP; END $d$")
        .await;
    p.claim_both(0, 2).await;
    p.compare_completion(|t| json!([item(3, &t[&3], "c"), item(2, &t[&2], "b")]))
        .await;
    assert_eq!(status(&p.b, 4).await, "pending");
    p.assert_same_state(true).await;
    // d, e and g1 are ready: the same claims on both sides.
    let got = p.compare_claims(0, 10, None).await;
    assert_eq!(
        got.as_array()
            .unwrap()
            .iter()
            .map(|c| c["action"].clone())
            .collect::<Vec<_>>(),
        vec![json!("d"), json!("e"), json!("g1")]
    );
    p.assert_same_state(false).await;
    p.finish().await;
}

#[tokio::test]
async fn a_thousand_item_batch_with_repeats_completes_as_single_calls() {
    let p = Pair::new(&[("", steps(1000))]).await;
    p.claim_batch_both(0, 1000).await;
    // 990 steps, 10 of them twice (a replay each); 10 steps left running.
    let answer = p
        .compare_completion(|t| {
            let mut v: Vec<Value> = (1..=990)
                .rev()
                .map(|i| item(i, &t[&i], &format!("o{i}")))
                .collect();
            v.extend((1..=10).map(|i| item(i * 7, &t[&(i * 7)], &format!("o{}", i * 7))));
            Value::Array(v)
        })
        .await;
    assert_eq!(answer["completed"].as_array().unwrap().len(), 1000);
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_repeated_batch_is_replayed_item_by_item() {
    let p = Pair::new(&[("", steps(5))]).await;
    p.claim_both(0, 5).await;
    let (tb, ts) = (tokens(&p.b).await, tokens(&p.s).await);
    let items = |t: &HashMap<i64, Uuid>| {
        json!([
            item(2, &t[&2], "b"),
            {"step_id": 1, "claim_token": t[&1], "summary": "a", "tokens_used": 3},
            item(4, &t[&4], "d")
        ])
    };
    p.compare_completion_with(&items(&tb), &items(&ts)).await;
    let again = p.compare_completion_with(&items(&tb), &items(&ts)).await;
    assert!(
        again["completed"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["replayed"] == true),
        "{again}"
    );
    p.assert_same_state(true).await;
    p.finish().await;
}

#[tokio::test]
async fn a_runners_batch_in_one_campaign_claims_as_single_dispatches() {
    let p = Pair::new(&[
        ("", steps(2)),
        (
            "",
            json!([
                {"action": "a"},
                {"action": "locked", "requires_locks": ["k"]},
                {"step_type": "sequence", "action": "q", "steps": [{"action": "q1"}, {"action": "q2"}]},
                {"action": "b"}, {"action": "c"}, {"action": "d"}
            ]),
        ),
    ])
    .await;
    // One runner slot of four taken by the other campaign.
    p.b.ok(
        "sortie.claim_next(owner => 'r', campaign_id => $1, max_dispatched => 4)",
        &[&p.cb[0]],
    )
    .await;
    p.s.ok(
        "sortie.claim_next(owner => 'r', campaign_id => $1, max_dispatched => 4)",
        &[&p.cs[0]],
    )
    .await;
    for _ in 0..2 {
        let batch = p
            .b
            .ok(
                "sortie.claim_next(owner => 'r', campaign_id => $1, max_dispatched => 4, max_steps => 10)",
                &[&p.cb[1]],
            )
            .await;
        let mut singles = Vec::new();
        for _ in 0..10 {
            let v =
                p.s.ok(
                    "sortie.claim_next(owner => 'r', campaign_id => $1, max_dispatched => 4)",
                    &[&p.cs[1]],
                )
                .await;
            if !v["step_id"].is_null() {
                singles.push(v);
            }
        }
        assert_eq!(
            normalise_claims(&batch),
            normalise_claims(&Value::Array(singles))
        );
        p.assert_same_state(false).await;
        p.both("DO $d$ DECLARE r record; BEGIN FOR r IN SELECT id, claim_token FROM sortie.steps WHERE status = 'running' AND step_type = 'atomic' AND action <> 's0' ORDER BY id LOOP PERFORM sortie.complete_step(r.id, r.claim_token, 'x'); END LOOP; END $d$")
            .await;
    }
    p.finish().await;
}
