//! A test's own database (cloned from the cluster's template) and calls of the engine's SQL
//! API that report the stable error code, as the MCP server does.
//!
//! With `SORTIE_TEST_CITUS=1` every `TestDb` is instead a database on the Citus cluster of
//! `crate::citus` (a coordinator and two workers) with the extension created and
//! `sortie.distribute()` run, so any test binary runs distributed unchanged (issue 19;
//! docs/scale-out.md names the subset CI runs this way).

use serde_json::Value;
use tokio_postgres::{Client, NoTls};

use crate::cluster::{connect_to, create_database, shared};

/// A fresh database with the extension, for one test. Finish every test with
/// `db.finish().await`, which checks the engine's invariants.
pub struct TestDb {
    pub name: String,
    pub client: Client,
    finished: bool,
    citus: Option<&'static crate::citus::CitusCluster>,
}

/// Whether this test process runs its databases on Citus (`SORTIE_TEST_CITUS=1`).
pub fn on_citus() -> bool {
    std::env::var("SORTIE_TEST_CITUS").is_ok_and(|v| v == "1")
}

impl TestDb {
    pub async fn new() -> TestDb {
        if on_citus() {
            return Self::distributed().await;
        }
        Self::single_node().await
    }

    /// A database of the single-node test cluster, whatever `SORTIE_TEST_CITUS` says.
    pub async fn single_node() -> TestDb {
        let shared = shared();
        let name = create_database(&shared.cluster)
            .await
            .expect("create test database");
        let client = connect_to(&shared.cluster, &name)
            .await
            .expect("test connection");
        TestDb {
            name,
            client,
            finished: false,
            citus: None,
        }
    }

    /// A database on the Citus cluster with the extension distributed (`sortie.distribute()`).
    pub async fn distributed() -> TestDb {
        let db = crate::citus::CitusDb::new().await;
        // One database at a time: CREATE EXTENSION on the coordinator also creates it on the
        // workers, and two of those at once collided on the cluster's catalog ("tuple
        // concurrently updated"). Two transactions: distribute() reaches the workers over
        // connections of their own, which must see the extension committed.
        static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _turn = ONE_AT_A_TIME.lock().await;
        for step in [
            "CREATE EXTENSION sortie CASCADE",
            "SELECT sortie.distribute()",
        ] {
            db.client
                .batch_execute(step)
                .await
                .unwrap_or_else(|e| panic!("{step} on the Citus test database: {e:?}"));
        }
        TestDb {
            name: db.name,
            client: db.client,
            finished: false,
            citus: Some(db.cluster),
        }
    }

    /// The Citus cluster this database lives on, if it is distributed.
    pub fn citus(&self) -> Option<&'static crate::citus::CitusCluster> {
        self.citus
    }

    /// Another connection to the same database (for concurrency tests).
    pub async fn connect(&self) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.connection_string(), NoTls)
            .await
            .expect("extra connection");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Another connection whose asynchronous messages (NOTIFY, NOTICE) arrive on the receiver
    /// instead of being dropped; the receiver ends when the client is dropped.
    pub async fn connect_with_messages(
        &self,
    ) -> (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::AsyncMessage>,
    ) {
        use futures_util::{stream, StreamExt};
        let (client, mut connection) = tokio_postgres::connect(&self.connection_string(), NoTls)
            .await
            .expect("extra connection");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                let _ = tx.send(message);
            }
        });
        (client, rx)
    }

    pub fn connection_string(&self) -> String {
        match self.citus {
            Some(cluster) => cluster.coordinator.connection_string(&self.name),
            None => shared().cluster.connection_string(&self.name),
        }
    }

    /// Stops this test binary's cluster (fast shutdown: every session is cut off), keeps it
    /// down for `down_for`, starts it again and reconnects `client`. Every test of the binary
    /// sees the restart, so a test that calls this needs a binary of its own.
    pub async fn restart_server(&mut self, down_for: std::time::Duration) {
        assert!(
            self.citus.is_none(),
            "restart_server restarts the single-node test cluster only"
        );
        let cluster = &shared().cluster;
        tokio::task::spawn_blocking(move || cluster.stop("fast"))
            .await
            .unwrap()
            .expect("stop the test cluster");
        tokio::time::sleep(down_for).await;
        tokio::task::spawn_blocking(move || cluster.ensure_running())
            .await
            .unwrap()
            .expect("start the test cluster again");
        self.client = self.connect().await;
    }

    /// Calls a SQL function returning jsonb, e.g. `db.call("sortie.get_campaign($1)", &[&id])`.
    pub async fn call(
        &self,
        expr: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Value, DbError> {
        call_on(&self.client, expr, params).await
    }

    /// Like `call`, panicking with the database's message on error.
    pub async fn ok(
        &self,
        expr: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Value {
        self.call(expr, params)
            .await
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    /// Runs the invariant checker; every test ends with this.
    pub async fn finish(mut self) {
        self.finished = true;
        let problems: Vec<String> = self
            .client
            .query("SELECT * FROM sortie.check_invariants()", &[])
            .await
            .expect("check_invariants")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            problems.is_empty(),
            "invariants broken:\n{}",
            problems.join("\n")
        );
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !self.finished && !std::thread::panicking() {
            panic!("test ended without db.finish(): invariants were not checked");
        }
    }
}

/// A database error with the stable code the engine put in front of its message.
#[derive(Debug)]
pub struct DbError {
    pub sqlstate: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}] {}", self.sqlstate, self.message)
    }
}

pub async fn call_on(
    client: &Client,
    expr: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Value, DbError> {
    match client
        .query_one(&format!("SELECT ({expr})::jsonb"), params)
        .await
    {
        Ok(row) => Ok(row.get::<_, Option<Value>>(0).unwrap_or(Value::Null)),
        Err(e) => {
            let db = e.as_db_error();
            let message = db
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            let sqlstate = db.map(|d| d.code().code().to_string()).unwrap_or_default();
            // The code comes from the SQLSTATE, through the same table as the MCP server's,
            // never from the message text.
            let code = sortie_mcp::db::code_for_sqlstate(&sqlstate)
                .unwrap_or("internal")
                .to_string();
            Err(DbError {
                sqlstate,
                code,
                message,
            })
        }
    }
}
