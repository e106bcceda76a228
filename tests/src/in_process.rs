//! The runner in this process (the library's `Runner`), for tests that tick it themselves.

use sortie_mcp::config::Config;
use sortie_mcp::db::Db;
use sortie_mcp::runner::Runner;
use tokio::sync::watch;

use crate::database::TestDb;

/// A runner on `db`, configured by `vars` over DATABASE_URL and SORTIE_OWNER=test-runner
/// (a later variable overrides an earlier one). Sending `true` on the sender shuts it down.
pub async fn runner(db: &TestDb, vars: &[(&str, String)]) -> (Runner, watch::Sender<bool>) {
    let mut all: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db.connection_string()),
        ("SORTIE_OWNER".into(), "test-runner".into()),
    ];
    for (k, v) in vars {
        all.retain(|(name, _)| name != k);
        all.push((k.to_string(), v.clone()));
    }
    let config =
        Config::from_vars(&|name| all.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()))
            .expect("config");
    let pool = Db::connect(&config).await.expect("connect");
    let (stop, shutdown) = watch::channel(false);
    (
        Runner::new(pool, config, db.connection_string(), shutdown).expect("runner"),
        stop,
    )
}

/// Ticks until the campaign is no longer active (at most `max` ticks), waiting each time
/// for the dispatches the tick started.
pub async fn run_until_settled(runner: &mut Runner, db: &TestDb, campaign: uuid::Uuid, max: usize) {
    for _ in 0..max {
        runner.tick().await.expect("tick");
        runner.wait().await;
        if crate::fixtures::campaign_status(db, campaign).await != "active" {
            return;
        }
    }
}
