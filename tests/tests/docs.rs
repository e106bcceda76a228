//! The documentation's examples, run as written (issue 17): every code block is read from the
//! Markdown file, so an example that stops working fails here instead of failing a reader.

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;
use sortie_tests::fixtures::*;
use sortie_tests::markdown::{code_blocks, read, Block};
use sortie_tests::{psql, TestDb};

/// Runs a campaign the way docs/step-json.md describes: every round, workers claim every
/// ready step, then finish each (in claim order) with its action as output. Returns the round
/// each step was claimed in.
async fn run_in_rounds(db: &TestDb, campaign: uuid::Uuid) -> HashMap<i64, usize> {
    let mut rounds = HashMap::new();
    for round in 1..=50 {
        let mut claims = Vec::new();
        while let Some(c) = claim(db, campaign).await {
            claims.push(c);
        }
        if claims.is_empty() {
            return rounds;
        }
        for c in claims {
            rounds.insert(c.step_id, round);
            // A step skipped while it ran (a threshold met) answers `skipped`: that is
            // what the example shows.
            let completed = db
                .call(
                    "sortie.complete_step($1, $2, $3)",
                    &[&c.step_id, &c.token, &c.action],
                )
                .await;
            // A step with `verify` waits for its check: run it as the runner would.
            if let Some(answer) = completed.ok().filter(|a| a["verification"] == "pending") {
                let check = Command::new("sh")
                    .args(["-c", answer["verify"].as_str().unwrap()])
                    .output()
                    .unwrap();
                let output = String::from_utf8_lossy(&check.stdout).to_string();
                db.ok(
                    "sortie.record_verification($1, $2, $3, $4)",
                    &[&c.step_id, &c.token, &check.status.success(), &output],
                )
                .await;
            }
        }
    }
    panic!("the campaign was still running after 50 rounds");
}

/// The steps of a campaign in the notation of docs/step-json.md.
async fn render(db: &TestDb, campaign: uuid::Uuid, rounds: &HashMap<i64, usize>) -> String {
    let rows = db
        .client
        .query(
            "SELECT id, parent_id, step_type::text, action, agent, input, requires_locks,
                    completion_threshold::int, status::text, verify
               FROM sortie.steps WHERE campaign_id = $1 ORDER BY parent_id NULLS FIRST, position, id",
            &[&campaign],
        )
        .await
        .unwrap();
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    let number = |id: i64| ids.iter().position(|x| *x == id).unwrap() + 1;
    let mut after: HashMap<i64, Vec<i64>> = HashMap::new();
    for row in db
        .client
        .query(
            "SELECT step_id, depends_on FROM sortie.step_dependencies WHERE campaign_id = $1",
            &[&campaign],
        )
        .await
        .unwrap()
    {
        after.entry(row.get(0)).or_default().push(row.get(1));
    }
    let line = |row: &tokio_postgres::Row, depth: usize| {
        let id: i64 = row.get(0);
        let mut text = format!(
            "{}#{} {} {:?}",
            "  ".repeat(depth),
            number(id),
            row.get::<_, String>(2),
            row.get::<_, String>(3)
        );
        if let Some(agent) = row.get::<_, Option<String>>(4) {
            text.push_str(&format!(" agent={agent}"));
        }
        if let Some(input) = row.get::<_, Option<Value>>(5).filter(|v| !v.is_null()) {
            text.push_str(&format!(" input={input}"));
        }
        let locks: Vec<String> = row.get(6);
        if !locks.is_empty() {
            text.push_str(&format!(" locks={}", locks.join(",")));
        }
        if let Some(threshold) = row.get::<_, Option<i32>>(7) {
            text.push_str(&format!(" threshold={threshold}"));
        }
        if let Some(verify) = row.get::<_, Option<String>>(9) {
            text.push_str(&format!(" verify={verify:?}"));
        }
        if let Some(deps) = after.get(&id) {
            let mut deps: Vec<usize> = deps.iter().map(|d| number(*d)).collect();
            deps.sort_unstable();
            let deps: Vec<String> = deps.iter().map(|d| format!("#{d}")).collect();
            text.push_str(&format!(" after {}", deps.join(",")));
        }
        text.push_str(" | ");
        if let Some(round) = rounds.get(&id) {
            text.push_str(&format!("round {round}: "));
        }
        text.push_str(&row.get::<_, String>(8));
        text
    };
    fn walk(
        rows: &[tokio_postgres::Row],
        parent: Option<i64>,
        depth: usize,
        line: &dyn Fn(&tokio_postgres::Row, usize) -> String,
        out: &mut Vec<String>,
    ) {
        for row in rows.iter().filter(|r| r.get::<_, Option<i64>>(1) == parent) {
            out.push(line(row, depth));
            walk(rows, Some(row.get(0)), depth + 1, line, out);
        }
    }
    let mut out = Vec::new();
    walk(&rows, None, 0, &line, &mut out);
    out.push(format!("campaign: {}", campaign_status(db, campaign).await));
    out.join("\n")
}

/// `json` blocks with the `text` block that must follow each; `sql` blocks run through psql.
#[tokio::test]
async fn every_step_json_example_runs_as_documented() {
    let blocks = code_blocks(&read("docs/step-json.md"));
    let db = TestDb::new().await;
    let (mut shapes, mut refusals, mut scripts) = (0, 0, 0);
    let mut pending: Option<&Block> = None;
    for block in &blocks {
        match (block.language(), pending.take()) {
            ("json", None) => pending = Some(block),
            ("text", Some(example)) => {
                let steps: Value = serde_json::from_str(&example.text).unwrap_or_else(|e| {
                    panic!("step-json.md line {}: not JSON: {e}", example.line)
                });
                let campaign = campaign(&db, "none").await;
                let expected = block.text.trim();
                if example.has("refused") {
                    let refusal = db
                        .call("sortie.add_steps($1, $2)", &[&campaign, &steps])
                        .await
                        .expect_err(&format!("step-json.md line {}: accepted", example.line));
                    assert!(
                        refusal.message.contains(expected),
                        "step-json.md line {}: refused with {refusal}, not {expected:?}",
                        example.line
                    );
                    let written = count(
                        &db,
                        &format!(
                            "SELECT count(*) FROM sortie.steps WHERE campaign_id = '{campaign}'"
                        ),
                    )
                    .await;
                    assert_eq!(written, 0, "a refused call wrote nothing");
                    db.ok("sortie.cancel_campaign($1)", &[&campaign]).await;
                    refusals += 1;
                } else {
                    add(&db, campaign, steps).await;
                    let rounds = run_in_rounds(&db, campaign).await;
                    let actual = render(&db, campaign, &rounds).await;
                    assert_eq!(
                        actual, expected,
                        "step-json.md line {}: the example ran differently:\n{actual}",
                        example.line
                    );
                    shapes += 1;
                }
            }
            ("sql", None) => {
                let output = psql(&db.connection_string(), &block.text);
                assert!(
                    output.status.success(),
                    "step-json.md line {}: {}",
                    block.line,
                    String::from_utf8_lossy(&output.stderr)
                );
                scripts += 1;
            }
            (language, example) => panic!(
                "step-json.md line {}: a {language:?} block where {} was expected",
                block.line,
                if example.is_some() {
                    "the text block of the example above"
                } else {
                    "a json or sql block"
                }
            ),
        }
    }
    assert!(pending.is_none(), "the last json example has no text block");
    // atomic, sequence, parallel, for_each, collect, nested, keys, thresholds, locks, verify.
    assert_eq!((shapes, refusals, scripts), (10, 4, 2));
    db.finish().await;
}

/// Runs a shell script the way a newcomer would: a normal user (`nobody` when the test runs as
/// root), a fresh home directory, no Sortie variable set but SORTIE_DEMO_AGENT (the source
/// tree may be out of that user's reach), the binaries of this build on PATH.
/// The embedded cluster the script starts lives in that home and is removed afterwards.
fn run_as_a_new_user(script: &str) -> std::process::Output {
    use sortie_mcp::embedded::running_as_root;
    let home = std::path::PathBuf::from(format!("/tmp/sortie-readme-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    // The binaries go into the new user's own directory (hard links when possible): the
    // build may sit where that user cannot enter (a clone under /root).
    let bin_dir = home.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    for name in ["sortie-runner", "sortie-mcp", "sortie"] {
        let built = sortie_tests::binary(name);
        let linked = bin_dir.join(name);
        if std::fs::hard_link(&built, &linked).is_err() {
            std::fs::copy(&built, &linked).unwrap();
        }
    }
    // So is the demo's agent script, which the runner otherwise finds in the source tree.
    let agent = home.join("demo-agent.sh");
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../sortie_mcp/examples/demo-agent.sh"),
        &agent,
    )
    .unwrap();
    let environment = [
        format!("HOME={}", home.display()),
        format!("PATH={}:/usr/local/bin:/usr/bin:/bin", bin_dir.display()),
        "LANG=C.UTF-8".to_string(),
        format!("SORTIE_DEMO_AGENT={}", agent.display()),
    ];
    let as_user = |program: &str| {
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "nobody", "--", "env", "-i"]);
            c
        } else {
            let mut c = Command::new("env");
            c.arg("-i");
            c
        };
        command.args(&environment).arg(program).current_dir(&home);
        command
    };
    if running_as_root() {
        // Only the home itself: the binaries may be hard links to the build's own files.
        let status = Command::new("chown")
            .arg("nobody:")
            .arg(&home)
            .status()
            .unwrap();
        assert!(status.success(), "chown {}", home.display());
    }
    let output = as_user("bash")
        .args(["-c", &format!("set -euo pipefail\n{script}")])
        .output()
        .expect("run the README's shell snippets");
    // Whatever the script left running or on disk goes.
    let data = home.join(".local/share/sortie/pgdata");
    if data.join("postmaster.pid").exists() {
        let _ = as_user("/usr/lib/postgresql/15/bin/pg_ctl")
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&data)
            .output();
    }
    let _ = std::fs::remove_dir_all(&home);
    output
}

/// README.md as a newcomer follows it: every `sql` block pasted in order into one psql session
/// on a database with the extension, every `sh` block run in order as a new user, every `json`
/// block parsed (MCP client configurations name only variables Sortie reads). A block that is
/// not meant to be run says so and why: ```sh no-run (reason).
#[tokio::test]
async fn every_readme_snippet_runs_as_pasted() {
    let readme = read("README.md");
    let (mut sql, mut shell, mut configurations) = (String::new(), String::new(), 0);
    for block in code_blocks(&readme) {
        if block.has("no-run") {
            let reason = block.info.split_once("no-run").unwrap().1.trim();
            assert!(
                reason.starts_with('(') && reason.ends_with(')') && reason.len() > 12,
                "README line {}: a no-run block says why, in brackets: {:?}",
                block.line,
                block.info
            );
            continue;
        }
        match block.language() {
            "sql" => sql.push_str(&block.text),
            "sh" => shell.push_str(&format!("# README line {}\n{}", block.line, block.text)),
            "json" => {
                let value: Value = serde_json::from_str(&block.text)
                    .unwrap_or_else(|e| panic!("README line {}: not JSON: {e}", block.line));
                let server = &value["mcpServers"]["sortie"];
                assert!(
                    server["command"].as_str().unwrap().ends_with("/sortie-mcp"),
                    "README line {}",
                    block.line
                );
                for name in server["env"].as_object().into_iter().flatten().map(|e| e.0) {
                    assert!(
                        sortie_mcp::config::ENV_VARS.iter().any(|v| v.name == name),
                        "README line {}: {name} is not a variable Sortie reads",
                        block.line
                    );
                }
                configurations += 1;
            }
            "text" => {}
            other => panic!(
                "README line {}: a {other:?} block; use sql, sh, json or text",
                block.line
            ),
        }
    }
    assert!(
        configurations >= 1,
        "the MCP client configuration is checked"
    );
    for var in sortie_mcp::config::ENV_VARS {
        assert!(
            readme.contains(&format!("`{}`", var.name)),
            "{} is missing from the README",
            var.name
        );
    }

    let db = TestDb::new().await;
    let output = psql(&db.connection_string(), &sql);
    assert!(
        output.status.success(),
        "the README's SQL failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("claimed step") && printed.contains("benchmark "),
        "the walk-through claimed a benchmark step: {printed}"
    );
    let done = count(
        &db,
        "SELECT count(*) FROM sortie.steps WHERE status = 'done' AND action LIKE 'benchmark %'",
    )
    .await;
    assert_eq!(done, 1, "the walk-through completed the step it claimed");
    db.finish().await;

    let output = run_as_a_new_user(&shell);
    assert!(
        output.status.success(),
        "the README's shell snippets failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
