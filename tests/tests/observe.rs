//! SPEC §16 in SQL: the event log reader, a campaign's graph, what runs now, health(), and
//! get_updates naming the transaction that holds its events back.

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;

/// A campaign with a parallel group, a dependency and a splice: every kind of edge.
async fn spliced_campaign(db: &TestDb) -> (uuid::Uuid, Value) {
    let c = campaign(db, "none").await;
    add(
        db,
        c,
        json!([
            {"action": "research", "key": "r"},
            {"step_type": "parallel_group", "action": "probe", "key": "p", "depends_on": ["r"],
             "children": [{"action": "probe a"}, {"action": "probe b"}]},
            {"action": "write", "depends_on": ["r"]}
        ]),
    )
    .await;
    let research = claim(db, c).await.unwrap();
    assert_eq!(research.action, "research");
    let spliced = db
        .ok(
            "sortie.spawn_and_continue(step_id => $1, claim_token => $2, subtasks => $3, continuation => to_jsonb('synthesise'::text))",
            &[&research.step_id, &research.token, &json!([{"action": "read paper A"}, {"action": "read paper B"}])],
        )
        .await;
    (c, spliced)
}

#[tokio::test]
async fn events_reads_the_log_oldest_first_and_pages_after_an_id() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    run_all(&db, c).await;
    let all = db.ok("sortie.events(campaign_id => $1)", &[&c]).await;
    let events = all["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"campaign.created"), "{kinds:?}");
    assert_eq!(kinds.iter().filter(|k| **k == "step.done").count(), 2);
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    assert_eq!(all["next_after_id"], *ids.last().unwrap());

    // Paging: two at a time from the first id, until the last.
    let mut seen = vec![ids[0]];
    let mut after = ids[0];
    loop {
        let page = db
            .ok(
                "sortie.events(campaign_id => $1, after_id => $2, \"limit\" => 2)",
                &[&c, &after],
            )
            .await;
        let got: Vec<i64> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_i64().unwrap())
            .collect();
        if got.is_empty() {
            assert_eq!(page["next_after_id"], after);
            break;
        }
        assert!(got.len() <= 2);
        after = page["next_after_id"].as_i64().unwrap();
        seen.extend(got);
    }
    assert_eq!(seen, ids);

    // Another campaign's events are not this one's.
    let other = campaign(&db, "none").await;
    let theirs = db.ok("sortie.events(campaign_id => $1)", &[&other]).await;
    assert!(theirs["events"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["campaign_id"] == json!(other.to_string())));

    let missing = db
        .call("sortie.events(campaign_id => $1)", &[&uuid::Uuid::new_v4()])
        .await
        .unwrap_err();
    assert_eq!(missing.code, "not_found");
    let negative = db
        .call("sortie.events(after_id => -1)", &[])
        .await
        .unwrap_err();
    assert_eq!(negative.code, "invalid_argument");
    db.finish().await;
}

/// The position form: `next_after` pages one campaign by its own event numbers and every
/// campaign in the node's order (by time on Citus), and a position of another form, or made
/// up, is refused with a stable code.
#[tokio::test]
async fn events_pages_by_the_position_it_gives() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let other = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    add(&db, other, json!([{"action": "x"}])).await;
    run_all(&db, c).await;
    run_all(&db, other).await;

    // One campaign, from the start, three at a time: its numbers 1..n, each once.
    let mut after = "s0".to_string();
    let mut seqs = Vec::new();
    loop {
        let page = db
            .ok(
                "sortie.events(campaign_id => $1, after => $2, \"limit\" => 3)",
                &[&c, &after],
            )
            .await;
        let rows = page["events"].as_array().unwrap().clone();
        assert!(rows
            .iter()
            .all(|e| e["campaign_id"] == json!(c.to_string())));
        seqs.extend(rows.iter().map(|e| e["seq"].as_i64().unwrap()));
        assert_eq!(page["has_more"], rows.len() == 3, "{page}");
        after = page["next_after"].as_str().unwrap().to_string();
        if rows.is_empty() {
            break;
        }
    }
    let count: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM sortie.events WHERE campaign_id = $1",
            &[&c],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(seqs, (1..=count).collect::<Vec<_>>());
    assert_eq!(after, format!("s{count}"));

    // Every campaign: starting from the newest event, nothing is after it until more happens.
    let start = db.ok("sortie.events(\"limit\" => 1)", &[]).await;
    let position = start["next_after"].as_str().unwrap().to_string();
    let quiet = db.ok("sortie.events(after => $1)", &[&position]).await;
    assert_eq!(quiet["events"], json!([]), "{quiet}");
    assert_eq!(quiet["next_after"], json!(position));
    let (third, fourth) = (campaign(&db, "none").await, campaign(&db, "none").await);
    add(&db, fourth, json!([{"action": "y"}])).await;
    let moved = db.ok("sortie.events(after => $1)", &[&position]).await;
    // The new campaigns' events, in the order they happened.
    let mut order: Vec<String> = moved["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["campaign_id"].as_str().unwrap().to_string())
        .collect();
    assert!(moved["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "steps.added"));
    order.dedup();
    assert_eq!(order, [third.to_string(), fourth.to_string()], "{moved}");

    // Positions are checked: of another form (a campaign's for the whole log, the whole
    // log's for a campaign), or not one at all.
    let third_events: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM sortie.events WHERE campaign_id = $1",
            &[&third],
        )
        .await
        .unwrap()
        .get(0);
    let on_citus = sortie_tests::on_citus();
    let mut bad_positions = vec![
        (None, "s3".to_string()),
        (Some(third), format!("s{}", third_events + 1)),
        (Some(third), "s99999999999999999999".to_string()),
        (None, "i9999999999999999999".to_string()),
        (None, "12".to_string()),
        (None, "i-1".to_string()),
        (None, "t1/zz/1".to_string()),
        (None, String::new()),
    ];
    if on_citus {
        bad_positions.push((
            None,
            "t9223372036854775807/00000000-0000-0000-0000-000000000000/0".to_string(),
        ));
        bad_positions.push((
            None,
            "t0/00000000-0000-0000-0000-000000000000/99999999999999999999".to_string(),
        ));
    } else {
        bad_positions.push((
            Some(c),
            "t0/00000000-0000-0000-0000-000000000000/0".to_string(),
        ));
    }
    for (campaign, bad) in bad_positions {
        let refused = db
            .call(
                "sortie.events(campaign_id => $1, after => $2)",
                &[&campaign, &bad],
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, "invalid_argument", "{bad:?}: {refused:?}");
        assert!(
            refused.message.contains("next_after"),
            "the position's own message, not a conversion error: {refused:?}"
        );
    }
    // What an after_id call answers is a position too: given back, it pages on by id.
    let by_id = db
        .ok(
            "sortie.events(campaign_id => $1, after_id => 1, \"limit\" => 2)",
            &[&c],
        )
        .await;
    let again = db
        .ok(
            "sortie.events(campaign_id => $1, after => $2, \"limit\" => 2)",
            &[&c, &by_id["next_after"].as_str().unwrap().to_string()],
        )
        .await;
    let first_ids: Vec<i64> = by_id["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    let next_ids: Vec<i64> = again["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(
        next_ids.iter().all(|id| id > first_ids.last().unwrap()),
        "{by_id} then {again}"
    );
    db.finish().await;
}

#[tokio::test]
async fn an_idle_transaction_holds_back_no_update_and_health_names_it() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    // Caught up before the transaction opens.
    db.ok("sortie.get_updates($1, 'watcher')", &[&c]).await;

    let idle = db.connect().await;
    idle.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let idle_pid: i32 = idle
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let step = claim(&db, c).await.unwrap();
    complete(&db, &step, "finished").await;

    // SPEC §10: events are numbered per campaign, so a transaction open elsewhere delays
    // nothing (it used to hold back every event committed after it began).
    let delivered = db.ok("sortie.get_updates($1, 'watcher')", &[&c]).await;
    assert_eq!(
        delivered["completed"][0]["step_id"], step.step_id,
        "{delivered}"
    );
    assert_eq!(delivered["held_back_by"], Value::Null);
    let everything = db.ok("sortie.get_updates(NULL, 'watcher')", &[]).await;
    assert_eq!(
        everything["completed"][0]["step_id"], step.step_id,
        "{everything}"
    );

    let health = db.ok("sortie.health(grace => '0 seconds')", &[]).await;
    let oldest = &health["oldest_transaction"];
    assert_eq!(oldest["pid"], idle_pid, "{health}");
    assert_eq!(oldest["has_transaction_id"], true);
    assert_eq!(oldest["state"], "idle in transaction");
    assert_eq!(health["ok"], false);
    let problem = health["problems"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["code"] == "open_transaction")
        .unwrap_or_else(|| panic!("{health}"))
        .clone();
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains(&format!("pid {idle_pid} has been idle in a transaction")),
        "{problem}"
    );
    // Under the default grace a transaction idle for a moment is no problem yet.
    let calm = db.ok("sortie.health()", &[]).await;
    assert!(
        !calm["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["code"] == "open_transaction"),
        "{calm}"
    );

    idle.batch_execute("COMMIT").await.unwrap();
    let health = db.ok("sortie.health(grace => '0 seconds')", &[]).await;
    assert_eq!(health["ok"], true, "{health}");
    db.finish().await;
}

#[tokio::test]
async fn an_event_committed_late_is_handed_out_after_the_others_and_never_lost() {
    let db = TestDb::new().await;
    let slow = campaign(&db, "none").await;
    let quick = campaign(&db, "none").await;
    add(&db, quick, json!([{"action": "q1"}, {"action": "q2"}])).await;
    db.ok("sortie.get_updates(NULL, 'everything')", &[]).await;
    db.ok("sortie.get_updates($1, 'one')", &[&slow]).await;

    // A note of `slow` written in a transaction left open: its event is numbered, not visible.
    let open = db.connect().await;
    open.batch_execute("BEGIN").await.unwrap();
    open.query_one("SELECT sortie.add_note($1, 'written late')", &[&slow])
        .await
        .unwrap();
    for _ in 0..2 {
        let step = claim(&db, quick).await.unwrap();
        complete(&db, &step, "done").await;
    }
    let first = db.ok("sortie.get_updates(NULL, 'everything')", &[]).await;
    assert_eq!(first["completed"].as_array().unwrap().len(), 2, "{first}");
    assert_eq!(first["notes"], json!([]), "{first}");
    assert_eq!(
        db.ok("sortie.get_updates($1, 'one')", &[&slow]).await["events_read"],
        0
    );

    open.batch_execute("COMMIT").await.unwrap();
    let late = db.ok("sortie.get_updates(NULL, 'everything')", &[]).await;
    assert_eq!(late["notes"][0]["content"], "written late", "{late}");
    assert_eq!(late["completed"], json!([]), "{late}");
    let one = db.ok("sortie.get_updates($1, 'one')", &[&slow]).await;
    assert_eq!(one["notes"][0]["content"], "written late", "{one}");
    assert_eq!(
        db.ok("sortie.get_updates(NULL, 'everything')", &[]).await["events_read"],
        0
    );
    db.finish().await;
}

#[tokio::test]
async fn get_updates_pages_every_campaign_in_its_own_order() {
    let db = TestDb::new().await;
    let a = campaign(&db, "none").await;
    let b = campaign(&db, "none").await;
    add(
        &db,
        a,
        json!([{"action": "a1"}, {"action": "a2"}, {"action": "a3"}]),
    )
    .await;
    add(&db, b, json!([{"action": "b1"}])).await;
    for c in [a, a, a, b] {
        let step = claim(&db, c).await.unwrap();
        complete(&db, &step, "done").await;
    }
    // Page by page, two events at a time: each campaign's events come in its own order, once.
    let mut seen: Vec<(String, i64)> = Vec::new();
    loop {
        let page = db
            .ok("sortie.get_updates(NULL, 'pager', \"limit\" => 2)", &[])
            .await;
        let read = page["events_read"].as_i64().unwrap();
        assert!(read <= 2, "{page}");
        if read == 0 {
            assert_eq!(page["has_more"], false);
            break;
        }
        for done in page["completed"].as_array().unwrap() {
            seen.push((
                done["action"].as_str().unwrap().to_string(),
                done["step_id"].as_i64().unwrap(),
            ));
        }
    }
    let actions: Vec<&str> = seen.iter().map(|(a, _)| a.as_str()).collect();
    let of_a: Vec<&str> = actions
        .iter()
        .copied()
        .filter(|x| x.starts_with('a'))
        .collect();
    assert_eq!(of_a, ["a1", "a2", "a3"], "{seen:?}");
    assert_eq!(
        actions.iter().filter(|x| **x == "b1").count(),
        1,
        "{seen:?}"
    );
    // Every event of both campaigns was read, each once, in its campaign's numbering.
    let log = db.ok("sortie.events(\"limit\" => 1000)", &[]).await;
    for c in [a, b] {
        let seqs: Vec<i64> = log["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["campaign_id"] == json!(c))
            .map(|e| e["seq"].as_i64().unwrap())
            .collect();
        assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "{log}");
    }
    db.finish().await;
}

#[tokio::test]
async fn health_reports_expired_leases_and_stalled_campaigns() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "slow"}])).await;
    let step = claim(&db, c).await.unwrap();
    let stalled = campaign(&db, "none").await;

    let now = db.ok("sortie.health()", &[]).await;
    assert_eq!(now["expired_leases"]["count"], 0, "{now}");
    assert!(!now["problems"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["code"] == "expired_leases"));

    // Two hours on: the lease ran out and nothing reset it; the empty campaign has waited.
    set_clock(&db.client, 7200).await;
    let later = db.ok("sortie.health()", &[]).await;
    assert_eq!(later["expired_leases"]["count"], 1, "{later}");
    assert_eq!(later["expired_leases"]["step_ids"], json!([step.step_id]));
    let codes: Vec<&str> = later["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert!(codes.contains(&"expired_leases"), "{codes:?}");
    assert!(codes.contains(&"stalled_campaign"), "{codes:?}");
    let stalled_ids: Vec<&str> = later["stalled_campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(stalled_ids, vec![stalled.to_string().as_str()]);
    let tables: Vec<&str> = later["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"].as_str().unwrap())
        .collect();
    assert_eq!(tables, vec!["campaigns", "events", "notes", "steps"]);

    let refused = db
        .call("sortie.health(grace => '-1 second')", &[])
        .await
        .unwrap_err();
    assert_eq!(refused.code, "invalid_argument");
    db.client
        .execute("SELECT set_config('sortie.fake_now', '', false)", &[])
        .await
        .unwrap();
    complete(&db, &step, "done").await;
    db.finish().await;
}

#[tokio::test]
async fn campaign_graph_shows_containment_dependencies_spawns_and_continuations() {
    let db = TestDb::new().await;
    let (c, spliced) = spliced_campaign(&db).await;
    let graph = db.ok("sortie.campaign_graph($1)", &[&c]).await;
    let nodes = graph["nodes"].as_array().unwrap();
    let node = |action: &str| -> Value {
        nodes
            .iter()
            .find(|n| n["action"] == action)
            .unwrap_or_else(|| panic!("{action} missing from {graph}"))
            .clone()
    };
    let total: i64 = count(
        &db,
        &format!("SELECT count(*) FROM sortie.steps WHERE campaign_id = '{c}'"),
    )
    .await;
    assert_eq!(nodes.len() as i64, total);
    assert_eq!(graph["total_steps"], total);
    let research = node("research");
    let probe = node("probe");
    let continuation = node("synthesise");
    assert_eq!(research["continued_by"], spliced["continuation_id"]);
    assert_eq!(continuation["continuation_of"], research["id"]);
    assert_eq!(node("read paper A")["spawned_by"], research["id"]);
    assert_eq!(node("probe a")["parent_id"], probe["id"]);
    assert_eq!(node("probe a").get("spawned_by"), None);
    assert_eq!(probe["step_type"], "parallel_group");

    let edges = graph["edges"].as_array().unwrap();
    let has = |from: &Value, to: &Value, kind: &str| {
        edges
            .iter()
            .any(|e| &e["from"] == from && &e["to"] == to && e["kind"] == kind)
    };
    // The splice rewired "probe" and "write" to wait for the continuation.
    assert!(
        has(&continuation["id"], &probe["id"], "dependency"),
        "{graph}"
    );
    assert!(has(&continuation["id"], &node("write")["id"], "dependency"));
    assert!(has(&research["id"], &node("read paper B")["id"], "spawned"));
    assert!(has(&research["id"], &continuation["id"], "continues"));
    assert!(has(
        &node("read paper A")["id"],
        &continuation["id"],
        "dependency"
    ));
    assert!(edges.iter().all(|e| {
        let known = |id: &Value| nodes.iter().any(|n| &n["id"] == id);
        known(&e["from"]) && known(&e["to"])
    }));

    let missing = db
        .call("sortie.campaign_graph($1)", &[&uuid::Uuid::new_v4()])
        .await
        .unwrap_err();
    assert_eq!(missing.code, "not_found");
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn activity_lists_running_steps_with_their_lease_and_campaign_progress() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "a", "agent": "coder"}, {"action": "b"}]),
    )
    .await;
    let step = db
        .ok(
            "sortie.claim_next(owner => 'w1', campaign_id => $1, lease_seconds => 600)",
            &[&c],
        )
        .await;
    let activity = db.ok("sortie.activity()", &[]).await;
    let running = activity["running"].as_array().unwrap();
    assert_eq!(running.len(), 1, "{activity}");
    assert_eq!(running[0]["step_id"], step["step_id"]);
    assert_eq!(running[0]["agent"], "coder");
    assert_eq!(running[0]["claim_owner"], "w1");
    let left = running[0]["lease_seconds_left"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 600.0, "{left}");
    let campaign_row = &activity["campaigns"][0];
    assert_eq!(campaign_row["id"], json!(c.to_string()));
    assert_eq!(campaign_row["step_counts"]["running"], 1);
    assert_eq!(campaign_row["step_counts"]["pending"], 1);
    let claim = parse_claim(&step).unwrap();
    complete(&db, &claim, "ok").await;
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn the_runner_warns_when_health_finds_a_problem() {
    let db = TestDb::new().await;
    let stalled = campaign(&db, "none").await;
    // The runner's sessions see a clock two hours on: the empty campaign has waited that long.
    let later: String = db
        .client
        .query_one("SELECT (now() + interval '2 hours')::text", &[])
        .await
        .unwrap()
        .get(0);
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET sortie.fake_now = '{later}'",
            db.name
        ))
        .await
        .unwrap();
    let url = db.connection_string();
    let output = sortie_tests::run_binary(
        "sortie-runner",
        &["--once"],
        &[("DATABASE_URL", url.as_str())],
        "",
    );
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("stalled_campaign"))
        .unwrap_or_else(|| panic!("no health warning in:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains(&stalled.to_string()),
        "{warning}"
    );
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" RESET sortie.fake_now",
            db.name
        ))
        .await
        .unwrap();
    db.finish().await;
}
