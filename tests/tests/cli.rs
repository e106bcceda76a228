//! The `sortie` command-line tool (SPEC §16) on real campaigns: the tree, JSON, graphs parsed
//! back (DOT checked by Graphviz), events (followed live), top, doctor and steering.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};
use sortie_tests::fixtures::*;
use sortie_tests::{binary, run_binary, wait_for, TestDb};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sortie(db: &TestDb, args: &[&str]) -> Run {
    let url = db.connection_string();
    let output = run_binary("sortie", args, &[("DATABASE_URL", url.as_str())], "");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn json_of(run: &Run) -> Value {
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// A campaign with a done step that spliced (two subtasks and a continuation), a parallel
/// group, a failed step and pending ones.
async fn busy_campaign(db: &TestDb) -> uuid::Uuid {
    let c = campaign(db, "none").await;
    add(
        db,
        c,
        json!([
            {"action": "research", "key": "r", "agent": "scout"},
            {"step_type": "parallel_group", "action": "probe \"hosts\"", "key": "p", "depends_on": ["r"],
             "children": [{"action": "probe a"}, {"action": "probe b"}]},
            {"action": "flaky", "max_attempts": 1}
        ]),
    )
    .await;
    let research = claim(db, c).await.unwrap();
    db.ok(
        "sortie.spawn_and_continue(step_id => $1, claim_token => $2, subtasks => $3, continuation => to_jsonb('synthesise'::text), partial_output => 'collected 3 sources\nand more')",
        &[&research.step_id, &research.token, &json!([{"action": "read paper A"}, {"action": "read paper B"}])],
    )
    .await;
    let flaky = claim(db, c).await.unwrap();
    assert_eq!(flaky.action, "flaky");
    fail(db, &flaky, "disk full").await;
    c
}

async fn step_ids(db: &TestDb, c: uuid::Uuid) -> Vec<i64> {
    db.client
        .query(
            "SELECT id FROM sortie.steps WHERE campaign_id = $1 ORDER BY id",
            &[&c],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn show_prints_the_step_tree_and_json_has_every_step() {
    let db = TestDb::new().await;
    let c = busy_campaign(&db).await;
    let ids = step_ids(&db, c).await;
    let tree = sortie(&db, &["show", &c.to_string()]);
    assert_eq!(tree.code, 0, "{}", tree.stderr);
    for id in &ids {
        assert!(
            tree.stdout.contains(&format!("#{id} ")),
            "#{id} missing:\n{}",
            tree.stdout
        );
    }
    let line = |needle: &str| {
        tree.stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle} missing:\n{}", tree.stdout))
            .to_string()
    };
    let research = line("research");
    assert!(
        research.contains("done") && research.contains("scout"),
        "{research}"
    );
    assert!(
        research.contains("1 attempt ") && research.contains("continued by #"),
        "{}",
        tree.stdout
    );
    // Output cut to its first line.
    assert!(research.contains("— collected 3 sources …"), "{research}");
    assert!(line("read paper A").contains("spawned by #"));
    assert!(line("read paper A").starts_with("├─ ") || line("read paper A").starts_with("└─ "));
    assert!(line("flaky").contains("failed") && line("flaky").contains("disk full"));
    assert!(line("probe a")
        .trim_start_matches(['├', '└', '─', ' ', '│'])
        .starts_with('#'));
    assert!(
        !tree.stdout.contains('\x1b'),
        "no colour when not on a terminal"
    );
    assert!(tree.stdout.contains("steps: "), "{}", tree.stdout);

    let parsed = json_of(&sortie(&db, &["show", &c.to_string(), "--json"]));
    let mut listed: Vec<i64> = parsed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_i64().unwrap())
        .collect();
    listed.sort();
    assert_eq!(listed, ids);

    let campaigns = sortie(&db, &["campaigns"]);
    assert!(
        campaigns.stdout.contains(&c.to_string()),
        "{}",
        campaigns.stdout
    );
    let campaigns = json_of(&sortie(&db, &["--json", "campaigns"]));
    assert_eq!(campaigns["campaigns"][0]["id"], json!(c.to_string()));
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn graph_output_is_valid_dot_and_mermaid_with_every_step() {
    let db = TestDb::new().await;
    let c = busy_campaign(&db).await;
    let ids = step_ids(&db, c).await;

    let dot = sortie(&db, &["graph", &c.to_string(), "--format", "dot"]);
    assert_eq!(dot.code, 0, "{}", dot.stderr);
    let mut graphviz = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("dot (Debian's graphviz, installed by scripts/setup)");
    std::io::Write::write_all(&mut graphviz.stdin.take().unwrap(), dot.stdout.as_bytes()).unwrap();
    let svg = graphviz.wait_with_output().unwrap();
    let svg_text = String::from_utf8_lossy(&svg.stdout);
    assert!(
        svg.status.success(),
        "dot refused the graph: {}\n{}",
        String::from_utf8_lossy(&svg.stderr),
        dot.stdout
    );
    for id in &ids {
        assert!(
            svg_text.contains(&format!("<title>s{id}</title>")),
            "s{id} not drawn"
        );
    }
    assert!(dot.stdout.contains("subgraph cluster_"));
    assert!(dot.stdout.contains("label=\"spawned\"") && dot.stdout.contains("label=\"continues\""));

    let mermaid = sortie(&db, &["graph", &c.to_string(), "--format", "mermaid"]);
    assert_eq!(mermaid.code, 0, "{}", mermaid.stderr);
    check_mermaid(&mermaid.stdout, &ids);
    // Mermaid is the default format.
    assert_eq!(
        sortie(&db, &["graph", &c.to_string()]).stdout,
        mermaid.stdout
    );
    let as_json = json_of(&sortie(&db, &["graph", &c.to_string(), "--json"]));
    assert_eq!(as_json["nodes"].as_array().unwrap().len(), ids.len());

    let refused = sortie(&db, &["graph", &c.to_string(), "--format", "png"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    run_all(&db, c).await;
    db.finish().await;
}

/// Structural Mermaid check: every line is a known statement, subgraphs are balanced, every
/// edge joins declared nodes and every step is declared once.
fn check_mermaid(text: &str, ids: &[i64]) {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("flowchart TD"));
    let mut declared = std::collections::HashMap::new();
    let mut depth = 0i32;
    let mut edges = Vec::new();
    let node_id = |s: &str| -> i64 {
        s.strip_prefix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bad node id {s:?} in {text}"))
    };
    for line in lines {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("classDef ") {
            let (name, style) = rest.split_once(' ').expect(line);
            assert!(!name.is_empty() && style.contains("fill:"), "{line}");
        } else if let Some(rest) = line.strip_prefix("subgraph ") {
            let (id, label) = rest.split_once('[').expect(line);
            assert!(label.starts_with('"') && label.ends_with("\"]"), "{line}");
            *declared.entry(node_id(id)).or_insert(0) += 1;
            depth += 1;
        } else if line == "end" {
            depth -= 1;
            assert!(depth >= 0, "unbalanced end");
        } else if let Some(rest) = line.strip_prefix("class ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(parts.len(), 2, "{line}");
            node_id(parts[0]);
        } else if line.contains("-->") || line.contains(".->") || line.contains("==>") {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let (from, to) = (parts[0], parts[parts.len() - 1]);
            assert!(
                matches!(
                    &parts[1..parts.len() - 1],
                    ["-->"] | ["-.", "spawned", ".->"] | ["==", "continues", "==>"]
                ),
                "{line}"
            );
            edges.push((node_id(from), node_id(to)));
        } else {
            let (id, rest) = line.split_once('[').expect(line);
            let (label, class) = rest.rsplit_once("]:::").expect(line);
            assert!(label.starts_with('"') && label.ends_with('"'), "{line}");
            assert!(
                !label[1..label.len() - 1].contains('"'),
                "unescaped quote: {line}"
            );
            assert!(
                [
                    "pending",
                    "running",
                    "waiting_input",
                    "done",
                    "failed",
                    "skipped"
                ]
                .contains(&class),
                "{line}"
            );
            *declared.entry(node_id(id)).or_insert(0) += 1;
        }
    }
    assert_eq!(depth, 0, "unbalanced subgraphs");
    let mut listed: Vec<i64> = declared.keys().copied().collect();
    listed.sort();
    assert_eq!(listed, ids, "{text}");
    assert!(declared.values().all(|n| *n == 1));
    for (from, to) in edges {
        assert!(declared.contains_key(&from) && declared.contains_key(&to));
    }
}

#[tokio::test]
async fn events_lists_the_log_and_follow_prints_new_events_as_they_happen() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}, {"action": "b"}])).await;
    let a = claim(&db, c).await.unwrap();
    complete(&db, &a, "ok").await;
    let log = sortie(&db, &["events", "--campaign", &c.to_string()]);
    assert_eq!(log.code, 0, "{}", log.stderr);
    assert!(log.stdout.contains("campaign.created"), "{}", log.stdout);
    assert!(
        log.stdout.contains(&format!(
            "{:16} campaign {} step #{}",
            "step.done",
            &c.to_string()[..8],
            a.step_id
        )),
        "{}",
        log.stdout
    );
    let as_json = json_of(&sortie(
        &db,
        &["events", "--campaign", &c.to_string(), "--json"],
    ));
    assert!(as_json["events"].as_array().unwrap().len() >= 3);

    let mut follower = Command::new(binary("sortie"))
        .args([
            "events",
            "--campaign",
            &c.to_string(),
            "--follow",
            "--json",
            "--limit",
            "1",
        ])
        .env("DATABASE_URL", db.connection_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str(&line) {
                let _ = lines_tx.send(event);
            }
        }
    });
    // The newest event first, then what happens next.
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.recv())
        .await
        .expect("the newest event")
        .unwrap();
    assert_eq!(first["kind"], "step.done");
    let b = claim(&db, c).await.unwrap();
    complete(&db, &b, "ok").await;
    let mut seen = Vec::new();
    wait_for(std::time::Duration::from_secs(30), || {
        while let Ok(event) = lines.try_recv() {
            seen.push(event);
        }
        let done = seen
            .iter()
            .any(|e| e["kind"] == "step.done" && e["step_id"] == b.step_id);
        async move { done }
    })
    .await;
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        seen.iter()
            .any(|e| e["kind"] == "step.claimed" && e["step_id"] == b.step_id)
            || seen
                .iter()
                .any(|e| e["kind"] == "step.done" && e["step_id"] == b.step_id),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| e["kind"] == "step.done" && e["step_id"] == b.step_id),
        "the follower never printed step {}'s completion: {seen:?}",
        b.step_id
    );
    db.finish().await;
}

#[tokio::test]
async fn top_once_shows_running_steps_and_progress() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(
        &db,
        c,
        json!([{"action": "long job", "agent": "coder"}, {"action": "later"}]),
    )
    .await;
    let running = claim(&db, c).await.unwrap();
    let frame = sortie(&db, &["top", "--once"]);
    assert_eq!(frame.code, 0, "{}", frame.stderr);
    assert!(frame.stdout.contains("RUNNING (1)"), "{}", frame.stdout);
    let line = frame
        .stdout
        .lines()
        .find(|l| l.contains("long job"))
        .unwrap_or_else(|| panic!("{}", frame.stdout));
    assert!(line.contains("coder") && line.contains("lease "), "{line}");
    assert!(frame.stdout.contains(&c.to_string()[..8]));
    let as_json = json_of(&sortie(&db, &["top", "--once", "--json"]));
    assert_eq!(as_json["running"][0]["step_id"], running.step_id);
    complete(&db, &running, "ok").await;
    run_all(&db, c).await;
    db.finish().await;
}

#[tokio::test]
async fn doctor_exits_non_zero_while_a_transaction_sits_idle() {
    let db = TestDb::new().await;
    let healthy = sortie(&db, &["doctor", "--grace", "0"]);
    assert_eq!(healthy.code, 0, "{}{}", healthy.stdout, healthy.stderr);
    assert!(healthy.stdout.starts_with("healthy"), "{}", healthy.stdout);

    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let idle = db.connect().await;
    idle.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let pid: i32 = idle
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let step = claim(&db, c).await.unwrap();
    complete(&db, &step, "ok").await;

    let sick = sortie(&db, &["doctor", "--grace", "0"]);
    assert_eq!(sick.code, 1, "{}{}", sick.stdout, sick.stderr);
    assert!(sick.stdout.contains("open_transaction"), "{}", sick.stdout);
    assert!(
        sick.stdout
            .contains(&format!("pid {pid} (idle in transaction)")),
        "{}",
        sick.stdout
    );
    let report: Value =
        serde_json::from_str(&sortie(&db, &["doctor", "--grace", "0", "--json"]).stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["oldest_transaction"]["pid"], pid);
    idle.batch_execute("COMMIT").await.unwrap();
    assert_eq!(sortie(&db, &["doctor", "--grace", "0"]).code, 0);
    db.finish().await;
}

#[tokio::test]
async fn pause_resume_and_cancel_steer_a_campaign_and_bad_ids_are_refused() {
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "a"}])).await;
    let id = c.to_string();
    let paused = sortie(&db, &["pause", &id]);
    assert_eq!(paused.code, 0, "{}", paused.stderr);
    assert_eq!(
        paused.stdout.trim(),
        format!("campaign {id} paused: now paused")
    );
    assert_eq!(campaign_status(&db, c).await, "paused");
    let resumed = json_of(&sortie(&db, &["resume", &id, "--json"]));
    assert_eq!(resumed["status"], "active");
    let cancelled = sortie(&db, &["cancel", &id, "--reason", "wrong goal"]);
    assert_eq!(cancelled.code, 0, "{}", cancelled.stderr);
    assert_eq!(campaign_status(&db, c).await, "cancelled");

    let typo = sortie(&db, &["pause", "campaign-7"]);
    assert_eq!(typo.code, 2);
    assert!(
        typo.stderr
            .starts_with("sortie: invalid_argument: \"campaign-7\" is not a campaign id"),
        "{}",
        typo.stderr
    );
    let unknown = uuid::Uuid::new_v4().to_string();
    let missing = sortie(&db, &["--json", "show", &unknown]);
    assert_eq!(missing.code, 1);
    let error: Value = serde_json::from_str(&missing.stdout).unwrap();
    assert_eq!(error["error"]["code"], "not_found");
    let again = sortie(&db, &["resume", &id]);
    assert_eq!(again.code, 1);
    assert!(
        again.stderr.starts_with("sortie: invalid_state: "),
        "{}",
        again.stderr
    );
    assert_eq!(campaign_status(&db, c).await, "cancelled");
    db.finish().await;
}

#[test]
fn help_names_the_environment_and_an_example_per_command() {
    let output = run_binary("sortie", &["--help"], &[], "");
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    for needle in ["DATABASE_URL", "NO_COLOR", "SORTIE_SCHEMA", "Examples:"] {
        assert!(help.contains(needle), "{needle}:\n{help}");
    }
    for command in [
        "campaigns",
        "show",
        "graph",
        "events",
        "top",
        "doctor",
        "pause",
        "resume",
        "cancel",
    ] {
        assert!(
            help.contains(&format!("sortie {command}")),
            "no example of {command}:\n{help}"
        );
        let sub = run_binary("sortie", &[command, "--help"], &[], "");
        let text = String::from_utf8(sub.stdout).unwrap();
        assert!(
            text.contains(&format!("Example: sortie {command}")),
            "{command} --help:\n{text}"
        );
    }
}

/// `top` on a terminal (a pseudo-terminal from util-linux `script`): it redraws in colour until
/// q is pressed; with NO_COLOR the same frame has no colour.
#[tokio::test]
async fn top_on_a_terminal_refreshes_in_colour_and_quits_on_q() {
    use std::io::{Read, Write};
    let db = TestDb::new().await;
    let c = campaign(&db, "none").await;
    add(&db, c, json!([{"action": "long job", "agent": "coder"}])).await;
    let running = claim(&db, c).await.unwrap();
    let on_terminal = |args: &str, no_color: bool| {
        let mut command = Command::new("script");
        command
            .args([
                "-q",
                "-e",
                "-c",
                &format!("{} {args}", binary("sortie").display()),
                "/dev/null",
            ])
            .env("DATABASE_URL", db.connection_string())
            .env("RUST_LOG", "warn")
            .env_remove("NO_COLOR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if no_color {
            command.env("NO_COLOR", "1");
        }
        command.spawn().expect("script (util-linux)")
    };
    let mut live = on_terminal("top --interval 0.2", false);
    let mut stdout = live.stdout.take().unwrap();
    let screen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let collected = screen.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut chunk) {
            if n == 0 {
                return;
            }
            collected
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    let frames = || screen.lock().unwrap().matches("RUNNING (1)").count();
    wait_for(std::time::Duration::from_secs(30), || {
        let n = frames();
        async move { n >= 2 }
    })
    .await;
    assert!(
        frames() >= 2,
        "top did not refresh: {:?}",
        screen.lock().unwrap()
    );
    live.stdin.as_mut().unwrap().write_all(b"q").unwrap();
    let mut status = None;
    wait_for(std::time::Duration::from_secs(30), || {
        status = live.try_wait().unwrap();
        let exited = status.is_some();
        async move { exited }
    })
    .await;
    let status = status.unwrap_or_else(|| {
        let _ = live.kill();
        panic!("top did not quit on q")
    });
    assert!(status.success(), "{status:?}");
    let text = screen.lock().unwrap().clone();
    assert!(text.contains("\x1b[2J"), "the screen is redrawn");
    assert!(text.contains("\x1b[1mRUNNING (1)\x1b[0m"), "{text:?}");
    assert!(text.contains("(q quits)"));

    let plain = on_terminal("top --once", true).wait_with_output().unwrap();
    let plain = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.contains("RUNNING (1)") && plain.contains("long job"),
        "{plain:?}"
    );
    assert!(!plain.contains("\x1b["), "NO_COLOR: {plain:?}");
    complete(&db, &running, "ok").await;
    db.finish().await;
}
