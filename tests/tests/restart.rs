//! SPEC §11: PostgreSQL restarted under the runner and the MCP server — both reconnect and lose
//! nothing. A test binary of its own, because the restart cuts off every session of its cluster.

use std::time::Duration;

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::mcp::McpClient;
use sortie_tests::{runner_process, script, TestDb};

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

    // Each dispatch is logged; the agent's output is finished while the server is down.
    let log =
        std::env::temp_dir().join(format!("sortie-restart-dispatches-{}", std::process::id()));
    let agent = script(
        "restart-agent.sh",
        &format!(
            "#!/bin/sh\ncat >/dev/null\necho \"$SORTIE_STEP_ID\" >> {}\nsleep 0.5\necho \"output of $SORTIE_STEP_ID\"\n",
            log.display()
        ),
    );
    let mut runner = runner_process(
        &db,
        &[],
        &[
            ("SORTIE_DISPATCH", "command".into()),
            ("SORTIE_AGENT_COMMAND", agent.display().to_string()),
        ],
    );
    let mcp = McpClient::start(&db, &[]).await;
    assert_eq!(
        mcp.ok("get_campaign", json!({"id": c})).await["status"],
        "active"
    );

    // Down while the first steps run, so their agents finish during the outage.
    for _ in 0..100 {
        if count(&db, &format!("SELECT count(*) FROM sortie.steps WHERE campaign_id = '{c}' AND status = 'running'")).await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.restart_server(Duration::from_millis(1500)).await;

    // The MCP server's next call works on a new connection.
    assert_eq!(
        mcp.ok("get_campaign", json!({"id": c})).await["status"],
        "active"
    );
    for _ in 0..400 {
        if campaign_status(&db, c).await != "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unsafe { libc::kill(runner.id() as i32, libc::SIGTERM) };
    runner.wait().unwrap();
    mcp.stop().await;

    assert_eq!(campaign_status(&db, c).await, "done");
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
