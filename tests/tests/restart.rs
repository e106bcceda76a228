//! SPEC §11: PostgreSQL restarted under the runner and the MCP server — both reconnect and lose
//! nothing. A test binary of its own, because the restart cuts off every session of its cluster.

use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::mcp::McpClient;
use sortie_tests::programs::runner_process_logged;
use sortie_tests::{script, wait_for, TestDb};

#[tokio::test]
async fn a_restart_under_the_runner_and_the_mcp_server_loses_nothing() {
    let mut db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    // Three chains of four: when the server goes away, steps are running and more are pending.
    let steps: Vec<Value> = (0..3)
        .flat_map(|chain| {
            (0..4).map(move |k| {
                let mut step = json!({"action": format!("chain {chain} step {k}"), "key": format!("c{chain}s{k}")});
                if k > 0 {
                    step["depends_on"] = json!([format!("c{chain}s{}", k - 1)]);
                }
                step
            })
        })
        .collect();
    let ids = add_ids(&db, c, Value::Array(steps)).await;

    // Each dispatch is logged. The first steps of chains 1 and 2 run long, so their agents
    // finish while the server is down; the other steps are quick.
    let log =
        std::env::temp_dir().join(format!("sortie-restart-dispatches-{}", std::process::id()));
    let agent = script(
        "restart-agent.sh",
        &format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$SORTIE_STEP_ID\" >> {log}\n\
             case \"$SORTIE_STEP_ID\" in {} | {}) sleep 3 ;; *) sleep 0.3 ;; esac\n\
             echo \"output of $SORTIE_STEP_ID\"\n",
            ids[4],
            ids[8],
            log = log.display()
        ),
    );
    let mcp = McpClient::start(&db, &[]).await;
    assert_eq!(
        mcp.ok("get_campaign", json!({"id": c})).await["status"],
        "active"
    );

    // First outage: a claim made and not yet handed to an agent. The notes table is locked
    // before the runner starts, so its first claim commits and then reading that step's context
    // (which reads notes) waits; the server goes down under it.
    let locker = db.connect().await;
    locker
        .batch_execute("BEGIN; LOCK sortie.notes IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let runner_log =
        std::env::temp_dir().join(format!("sortie-restart-runner-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&runner_log);
    let mut runner = runner_process_logged(
        &db,
        &[],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
        &runner_log,
    );
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%get_my_context%'";
    wait_for(Duration::from_secs(20), || async {
        count(&db, waiting).await > 0
    })
    .await;
    assert!(
        count(&db, waiting).await > 0,
        "the runner waits for a claimed step's context"
    );
    db.restart_server(Duration::from_millis(1500)).await;

    // Second outage: two agents still running, so their outputs arrive while the server is down.
    let dispatched = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    wait_for(Duration::from_secs(20), || async { dispatched() >= 3 }).await;
    db.restart_server(Duration::from_millis(3000)).await;

    // The MCP server's next call works on a new connection.
    assert_eq!(
        mcp.ok("get_campaign", json!({"id": c})).await["status"],
        "active"
    );
    // What this test holds the runner to is that nothing is lost, not how soon it finishes:
    // 9 s here as a rule, but a lost wake-up leaves each remaining step to the 5 s safety tick.
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(60), || async {
        campaign_status(&db, c).await != "active"
    })
    .await;
    let took = started.elapsed();
    sortie_tests::terminate(&runner);
    runner.wait().unwrap();
    mcp.stop().await;
    let runner_said = std::fs::read_to_string(&runner_log).unwrap_or_default();
    let _ = std::fs::remove_file(&runner_log);
    if took > Duration::from_secs(20) {
        eprintln!(
            "the campaign took {took:?} to finish after the second restart; the runner's log:\n{runner_said}"
        );
    }

    assert_eq!(
        campaign_status(&db, c).await,
        "done",
        "the runner's log:\n{runner_said}"
    );
    let mut dispatched: Vec<i64> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    dispatched.sort();
    assert_eq!(dispatched, ids, "every step dispatched exactly once");
    for id in &ids {
        assert_eq!(
            step_field(&db, *id, "output").await,
            format!("output of {id}")
        );
        assert_eq!(
            step_field(&db, *id, "attempts").await,
            0,
            "step {id} lost an attempt"
        );
    }
    db.finish().await;
}
