//! The harness every integration test uses: one throwaway PostgreSQL cluster per test binary
//! (temporary directory, its own Unix socket, no TCP port), a template database with the real
//! extension, and a fresh database per test cloned from it.
//!
//! The cluster is stopped and its directory removed by a watchdog process when the test
//! binary exits — also when a test panics or the binary is killed.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use serde_json::Value;
use sortie_mcp::embedded::{find_bin_dir, running_as_root, Cluster};
use tokio_postgres::{Client, NoTls};

pub mod citus;

const TEMPLATE: &str = "sortie_template";

struct Shared {
    cluster: Cluster,
}

static SHARED: OnceLock<Shared> = OnceLock::new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Tests trade durability for speed; benchmarks choose their own settings.
pub const TEST_SETTINGS: &[(&str, &str)] = &[
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
    ("max_connections", "300"),
    ("shared_buffers", "256MB"),
    ("log_min_messages", "warning"),
];

fn shared() -> &'static Shared {
    // Started on a thread of its own: tests call this from inside their tokio runtime.
    SHARED.get_or_init(|| {
        std::thread::spawn(|| start_cluster(TEST_SETTINGS))
            .join()
            .expect("cluster thread")
            .map(|cluster| Shared { cluster })
            .unwrap_or_else(|e| panic!("test cluster: {e:#}"))
    })
}

/// A throwaway cluster with a template database holding the extension; stopped and removed
/// when this process exits.
pub fn start_cluster(settings: &[(&str, &str)]) -> anyhow::Result<Cluster> {
    // Not under /root or a private TMPDIR: the server user must reach it when we are root.
    let base = std::env::var_os("SORTIE_TEST_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let root = base.join(format!(
        "sortie-test-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&root)?;
    let mut cluster = Cluster::new(root.clone(), find_bin_dir()?);
    cluster.settings = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cluster.ensure_running()?;
    spawn_watchdog(&cluster)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let admin = connect_to(&cluster, "postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
            .await?;
        let template = connect_to(&cluster, TEMPLATE).await?;
        template
            .batch_execute("CREATE EXTENSION sortie CASCADE")
            .await?;
        anyhow::Ok(())
    })?;
    Ok(cluster)
}

/// A new database with the extension, cloned from the template; returns its name.
pub async fn create_database(cluster: &Cluster) -> anyhow::Result<String> {
    let name = format!(
        "t_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let admin = connect_to(cluster, "postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {TEMPLATE}"))
        .await?;
    Ok(name)
}

/// Stops the cluster and removes its directory once this process is gone.
fn spawn_watchdog(cluster: &Cluster) -> anyhow::Result<()> {
    let pg_ctl = cluster.bin_dir.join("pg_ctl");
    let stop = if running_as_root() {
        format!(
            "runuser -u postgres -- {} stop -m immediate -D {}",
            pg_ctl.display(),
            cluster.data_dir().display()
        )
    } else {
        format!(
            "{} stop -m immediate -D {}",
            pg_ctl.display(),
            cluster.data_dir().display()
        )
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf {root}",
        pid = std::process::id(),
        root = cluster.root.display()
    );
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    Ok(())
}

pub async fn connect_to(cluster: &Cluster, database: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(&cluster.connection_string(database), NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A new, empty database of the test cluster without the extension (start-up checks);
/// returns its connection string.
pub async fn database_without_extension() -> String {
    let cluster = &shared().cluster;
    let name = format!(
        "plain_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::SeqCst)
    );
    let admin = connect_to(cluster, "postgres")
        .await
        .expect("admin connection");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create a database without the extension");
    cluster.connection_string(&name)
}

/// A fresh database with the extension, for one test. Finish every test with
/// `db.finish().await`, which checks the engine's invariants.
pub struct TestDb {
    pub name: String,
    pub client: Client,
    finished: bool,
}

impl TestDb {
    pub async fn new() -> TestDb {
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
        }
    }

    /// Another connection to the same database (for concurrency tests).
    pub async fn connect(&self) -> Client {
        connect_to(&shared().cluster, &self.name)
            .await
            .expect("extra connection")
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
        shared().cluster.connection_string(&self.name)
    }

    /// Stops this test binary's cluster (fast shutdown: every session is cut off), keeps it
    /// down for `down_for`, starts it again and reconnects `client`. Every test of the binary
    /// sees the restart, so a test that calls this needs a binary of its own.
    pub async fn restart_server(&mut self, down_for: std::time::Duration) {
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

/// Shared fixtures: small verbs over the engine's SQL API, so tests read as the rules they prove.
pub mod fixtures {
    use super::*;
    use uuid::Uuid;

    pub async fn campaign(db: &TestDb, planner: &str) -> Uuid {
        let c = db
            .ok(
                "sortie.create_campaign(goal => 'test goal', planner => $1)",
                &[&planner],
            )
            .await;
        Uuid::parse_str(c["id"].as_str().unwrap()).unwrap()
    }

    pub async fn add(db: &TestDb, campaign: Uuid, steps: Value) -> Value {
        db.ok("sortie.add_steps($1, $2)", &[&campaign, &steps])
            .await
    }

    /// Ids of the top-level steps added, in order.
    pub async fn add_ids(db: &TestDb, campaign: Uuid, steps: Value) -> Vec<i64> {
        ids(&add(db, campaign, steps).await["step_ids"])
    }

    pub fn ids(v: &Value) -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    }

    pub struct Claim {
        pub step_id: i64,
        pub token: Uuid,
        pub action: String,
    }

    pub async fn claim(db: &TestDb, campaign: Uuid) -> Option<Claim> {
        claim_on(&db.client, campaign).await
    }

    pub async fn claim_on(client: &Client, campaign: Uuid) -> Option<Claim> {
        let v = call_on(
            client,
            "sortie.claim_next(owner => 'test', campaign_id => $1)",
            &[&campaign],
        )
        .await
        .expect("claim_next");
        parse_claim(&v)
    }

    pub fn parse_claim(v: &Value) -> Option<Claim> {
        v["step_id"].as_i64().map(|step_id| Claim {
            step_id,
            token: Uuid::parse_str(v["claim_token"].as_str().unwrap()).unwrap(),
            action: v["action"].as_str().unwrap_or_default().to_string(),
        })
    }

    pub async fn complete(db: &TestDb, claim: &Claim, output: &str) -> Value {
        db.ok(
            "sortie.complete_step($1, $2, $3)",
            &[&claim.step_id, &claim.token, &output],
        )
        .await
    }

    pub async fn fail(db: &TestDb, claim: &Claim, error: &str) -> Value {
        db.ok(
            "sortie.fail_step($1, $2, $3)",
            &[&claim.step_id, &claim.token, &error],
        )
        .await
    }

    /// Claims and completes every ready step until none is left; returns the actions in order.
    pub async fn run_all(db: &TestDb, campaign: Uuid) -> Vec<String> {
        let mut done = Vec::new();
        while let Some(c) = claim(db, campaign).await {
            complete(db, &c, &format!("out:{}", c.action)).await;
            done.push(c.action);
        }
        done
    }

    pub async fn status(db: &TestDb, step: i64) -> String {
        db.client
            .query_one("SELECT status FROM sortie.steps WHERE id = $1", &[&step])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn step_field(db: &TestDb, step: i64, field: &str) -> Value {
        db.client
            .query_one(
                &format!("SELECT to_jsonb({field}) FROM sortie.steps WHERE id = $1"),
                &[&step],
            )
            .await
            .unwrap()
            .get::<_, Option<Value>>(0)
            .unwrap_or(Value::Null)
    }

    pub async fn campaign_status(db: &TestDb, campaign: Uuid) -> String {
        db.client
            .query_one(
                "SELECT status FROM sortie.campaigns WHERE id = $1",
                &[&campaign],
            )
            .await
            .unwrap()
            .get(0)
    }

    pub async fn step_by_action(db: &TestDb, campaign: Uuid, action: &str) -> i64 {
        db.client
            .query_one(
                "SELECT id FROM sortie.steps WHERE campaign_id = $1 AND action = $2 ORDER BY id DESC LIMIT 1",
                &[&campaign, &action],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Moves the engine's clock (`sortie.fake_now`) for this connection.
    pub async fn set_clock(client: &Client, offset_seconds: i64) {
        client
            .execute(
                "SELECT set_config('sortie.fake_now', (now() + make_interval(secs => $1))::text, false)",
                &[&(offset_seconds as f64)],
            )
            .await
            .unwrap();
    }

    pub async fn count(db: &TestDb, sql: &str) -> i64 {
        db.client.query_one(sql, &[]).await.unwrap().get(0)
    }
}

/// The project's binaries, built by cargo in the profile of the running test or benchmark.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> for tests, target/<profile>/<bin> for the benchmark.
    let mut dir = exe.parent().expect("target dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    BUILT.get_or_init(|| {
        // `cargo test -p sortie_tests` alone does not build another package's binaries. Both
        // packages are named so that features resolve as in the test build: otherwise cargo
        // rebuilds sortie_mcp with other features here, and again for the next test build.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-q",
            "-p",
            "sortie_mcp",
            "-p",
            "sortie_tests",
            "--bins",
        ]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo build").success(),
            "building sortie_mcp's binaries failed"
        );
    });
    dir.join(name)
}

/// Sends SIGTERM to a child process (a runner asked to shut down gracefully).
#[allow(unsafe_code)] // one libc call; see the SAFETY comment
pub fn terminate(child: &std::process::Child) {
    // SAFETY: kill(2) with a pid this process started and has not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

/// Polls `ready` every 50 ms until it holds or `limit` has passed; the assertions after it say
/// what went wrong if it never holds.
pub async fn wait_for<F: std::future::Future<Output = bool>>(
    limit: std::time::Duration,
    mut ready: impl FnMut() -> F,
) {
    let until = std::time::Instant::now() + limit;
    while !ready().await && std::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An executable script (a stand-in agent) in this test process's temporary directory.
pub fn script(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sortie-runner-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs one of the project's binaries to its end with `stdin` as its input. Every variable of
/// Sortie's table is removed from its environment first, so only `env` (and a quiet RUST_LOG)
/// applies; pass DATABASE_URL or SORTIE_DATA_DIR, never the user's embedded cluster.
pub fn run_binary(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut command = Command::new(binary(name));
    for var in sortie_mcp::config::ENV_VARS {
        command.env_remove(var.name);
    }
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    let mut input = child.stdin.take().expect("stdin");
    // A program that exits at start closes its stdin before reading: ignore the broken pipe.
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    child.wait_with_output().expect("wait for the binary")
}

/// Fenced code blocks of a Markdown file, for tests that run the documentation's examples.
pub mod markdown {
    /// One fenced block: its info string (`sql`, `sh no-run`, ...), its text and the line of
    /// its opening fence (1-based), for messages.
    #[derive(Debug, Clone)]
    pub struct Block {
        pub info: String,
        pub text: String,
        pub line: usize,
    }

    impl Block {
        /// The block's language: the first word of its info string.
        pub fn language(&self) -> &str {
            self.info.split_whitespace().next().unwrap_or("")
        }

        /// Whether the info string carries `word` after the language (`no-run`, `refused`).
        pub fn has(&self, word: &str) -> bool {
            self.info.split_whitespace().skip(1).any(|w| w == word)
        }
    }

    /// Every block fenced with three backticks, in order. A fence may be indented (a block
    /// inside a list item); that indentation is removed from the block's lines.
    pub fn code_blocks(markdown: &str) -> Vec<Block> {
        let mut blocks = Vec::new();
        let mut open: Option<(Block, usize)> = None;
        for (i, line) in markdown.lines().enumerate() {
            let indent = line.len() - line.trim_start().len();
            match (&mut open, line.trim_start().strip_prefix("```")) {
                (None, Some(info)) => {
                    let block = Block {
                        info: info.trim().to_string(),
                        text: String::new(),
                        line: i + 1,
                    };
                    open = Some((block, indent));
                }
                (Some(_), Some(rest)) if rest.trim().is_empty() => {
                    blocks.extend(open.take().map(|(block, _)| block));
                }
                (Some((block, fence_indent)), _) => {
                    let cut = indent.min(*fence_indent);
                    block.text.push_str(&line[cut..]);
                    block.text.push('\n');
                }
                (None, None) => {}
            }
        }
        assert!(open.is_none(), "a code block is never closed");
        blocks
    }

    /// A file of the repository, by its path from the repository's root.
    pub fn read(path: &str) -> String {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

/// Runs SQL through `psql` (so `\gset` and other psql commands work, as a reader pastes them)
/// against `connection_string`, stopping at the first error.
pub fn psql(connection_string: &str, sql: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", connection_string])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start psql");
    child
        .stdin
        .take()
        .expect("psql stdin")
        .write_all(sql.as_bytes())
        .expect("write to psql");
    child.wait_with_output().expect("wait for psql")
}

/// A `sortie-runner` process against the test database, quiet on stdout and stderr.
pub fn runner_process(db: &TestDb, args: &[&str], env: &[(&str, String)]) -> std::process::Child {
    let mut command = Command::new(binary("sortie-runner"));
    command
        .args(args)
        .env("DATABASE_URL", db.connection_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("start sortie-runner")
}

/// A real MCP client talking to the real `sortie-mcp` binary over stdio.
pub mod mcp {
    use super::*;
    use rmcp::model::{CallToolRequestParams, CallToolResult};
    use rmcp::service::RunningService;
    use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
    use rmcp::{RoleClient, ServiceExt};

    pub struct McpClient {
        pub service: RunningService<RoleClient, ()>,
    }

    /// The outcome of one tool call: the structured JSON, and whether it was a tool error.
    #[derive(Debug)]
    pub struct Outcome {
        pub is_error: bool,
        pub value: Value,
        pub text: String,
    }

    impl Outcome {
        pub fn code(&self) -> &str {
            self.value["error"]["code"].as_str().unwrap_or("")
        }
    }

    impl McpClient {
        /// Starts `sortie-mcp` against the test database with extra environment variables.
        pub async fn start(db: &TestDb, env: &[(&str, String)]) -> McpClient {
            let mut all: Vec<(String, String)> =
                vec![("DATABASE_URL".into(), db.connection_string())];
            all.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
            Self::start_with(all).await
        }

        pub async fn start_with(env: Vec<(String, String)>) -> McpClient {
            let program = binary("sortie-mcp");
            let transport =
                TokioChildProcess::new(tokio::process::Command::new(program).configure(|cmd| {
                    for key in [
                        "DATABASE_URL",
                        "SORTIE_ROLE",
                        "SORTIE_STEP_ID",
                        "SORTIE_CAMPAIGN_ID",
                        "SORTIE_CLAIM_TOKEN",
                    ] {
                        cmd.env_remove(key);
                    }
                    for (k, v) in &env {
                        cmd.env(k, v);
                    }
                    cmd.env("RUST_LOG", "warn");
                }))
                .expect("spawn sortie-mcp");
            let service = ().serve(transport).await.expect("MCP initialize");
            McpClient { service }
        }

        pub async fn tool_names(&self) -> Vec<String> {
            let mut names: Vec<String> = self
                .service
                .list_all_tools()
                .await
                .expect("tools/list")
                .into_iter()
                .map(|t| t.name.to_string())
                .collect();
            names.sort();
            names
        }

        pub async fn call(&self, tool: &str, args: Value) -> Outcome {
            let arguments = match args {
                Value::Object(map) => map,
                other => panic!("tool arguments must be an object, not {other}"),
            };
            let result: CallToolResult = self
                .service
                .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(arguments))
                .await
                .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"));
            let text = result
                .content
                .iter()
                .filter_map(|c| c.as_text().map(|t| t.text.clone()))
                .collect::<Vec<_>>()
                .join("\n");
            Outcome {
                is_error: result.is_error.unwrap_or(false),
                value: result.structured_content.unwrap_or(Value::Null),
                text,
            }
        }

        /// A call that must succeed; returns its JSON.
        pub async fn ok(&self, tool: &str, args: Value) -> Value {
            let outcome = self.call(tool, args).await;
            assert!(!outcome.is_error, "{tool} failed: {}", outcome.text);
            outcome.value
        }

        pub async fn stop(self) {
            let _ = self.service.cancel().await;
        }
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 standing in for an agent runtime, an LLM or a webhook.
/// Every request is recorded; `answer` decides each response from the path and JSON body.
pub mod fake_http {
    use std::sync::{Arc, Mutex};

    use serde_json::Value;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    pub type Answer = Arc<dyn Fn(&str, &Value) -> (u16, Value) + Send + Sync>;

    #[derive(Clone, Debug)]
    pub struct Request {
        pub path: String,
        pub body: Value,
        pub at: std::time::Instant,
    }

    pub struct FakeHttp {
        pub url: String,
        pub requests: Arc<Mutex<Vec<Request>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeHttp {
        pub async fn start(
            answer: impl Fn(&str, &Value) -> (u16, Value) + Send + Sync + 'static,
        ) -> FakeHttp {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind 127.0.0.1");
            let url = format!("http://{}", listener.local_addr().unwrap());
            let requests = Arc::new(Mutex::new(Vec::new()));
            let answer: Answer = Arc::new(answer);
            let log = requests.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    let (answer, log) = (answer.clone(), log.clone());
                    tokio::spawn(async move {
                        let Some((path, body)) = read_request(&mut socket).await else {
                            return;
                        };
                        log.lock().unwrap().push(Request {
                            path: path.clone(),
                            body: body.clone(),
                            at: std::time::Instant::now(),
                        });
                        let (status, reply) = answer(&path, &body);
                        let text = reply.to_string();
                        let response = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                            text.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            });
            FakeHttp {
                url,
                requests,
                task,
            }
        }

        pub fn requests(&self) -> Vec<Request> {
            self.requests.lock().unwrap().clone()
        }
    }

    impl Drop for FakeHttp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, Value)> {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 8192];
        let header_end = loop {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        let path = head.split_whitespace().nth(1)?.to_string();
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            })
            .unwrap_or(0);
        while buffer.len() < header_end + length {
            let n = socket.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buffer.extend_from_slice(&chunk[..n]);
        }
        let body = serde_json::from_slice(&buffer[header_end..]).unwrap_or(Value::Null);
        Some((path, body))
    }
}

/// The runner in this process (the library's `Runner`), for tests that tick it themselves.
pub mod in_process {
    use super::TestDb;
    use sortie_mcp::config::Config;
    use sortie_mcp::db::Db;
    use sortie_mcp::runner::Runner;
    use tokio::sync::watch;

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
    pub async fn run_until_settled(
        runner: &mut Runner,
        db: &TestDb,
        campaign: uuid::Uuid,
        max: usize,
    ) {
        for _ in 0..max {
            runner.tick().await.expect("tick");
            runner.wait().await;
            if super::fixtures::campaign_status(db, campaign).await != "active" {
                return;
            }
        }
    }
}
