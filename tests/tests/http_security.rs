//! `sortie-mcp --http` behind the trust boundary (SPEC §15): bearer tokens with roles, claim
//! tokens as bearers bound to their step, sessions tied to their bearer, Origin and Host
//! checks, --allow-remote, idle expiry and a session cap. Each test runs the real binary on
//! 127.0.0.1 and talks to it with reqwest or rmcp's HTTP client.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::ServiceExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sortie_tests::fixtures::*;
use sortie_tests::{binary, TestDb};

const BOTH: &str = "a-both-token-long-enough";
const COORDINATOR: &str = "a-coordinator-token-long-enough";
const WORKER: &str = "a-worker-token-long-enough";

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A tokens file: a coordinator token in clear, a worker token stored hashed.
fn tokens_file() -> String {
    let hash: String = Sha256::digest(WORKER.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let path = std::env::temp_dir().join(format!(
        "sortie-http-tokens-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(
        &path,
        format!("# role token\ncoordinator {COORDINATOR}\nworker sha256:{hash}\n"),
    )
    .unwrap();
    path.display().to_string()
}

async fn start(db: &TestDb, env: &[(&str, String)]) -> Server {
    let port = free_port();
    let mut command = Command::new(binary("sortie-mcp"));
    for var in sortie_mcp::config::ENV_VARS {
        command.env_remove(var.name);
    }
    command
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", BOTH)
        .env("SORTIE_HTTP_TOKENS_FILE", tokens_file())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    let server = Server {
        child: command.spawn().unwrap(),
        port,
    };
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http.get(server.url()).send().await.is_ok() {
            return server;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sortie-mcp --http did not start");
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

fn post(
    http: &reqwest::Client,
    server: &Server,
    authorization: &str,
    body: &str,
) -> reqwest::RequestBuilder {
    http.post(server.url())
        .header("authorization", authorization)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string())
}

/// Opens a session with a raw initialize; returns its id.
async fn open_session(http: &reqwest::Client, server: &Server, token: &str) -> String {
    let response = post(http, server, &format!("Bearer {token}"), INITIALIZE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let id = response.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_string();
    let _ = response.text().await;
    let initialized = post(
        http,
        server,
        &format!("Bearer {token}"),
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .header("mcp-session-id", &id)
    .send()
    .await
    .unwrap();
    assert!(
        initialized.status().is_success(),
        "{}",
        initialized.status()
    );
    id
}

/// tools/list in a session: the HTTP status.
async fn list_in(http: &reqwest::Client, server: &Server, token: &str, session: &str) -> u16 {
    let response = post(
        http,
        server,
        &format!("Bearer {token}"),
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#,
    )
    .header("mcp-session-id", session)
    .send()
    .await
    .unwrap();
    let status = response.status().as_u16();
    let _ = response.text().await;
    status
}

async fn client(
    server: &Server,
    token: &str,
) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(server.url()).auth_header(token),
    );
    ().serve(transport).await.expect("initialize over HTTP")
}

async fn tool_names(client: &rmcp::service::RunningService<rmcp::RoleClient, ()>) -> Vec<String> {
    client
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect()
}

async fn call(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    tool: &str,
    args: Value,
) -> (bool, Value) {
    let result = client
        .call_tool(
            rmcp::model::CallToolRequestParams::new(tool.to_string())
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    (
        result.is_error.unwrap_or(false),
        result.structured_content.unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn each_bearer_token_opens_sessions_with_its_roles_tools() {
    let db = TestDb::new().await;
    let server = start(&db, &[]).await;
    let coordinator = client(&server, COORDINATOR).await;
    let names = tool_names(&coordinator).await;
    assert!(names.contains(&"create_campaign".to_string()));
    assert!(!names.contains(&"complete_step".to_string()), "{names:?}");
    let worker = client(&server, WORKER).await;
    let names = tool_names(&worker).await;
    assert!(names.contains(&"complete_step".to_string()));
    assert!(!names.contains(&"create_campaign".to_string()), "{names:?}");
    let both = client(&server, BOTH).await;
    let names = tool_names(&both).await;
    assert!(
        names.contains(&"complete_step".to_string())
            && names.contains(&"create_campaign".to_string())
    );
    // A worker token without a step sees no campaign until it claims one.
    let (is_error, value) = call(
        &worker,
        "get_notes",
        json!({"campaign_id": uuid::Uuid::new_v4()}),
    )
    .await;
    assert!(is_error);
    assert_eq!(value["error"]["code"], "forbidden");
    for c in [coordinator, worker, both] {
        let _ = c.cancel().await;
    }
    db.finish().await;
}

#[tokio::test]
async fn a_claim_token_bearer_is_a_worker_bound_to_that_step_only() {
    let db = TestDb::new().await;
    let a = campaign(&db, "none").await;
    let b = campaign(&db, "none").await;
    add_ids(&db, a, json!([{"action": "a1"}])).await;
    add_ids(&db, b, json!([{"action": "b1"}])).await;
    let a1 = claim(&db, a).await.unwrap();
    let b1 = claim(&db, b).await.unwrap();
    db.ok(
        "sortie.add_note(campaign_id => $1, content => 'private to b')",
        &[&b],
    )
    .await;
    let server = start(&db, &[]).await;

    let http = reqwest::Client::new();
    let stranger = post(
        &http,
        &server,
        &format!("Bearer {}", uuid::Uuid::new_v4()),
        INITIALIZE,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        stranger.status().as_u16(),
        401,
        "a token that is no current claim opens nothing"
    );

    let session = client(&server, &a1.token.to_string()).await;
    let names = tool_names(&session).await;
    assert!(!names.contains(&"create_campaign".to_string()), "{names:?}");
    let (is_error, context) = call(&session, "get_my_context", json!({})).await;
    assert!(!is_error, "{context}");
    assert_eq!(context["step"]["id"], a1.step_id);
    for (tool, args, code) in [
        ("get_notes", json!({"campaign_id": b}), "forbidden"),
        ("claim_next", json!({"campaign_id": b}), "forbidden"),
        (
            "read_step_output",
            json!({"step_id": b1.step_id}),
            "not_found",
        ),
        (
            "complete_step",
            json!({"step_id": b1.step_id, "summary": "forged"}),
            "stale_claim",
        ),
    ] {
        let (is_error, value) = call(&session, tool, args).await;
        assert!(is_error, "{tool}: {value}");
        assert_eq!(value["error"]["code"], code, "{tool}: {value}");
    }
    let (is_error, done) = call(
        &session,
        "complete_step",
        json!({"summary": "done over http"}),
    )
    .await;
    assert!(!is_error, "{done}");
    assert_eq!(status(&db, a1.step_id).await, "done");
    assert_eq!(status(&db, b1.step_id).await, "running");
    let _ = session.cancel().await;
    // The finished claim opens no new session.
    let after = post(&http, &server, &format!("Bearer {}", a1.token), INITIALIZE)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status().as_u16(), 401);
    db.ok("sortie.cancel_campaign($1)", &[&b]).await;
    db.finish().await;
}

#[tokio::test]
async fn a_session_id_works_only_with_the_bearer_that_opened_it_and_the_scheme_is_any_case() {
    let db = TestDb::new().await;
    let server = start(&db, &[]).await;
    let http = reqwest::Client::new();
    let session = open_session(&http, &server, COORDINATOR).await;
    assert_eq!(list_in(&http, &server, COORDINATOR, &session).await, 200);
    assert_eq!(
        list_in(&http, &server, BOTH, &session).await,
        404,
        "another bearer"
    );
    assert_eq!(list_in(&http, &server, WORKER, &session).await, 404);
    // RFC 7235: the scheme is case-insensitive.
    let lower = post(
        &http,
        &server,
        &format!("bearer {COORDINATOR}"),
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list"}"#,
    )
    .header("mcp-session-id", &session)
    .send()
    .await
    .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    let none = post(&http, &server, "Basic abc", INITIALIZE)
        .send()
        .await
        .unwrap();
    assert_eq!(none.status().as_u16(), 401);
    assert!(none.headers().contains_key("www-authenticate"));
    db.finish().await;
}

#[tokio::test]
async fn origins_and_hosts_outside_the_allow_lists_are_refused() {
    let db = TestDb::new().await;
    let server = start(
        &db,
        &[
            ("SORTIE_HTTP_ALLOWED_ORIGINS", "https://app.example".into()),
            ("SORTIE_HTTP_ALLOWED_HOSTS", "sortie.internal".into()),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let with = |origin: Option<&str>, host: Option<String>| {
        let mut request = post(&http, &server, &format!("Bearer {BOTH}"), INITIALIZE);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request
    };
    let evil = with(Some("http://evil.example"), None)
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status().as_u16(), 403);
    let port = server.port;
    for origin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        "https://app.example".into(),
    ] {
        let ok = with(Some(&origin), None).send().await.unwrap();
        assert_eq!(ok.status().as_u16(), 200, "{origin}");
    }
    let other_port = with(Some("http://127.0.0.1:1"), None).send().await.unwrap();
    assert_eq!(
        other_port.status().as_u16(),
        403,
        "loopback of another port"
    );
    let rebinding = with(None, Some(format!("attacker.example:{port}")))
        .send()
        .await
        .unwrap();
    assert_eq!(rebinding.status().as_u16(), 403);
    let internal = with(None, Some(format!("sortie.internal:{port}")))
        .send()
        .await
        .unwrap();
    assert_eq!(internal.status().as_u16(), 200);
    // The web view beside MCP is behind the same checks.
    let page = http
        .get(format!("http://127.0.0.1:{port}/"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(page.status().as_u16(), 403);
    db.finish().await;
}

#[tokio::test]
async fn idle_sessions_expire_and_past_the_cap_the_oldest_goes() {
    let db = TestDb::new().await;
    let server = start(
        &db,
        &[
            ("SORTIE_HTTP_SESSION_IDLE", "2".into()),
            ("SORTIE_HTTP_MAX_SESSIONS", "3".into()),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let first = open_session(&http, &server, BOTH).await;
    let second = open_session(&http, &server, BOTH).await;
    let third = open_session(&http, &server, BOTH).await;
    assert_eq!(list_in(&http, &server, BOTH, &first).await, 200);
    // `second` is now the oldest idle one: a fourth session closes it.
    let fourth = open_session(&http, &server, BOTH).await;
    assert_eq!(list_in(&http, &server, BOTH, &second).await, 404);
    for session in [&first, &third, &fourth] {
        assert_eq!(list_in(&http, &server, BOTH, session).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        list_in(&http, &server, BOTH, &fourth).await,
        404,
        "expired after 2 s idle"
    );
    db.finish().await;
}

#[tokio::test]
async fn a_non_loopback_address_needs_allow_remote_and_warns_about_tls() {
    let db = TestDb::new().await;
    let refused = Command::new(binary("sortie-mcp"))
        .args(["--http", "0.0.0.0:0"])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", BOTH)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-remote"));

    let port = free_port();
    let mut child = Command::new(binary("sortie-mcp"))
        .args(["--http", &format!("0.0.0.0:{port}"), "--allow-remote"])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", BOTH)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("TLS"))
    });
    let line = tokio::time::timeout(Duration::from_secs(20), line)
        .await
        .expect("a TLS warning")
        .unwrap();
    assert!(line.is_some());
    // The warning comes before the address is bound: wait for it to answer.
    let mut answered = None;
    for _ in 0..200 {
        if let Ok(r) = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/mcp"))
            .send()
            .await
        {
            answered = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered, Some(401));
    child.kill().unwrap();
    child.wait().unwrap();
    db.finish().await;
}
