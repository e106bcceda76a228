//! The upgrade path (issue 12): the first release, 0.1.0 (sql/upgrade/sortie--0.1.0.sql, frozen),
//! filled with a running campaign, updated with `ALTER EXTENSION sortie UPDATE`, has exactly the
//! schema of a fresh install of the current version, and the campaign runs on to its end.

use serde_json::json;
use sortie_tests::{call_on, database_without_extension};
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// The schema, one line per object, order-insensitive: columns (type, null, default; not their
/// position, since an upgrade appends), indexes, constraints, domains' constraints, triggers,
/// functions (signature, result, volatility, security, settings, body, grants), tables'
/// grants, and what belongs to the extension.
async fn schema(client: &Client) -> Vec<String> {
    let rows = client
        .query(
            "WITH s AS (SELECT c.relnamespace AS oid FROM pg_class c WHERE c.relname = 'campaigns'
                          AND c.relnamespace IN (SELECT n.oid FROM pg_namespace n
                                                  WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')))
             SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END || ' identity=' || a.attidentity::text
                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               FROM pg_class c JOIN s ON c.relnamespace = s.oid
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
               LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
              WHERE c.relkind IN ('r', 'p')
             UNION ALL
             SELECT 'index ' || pg_get_indexdef(i.indexrelid)
               FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN s ON c.relnamespace = s.oid
             UNION ALL
             SELECT 'constraint ' || c.relname || ' ' || co.conname || ' ' || pg_get_constraintdef(co.oid)
               FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN s ON c.relnamespace = s.oid
             UNION ALL
             SELECT 'domain ' || t.typname || ' ' || format_type(t.typbasetype, t.typtypmod) || ' '
                    || coalesce(pg_get_constraintdef(co.oid), '')
               FROM pg_type t JOIN s ON t.typnamespace = s.oid
               LEFT JOIN pg_constraint co ON co.contypid = t.oid
              WHERE t.typtype = 'd'
             UNION ALL
             SELECT 'trigger ' || pg_get_triggerdef(tg.oid)
               FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN s ON c.relnamespace = s.oid
              WHERE NOT tg.tgisinternal
             UNION ALL
             SELECT 'function ' || p.oid::regprocedure::text || ' (' || pg_get_function_arguments(p.oid)
                    || ') returns ' || pg_get_function_result(p.oid) || ' volatility=' || p.provolatile::text
                    || ' security_definer=' || p.prosecdef::text || ' strict=' || p.proisstrict::text
                    || ' parallel=' || p.proparallel::text
                    || ' config=' || coalesce(array_to_string(p.proconfig, ','), '')
                    || ' body=' || md5(p.prosrc)
                    || ' acl=' || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(p.proacl) x), 'default')
               FROM pg_proc p JOIN s ON p.pronamespace = s.oid
             UNION ALL
             SELECT 'table acl ' || c.relname || ' '
                    || coalesce((SELECT string_agg(x::text, ',' ORDER BY x::text) FROM unnest(c.relacl) x), 'default')
               FROM pg_class c JOIN s ON c.relnamespace = s.oid WHERE c.relkind IN ('r', 'p', 'S')
             UNION ALL
             SELECT 'dumped ' || x::regclass::text
               FROM pg_extension e CROSS JOIN LATERAL unnest(e.extconfig) x WHERE e.extname = 'sortie'
             UNION ALL
             SELECT 'member ' || pg_describe_object(d.classid, d.objid, 0)
               FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
              WHERE d.deptype = 'e'
             ORDER BY 1",
            &[],
        )
        .await
        .expect("read the schema");
    rows.iter().map(|r| r.get(0)).collect()
}

async fn claim(client: &Client, campaign: uuid::Uuid) -> serde_json::Value {
    call_on(
        client,
        "sortie.claim_next(owner => 'w', campaign_id => $1)",
        &[&campaign],
    )
    .await
    .expect("claim")
}

#[tokio::test]
async fn an_upgraded_first_release_equals_a_fresh_install_and_keeps_running() {
    let old_url = database_without_extension().await;
    let old = connect(&old_url).await;
    old.batch_execute("CREATE EXTENSION sortie VERSION '0.1.0' CASCADE")
        .await
        .expect("the first release installs (scripts/setup copies sql/upgrade/sortie--0.1.0.sql)");
    // A campaign in flight under 0.1.0: one step done, one running, one waiting for it.
    let created = call_on(
        &old,
        "sortie.create_campaign(goal => 'survive the upgrade', planner => 'none', steps => $1)",
        &[&json!([{"action": "first", "key": "a"}, {"action": "second", "key": "b", "depends_on": ["a"]},
                  {"action": "third", "depends_on": ["b"]}])],
    )
    .await
    .expect("create under 0.1.0");
    let campaign = uuid::Uuid::parse_str(created["id"].as_str().unwrap()).unwrap();
    let first = claim(&old, campaign).await;
    call_on(
        &old,
        "sortie.complete_step($1, $2::text::uuid, 'one')",
        &[
            &first["step_id"].as_i64().unwrap(),
            &first["claim_token"].as_str().unwrap(),
        ],
    )
    .await
    .expect("complete under 0.1.0");
    // Two consumers that have read everything so far, one of the campaign and one of all.
    for read in [
        "sortie.get_updates($1, 'watcher')",
        "sortie.get_updates(NULL, 'watcher') || jsonb_build_object('ignored', $1::uuid)",
    ] {
        call_on(&old, read, &[&campaign])
            .await
            .expect("get_updates under 0.1.0");
    }
    let second = claim(&old, campaign).await;

    old.batch_execute("ALTER EXTENSION sortie UPDATE")
        .await
        .expect("ALTER EXTENSION sortie UPDATE from 0.1.0");
    let version: String = old
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'sortie'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(version, "0.1.0");
    // Each consumer goes on where it stopped: the one claim made since, nothing again.
    for read in [
        "sortie.get_updates($1, 'watcher')",
        "sortie.get_updates(NULL, 'watcher') || jsonb_build_object('ignored', $1::uuid)",
    ] {
        let page = call_on(&old, read, &[&campaign])
            .await
            .expect("get_updates after the upgrade");
        assert_eq!(page["events_read"], 1, "{read}: {page}");
        assert_eq!(page["completed"], json!([]), "{read}: {page}");
    }

    let fresh_url = database_without_extension().await;
    let fresh = connect(&fresh_url).await;
    fresh
        .batch_execute("CREATE EXTENSION sortie CASCADE")
        .await
        .expect("a fresh install");
    let (upgraded, installed) = (schema(&old).await, schema(&fresh).await);
    let missing: Vec<&String> = installed.iter().filter(|l| !upgraded.contains(l)).collect();
    let extra: Vec<&String> = upgraded.iter().filter(|l| !installed.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the upgraded schema differs from a fresh install (run scripts/make-upgrade, and put \
         table changes in sql/upgrade/0.1.0--0.2.0.head.sql)\nonly in the fresh install:\n  {}\nonly after the upgrade:\n  {}",
        missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  "),
        extra.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n  ")
    );

    // The step claimed under 0.1.0 completes under the new version, and the campaign ends.
    call_on(
        &old,
        "sortie.complete_step($1, $2::text::uuid, 'two')",
        &[
            &second["step_id"].as_i64().unwrap(),
            &second["claim_token"].as_str().unwrap(),
        ],
    )
    .await
    .expect("the claim taken before the upgrade completes after it");
    let third = claim(&old, campaign).await;
    assert_eq!(third["action"], "third");
    let done = call_on(
        &old,
        "sortie.complete_step($1, $2::text::uuid, 'three')",
        &[
            &third["step_id"].as_i64().unwrap(),
            &third["claim_token"].as_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    assert_eq!(done["campaign_status"], "done");
    let problems: Vec<String> = old
        .query("SELECT * FROM sortie.check_invariants()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
}
