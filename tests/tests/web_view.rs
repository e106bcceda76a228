//! The web view of `sortie-mcp --http` (SPEC §16) in a real browser: Debian's headless
//! Chromium, driven over the DevTools protocol (`--remote-debugging-pipe`), loads `/`, sees a
//! step change colour when the test completes it (server-sent events, no reload), opens the
//! step's details, and saves a screenshot under the target directory that must not be blank.
#![allow(unsafe_code)] // the DevTools pipe to Chromium is a pair of raw descriptors

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::{binary, wait_for, TestDb};

const TOKEN: &str = "web-view-test-token-0123456789";
const PENDING_FILL: &str = "#f9fafb";
const DONE_FILL: &str = "#d1fae5";
const RUNNING_FILL: &str = "#dbeafe";

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(db: &TestDb) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(binary("sortie-mcp"))
        .args(["--http", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", db.connection_string())
        .env("SORTIE_HTTP_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let url = format!("{}/", server.base);
    wait_for(Duration::from_secs(30), || {
        let request = http.get(&url).send();
        async move { request.await.is_ok() }
    })
    .await;
    server
}

/// A Chromium speaking the DevTools protocol over fds 3 (commands) and 4 (answers), each
/// message a JSON text ended by NUL.
struct Browser {
    child: Child,
    commands: std::fs::File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    _profile: std::path::PathBuf,
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two descriptors; close-on-exec keeps them out of children
    // except where dup2 below places them.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

impl Browser {
    fn launch() -> Browser {
        let profile = std::env::temp_dir().join(format!("sortie-chromium-{}", std::process::id()));
        let (command_read, command_write) = pipe();
        let (answer_read, answer_write) = pipe();
        let mut command = Command::new("chromium");
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(command_read, 3) < 0 || libc::dup2(answer_write, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("chromium (Debian's, installed by scripts/setup)");
        // SAFETY: the parent's ends; the child's ends are closed here after the fork.
        let commands = unsafe {
            libc::close(command_read);
            libc::close(answer_write);
            std::fs::File::from_raw_fd(command_write)
        };
        let mut answers_pipe = unsafe { std::fs::File::from_raw_fd(answer_read) };
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 65536];
            while let Ok(n) = answers_pipe.read(&mut chunk) {
                if n == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..n]);
                while let Some(end) = buffer.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = buffer.drain(..=end).collect();
                    if let Ok(value) = serde_json::from_slice(&message[..message.len() - 1]) {
                        if tx.send(value).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Browser {
            child,
            commands,
            answers,
            next_id: 0,
            session: None,
            _profile: profile,
        }
    }

    /// One DevTools command; its result, or a panic naming the error.
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            message["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).expect("write to chromium");
        loop {
            let answer = self
                .answers
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            if answer["id"] == id {
                if let Some(error) = answer.get("error") {
                    panic!("{method}: {error}");
                }
                return answer["result"].clone();
            }
        }
    }

    fn open(&mut self, url: &str) {
        let target = self.send("Target.createTarget", json!({"url": "about:blank"}));
        let attached = self.send(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        self.session = attached["sessionId"].as_str().map(str::to_string);
        self.send("Page.enable", json!({}));
        self.send(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        self.send("Page.navigate", json!({"url": url}));
    }

    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.send(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        result["result"]["value"].clone()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.send("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

/// Polls an expression in the page (every 50 ms, up to 30 s) until it equals `expected`.
fn wait_in_page(browser: &mut Browser, expression: &str, expected: &Value) -> Value {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let value = browser.evaluate(expression);
        if &value == expected || std::time::Instant::now() > until {
            return value;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn fill_of(step: i64) -> String {
    format!(
        "(() => {{ const r = document.querySelector('#dag g.step[data-id=\"{step}\"] rect'); return r ? r.getAttribute('fill') : null; }})()"
    )
}

/// Where cargo builds: CARGO_TARGET_DIR, else the directory above this test's profile.
fn target_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return dir.into();
    }
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

#[tokio::test]
async fn the_routes_take_the_mcp_token_and_refuse_without_it() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    let server = serve(&db).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |path: &str| http.get(format!("{}{path}", server.base));
    assert_eq!(get("/").send().await.unwrap().status(), 401);
    assert_eq!(get("/api/campaigns").send().await.unwrap().status(), 401);
    assert_eq!(
        get("/?token=wrong-token-wrong-token")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    let page = get(&format!("/?token={TOKEN}")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let cookie = page.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with(&format!("sortie_token={TOKEN};")) && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let listed: Value = get("/api/campaigns")
        .header("cookie", format!("sortie_token={TOKEN}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["campaigns"][0]["id"], json!(c.to_string()));
    let one = get(&format!("/api/campaigns/{c}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 200);
    let one: Value = one.json().await.unwrap();
    assert!(one["svg"].as_str().unwrap().starts_with("<svg"));
    let bad = get("/api/campaigns/nope")
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_argument");
    let missing = get(&format!("/api/campaigns/{}", uuid::Uuid::new_v4()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // The query token opens the web view only: MCP still wants the Authorization header.
    let mcp = http
        .post(format!("{}/mcp?token={TOKEN}", server.base))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(mcp.status(), 401);
    drop(server);
    db.finish().await;
}

#[tokio::test]
async fn the_browser_sees_a_step_change_colour_live_and_opens_its_details() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([
            {"action": "gather requirements", "key": "g", "agent": "analyst"},
            {"step_type": "parallel_group", "action": "build", "key": "b", "depends_on": ["g"],
             "children": [{"action": "build the API"}, {"action": "build the UI"}]},
            {"action": "release", "depends_on": ["b"]}
        ]),
    )
    .await;
    let first = step_by_action(&db, c, "gather requirements").await;
    let server = serve(&db).await;
    let mut browser = Browser::launch();
    browser.open(&format!("{}/?token={TOKEN}#campaign={c}", server.base));

    assert_eq!(
        wait_in_page(&mut browser, &fill_of(first), &json!(PENDING_FILL)),
        json!(PENDING_FILL),
        "the DAG never showed the first step as pending"
    );
    for action in ["build the API", "build the UI", "release"] {
        let id = step_by_action(&db, c, action).await;
        assert_eq!(
            browser.evaluate(&fill_of(id)),
            json!(PENDING_FILL),
            "{action}"
        );
    }
    // The page is subscribed to the events before anything changes.
    assert_eq!(
        wait_in_page(
            &mut browser,
            "document.getElementById('live').textContent",
            &json!("live")
        ),
        json!("live")
    );
    // The token left the address bar once the cookie held it.
    assert_eq!(
        browser.evaluate("location.search.includes('token')"),
        json!(false)
    );

    let step = claim(&db, c).await.unwrap();
    assert_eq!(step.step_id, first);
    complete(&db, &step, "Requirements:\n1. an API\n2. a UI").await;
    assert_eq!(
        wait_in_page(&mut browser, &fill_of(first), &json!(DONE_FILL)),
        json!(DONE_FILL),
        "the step did not turn green without a reload"
    );
    assert_eq!(
        browser.evaluate("performance.getEntriesByType('navigation').length"),
        json!(1),
        "the page was not reloaded"
    );

    browser.evaluate(&format!(
        "document.querySelector('#dag g.step[data-id=\"{first}\"]').dispatchEvent(new MouseEvent('click', {{bubbles: true}}))"
    ));
    let output = wait_in_page(
        &mut browser,
        "document.getElementById('details-output').textContent",
        &json!("Requirements:\n1. an API\n2. a UI"),
    );
    assert_eq!(output, json!("Requirements:\n1. an API\n2. a UI"));
    let details = browser.evaluate("document.getElementById('details').innerText");
    let details = details.as_str().unwrap_or_default();
    assert!(
        details.contains("gather requirements") && details.contains("analyst"),
        "{details}"
    );
    assert!(details.contains("done"), "{details}");

    // A second change arrives the same way: a step starts running (blue).
    let api = step_by_action(&db, c, "build the API").await;
    let running = db
        .ok("sortie.claim_step($1, 'web-view-test', 600)", &[&api])
        .await;
    assert_eq!(running["step_id"], api, "{running}");
    assert_eq!(
        wait_in_page(&mut browser, &fill_of(api), &json!(RUNNING_FILL)),
        json!(RUNNING_FILL)
    );
    // The DAG rewires itself: the running step splits into two subtasks and a continuation,
    // drawn as they appear, with their spawn and continuation edges.
    let token = uuid::Uuid::parse_str(running["claim_token"].as_str().unwrap()).unwrap();
    let spliced = db
        .ok(
            "sortie.spawn_and_continue(step_id => $1, claim_token => $2, subtasks => $3, continuation => to_jsonb('assemble the API'::text), partial_output => 'split in two')",
            &[&api, &token, &json!([{"action": "write the handlers", "agent": "coder"}, {"action": "write the schema", "agent": "coder"}])],
        )
        .await;
    let continuation = spliced["continuation_id"].as_i64().unwrap();
    assert_eq!(
        wait_in_page(&mut browser, &fill_of(continuation), &json!(PENDING_FILL)),
        json!(PENDING_FILL),
        "the continuation never appeared"
    );
    assert_eq!(
        browser.evaluate("document.querySelectorAll('#dag path.edge-spawned').length"),
        json!(2)
    );
    assert_eq!(
        browser.evaluate("document.querySelectorAll('#dag path.edge-continues').length"),
        json!(1)
    );
    assert_eq!(browser.evaluate(&fill_of(api)), json!(DONE_FILL));
    let handlers = step_by_action(&db, c, "write the handlers").await;
    db.ok("sortie.claim_step($1, 'web-view-test', 600)", &[&handlers])
        .await;
    assert_eq!(
        wait_in_page(&mut browser, &fill_of(handlers), &json!(RUNNING_FILL)),
        json!(RUNNING_FILL)
    );

    let png_bytes = browser.screenshot();
    let path = target_dir().join("web-view.png");
    std::fs::write(&path, &png_bytes).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    let pixels = &pixels[..frame.buffer_size()];
    assert!(
        frame.width >= 800 && frame.height >= 600,
        "{}x{}",
        frame.width,
        frame.height
    );
    let channels = frame.color_type.samples();
    let mut colours = std::collections::HashSet::new();
    let (mut sum, mut sum_sq, mut n) = (0f64, 0f64, 0f64);
    for pixel in pixels.chunks(channels) {
        let grey = (pixel[0] as f64 + pixel[1] as f64 + pixel[2] as f64) / 3.0;
        sum += grey;
        sum_sq += grey * grey;
        n += 1.0;
        colours.insert((pixel[0], pixel[1], pixel[2]));
    }
    let variance = sum_sq / n - (sum / n).powi(2);
    assert!(
        variance > 100.0 && colours.len() > 50,
        "{} looks blank: variance {variance:.1}, {} colours",
        path.display(),
        colours.len()
    );
    // The done step's green is on screen.
    assert!(
        colours.contains(&(0xd1, 0xfa, 0xe5)),
        "no done-green pixel in {}",
        path.display()
    );
    drop(browser);
    drop(server);
    run_all(&db, c).await;
    db.finish().await;
}

/// Each open event stream holds one LISTEN connection; a closed page gives it back.
#[tokio::test]
async fn a_closed_event_stream_gives_its_database_connection_back() {
    let db = TestDb::new().await;
    let server = serve(&db).await;
    let listening = || async {
        db.client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN sortie_events'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(listening().await, 0);
    let mut stream = reqwest::Client::new()
        .get(format!("{}/api/events", server.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let first = stream.chunk().await.unwrap().expect("the ready event");
    assert!(String::from_utf8_lossy(&first).contains("event: ready"));
    wait_for(Duration::from_secs(30), || async { listening().await == 1 }).await;
    assert_eq!(listening().await, 1, "the stream listens on sortie_events");
    drop(stream);
    wait_for(Duration::from_secs(30), || async { listening().await == 0 }).await;
    assert_eq!(
        listening().await,
        0,
        "the closed stream's LISTEN connection is still open"
    );
    drop(server);
    db.finish().await;
}
