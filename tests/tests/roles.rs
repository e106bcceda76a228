//! The trust boundary in the database (SPEC §15): the four roles, what each may call, and a
//! worker bound by its claim. Each test logs in as a LOGIN role holding one sortie role, the
//! way a deployment would, beside the harness's superuser.

use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::mcp::McpClient;
use sortie_tests::{call_on, DbError, TestDb};
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

static NEXT_LOGIN: AtomicUsize = AtomicUsize::new(0);

/// A new LOGIN role that is a member of `role` only; returns its connection string and a
/// connection. Roles belong to the cluster, so each name is unique to this test process.
async fn login(db: &TestDb, role: &str) -> (String, Client) {
    let name = format!(
        "{role}_login_{}_{}",
        std::process::id(),
        NEXT_LOGIN.fetch_add(1, Ordering::SeqCst)
    );
    db.client
        .batch_execute(&format!("CREATE ROLE {name} LOGIN IN ROLE {role}"))
        .await
        .expect("create a login");
    let connection_string = db
        .connection_string()
        .replace("user=postgres", &format!("user={name}"));
    assert!(connection_string.contains(&name), "{connection_string}");
    let (client, connection) = tokio_postgres::connect(&connection_string, NoTls)
        .await
        .expect("connect as the login");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    (connection_string, client)
}

async fn refused(
    client: &Client,
    expr: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> DbError {
    match call_on(client, expr, params).await {
        Ok(v) => panic!("{expr} was allowed: {v}"),
        Err(e) => e,
    }
}

/// A statement the login must not run: refused with insufficient_privilege (42501).
async fn denied(client: &Client, sql: &str) {
    let error = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("{sql} was allowed"));
    assert_eq!(
        error.as_db_error().map(|d| d.code().code()),
        Some("42501"),
        "{sql}: {error}"
    );
}

/// Direct table access and internal helpers: refused for every role.
async fn no_tables_no_helpers(client: &Client) {
    denied(client, "SELECT count(*) FROM sortie.steps").await;
    denied(client, "SELECT count(*) FROM sortie.notes").await;
    denied(
        client,
        "UPDATE sortie.steps SET status = 'done', output = 'forged'",
    )
    .await;
    denied(
        client,
        "INSERT INTO sortie.campaigns (goal) VALUES ('smuggled')",
    )
    .await;
    denied(client, "DELETE FROM sortie.events").await;
    denied(client, "SELECT sortie._raise('not_found', 'x')").await;
    denied(client, "SELECT sortie._lock_campaign(gen_random_uuid())").await;
    denied(client, "SELECT sortie._expand_steps('[]')").await;
    denied(
        client,
        "SELECT sortie._skip_cascade(gen_random_uuid(), '{}', 'abort', 'x')",
    )
    .await;
    denied(client, "SELECT sortie._worker_confined()").await;
}

#[tokio::test]
async fn every_function_is_placed_in_the_grant_table_and_roles_hold_no_table_privileges() {
    let db = TestDb::new().await;
    let names =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    // Every function with a fixed search_path (the API and the helpers that need one) is in
    // roles.sql's table, and every name there exists.
    let unplaced = names(
        db.client
            .query(
                "SELECT DISTINCT p.proname::text FROM pg_proc p
                  WHERE p.pronamespace = 'sortie'::regnamespace AND p.proconfig IS NOT NULL
                    AND p.proname NOT IN (SELECT name FROM sortie._api_grants()) ORDER BY 1",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(
        unplaced.is_empty(),
        "not in roles.sql's table: {unplaced:?}"
    );
    let missing = names(
        db.client
            .query(
                "SELECT name FROM sortie._api_grants()
                  WHERE name NOT IN (SELECT proname FROM pg_proc WHERE pronamespace = 'sortie'::regnamespace)",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(
        missing.is_empty(),
        "in roles.sql's table but gone: {missing:?}"
    );
    // Nothing of the extension is executable by PUBLIC; what a role may execute is exactly
    // the table, and runs as its owner.
    let public = names(
        db.client
            .query(
                "SELECT p.oid::regprocedure::text FROM pg_proc p
                  WHERE p.pronamespace = 'sortie'::regnamespace
                    AND has_function_privilege('public', p.oid, 'EXECUTE')",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(public.is_empty(), "executable by PUBLIC: {public:?}");
    let wrong = names(
        db.client
            .query(
                "SELECT r.rolname || ' ' || p.proname FROM pg_proc p
                  CROSS JOIN pg_roles r
                  LEFT JOIN sortie._api_grants() g ON g.name = p.proname
                  WHERE p.pronamespace = 'sortie'::regnamespace
                    AND r.rolname IN ('sortie_coordinator', 'sortie_worker', 'sortie_runner', 'sortie_reader')
                    AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
                        IS DISTINCT FROM (r.rolname = ANY (coalesce(g.roles, '{}')))
                  ORDER BY 1",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(wrong.is_empty(), "grants differ from the table: {wrong:?}");
    let invoker = names(
        db.client
            .query(
                "SELECT p.proname::text FROM pg_proc p JOIN sortie._api_grants() g ON g.name = p.proname
                  WHERE p.pronamespace = 'sortie'::regnamespace AND cardinality(g.roles) > 0
                    AND p.proconfig IS NOT NULL AND NOT p.prosecdef",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(
        invoker.is_empty(),
        "API functions not SECURITY DEFINER: {invoker:?}"
    );
    let tables = names(
        db.client
            .query(
                "SELECT r.rolname || ' ' || c.relname FROM pg_class c CROSS JOIN pg_roles r
                  WHERE c.relnamespace = 'sortie'::regnamespace AND c.relkind IN ('r', 'v', 'S', 'p')
                    AND r.rolname IN ('sortie_coordinator', 'sortie_worker', 'sortie_runner', 'sortie_reader')
                    AND (has_table_privilege(r.oid, c.oid, 'SELECT') OR has_table_privilege(r.oid, c.oid, 'INSERT')
                         OR has_table_privilege(r.oid, c.oid, 'UPDATE') OR has_table_privilege(r.oid, c.oid, 'DELETE'))",
                &[],
            )
            .await
            .unwrap(),
    );
    assert!(tables.is_empty(), "table privileges: {tables:?}");
    // pgvector's own functions are left as pgvector made them.
    let vector: bool = db
        .client
        .query_one(
            "SELECT has_function_privilege('public', 'vector_dims(vector)', 'EXECUTE')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(vector, "pgvector's functions stay executable");
    db.finish().await;
}

#[tokio::test]
async fn a_coordinator_login_runs_campaigns_but_not_workers_runners_or_tables() {
    let db = TestDb::new().await;
    let (_, coordinator) = login(&db, "sortie_coordinator").await;
    let created = call_on(
        &coordinator,
        "sortie.create_campaign(goal => 'as a coordinator', planner => 'none')",
        &[],
    )
    .await
    .expect("create_campaign");
    let c = Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    let steps = json!([{"action": "a"}]);
    call_on(&coordinator, "sortie.add_steps($1, $2)", &[&c, &steps])
        .await
        .expect("add_steps");
    call_on(&coordinator, "sortie.get_campaign($1)", &[&c])
        .await
        .expect("get_campaign");
    call_on(&coordinator, "sortie.list_campaigns()", &[])
        .await
        .expect("list_campaigns");
    call_on(&coordinator, "sortie.get_updates($1)", &[&c])
        .await
        .expect("get_updates");
    call_on(&coordinator, "sortie.pause_campaign($1)", &[&c])
        .await
        .expect("pause_campaign");
    // The runner's and the worker's calls are not the coordinator's.
    let e = refused(&coordinator, "to_jsonb(sortie.reap_leases())", &[]).await;
    assert_eq!(e.sqlstate, "42501", "{e}");
    let token = Uuid::new_v4();
    let e = refused(
        &coordinator,
        "sortie.complete_step(1, $1, 'forged')",
        &[&token],
    )
    .await;
    assert_eq!(e.sqlstate, "42501", "{e}");
    no_tables_no_helpers(&coordinator).await;
    db.ok("sortie.cancel_campaign($1)", &[&c]).await;
    db.finish().await;
}

#[tokio::test]
async fn a_runner_login_ticks_claims_and_completes_but_creates_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add_ids(&db, c, json!([{"action": "run me"}])).await;
    let (_, runner) = login(&db, "sortie_runner").await;
    for call in [
        "sortie.reset_zombies()",
        "to_jsonb(sortie.enforce_budgets())",
        "sortie.health()",
        "sortie.dispatch_blockers(4)",
        "to_jsonb(sortie.listen_poll_window())",
    ] {
        call_on(&runner, call, &[])
            .await
            .unwrap_or_else(|e| panic!("{call}: {e}"));
    }
    runner
        .query_one("SELECT sortie.reap_leases()", &[])
        .await
        .expect("reap_leases");
    let claimed = call_on(
        &runner,
        "sortie.claim_next(owner => 'runner', campaign_id => $1)",
        &[&c],
    )
    .await
    .expect("claim_next");
    let claim = parse_claim(&claimed).expect("a claim");
    call_on(&runner, "sortie.get_my_context($1)", &[&claim.step_id])
        .await
        .expect("get_my_context");
    call_on(
        &runner,
        "sortie.complete_step($1, $2, 'done by the runner')",
        &[&claim.step_id, &claim.token],
    )
    .await
    .expect("complete_step");
    assert_eq!(status(&db, claim.step_id).await, "done");
    let e = refused(&runner, "sortie.create_campaign(goal => 'no')", &[]).await;
    assert_eq!(e.sqlstate, "42501", "{e}");
    let e = refused(&runner, "sortie.cancel_campaign($1)", &[&c]).await;
    assert_eq!(e.sqlstate, "42501", "{e}");
    no_tables_no_helpers(&runner).await;
    db.finish().await;
}

#[tokio::test]
async fn a_reader_login_reads_every_campaign_and_changes_nothing() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "read me"}])).await;
    let step = claim(&db, c).await.unwrap();
    complete(&db, &step, "the output").await;
    db.ok(
        "sortie.add_note(campaign_id => $1, content => 'a finding about readers')",
        &[&c],
    )
    .await;
    let (_, reader) = login(&db, "sortie_reader").await;
    for (call, params) in [
        ("sortie.list_campaigns()", vec![]),
        (
            "sortie.get_campaign($1)",
            vec![&c as &(dyn tokio_postgres::types::ToSql + Sync)],
        ),
        ("sortie.events(campaign_id => $1)", vec![&c as _]),
        ("sortie.campaign_graph($1)", vec![&c as _]),
        ("sortie.activity()", vec![]),
        ("sortie.get_notes($1)", vec![&c as _]),
    ] {
        call_on(&reader, call, &params)
            .await
            .unwrap_or_else(|e| panic!("{call}: {e}"));
    }
    let output = call_on(&reader, "sortie.read_step_output($1)", &[&ids[0]])
        .await
        .expect("read_step_output");
    assert_eq!(output["content"], "the output", "{output}");
    for call in [
        "sortie.cancel_campaign($1)",
        "sortie.pause_campaign($1)",
        "sortie.add_note(campaign_id => $1, content => 'x')",
        "sortie.claim_next(owner => 'r', campaign_id => $1)",
    ] {
        let e = refused(&reader, call, &[&c]).await;
        assert_eq!(e.sqlstate, "42501", "{call}: {e}");
    }
    no_tables_no_helpers(&reader).await;
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

/// Two campaigns, each with a claimed step and a private note.
struct TwoCampaigns {
    a: Uuid,
    b: Uuid,
    a_claim: Claim,
    b_claim: Claim,
    b_waiting: i64,
    a_waiting: i64,
}

async fn two_campaigns(db: &TestDb) -> TwoCampaigns {
    let a = campaign(db, "none").await;
    let b = campaign(db, "none").await;
    let a_ids = add_ids(
        db,
        a,
        json!([{"action": "a1", "input": "input of a"}, {"action": "a2"}]),
    )
    .await;
    let b_ids = add_ids(
        db,
        b,
        json!([{"action": "b1", "input": "secret input of b"}, {"action": "b2"}]),
    )
    .await;
    let a_claim = claim(db, a).await.unwrap();
    let b_claim = claim(db, b).await.unwrap();
    db.ok(
        "sortie.add_note(campaign_id => $1, content => 'private zebra finding of campaign b')",
        &[&b],
    )
    .await;
    db.ok(
        "sortie.add_note(campaign_id => $1, content => 'zebra finding of campaign a')",
        &[&a],
    )
    .await;
    TwoCampaigns {
        a,
        b,
        a_waiting: a_ids[1],
        b_waiting: b_ids[1],
        a_claim,
        b_claim,
    }
}

#[tokio::test]
async fn a_worker_login_with_a_claim_of_campaign_a_reaches_nothing_of_campaign_b_by_sql() {
    let db = TestDb::new().await;
    let t = two_campaigns(&db).await;
    let (_, worker) = login(&db, "sortie_worker").await;
    let token = t.a_claim.token;
    let step = t.a_claim.step_id;

    // Its own step, by its claim.
    let context = call_on(
        &worker,
        "sortie.get_my_context($1, claim_token => $2)",
        &[&step, &token],
    )
    .await
    .expect("get_my_context");
    assert_eq!(context["campaign"]["id"], t.a.to_string());
    let notes = call_on(
        &worker,
        "sortie.get_notes($1, claim_token => $2)",
        &[&t.a, &token],
    )
    .await
    .expect("get_notes");
    assert_eq!(notes["notes"].as_array().unwrap().len(), 1);
    let hits = call_on(
        &worker,
        "sortie.search_notes('zebra finding', claim_token => $1)",
        &[&token],
    )
    .await
    .expect("search_notes");
    let texts = hits.to_string();
    assert!(
        texts.contains("campaign a") && !texts.contains("campaign b"),
        "{hits}"
    );
    call_on(
        &worker,
        "sortie.add_note($1, 'mine', step_id => $2, claim_token => $3)",
        &[&t.a, &step, &token],
    )
    .await
    .expect("add_note");
    call_on(&worker, "sortie.heartbeat($1, $2)", &[&step, &token])
        .await
        .expect("heartbeat");

    // Nothing without the claim.
    for (call, params) in [
        (
            "sortie.get_my_context($1)",
            vec![&step as &(dyn tokio_postgres::types::ToSql + Sync)],
        ),
        ("sortie.get_notes($1)", vec![&t.a as _]),
        ("sortie.search_notes('zebra')", vec![]),
        ("sortie.read_step_output($1)", vec![&step as _]),
        ("sortie.claim_next(owner => 'agent')", vec![]),
        ("sortie.add_note($1, 'x')", vec![&t.a as _]),
    ] {
        let e = refused(&worker, call, &params).await;
        assert_eq!(e.code, "forbidden", "{call}: {e}");
    }

    // Nothing of campaign B with A's claim.
    let e = refused(
        &worker,
        "sortie.get_my_context($1, claim_token => $2)",
        &[&t.b_claim.step_id, &token],
    )
    .await;
    assert_eq!(e.code, "stale_claim", "{e}");
    let e = refused(
        &worker,
        "sortie.read_step_output($1, field => 'input', claim_token => $2)",
        &[&t.b_claim.step_id, &token],
    )
    .await;
    assert_eq!(e.code, "not_found", "{e}");
    for (call, params) in [
        (
            "sortie.get_notes($1, claim_token => $2)",
            vec![
                &t.b as &(dyn tokio_postgres::types::ToSql + Sync),
                &token as _,
            ],
        ),
        (
            "sortie.search_notes('zebra', campaign_id => $1, claim_token => $2)",
            vec![&t.b as _, &token as _],
        ),
        (
            "sortie.add_note($1, 'planted', claim_token => $2)",
            vec![&t.b as _, &token as _],
        ),
        (
            "sortie.claim_next(owner => 'agent', campaign_id => $1, claim_token => $2)",
            vec![&t.b as _, &token as _],
        ),
    ] {
        let e = refused(&worker, call, &params).await;
        assert_eq!(e.code, "forbidden", "{call}: {e}");
    }
    for call in [
        "sortie.complete_step($1, $2, 'forged')",
        "sortie.fail_step($1, $2, 'forged')",
        "sortie.heartbeat($1, $2)",
        "sortie.request_input($1, $2, 'question?')",
    ] {
        let e = refused(&worker, call, &[&t.b_claim.step_id, &token]).await;
        assert_eq!(e.code, "stale_claim", "{call}: {e}");
    }
    let e = refused(
        &worker,
        "sortie.abort_branch($1, $2, $3, 'x', 'y')",
        &[&t.b_waiting, &token, &step],
    )
    .await;
    assert_eq!(e.code, "not_found", "{e}");
    // Direct SQL is refused outright.
    no_tables_no_helpers(&worker).await;
    denied(&worker, "SELECT sortie.claim_step(1, 'agent')").await;
    denied(&worker, "SELECT sortie.get_campaign(gen_random_uuid())").await;
    denied(&worker, "SELECT sortie.create_campaign('g')").await;

    // A claim within its own campaign binds it to that step.
    let next = call_on(
        &worker,
        "sortie.claim_next(owner => 'agent', claim_token => $1)",
        &[&token],
    )
    .await
    .expect("claim_next within campaign a");
    assert_eq!(next["step_id"], t.a_waiting, "{next}");
    assert_eq!(next["campaign_id"], t.a.to_string());
    // B is untouched: its step still held by its own claim, its waiting step unclaimed, no note planted.
    assert_eq!(status(&db, t.b_claim.step_id).await, "running");
    assert_eq!(status(&db, t.b_waiting).await, "pending");
    let b_notes = db.ok("sortie.get_notes($1)", &[&t.b]).await;
    assert_eq!(b_notes["notes"].as_array().unwrap().len(), 1);
    // The worker finishes its step by its claim; once finished, the claim reads nothing more.
    call_on(
        &worker,
        "sortie.complete_step($1, $2, 'ok')",
        &[&step, &token],
    )
    .await
    .expect("complete_step");
    let e = refused(
        &worker,
        "sortie.get_notes($1, claim_token => $2)",
        &[&t.a, &token],
    )
    .await;
    assert_eq!(e.code, "stale_claim", "{e}");
    db.ok("sortie.cancel_campaign($1)", &[&t.a]).await;
    db.ok("sortie.cancel_campaign($1)", &[&t.b]).await;
    db.finish().await;
}

/// The worker tools of sortie-mcp, run with a worker-only login and the session of a step of
/// campaign A, as an agent would have them.
#[tokio::test]
async fn a_worker_session_of_campaign_a_reaches_nothing_of_campaign_b_by_any_tool() {
    let db = TestDb::new().await;
    let t = two_campaigns(&db).await;
    let (url, _) = login(&db, "sortie_worker").await;
    let session = McpClient::start_with(vec![
        ("DATABASE_URL".into(), url),
        ("SORTIE_ROLE".into(), "worker".into()),
        ("SORTIE_STEP_ID".into(), t.a_claim.step_id.to_string()),
        ("SORTIE_CAMPAIGN_ID".into(), t.a.to_string()),
        ("SORTIE_CLAIM_TOKEN".into(), t.a_claim.token.to_string()),
    ])
    .await;
    let context = session.ok("get_my_context", json!({})).await;
    assert_eq!(context["campaign"]["id"], t.a.to_string());
    let hits = session
        .ok("search_notes", json!({"query": "zebra finding"}))
        .await;
    assert!(!hits.to_string().contains("campaign b"), "{hits}");
    session
        .ok("add_note", json!({"content": "a worker's finding"}))
        .await;

    let b_step = t.b_claim.step_id;
    let cases: Vec<(&str, Value, &str)> = vec![
        ("get_my_context", json!({"step_id": b_step}), "stale_claim"),
        (
            "read_step_output",
            json!({"step_id": b_step, "field": "input"}),
            "not_found",
        ),
        ("get_notes", json!({"campaign_id": t.b}), "forbidden"),
        (
            "search_notes",
            json!({"query": "zebra", "campaign_id": t.b}),
            "forbidden",
        ),
        (
            "add_note",
            json!({"campaign_id": t.b, "content": "planted"}),
            "forbidden",
        ),
        ("claim_next", json!({"campaign_id": t.b}), "forbidden"),
        ("heartbeat", json!({"step_id": b_step}), "stale_claim"),
        (
            "complete_step",
            json!({"step_id": b_step, "summary": "forged"}),
            "stale_claim",
        ),
        (
            "fail_step",
            json!({"step_id": b_step, "error": "forged"}),
            "stale_claim",
        ),
        (
            "request_input",
            json!({"step_id": b_step, "question": "?"}),
            "stale_claim",
        ),
        (
            "abort_branch",
            json!({"target_id": t.b_waiting, "output": "x", "reason": "y"}),
            "not_found",
        ),
    ];
    for (tool, args, code) in cases {
        let outcome = session.call(tool, args.clone()).await;
        assert!(
            outcome.is_error,
            "{tool} {args} was allowed: {}",
            outcome.text
        );
        assert_eq!(outcome.code(), code, "{tool} {args}: {}", outcome.text);
    }
    // Nor through resources or prompts: the campaign views are not a worker's.
    for uri in [
        "sortie://campaigns".to_string(),
        format!("sortie://campaigns/{}", t.b),
        format!("sortie://steps/{b_step}/output"),
    ] {
        let read = session
            .service
            .read_resource(rmcp::model::ReadResourceRequestParams::new(uri.clone()))
            .await;
        assert!(read.is_err(), "{uri} was readable");
    }
    let mut arguments = serde_json::Map::new();
    arguments.insert("step_id".into(), json!(b_step.to_string()));
    let briefing = session
        .service
        .get_prompt(
            rmcp::model::GetPromptRequestParams::new("worker_briefing").with_arguments(arguments),
        )
        .await;
    assert!(briefing.is_err(), "another step's briefing");
    assert_eq!(status(&db, b_step).await, "running");
    assert_eq!(status(&db, t.b_waiting).await, "pending");
    let b_notes = db.ok("sortie.get_notes($1)", &[&t.b]).await;
    assert_eq!(b_notes["notes"].as_array().unwrap().len(), 1);
    session
        .ok("complete_step", json!({"summary": "done"}))
        .await;
    assert_eq!(status(&db, t.a_claim.step_id).await, "done");
    session.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&t.a]).await;
    db.ok("sortie.cancel_campaign($1)", &[&t.b]).await;
    db.finish().await;
}

/// A pull-mode worker session without a step claims one and is then bound to it.
#[tokio::test]
async fn a_worker_session_without_a_step_is_bound_to_what_it_claims() {
    let db = TestDb::new().await;
    let t = two_campaigns(&db).await;
    let session = McpClient::start(&db, &[("SORTIE_ROLE", "worker".into())]).await;
    let outcome = session.call("get_notes", json!({"campaign_id": t.b})).await;
    assert_eq!(outcome.code(), "forbidden", "{}", outcome.text);
    let claimed = session.ok("claim_next", json!({"campaign_id": t.a})).await;
    assert_eq!(claimed["step_id"], t.a_waiting);
    let context = session.ok("get_my_context", json!({})).await;
    assert_eq!(context["step"]["id"], t.a_waiting);
    let outcome = session.call("get_notes", json!({"campaign_id": t.b})).await;
    assert_eq!(outcome.code(), "forbidden", "{}", outcome.text);
    session
        .ok("complete_step", json!({"summary": "pulled"}))
        .await;
    assert_eq!(status(&db, t.a_waiting).await, "done");
    session.stop().await;
    db.ok("sortie.cancel_campaign($1)", &[&t.a]).await;
    db.ok("sortie.cancel_campaign($1)", &[&t.b]).await;
    let _ = &t.a_claim;
    db.finish().await;
}

/// SPEC §15: a call the login holds no role for answers `forbidden`, through the MCP server
/// too; the shipped server works with a coordinator login.
#[tokio::test]
async fn a_missing_privilege_is_forbidden_and_a_coordinator_login_serves_the_coordinator_tools() {
    let db = TestDb::new().await;
    let (reader_url, _) = login(&db, "sortie_reader").await;
    let reader = McpClient::start_with(vec![
        ("DATABASE_URL".into(), reader_url),
        ("SORTIE_ROLE".into(), "coordinator".into()),
    ])
    .await;
    reader.ok("list_campaigns", json!({})).await;
    let outcome = reader
        .call(
            "create_campaign",
            json!({"goal": "not allowed", "planner": "none"}),
        )
        .await;
    assert!(outcome.is_error);
    assert_eq!(outcome.code(), "forbidden", "{}", outcome.text);
    assert_eq!(
        db.client
            .query_one("SELECT count(*) FROM sortie.campaigns", &[])
            .await
            .unwrap()
            .get::<_, i64>(0),
        0
    );
    reader.stop().await;
    let (coordinator_url, _) = login(&db, "sortie_coordinator").await;
    let coordinator = McpClient::start_with(vec![
        ("DATABASE_URL".into(), coordinator_url),
        ("SORTIE_ROLE".into(), "coordinator".into()),
    ])
    .await;
    let created = coordinator
        .ok(
            "create_campaign",
            json!({"goal": "allowed", "planner": "none"}),
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    coordinator
        .ok(
            "add_steps",
            json!({"campaign_id": id, "steps": [{"action": "x"}]}),
        )
        .await;
    coordinator.ok("get_campaign", json!({"id": id})).await;
    coordinator.ok("cancel_campaign", json!({"id": id})).await;
    coordinator.stop().await;
    db.finish().await;
}

/// SPEC §15: the shipped runner works with a login that holds only sortie_runner.
#[tokio::test]
async fn sortie_runner_runs_a_tick_with_a_runner_login() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let ids = add_ids(&db, c, json!([{"action": "first"}, {"action": "second"}])).await;
    let (url, _) = login(&db, "sortie_runner").await;
    let agent = sortie_tests::script(
        "runner-login-agent.sh",
        "#!/bin/sh\ncat >/dev/null\necho \"did $SORTIE_STEP_ID\"\n",
    );
    let mut runner = sortie_tests::runner_process(
        &db,
        &["--once"],
        &[
            ("DATABASE_URL", url),
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
    );
    let exit = tokio::task::spawn_blocking(move || runner.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        exit.success(),
        "sortie-runner --once with a runner login: {exit}"
    );
    for id in ids {
        assert_eq!(status(&db, id).await, "done");
        assert_eq!(step_field(&db, id, "output").await, format!("did {id}"));
    }
    assert_eq!(campaign_status(&db, c).await, "done");
    db.finish().await;
}

/// Every function a role may call, called with each argument it requires (no default) left
/// NULL and its optional ones at their defaults, refuses with `invalid_argument` — never
/// `not_found` of an empty id, an internal error, or an answer. Run on Citus too, where a NULL
/// campaign reaching a delegated twin would otherwise crash the node (citusdata/citus#7242).
#[tokio::test]
async fn every_function_refuses_a_missing_required_argument_as_invalid_argument() {
    let db = TestDb::new().await;
    // Each API function with a required argument: name, argument types and names, defaults.
    let functions: Vec<(String, Vec<String>, Vec<String>, i16)> = db
        .client
        .query(
            "SELECT p.proname::text, array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t)::text[],
                    coalesce(p.proargnames, '{}')::text[], p.pronargdefaults
               FROM pg_proc p JOIN sortie._api_grants() g ON g.name = p.proname
              WHERE p.pronamespace = 'sortie'::regnamespace AND cardinality(g.roles) > 0
                AND p.pronargs > p.pronargdefaults
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert!(functions.len() > 40, "{functions:?}");
    // Functions whose required argument may be NULL by design: can_spawn answers false for no
    // step (sortie-mcp lists spawn_and_continue by it), claim_session says no session.
    let answers_null = ["can_spawn", "claim_session"];
    let mut wrong = Vec::new();
    for (name, types, _, defaults) in &functions {
        if answers_null.contains(&name.as_str()) {
            continue;
        }
        let required = types.len() - *defaults as usize;
        let args: Vec<String> = types[..required]
            .iter()
            .map(|t| format!("NULL::{t}"))
            .collect();
        let sql = format!("sortie.{name}({})", args.join(", "));
        match db.call(&sql, &[]).await {
            Err(e) if e.code == "invalid_argument" => {}
            other => wrong.push(format!("{sql}: {other:?}")),
        }
    }
    // Each required argument NULL in turn, the others real: a campaign, its running step and
    // the step's claim token. Whatever else the call says, it never looks a NULL up as an id.
    let campaign = campaign(&db, "none").await;
    add(&db, campaign, json!([{"action": "a"}, {"action": "b"}])).await;
    let claimed = claim(&db, campaign).await.unwrap();
    let (step, token) = (claimed.step_id, claimed.token);
    let value = |name: &str, ty: &str| -> String {
        match ty {
            "uuid" if name.contains("token") => format!("'{token}'::uuid"),
            "uuid" => format!("'{campaign}'::uuid"),
            "bigint" => step.to_string(),
            "integer" | "smallint" => "1".into(),
            "double precision" => "1".into(),
            "boolean" => "true".into(),
            "text[]" => "'{}'::text[]".into(),
            "jsonb" if name == "definition" => "'{\"steps\": [{\"name\": \"A\", \"instructions\": \"do\", \"transitions\": {}}]}'::jsonb".into(),
            "jsonb" if name == "steps" || name == "subtasks" || name == "items" => "'[{\"action\": \"x\"}]'::jsonb".into(),
            "jsonb" => "'{}'::jsonb".into(),
            "interval" => "'1 minute'::interval".into(),
            other => format!("'x'::{other}"),
        }
    };
    for (function, types, names, defaults) in &functions {
        if answers_null.contains(&function.as_str()) {
            continue;
        }
        let required = types.len() - *defaults as usize;
        for missing in 0..required {
            let args: Vec<String> = (0..required)
                .map(|i| {
                    let name = names.get(i).map(String::as_str).unwrap_or("");
                    if i == missing {
                        format!("NULL::{}", types[i])
                    } else {
                        value(name, &types[i])
                    }
                })
                .collect();
            let sql = format!("sortie.{function}({})", args.join(", "));
            match db.call(&sql, &[]).await {
                Err(e) if e.code == "invalid_argument" => {}
                other => wrong.push(format!("{sql}: {other:?}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    db.finish().await;
}
