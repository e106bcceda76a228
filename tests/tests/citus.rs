//! Sortie on Citus (SPEC §2, issue 19, docs/scale-out.md): a coordinator and two workers
//! started by the harness, the extension distributed by `sortie.distribute()`, a campaign's
//! read delegated to the one worker that holds it, and a campaign run through the rules on the
//! distributed database. The rest of the suite runs distributed with `SORTIE_TEST_CITUS=1`
//! (scripts/test runs a named subset that way).

use serde_json::Value;
use sortie_tests::citus::CitusDb;
use sortie_tests::TestDb;
use tokio_postgres::{AsyncMessage, NoTls};

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

/// Every table of the extension is either distributed by campaign and co-located with
/// `campaigns`, or a reference table: a table added later without a place fails here.
#[tokio::test]
async fn distribute_places_every_table_by_campaign_or_as_reference() {
    let db = TestDb::distributed().await;
    let rows = db
        .client
        .query(
            "SELECT c.relname::text,
                    p.partmethod::text,
                    (SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum = (SELECT (regexp_match(p.partkey, ':varattno (\\d+)'))[1]::int2)),
                    p.colocationid = (SELECT colocationid FROM pg_dist_partition
                                       WHERE logicalrelid = 'sortie.campaigns'::regclass)
               FROM pg_class c
               LEFT JOIN pg_dist_partition p ON p.logicalrelid = c.oid
              WHERE c.relnamespace = 'sortie'::regnamespace AND c.relkind = 'r'
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut distributed = Vec::new();
    let mut reference = Vec::new();
    for row in &rows {
        let table: String = row.get(0);
        let method: Option<String> = row.get(1);
        let column: Option<String> = row.get(2);
        let colocated: Option<bool> = row.get(3);
        match method.as_deref() {
            Some("h") => {
                let expected = if table == "campaigns" {
                    "id"
                } else {
                    "campaign_id"
                };
                assert_eq!(
                    column.as_deref(),
                    Some(expected),
                    "{table} distributed by its campaign"
                );
                assert_eq!(colocated, Some(true), "{table} co-located with campaigns");
                distributed.push(table);
            }
            Some("n") => reference.push(table),
            other => panic!("table {table} is neither distributed nor reference ({other:?})"),
        }
    }
    assert_eq!(
        distributed,
        [
            "campaigns",
            "event_positions",
            "events",
            "finished_claims",
            "notes",
            "notifications",
            "step_dependencies",
            "steps",
            "workflow_history"
        ]
    );
    assert_eq!(
        reference,
        [
            "cursors",
            "idempotency_records",
            "resource_leases",
            "workflows"
        ]
    );
    // A second call moves nothing again.
    let again = db.ok("sortie.distribute()", &[]).await;
    assert_eq!(again["first"], false, "{again}");
    db.finish().await;
}

/// Without Citus, distribute() refuses with a stable code and changes nothing.
#[tokio::test]
async fn distribute_refuses_on_a_single_node() {
    let db = TestDb::single_node().await;
    let error = db.call("sortie.distribute()", &[]).await.unwrap_err();
    assert_eq!(error.code, "invalid_state", "{error}");
    assert!(error.message.contains("citus"), "{error}");
    db.finish().await;
}

/// Rows inserted on different workers never share an id (each worker's sequences have their
/// own range), so a rule finding a step by id finds one step.
#[tokio::test]
async fn ids_given_on_workers_do_not_collide() {
    let db = TestDb::distributed().await;
    let cluster = db.citus().unwrap();
    let mut firsts = Vec::new();
    for worker in &cluster.workers {
        let (client, connection) =
            tokio_postgres::connect(&worker.connection_string(&db.name), NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let (next, group): (i64, i32) = client
            .query_one(
                "SELECT nextval('sortie.steps_id_seq'), (SELECT groupid FROM pg_dist_local_group)",
                &[],
            )
            .await
            .map(|r| (r.get(0), r.get(1)))
            .unwrap();
        // The worker's range starts at its group id << 40 (2^40 ids a node).
        assert_eq!(next, ((group as i64) << 40) + 1, "group {group}");
        firsts.push(next);
    }
    assert!(firsts[0] > 1 << 40 && firsts[1] > 1 << 40, "{firsts:?}");
    assert_ne!(firsts[0] >> 40, firsts[1] >> 40, "{firsts:?}");
    assert!(
        firsts.iter().all(|id| *id < 1 << 53),
        "exact in JSON: {firsts:?}"
    );
    db.finish().await;
}

/// A new campaign without a planner; its id as text, as the tests' SQL takes it.
async fn new_campaign(db: &TestDb, goal: &str) -> String {
    db.ok(
        "sortie.create_campaign(goal => $1, planner => 'none')",
        &[&goal],
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A claim in `campaign` through its twin: the step and its claim token.
async fn claim_delegated(db: &TestDb, campaign: &str) -> (i64, String) {
    let claim = db
        .ok(
            "sortie._claim_next_delegated($1::text::uuid, 'w')",
            &[&campaign],
        )
        .await;
    (
        claim["step_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("{claim}")),
        claim["claim_token"].as_str().unwrap().to_string(),
    )
}

/// Completes a claimed step of `campaign` through its twin; its answer.
async fn complete_delegated(db: &TestDb, campaign: &str, step: i64, token: &str) -> Value {
    db.ok(
        &format!("sortie._complete_step_delegated($1::text::uuid, {step}, '{token}'::uuid, 'ok')"),
        &[&campaign],
    )
    .await
}

/// The node holding a campaign's shard (its port).
async fn holder(db: &TestDb, campaign: &str) -> i32 {
    db.client
        .query_one(
            "SELECT n.nodeport FROM pg_dist_placement p JOIN pg_dist_node n USING (groupid)
              WHERE p.shardid = get_shard_id_for_distribution_column('sortie.campaigns', $1::text::uuid)",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0)
}

/// A read of one campaign is one call on the worker that holds it: the coordinator sends it
/// the function call and nothing else, and that worker runs every statement locally.
#[tokio::test]
async fn a_campaign_read_runs_on_the_worker_holding_it() {
    let db = TestDb::distributed().await;
    let campaign = new_campaign(&db, "g").await;
    db.ok(
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}, {\"action\": \"b\", \"depends_on\": [\"a\"]}]')",
        &[&campaign],
    )
    .await;
    let port = holder(&db, &campaign).await;
    let (answer, notices) = logged_call(
        &db,
        "SELECT sortie._get_campaign_delegated($1::text::uuid)",
        &campaign,
    )
    .await;
    assert_eq!(
        answer["steps"].as_array().map(Vec::len),
        Some(2),
        "{answer}"
    );
    assert_runs_on_holder(&notices, "_get_campaign_delegated", port);
    db.finish().await;
}

/// Runs `sql` (one parameter, the campaign id as text) with every node logging the commands
/// it runs locally and those it sends elsewhere (Citus relays the workers' notices to the
/// client); the answer and the notices, `message | detail`.
async fn logged_call(db: &TestDb, sql: &str, campaign: &str) -> (Value, Vec<String>) {
    for node in db.citus().unwrap().nodes() {
        let admin = node.connect("postgres").await.unwrap();
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {0} SET citus.log_local_commands = on; \
                 ALTER DATABASE {0} SET citus.log_remote_commands = on;",
                db.name
            ))
            .await
            .unwrap();
    }
    let (client, mut rx) = db.connect_with_messages().await;
    let answer: Value = client.query_one(sql, &[&campaign]).await.unwrap().get(0);
    drop(client);
    let mut notices = Vec::new();
    while let Some(message) = rx.recv().await {
        if let AsyncMessage::Notice(notice) = message {
            notices.push(format!(
                "{} | {}",
                notice.message(),
                notice.detail().unwrap_or("")
            ));
        }
    }
    for node in db.citus().unwrap().nodes() {
        let admin = node.connect("postgres").await.unwrap();
        admin
            .batch_execute(&format!(
                "ALTER DATABASE {0} RESET citus.log_local_commands; ALTER DATABASE {0} RESET citus.log_remote_commands;",
                db.name
            ))
            .await
            .unwrap();
    }
    (answer, notices)
}

/// The coordinator sent exactly one command, the call of `function`, to the worker on `port`,
/// and every statement run locally ran there.
fn assert_runs_on_holder(notices: &[String], function: &str, port: i32) {
    let holder_addr = format!(":{port}");
    let issued: Vec<&String> = notices
        .iter()
        .filter(|n| n.starts_with("issuing"))
        .collect();
    assert_eq!(
        issued.len(),
        1,
        "the coordinator sends one command: {notices:#?}"
    );
    assert!(
        issued[0].contains(function) && issued[0].contains(&holder_addr),
        "the call itself, to the worker holding the campaign (port {port}): {notices:#?}"
    );
    let local: Vec<&String> = notices
        .iter()
        .filter(|n| n.starts_with("executing the command locally"))
        .collect();
    assert!(
        !local.is_empty(),
        "the worker ran the rule's statements: {notices:#?}"
    );
    assert!(
        local.iter().all(|n| n.contains(&holder_addr)),
        "only on the worker holding the campaign (port {port}): {notices:#?}"
    );
}

/// A heartbeat named by its campaign (the runner's, and sortie-mcp's for its own step) runs on
/// the worker holding the campaign as one local transaction: it writes no event, and a step
/// without lock keys touches no table shared by every node. So does the step's context.
#[tokio::test]
async fn a_heartbeat_and_the_context_run_on_the_worker_holding_their_campaign() {
    let db = TestDb::distributed().await;
    let campaign = new_campaign(&db, "g").await;
    db.ok(
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"a\"}]')",
        &[&campaign],
    )
    .await;
    let claim = db
        .ok(
            "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid, lease_seconds => 60)",
            &[&campaign],
        )
        .await;
    let (step, token) = (
        claim["step_id"].as_i64().unwrap(),
        claim["claim_token"].as_str().unwrap().to_string(),
    );
    let port = holder(&db, &campaign).await;
    let sql = format!(
        "SELECT sortie._heartbeat_delegated($1::text::uuid, {step}, '{token}'::uuid, 3600)"
    );
    let (answer, notices) = logged_call(&db, &sql, &campaign).await;
    assert_eq!(answer["status"], "running", "{answer}");
    assert_runs_on_holder(&notices, "_heartbeat_delegated", port);
    let left: f64 = db
        .client
        .query_one(
            "SELECT extract(epoch FROM lease_expires_at - now())::float8 FROM sortie.steps WHERE id = $1",
            &[&step],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        left > 3000.0,
        "the lease was extended to an hour: {left} s left"
    );
    // A step of another campaign, or a stale token, is refused there as by heartbeat().
    let other = new_campaign(&db, "other").await;
    let refused = db
        .call(
            &format!("sortie._heartbeat_delegated($1::text::uuid, {step}, '{token}'::uuid)"),
            &[&other],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "not_found", "{refused:?}");
    let stale = db
        .call(
            &format!("sortie._heartbeat_delegated($1::text::uuid, {step}, gen_random_uuid())"),
            &[&campaign],
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, "stale_claim", "{stale:?}");
    // The worker's first read, its context, the same way: answered as get_my_context answers.
    let sql = format!(
        "SELECT sortie._get_my_context_delegated($1::text::uuid, {step}, claim_token => '{token}'::uuid)"
    );
    let (context, notices) = logged_call(&db, &sql, &campaign).await;
    let public = db
        .ok(
            &format!("sortie.get_my_context({step}, claim_token => '{token}'::uuid)"),
            &[],
        )
        .await;
    assert_eq!(context, public);
    assert_runs_on_holder(&notices, "_get_my_context_delegated", port);
    db.finish().await;
}

/// A claim, a note, a completion, a failure and a splice named by their campaign (sortie-mcp's
/// in its campaign and for its own step, the runner's for its dispatches) run on the worker
/// holding the campaign as one local transaction: the step taken, the note stored, dependents
/// released, counters moved, subtasks and the continuation inserted, the events numbered and
/// the finished claim kept there, with no command to any other node. A
/// repeat of the same completion is answered from the finished claim kept on that worker; a
/// step with lock keys is left to claim_next on the coordinator.
#[tokio::test]
async fn a_claim_a_completion_and_a_failure_run_on_the_worker_holding_their_campaign() {
    let db = TestDb::distributed().await;
    let campaign = new_campaign(&db, "g").await;
    db.ok(
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}, {\"action\": \"b\", \"key\": \"b\", \"max_attempts\": 2}, \
           {\"action\": \"after\", \"depends_on\": [\"a\"]}, {\"action\": \"locked\", \"requires_locks\": [\"db\"]}]')",
        &[&campaign],
    )
    .await;
    let claim = |action: &'static str| {
        let (db, campaign) = (&db, campaign.clone());
        async move {
            let claim = db
                .ok(
                    "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
                    &[&campaign],
                )
                .await;
            assert_eq!(claim["action"], action, "{claim}");
            (
                claim["step_id"].as_i64().unwrap(),
                claim["claim_token"].as_str().unwrap().to_string(),
            )
        }
    };
    let port = holder(&db, &campaign).await;
    let (claimed, notices) = logged_call(
        &db,
        "SELECT sortie._claim_next_delegated($1::text::uuid, 'w')",
        &campaign,
    )
    .await;
    assert_eq!(claimed["action"], "a", "{claimed}");
    assert_runs_on_holder(&notices, "_claim_next_delegated", port);
    let (a, a_token) = (
        claimed["step_id"].as_i64().unwrap(),
        claimed["claim_token"].as_str().unwrap().to_string(),
    );
    let note = format!(
        "SELECT sortie._add_note_delegated($1::text::uuid, 'a finding', step_id => {a}, claim_token => '{a_token}'::uuid)"
    );
    let (noted, notices) = logged_call(&db, &note, &campaign).await;
    assert_eq!(noted["campaign_id"], campaign.as_str(), "{noted}");
    assert_runs_on_holder(&notices, "_add_note_delegated", port);
    let complete = format!(
        "SELECT sortie._complete_step_delegated($1::text::uuid, {a}, '{a_token}'::uuid, 'a done', 7)"
    );
    let (answer, notices) = logged_call(&db, &complete, &campaign).await;
    assert_eq!(answer["status"], "done", "{answer}");
    assert_runs_on_holder(&notices, "_complete_step_delegated", port);
    // The lost reply's repeat: the first answer, from the worker's finished claim.
    let again = db
        .ok(
            &format!(
                "sortie._complete_step_delegated($1::text::uuid, {a}, '{a_token}'::uuid, 'a done', 7)"
            ),
            &[&campaign],
        )
        .await;
    assert_eq!(again["replayed"], true, "{again}");
    assert_eq!(again["status"], "done", "{again}");

    let (b, b_token) = claim("b").await;
    let fail = format!(
        "SELECT sortie._fail_step_delegated($1::text::uuid, {b}, '{b_token}'::uuid, 'flaky')"
    );
    let (answer, notices) = logged_call(&db, &fail, &campaign).await;
    assert_eq!(answer["status"], "pending", "{answer}");
    assert_eq!(answer["will_retry"], true, "{answer}");
    assert_runs_on_holder(&notices, "_fail_step_delegated", port);

    // What the worker wrote is the campaign's state as every reader sees it.
    let got = db
        .ok("sortie.get_campaign($1::text::uuid)", &[&campaign])
        .await;
    assert_eq!(got["step_counts"]["done"], 1, "{got}");
    let tokens: i64 = db
        .client
        .query_one(
            "SELECT tokens_used FROM sortie.campaigns WHERE id = $1::text::uuid",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 7);
    let ready: Vec<String> = db
        .client
        .query(
            "SELECT action FROM sortie.ready_steps(campaign_id => $1) ORDER BY action",
            &[&campaign.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        ready.contains(&"after".to_string()),
        "a's dependent was released: {ready:?}"
    );
    let invariants: Vec<String> = db
        .client
        .query(
            "SELECT sortie.check_invariants($1)",
            &[&campaign.parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(invariants.is_empty(), "{invariants:?}");
    // The released step next; the step with lock keys is claim_next's.
    let twin = "sortie._claim_next_delegated($1::text::uuid, 'w')";
    let after = db.ok(twin, &[&campaign]).await;
    assert_eq!(after["action"], "after");
    assert_eq!(
        db.ok(twin, &[&campaign]).await,
        serde_json::json!({"step_id": null, "reason": "lock_keys"})
    );
    claim("locked").await;
    // A splice of the released step, on the worker too.
    let splice = format!(
        "SELECT sortie._spawn_and_continue_delegated($1::text::uuid, {}, '{}'::uuid,          '[{{\"action\": \"sub\"}}]'::jsonb, '\"resume\"'::jsonb, 'half way')",
        after["step_id"], after["claim_token"].as_str().unwrap()
    );
    let (spliced, notices) = logged_call(&db, &splice, &campaign).await;
    assert_eq!(spliced["status"], "done", "{spliced}");
    assert_eq!(spliced["subtask_ids"].as_array().map(Vec::len), Some(1));
    assert_runs_on_holder(&notices, "_spawn_and_continue_delegated", port);
    // A step of another campaign, or a stale token, is refused as by the public functions.
    let other = new_campaign(&db, "other").await;
    let refused = db
        .call(
            &format!("sortie._complete_step_delegated($1::text::uuid, {b}, '{b_token}'::uuid)"),
            &[&other],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "not_found", "{refused:?}");
    let stale = db
        .call(
            &format!("sortie._fail_step_delegated($1::text::uuid, {b}, gen_random_uuid())"),
            &[&campaign],
        )
        .await
        .unwrap_err();
    assert_eq!(stale.code, "stale_claim", "{stale:?}");
    db.finish().await;
}

/// The kind of fault behind a query that fans out: a statement of a rule that does not name
/// the campaign by equality on every per-campaign table reaches every worker. Every rule called
/// with its campaign — on the coordinator or delegated — sends commands to the worker holding
/// it and to no other node; one table shared by every node may be touched only by a rule whose
/// steps hold lock keys (none here) or one that keeps a request id (none here).
#[tokio::test]
async fn every_rule_named_by_its_campaign_touches_only_the_worker_holding_it() {
    let db = TestDb::distributed().await;
    let campaign = db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'none', success_metric => 'score', success_target => 1)",
            &[],
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let port = holder(&db, &campaign).await;
    let mut calls: Vec<String> = vec![
        "SELECT sortie.add_steps($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}, {\"action\": \"a\"}, \
           {\"step_type\": \"parallel_group\", \"action\": \"g\", \"depends_on\": [\"a\"], \"children\": [{\"action\": \"g1\"}, {\"action\": \"g2\"}]}, \
           {\"step_type\": \"for_each\", \"action\": \"each\", \"items\": [1, 2], \"template\": {\"action\": \"item {{item}}\"}}]')".into(),
        "SELECT sortie.steer_campaign($1::text::uuid, 'go faster')".into(),
        "SELECT sortie.pause_campaign($1::text::uuid)".into(),
        "SELECT sortie.resume_campaign($1::text::uuid)".into(),
        "SELECT sortie._claim_next_delegated($1::text::uuid, 'w')".into(),
        "SELECT sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)".into(),
        "SELECT sortie._claim_next_delegated($1::text::uuid, 'w')".into(),
        "SELECT sortie._claim_next_delegated($1::text::uuid, 'w')".into(),
        "SELECT sortie.events(campaign_id => $1::text::uuid)".into(),
        "SELECT sortie.get_updates(id => $1::text::uuid)".into(),
        "SELECT sortie._add_note_delegated($1::text::uuid, 'a finding', tags => '{metric:score}')".into(),
        "SELECT sortie.get_notes(campaign_id => $1::text::uuid)".into(),
        "SELECT sortie.check_success($1::text::uuid)".into(),
        "SELECT sortie._get_campaign_delegated($1::text::uuid)".into(),
        "SELECT sortie._campaign_graph_delegated($1::text::uuid)".into(),
        "SELECT sortie._planner_context_delegated($1::text::uuid)".into(),
    ];
    let mut failures = Vec::new();
    let mut claims = Vec::new();
    for call in calls.drain(..) {
        let (answer, notices) = logged_call(&db, &call, &campaign).await;
        if answer["claim_token"].is_string() {
            claims.push(answer.clone());
        }
        // get_updates keeps its consumer's row in `cursors`, a reference table (a consumer may
        // follow every campaign): that write, and the commit it makes on every node, is its.
        let cursor_write = |n: &str| {
            call.contains("get_updates")
                && (n.contains("cursors_")
                    // Citus serialises a reference table's writes on its first placement.
                    || n.contains("lock_shard_resources")
                    || n.contains("assign_distributed_transaction_id")
                    || n.contains("PREPARE TRANSACTION")
                    || n.contains("COMMIT PREPARED"))
        };
        let elsewhere: Vec<&String> = notices
            .iter()
            .filter(|n| {
                (n.starts_with("issuing") || n.starts_with("executing the command locally"))
                    && n.contains("127.0.0.1:")
                    && !n.contains(&format!(":{port}"))
                    && !cursor_write(n)
            })
            .collect();
        if !elsewhere.is_empty() {
            failures.push(format!("{call}:\n{elsewhere:#?}"));
        }
    }
    // The claimed steps' own calls, by their campaign.
    assert_eq!(claims.len(), 4, "{claims:?}");
    for (i, claim) in claims.iter().enumerate() {
        let (step, token) = (&claim["step_id"], claim["claim_token"].as_str().unwrap());
        let call = match i {
            0 => format!("SELECT sortie._complete_step_delegated($1::text::uuid, {step}, '{token}'::uuid, 'ok')"),
            1 => format!(
                "SELECT sortie._spawn_and_continue_delegated($1::text::uuid, {step}, '{token}'::uuid, \
                 '[{{\"action\": \"sub\"}}]'::jsonb, '\"join\"'::jsonb, 'half')"
            ),
            2 => format!("SELECT sortie._request_input_delegated($1::text::uuid, {step}, '{token}'::uuid, 'go on?')"),
            _ => format!("SELECT sortie._release_step_delegated($1::text::uuid, {step}, '{token}'::uuid)"),
        };
        for call in [
            format!("SELECT sortie._heartbeat_delegated($1::text::uuid, {step}, '{token}'::uuid)"),
            format!("SELECT sortie._get_my_context_delegated($1::text::uuid, {step}, claim_token => '{token}'::uuid)"),
            call,
        ] {
            let (_, notices) = logged_call(&db, &call, &campaign).await;
            let elsewhere: Vec<&String> = notices
                .iter()
                .filter(|n| n.contains("127.0.0.1:") && !n.contains(&format!(":{port}")))
                .collect();
            if !elsewhere.is_empty() {
                failures.push(format!("{call}:\n{elsewhere:#?}"));
            }
        }
    }
    let (_, notices) = logged_call(
        &db,
        "SELECT sortie.cancel_campaign($1::text::uuid, 'enough')",
        &campaign,
    )
    .await;
    if notices
        .iter()
        .any(|n| n.contains("127.0.0.1:") && !n.contains(&format!(":{port}")))
    {
        failures.push(format!("cancel_campaign:\n{notices:#?}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    db.finish().await;
}

/// Runs a twin's call (`sql`, the campaign as its one parameter) with the nodes' command logs
/// and checks that it ran on the worker holding the campaign alone; its answer.
async fn delegated(db: &TestDb, sql: &str, campaign: &str) -> Value {
    let function = sql
        .split("sortie.")
        .nth(1)
        .and_then(|rest| rest.split('(').next())
        .unwrap();
    let port = holder(db, campaign).await;
    let (answer, notices) = logged_call(db, sql, campaign).await;
    assert_runs_on_holder(&notices, function, port);
    answer
}

/// The coordinator's and the runner's calls of one campaign — steps added, steering, pause and
/// resume, an answer to a question, notes and the success check read, the planner's lease and
/// plan, the campaign's end, a benchmark's outcome, a workflow's status, advance and resume, a
/// cancellation — run through their twins on the worker holding the campaign as one local
/// transaction: the coordinator sends that worker the call and nothing else.
#[tokio::test]
async fn the_coordinators_and_the_runners_calls_of_one_campaign_run_on_the_worker_holding_it() {
    let db = TestDb::distributed().await;
    let id = |answer: Value| {
        answer["id"]
            .as_str()
            .or(answer["instance_id"].as_str())
            .unwrap_or_else(|| panic!("{answer}"))
            .to_string()
    };

    // A campaign planned by the runner's planner, then driven by a coordinator.
    let planned = id(db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'llm', plan_delay => 0)",
            &[],
        )
        .await);
    let granted = delegated(
        &db,
        "SELECT sortie._begin_planning_delegated($1::text::uuid, 60)",
        &planned,
    )
    .await;
    assert_eq!(granted["granted"], true, "{granted}");
    let applied = delegated(
        &db,
        "SELECT sortie._apply_plan_delegated($1::text::uuid, '{\"strategy_update\": \"one step\", \"next_delay_minutes\": 0}')",
        &planned,
    )
    .await;
    assert_eq!(applied["status"], "active", "{applied}");
    let added = delegated(
        &db,
        "SELECT sortie._add_steps_delegated($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}]')",
        &planned,
    )
    .await;
    assert_eq!(added["created"], 1, "{added}");
    delegated(
        &db,
        "SELECT sortie._steer_campaign_delegated($1::text::uuid, 'go on')",
        &planned,
    )
    .await;
    let paused = delegated(
        &db,
        "SELECT sortie._pause_campaign_delegated($1::text::uuid)",
        &planned,
    )
    .await;
    assert_eq!(paused["status"], "paused", "{paused}");
    let resumed = delegated(
        &db,
        "SELECT sortie._resume_campaign_delegated($1::text::uuid)",
        &planned,
    )
    .await;
    assert_eq!(resumed["status"], "active", "{resumed}");
    let (step, token) = claim_delegated(&db, &planned).await;
    db.ok(
        &format!("sortie._request_input_delegated($1::text::uuid, {step}, '{token}'::uuid, 'which way?')"),
        &[&planned],
    )
    .await;
    let sql = format!("SELECT sortie._provide_input_delegated($1::text::uuid, {step}, 'left')");
    let answered = delegated(&db, &sql, &planned).await;
    assert!(answered.is_object(), "{answered}");
    db.ok(
        "sortie._add_note_delegated($1::text::uuid, 'a finding')",
        &[&planned],
    )
    .await;
    let notes = delegated(
        &db,
        "SELECT sortie._get_notes_delegated($1::text::uuid)",
        &planned,
    )
    .await;
    assert_eq!(notes["notes"].as_array().map(Vec::len), Some(1), "{notes}");
    delegated(
        &db,
        "SELECT sortie._check_success_delegated($1::text::uuid)",
        &planned,
    )
    .await;
    let (step, token) = claim_delegated(&db, &planned).await;
    complete_delegated(&db, &planned, step, &token).await;
    let finished = delegated(
        &db,
        "SELECT sortie._finish_campaign_delegated($1::text::uuid)",
        &planned,
    )
    .await;
    assert_eq!(finished["status"], "done", "{finished}");

    // A campaign judged by its benchmark: the runner records the outcome.
    let measured = id(db
        .ok(
            "sortie.create_campaign(goal => 'g', planner => 'none', success_metric => 'score', success_target => 1, \
             benchmark_command => 'echo score=2', steps => '[{\"action\": \"a\"}]')",
            &[],
        )
        .await);
    let (step, token) = claim_delegated(&db, &measured).await;
    complete_delegated(&db, &measured, step, &token).await;
    let taken = db.ok("sortie.take_benchmark()", &[]).await;
    assert_eq!(
        taken["campaign_id"].as_str(),
        Some(measured.as_str()),
        "{taken}"
    );
    let recorded = delegated(
        &db,
        "SELECT sortie._record_benchmark_delegated($1::text::uuid, 0, 'score=2')",
        &measured,
    )
    .await;
    assert_eq!(recorded["met"], true, "{recorded}");

    // A workflow instance: its status, an advance, a resume, and its cancellation.
    let step = |name: &str, transitions: Value| serde_json::json!({"name": name, "instructions": "do", "transitions": transitions});
    let definition = serde_json::json!({"goal": "g", "steps": [
        step("A", serde_json::json!({"success": "B"})),
        step("B", serde_json::json!({"success": "FINISH"}))]});
    let instance = id(db
        .ok(
            "sortie.start_workflow(workflow_name => 'T', definition => $1)",
            &[&definition],
        )
        .await);
    let status = delegated(
        &db,
        "SELECT sortie._get_workflow_status_delegated($1::text::uuid)",
        &instance,
    )
    .await;
    assert_eq!(status["current_step"]["step_name"], "A", "{status}");
    let advanced = delegated(
        &db,
        "SELECT sortie._advance_workflow_delegated($1::text::uuid, '{\"step_id\": \"A\", \"status\": \"success\"}')",
        &instance,
    )
    .await;
    assert_eq!(advanced["current_step"]["step_name"], "B", "{advanced}");
    let resumed = delegated(
        &db,
        "SELECT sortie._resume_workflow_delegated($1::text::uuid, 'B')",
        &instance,
    )
    .await;
    assert_eq!(resumed["current_step"]["step_name"], "B", "{resumed}");
    let cancelled = delegated(
        &db,
        "SELECT sortie._cancel_campaign_delegated($1::text::uuid, 'enough')",
        &instance,
    )
    .await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    // Each answers as the public function: a repeat of the cancellation is refused alike.
    let twin_refusal = db
        .call(
            "sortie._cancel_campaign_delegated($1::text::uuid)",
            &[&instance],
        )
        .await
        .unwrap_err();
    let public_refusal = db
        .call("sortie.cancel_campaign($1::text::uuid)", &[&instance])
        .await
        .unwrap_err();
    assert_eq!(twin_refusal.code, public_refusal.code);
    db.finish().await;
}

/// An event's time is taken when it is numbered, under its campaign's lock. A rule that waited
/// for the lock therefore logs a time later than the events committed while it waited, and a
/// follower of every campaign — which pages by time on Citus — does not pass it. (With the
/// transaction's start as its time, the claim below was logged before the other campaign's
/// event that the follower had already read, and was never seen.)
#[tokio::test]
async fn a_rule_that_waited_for_its_campaign_is_not_passed_by_a_follower() {
    use sortie_tests::fixtures::{add, campaign, claim, claim_on};
    let db = TestDb::distributed().await;
    let (a, b) = (campaign(&db, "none").await, campaign(&db, "none").await);
    add(&db, a, serde_json::json!([{"action": "x"}])).await;
    add(&db, b, serde_json::json!([{"action": "y"}])).await;
    let start = db.ok("sortie.events(\"limit\" => 1)", &[]).await;
    let after = start["next_after"].as_str().unwrap().to_string();

    // Another session holds campaign a; a claim in a waits for it.
    let holder = db.connect().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM sortie.campaigns WHERE id = '{a}' FOR UPDATE"
        ))
        .await
        .unwrap();
    let claimer = db.connect().await;
    let waiting = tokio::spawn(async move { claim_on(&claimer, a).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Meanwhile b's claim commits, and a follower reads past it.
    assert!(claim(&db, b).await.is_some());
    let page = db.ok("sortie.events(after => $1)", &[&after]).await;
    let seen: Vec<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["campaign_id"].as_str().unwrap(),
                e["kind"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(seen, [format!("{b} step.claimed")], "{page}");
    let after = page["next_after"].as_str().unwrap().to_string();

    holder.batch_execute("COMMIT").await.unwrap();
    let claimed = waiting
        .await
        .unwrap()
        .expect("a's step claimed once a is free");
    let page = db.ok("sortie.events(after => $1)", &[&after]).await;
    let seen: Vec<String> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {}",
                e["campaign_id"].as_str().unwrap(),
                e["kind"].as_str().unwrap(),
                e["step_id"]
            )
        })
        .collect();
    assert_eq!(
        seen,
        [format!("{a} step.claimed {}", claimed.step_id)],
        "the waiting claim's event comes after the follower's position: {page}"
    );
    db.finish().await;
}

/// A worker that refuses the listener (here: its login exists on the coordinator alone; a
/// pg_hba rule or a node that is down alike) is left out with a warning; the coordinator's and
/// the other workers' wake-ups still arrive.
#[tokio::test]
async fn a_worker_refusing_the_listener_leaves_the_other_nodes_heard() {
    use sortie_tests::fixtures::{add, campaign, claim};
    let db = TestDb::distributed().await;
    let role = format!("listener_{}", std::process::id());
    db.client
        .batch_execute(&format!(
            "SET citus.enable_ddl_propagation = off; \
             DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN \
               CREATE ROLE {role} LOGIN SUPERUSER; END IF; END $$; \
             RESET citus.enable_ddl_propagation"
        ))
        .await
        .unwrap();
    let url = db
        .connection_string()
        .replace("user=postgres", &format!("user={role}"));
    let c = campaign(&db, "none").await;
    add(&db, c, serde_json::json!([{"action": "x"}])).await;
    let mut wake = sortie_mcp::runner::listener::listen(&url).await;
    sortie_tests::programs::wait_for(std::time::Duration::from_secs(20), || async {
        db.client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND query = 'LISTEN sortie_events'",
                &[&role],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while wake.try_recv().is_ok() {}
    // A claim on the coordinator wakes it.
    assert!(claim(&db, c).await.is_some());
    tokio::time::timeout(std::time::Duration::from_secs(10), wake.recv())
        .await
        .expect("the coordinator's wake-up reaches a listener some worker refused")
        .unwrap();
    db.finish().await;
}

/// A completion delegated to a worker sends its wake-up from that worker: a LISTEN on the
/// coordinator alone does not hear it, sortie's listener (the runner's, the web view's, the
/// CLI's, the MCP server's) does, since it listens on every worker too. And the followers of
/// the log (events() with `after`) see every event once, whichever node wrote it: ids come from
/// each node's own range, so an id position would pass one worker's events for good.
#[tokio::test]
async fn wake_ups_and_the_log_reach_followers_from_every_worker() {
    let db = TestDb::distributed().await;
    // Two campaigns held by different workers.
    let mut campaigns: Vec<(String, i32)> = Vec::new();
    while campaigns.len() < 2 {
        let id = new_campaign(&db, "g").await;
        let port = holder(&db, &id).await;
        if campaigns.iter().all(|(_, p)| *p != port) {
            campaigns.push((id, port));
        }
    }
    for (id, _) in &campaigns {
        db.ok(
            "sortie.add_steps($1::text::uuid, '[{\"action\": \"x\"}, {\"action\": \"y\"}, {\"action\": \"z\"}]')",
            &[id],
        )
        .await;
    }
    // Each campaign's last event number before following starts.
    let mut before = Vec::new();
    for (id, _) in &campaigns {
        let seq: i64 = db
            .client
            .query_one(
                "SELECT event_seq FROM sortie.campaigns WHERE id = $1::text::uuid",
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        before.push(seq);
    }
    let start = db.ok("sortie.events(\"limit\" => 1)", &[]).await;
    let mut after = start["next_after"].as_str().unwrap().to_string();

    // A plain LISTEN on the coordinator, and sortie's listener.
    let (plain, mut plain_rx) = db.connect_with_messages().await;
    plain.batch_execute("LISTEN sortie_events").await.unwrap();
    let mut wake = sortie_mcp::runner::listener::listen(&db.connection_string()).await;
    let (first, _) = &campaigns[0];
    let mut claims = Vec::new();
    for (id, _) in &campaigns {
        let claim = db
            .ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
                &[id],
            )
            .await;
        claims.push((
            id.clone(),
            claim["step_id"].as_i64().unwrap(),
            claim["claim_token"].as_str().unwrap().to_string(),
        ));
    }
    // The listener listens on the coordinator and on both workers.
    for node in db.citus().unwrap().nodes() {
        let client = node.connect(&db.name).await.unwrap();
        sortie_tests::programs::wait_for(std::time::Duration::from_secs(20), || async {
            client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN sortie_events'",
                    &[],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
                >= 1
        })
        .await;
    }
    // The extension wakes at most once per wake_interval() a connection.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    while plain_rx.try_recv().is_ok() {}
    while wake.try_recv().is_ok() {}
    let (id, step, token) = &claims[0];
    assert_eq!(id, first);
    db.ok(
        "sortie._complete_step_delegated($1::text::uuid, $2, $3::text::uuid, 'x done')",
        &[id, step, token],
    )
    .await;
    tokio::time::timeout(std::time::Duration::from_secs(10), wake.recv())
        .await
        .expect("the listener heard the worker's wake-up")
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut heard_on_coordinator = false;
    while let Ok(message) = plain_rx.try_recv() {
        heard_on_coordinator |= matches!(message, AsyncMessage::Notification(_));
    }
    assert!(
        !heard_on_coordinator,
        "the completion ran on the worker: the coordinator sent no wake-up"
    );
    drop(plain);

    // The other campaign's worker, then the coordinator again, then the first worker.
    let (id, step, token) = &claims[1];
    db.ok(
        "sortie._complete_step_delegated($1::text::uuid, $2, $3::text::uuid, 'x done')",
        &[id, step, token],
    )
    .await;
    for (id, _) in &campaigns {
        let claim = db
            .ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
                &[id],
            )
            .await;
        db.ok(
            "sortie._fail_step_delegated($1::text::uuid, $2, $3::text::uuid, 'no')",
            &[
                id,
                &claim["step_id"].as_i64().unwrap(),
                &claim["claim_token"].as_str().unwrap().to_string(),
            ],
        )
        .await;
    }
    // Followed two events at a time, every event of both campaigns arrives once.
    let mut seen: Vec<(String, i64)> = Vec::new();
    loop {
        let page = db
            .ok("sortie.events(after => $1, \"limit\" => 2)", &[&after])
            .await;
        let rows = page["events"].as_array().unwrap().clone();
        for event in &rows {
            seen.push((
                event["campaign_id"].as_str().unwrap().to_string(),
                event["seq"].as_i64().unwrap(),
            ));
        }
        after = page["next_after"].as_str().unwrap().to_string();
        if rows.is_empty() {
            break;
        }
    }
    let mut expected: Vec<(String, i64)> = Vec::new();
    for ((id, _), start_seq) in campaigns.iter().zip(&before) {
        let rows = db
            .client
            .query(
                "SELECT seq FROM sortie.events WHERE campaign_id = $1::text::uuid AND seq > $2 ORDER BY seq",
                &[id, start_seq],
            )
            .await
            .unwrap();
        expected.extend(rows.iter().map(|row| (id.clone(), row.get::<_, i64>(0))));
    }
    assert!(
        expected.len() >= 8,
        "claims, completions, failures: {expected:?}"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    expected.sort();
    assert_eq!(sorted, expected, "in the order followed: {seen:?}");
    // One campaign's follower pages by the campaign's own numbers.
    let (id, _) = &campaigns[1];
    let one = db
        .ok(
            "sortie.events(campaign_id => $1::text::uuid, after => 's0', \"limit\" => 1000)",
            &[id],
        )
        .await;
    let seqs: Vec<i64> = one["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    db.finish().await;
}

/// A call of one campaign made without its campaign (a NULL, in any form) is refused as on one
/// node, and the node keeps serving. Stock Citus 13.2 hashes a NULL distribution argument to
/// find its shard (citusdata/citus#7242) and crashes the backend, and with it every session of
/// the node: the public functions are not distributed (they refuse the NULL on the
/// coordinator), and Citus as scripts/setup builds it runs a twin called with a NULL where it
/// was sent, where the twin refuses it.
#[tokio::test]
async fn a_delegated_read_without_a_campaign_is_refused_and_the_coordinator_lives() {
    let nulls = [
        "sortie.get_campaign(NULL)",
        "sortie.campaign_graph(NULL)",
        "sortie.planner_context(NULL)",
        "sortie._get_campaign_delegated(NULL)",
    ];
    // One node: the same refusal, from the same check.
    let single = TestDb::single_node().await;
    for sql in nulls {
        let refused = single.call(sql, &[]).await.unwrap_err();
        assert_eq!(
            refused.code, "invalid_argument",
            "one node, {sql}: {refused:?}"
        );
    }
    // Every twin too, from its own body's check.
    let twins: Vec<(String, Vec<String>)> = single
        .client
        .query(
            "SELECT p.proname::text, array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t)::text[] \
               FROM sortie._delegated_functions() f JOIN pg_proc p ON p.oid = ('sortie.' || f.signature)::regprocedure",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, types) in &twins {
        let rest: String = types[1..].iter().map(|t| format!(", NULL::{t}")).collect();
        let sql = format!("sortie.{name}(NULL::uuid{rest})");
        let refused = single.call(&sql, &[]).await.unwrap_err();
        assert_eq!(
            refused.code, "invalid_argument",
            "one node, {sql}: {refused:?}"
        );
    }
    single.finish().await;
    let db = TestDb::distributed().await;
    for sql in &nulls[..3] {
        let refused = db.call(sql, &[]).await.unwrap_err();
        assert_eq!(refused.code, "invalid_argument", "{sql}: {refused:?}");
    }
    let none: Option<uuid::Uuid> = None;
    let refused = db
        .call("sortie.get_campaign($1)", &[&none])
        .await
        .unwrap_err();
    assert_eq!(refused.code, "invalid_argument", "bound NULL: {refused:?}");
    // The public functions are not Citus's distributed functions; only their twins are.
    let delegated: Vec<String> = db
        .client
        .query(
            "SELECT p.proname::text FROM pg_dist_object o JOIN pg_proc p ON o.classid = 'pg_proc'::regclass AND o.objid = p.oid \
              WHERE o.distribution_argument_index IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut listed: Vec<String> = twins.iter().map(|(name, _)| name.clone()).collect();
    listed.sort();
    assert_eq!(delegated, listed, "the twins, and only they");
    assert!(
        delegated.len() >= 29
            && delegated
                .iter()
                .all(|n| n.starts_with('_') && n.ends_with("_delegated")),
        "{delegated:?}"
    );
    // The twins are. Called without a campaign — a NULL in every form PostgreSQL's planner
    // leaves Citus a NULL constant: literal, bound, cast, folded, from a CTE or a VALUES row,
    // through a SQL wrapper, named or not, in PL/pgSQL — Citus, as scripts/setup builds it
    // (scripts/citus/null-distribution-argument.patch), does not hash the NULL to find a shard
    // (stock Citus 13.2 crashes there) but runs the call where it was sent, and the twin
    // refuses it as on one node; the session and the node live on.
    assert_eq!(twins.len(), delegated.len());
    for (name, types) in &twins {
        let rest: String = types[1..].iter().map(|t| format!(", NULL::{t}")).collect();
        // Every shape PostgreSQL's planner turns into a NULL constant before Citus looks:
        // casts, folded expressions, a bound text parameter cast to uuid, a CTE, a VALUES row.
        let zero = "'00000000-0000-0000-0000-000000000000'::uuid";
        let calls = [
            format!("SELECT sortie.{name}(NULL::uuid{rest})"),
            format!("SELECT sortie.{name}($1{rest})"),
            format!("SELECT sortie.{name}($1::text::uuid{rest})"),
            format!("SELECT * FROM sortie.{name}(NULL{rest})"),
            format!("SELECT sortie.{name}(NULL::text::uuid{rest})"),
            format!("SELECT sortie.{name}(nullif({zero}, {zero}){rest})"),
            format!("SELECT sortie.{name}(CASE WHEN false THEN gen_random_uuid() END{rest})"),
            format!("WITH x AS (SELECT sortie.{name}(NULL{rest})) SELECT * FROM x"),
            format!("SELECT sortie.{name}(v.x{rest}) FROM (VALUES (NULL::uuid)) v(x)"),
        ];
        for sql in &calls {
            let fresh = db.connect().await;
            let no_text: Option<String> = None;
            let error = if sql.contains("$1::text") {
                fresh.query(sql.as_str(), &[&no_text]).await
            } else if sql.contains("$1") {
                fresh.query(sql.as_str(), &[&none]).await
            } else {
                fresh.query(sql.as_str(), &[]).await
            }
            .unwrap_err();
            let refused = error
                .as_db_error()
                .unwrap_or_else(|| panic!("{sql}: {error:?}"));
            assert_eq!(refused.code().code(), "SR005", "{sql}: {refused:?}");
            let one: i32 = fresh.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1, "{sql}: the session lives on");
        }
    }
    // A SQL function wrapping a twin, a wrapper of that and an operator inline into its call.
    db.client
        .batch_execute(
            "CREATE FUNCTION public.wrapped(u uuid) RETURNS jsonb LANGUAGE sql AS $$ SELECT sortie._get_campaign_delegated(u) $$; \
             CREATE FUNCTION public.wrapped_twice(u uuid) RETURNS jsonb LANGUAGE sql AS $$ SELECT public.wrapped(u) $$; \
             CREATE OPERATOR public.### (RIGHTARG = uuid, FUNCTION = public.wrapped)",
        )
        .await
        .unwrap();
    for sql in [
        "SELECT public.wrapped(NULL)",
        "SELECT public.wrapped_twice(NULL)",
        "SELECT OPERATOR(public.###) NULL::uuid",
    ] {
        let fresh = db.connect().await;
        let error = fresh.query(sql, &[]).await.unwrap_err();
        let refused = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{sql}: {error:?}"));
        assert_eq!(refused.code().code(), "SR005", "{sql}: {refused:?}");
    }
    let refused = db
        .call(
            "sortie._get_campaign_delegated(id => NULL, steps_limit => 1)",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code, "invalid_argument", "named: {refused:?}");
    let refused = db
        .call(
            "sortie._heartbeat_delegated(step_id => 1, campaign_id => $1, claim_token => NULL)",
            &[&none],
        )
        .await
        .unwrap_err();
    assert_eq!(
        refused.code, "invalid_argument",
        "named, out of order, bound: {refused:?}"
    );
    let error = db
        .client
        .batch_execute(
            "DO $$ DECLARE c uuid; BEGIN PERFORM sortie._get_campaign_delegated(c); END $$",
        )
        .await
        .unwrap_err();
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("SR005"),
        "PL/pgSQL: {error:?}"
    );
    // The same connection and a new one both still work.
    let one: i32 = db.client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    let (client, _rx) = db.connect_with_messages().await;
    assert_eq!(
        client
            .query_one("SELECT 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    db.finish().await;
}

/// A campaign runs through the rules on the distributed database: steps with a dependency,
/// claims, completions and a failure retried (through the delegated twins sortie's programs
/// call, so run on the worker: a group settled, dependents released, the campaign ended
/// there), notes, and the campaign's end.
#[tokio::test]
async fn a_campaign_runs_to_its_end_on_the_cluster() {
    let db = TestDb::distributed().await;
    let campaign = new_campaign(&db, "ship it").await;
    db.ok(
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"build\", \"key\": \"b\"}, \
           {\"step_type\": \"parallel_group\", \"action\": \"checks\", \"key\": \"c\", \"depends_on\": [\"b\"], \
            \"children\": [{\"action\": \"lint\"}, {\"action\": \"test\"}]}]')",
        &[&campaign],
    )
    .await;
    let mut done = Vec::new();
    let mut failed_once = false;
    loop {
        let claim = db
            .ok(
                "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
                &[&campaign],
            )
            .await;
        let Some(step) = claim["step_id"].as_i64() else {
            break;
        };
        let token = claim["claim_token"].as_str().unwrap().to_string();
        let action = claim["action"].as_str().unwrap().to_string();
        if action == "test" && !failed_once {
            failed_once = true;
            db.ok(
                "sortie._fail_step_delegated($1::text::uuid, $2, $3::text::uuid, 'flaky')",
                &[&campaign, &step, &token],
            )
            .await;
            db.client
                .batch_execute(&format!(
                    "UPDATE sortie.steps SET not_before = '-infinity' WHERE campaign_id = '{campaign}' AND id = {step}"
                ))
                .await
                .unwrap();
            continue;
        }
        db.ok(
            "sortie.add_note(campaign_id => $1::text::uuid, content => $2, step_id => $3, claim_token => $4::text::uuid)",
            &[&campaign, &format!("finding of {action}"), &step, &token],
        )
        .await;
        db.ok(
            "sortie._complete_step_delegated($1::text::uuid, $2, $3::text::uuid, $4)",
            &[&campaign, &step, &token, &format!("{action} ok")],
        )
        .await;
        done.push(action);
    }
    assert!(failed_once);
    assert_eq!(done[0], "build");
    assert_eq!(done.len(), 3, "{done:?}");
    let got = db
        .ok("sortie.get_campaign($1::text::uuid)", &[&campaign])
        .await;
    assert_eq!(got["status"], "done", "{got}");
    let notes = db
        .ok(
            "sortie.get_notes(campaign_id => $1::text::uuid)",
            &[&campaign],
        )
        .await;
    assert_eq!(notes["notes"].as_array().map(Vec::len), Some(3), "{notes}");
    db.finish().await;
}

/// Moving an existing database: a campaign running on one node before `distribute()` keeps
/// running after it, its rows moved to the workers (docs/scale-out.md, "Moving a database").
#[tokio::test]
async fn an_existing_database_moves_with_its_running_campaign() {
    let db = CitusDb::new().await;
    db.client
        .batch_execute("CREATE EXTENSION sortie CASCADE")
        .await
        .unwrap();
    let one = |sql: &'static str| {
        let client = &db.client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, Value>(0) }
    };
    let campaign = one("SELECT sortie.create_campaign(goal => 'before', planner => 'none')").await
        ["id"]
        .as_str()
        .unwrap()
        .to_string();
    db.client
        .execute(
            "SELECT sortie.add_steps($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}, {\"action\": \"b\", \"depends_on\": [\"a\"]}]')",
            &[&campaign],
        )
        .await
        .unwrap();
    let claim: Value = db
        .client
        .query_one(
            "SELECT sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0);
    // A consumer that has read the campaign so far: its positions move with the campaign.
    let before = one("SELECT sortie.get_updates(NULL, 'follower')").await;
    assert!(before["events_read"].as_i64().unwrap() >= 3, "{before}");
    db.client
        .batch_execute("SELECT sortie.distribute()")
        .await
        .unwrap();
    // The rows now live on the workers, none on the coordinator.
    let placed: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid = 'sortie.steps'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(placed, 1);
    // And the coordinator keeps no copy of them on disk: distribute() emptied its own tables
    // after Citus copied their rows into the shards.
    let kept: i64 = db
        .client
        .query_one(
            "SELECT sum(pg_relation_size(format('sortie.%I', t)::regclass))::bigint
               FROM unnest(sortie._distributed_tables() || sortie._reference_tables()) t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 0, "bytes left in the coordinator's own tables");
    let step = claim["step_id"].as_i64().unwrap();
    let token = claim["claim_token"].as_str().unwrap().to_string();
    db.client
        .execute(
            "SELECT sortie.complete_step($1, $2::text::uuid, 'a done')",
            &[&step, &token],
        )
        .await
        .unwrap();
    let next: Value = db
        .client
        .query_one(
            "SELECT sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(next["action"], "b", "{next}");
    db.client
        .execute(
            "SELECT sortie.complete_step($1, $2::text::uuid, 'b done')",
            &[
                &next["step_id"].as_i64().unwrap(),
                &next["claim_token"].as_str().unwrap(),
            ],
        )
        .await
        .unwrap();
    let got: Value = db
        .client
        .query_one("SELECT sortie.get_campaign($1::text::uuid)", &[&campaign])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got["status"], "done", "{got}");
    // The consumer goes on where it stopped: both completions once, the claim read before not again.
    let after = one("SELECT sortie.get_updates(NULL, 'follower')").await;
    let done: Vec<&str> = after["completed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(done, ["a", "b"], "{after}");
    assert_eq!(
        one("SELECT sortie.get_updates(NULL, 'follower')").await["events_read"],
        0
    );
    let problems: i64 = db
        .client
        .query_one("SELECT count(*) FROM sortie.check_invariants()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(problems, 0);
}

/// The way back (docs/scale-out.md, "Moving a database"): a dump of the coordinator's database,
/// restored into a single node without Citus (the citus extension's two entries left out of
/// the restore's list), holds every campaign, and they run on there with new ids that collide
/// with none of the workers' ranges.
#[tokio::test]
async fn a_distributed_database_dumps_and_restores_into_a_single_node() {
    let tool = |name: &str| format!("/usr/lib/postgresql/15/bin/{name}");
    let db = TestDb::distributed().await;
    let campaign = new_campaign(&db, "g").await;
    db.ok(
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"a\", \"key\": \"a\"}, {\"action\": \"b\", \"depends_on\": [\"a\"]}]')",
        &[&campaign],
    )
    .await;
    let (step, token) = claim_delegated(&db, &campaign).await;
    complete_delegated(&db, &campaign, step, &token).await;
    db.ok(
        "sortie._add_note_delegated($1::text::uuid, 'kept')",
        &[&campaign],
    )
    .await;

    let file = std::env::temp_dir().join(format!("sortie-citus-{}.dump", std::process::id()));
    let list = file.with_extension("list");
    let dumped = std::process::Command::new(tool("pg_dump"))
        .args([
            "-Fc",
            "-f",
            file.to_str().unwrap(),
            "-d",
            &db.connection_string(),
        ])
        .output()
        .unwrap();
    assert!(
        dumped.status.success(),
        "{}",
        String::from_utf8_lossy(&dumped.stderr)
    );
    let listed = std::process::Command::new(tool("pg_restore"))
        .args(["-l", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(listed.status.success());
    let kept: String = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|line| !line.contains(" citus"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&list, kept).unwrap();
    let target = sortie_tests::database_without_extension().await;
    let restored = std::process::Command::new(tool("pg_restore"))
        .args([
            "--exit-on-error",
            "-L",
            list.to_str().unwrap(),
            "-d",
            &target,
            file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&list);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );

    let (client, connection) = tokio_postgres::connect(&target, NoTls).await.unwrap();
    tokio::spawn(connection);
    let got = sortie_tests::call_on(&client, "sortie.get_campaign($1::text::uuid)", &[&campaign])
        .await
        .unwrap();
    assert_eq!(got["steps"].as_array().map(Vec::len), Some(2), "{got}");
    let notes = sortie_tests::call_on(&client, "sortie.get_notes($1::text::uuid)", &[&campaign])
        .await
        .unwrap();
    assert_eq!(notes["notes"][0]["content"], "kept", "{notes}");
    let added = sortie_tests::call_on(
        &client,
        "sortie.add_steps($1::text::uuid, '[{\"action\": \"after the restore\"}]')",
        &[&campaign],
    )
    .await
    .unwrap();
    let new_id = added["step_ids"][0].as_i64().unwrap();
    let ids: Vec<i64> = got["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["id"].as_i64())
        .collect();
    assert!(!ids.contains(&new_id), "{new_id} against {ids:?}");
    loop {
        let claimed = sortie_tests::call_on(
            &client,
            "sortie.claim_next(owner => 'w', campaign_id => $1::text::uuid)",
            &[&campaign],
        )
        .await
        .unwrap();
        let Some(step) = claimed["step_id"].as_i64() else {
            break;
        };
        sortie_tests::call_on(
            &client,
            "sortie.complete_step($1, $2::text::uuid, 'ok')",
            &[&step, &claimed["claim_token"].as_str().unwrap()],
        )
        .await
        .unwrap();
    }
    let status: String = client
        .query_one(
            "SELECT status FROM sortie.campaigns WHERE id = $1::text::uuid",
            &[&campaign],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "done");
    let problems = client
        .query("SELECT * FROM sortie.check_invariants()", &[])
        .await
        .unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    db.finish().await;
}
