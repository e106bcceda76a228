//! Start-up checks of both binaries (SPEC §9, issue 17): a bad DATABASE_URL, an unreachable
//! server or a database without the extension stops the program before it serves anything,
//! with a message naming the variable and the fix; `--help` lists every variable the programs
//! read; `--version` names the commit.

use std::process::{Command, Output};

use serde_json::json;
use sortie_mcp::config::{Reader, ENV_VARS};
use sortie_tests::mcp::McpClient;
use sortie_tests::{database_without_extension, run_binary, TestDb};

const BINARIES: [&str; 2] = ["sortie-mcp", "sortie-runner"];

/// What an MCP client sends first: if the server answered it, stdout would not be empty.
fn initialize() -> String {
    format!(
        "{}\n",
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}})
    )
}

/// Runs `binary` with one DATABASE_URL and asserts it stopped at start: a non-zero exit, no
/// byte on stdout (so no JSON-RPC answer), and stderr containing every one of `expected`.
fn assert_refused_at_start(binary: &str, env: &[(&str, &str)], expected: &[&str]) -> String {
    // --once keeps the runner from serving forever if the check were missing.
    let args: &[&str] = if binary == "sortie-runner" {
        &["--once"]
    } else {
        &[]
    };
    let output: Output = run_binary(binary, args, env, &initialize());
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        !output.status.success(),
        "{binary} {env:?} started: {stderr}"
    );
    assert_eq!(output.status.code(), Some(1), "{binary}: {stderr}");
    assert!(
        output.stdout.is_empty(),
        "{binary} {env:?} wrote to stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    for text in expected {
        assert!(
            stderr.contains(text),
            "{binary} {env:?}: {text:?} not in {stderr}"
        );
    }
    stderr
}

#[test]
fn an_unparseable_database_url_stops_both_binaries_naming_the_variable() {
    for binary in BINARIES {
        for url in [
            "postgresql://me@localhost:notaport/db",
            "not a connection string",
        ] {
            assert_refused_at_start(
                binary,
                &[("DATABASE_URL", url)],
                &["DATABASE_URL: invalid connection string"],
            );
        }
    }
}

#[test]
fn an_unreachable_server_stops_both_binaries_before_they_serve() {
    for binary in BINARIES {
        for url in [
            "host=/nonexistent-sortie-socket user=nobody dbname=none",
            // Port 1 on the loopback: nothing listens there, the connection is refused.
            "postgresql://nobody:secret-password@127.0.0.1:1/none",
        ] {
            let stderr = assert_refused_at_start(
                binary,
                &[("DATABASE_URL", url)],
                &["DATABASE_URL: cannot reach"],
            );
            assert!(!stderr.contains("secret-password"), "{stderr}");
        }
    }
}

#[tokio::test]
async fn a_database_without_the_extension_is_answered_with_the_command_that_installs_it() {
    let url = database_without_extension().await;
    for binary in BINARIES {
        assert_refused_at_start(
            binary,
            &[("DATABASE_URL", &url)],
            &[
                "DATABASE_URL:",
                "does not have the sortie extension",
                "CREATE EXTENSION sortie CASCADE",
            ],
        );
    }
}

/// A database whose extension was created by an older build of the same version (a
/// development build) lacks the functions added since: both binaries stop at start naming them
/// and the fix, rather than fail each call that needs one (a runner's records among them).
#[tokio::test]
async fn an_extension_older_than_the_binaries_is_named_with_the_functions_it_lacks() {
    let db = TestDb::single_node().await;
    db.client
        .batch_execute(
            "ALTER EXTENSION sortie DROP FUNCTION sortie._complete_step_delegated; \
             DROP FUNCTION sortie._complete_step_delegated; \
             ALTER EXTENSION sortie DROP FUNCTION sortie._release_step_delegated; \
             DROP FUNCTION sortie._release_step_delegated",
        )
        .await
        .unwrap();
    for binary in BINARIES {
        assert_refused_at_start(
            binary,
            &[("DATABASE_URL", &db.connection_string())],
            &[
                "DATABASE_URL:",
                "lacks 2 function(s)",
                "_complete_step_delegated, _release_step_delegated",
                "older build",
                "ALTER EXTENSION sortie UPDATE",
            ],
        );
    }
    db.finish().await;
}

#[tokio::test]
async fn an_extension_in_another_schema_is_answered_with_the_setting_that_finds_it() {
    let db = TestDb::new().await;
    for binary in BINARIES {
        assert_refused_at_start(
            binary,
            &[
                ("DATABASE_URL", &db.connection_string()),
                ("SORTIE_SCHEMA", "elsewhere"),
            ],
            &["SORTIE_SCHEMA:", "set SORTIE_SCHEMA=sortie"],
        );
    }
    db.finish().await;
}

#[tokio::test]
async fn an_extension_dropped_after_start_is_a_tool_error_naming_the_command_that_installs_it() {
    let db = TestDb::new().await;
    let mcp = McpClient::start(&db, &[]).await;
    db.client
        .batch_execute("DROP EXTENSION sortie CASCADE")
        .await
        .unwrap();
    let outcome = mcp.call("list_campaigns", json!({})).await;
    assert!(outcome.is_error, "{outcome:?}");
    assert_eq!(outcome.code(), "unavailable", "{outcome:?}");
    assert!(
        outcome.text.contains("CREATE EXTENSION sortie CASCADE"),
        "{}",
        outcome.text
    );
    db.client
        .batch_execute("CREATE EXTENSION sortie CASCADE")
        .await
        .unwrap();
    let again = mcp.call("list_campaigns", json!({})).await;
    assert!(
        !again.is_error,
        "once installed again, the same call works: {again:?}"
    );
    mcp.stop().await;
    db.finish().await;
}

/// Every variable named in a `var("…")`, `var_os("…")` or `try_from_env("…")` call anywhere in
/// sortie_mcp's sources.
fn variables_read_in_sources() -> Vec<String> {
    fn walk(dir: &std::path::Path, found: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for call in ["var(\"", "var_os(\"", "try_from_env(\""] {
                    for (at, _) in text.match_indices(call) {
                        let rest = &text[at + call.len()..];
                        let name = &rest[..rest.find('"').unwrap()];
                        if !name.is_empty()
                            && name
                                .chars()
                                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                        {
                            found.push(name.to_string());
                        }
                    }
                }
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sortie_mcp/src"),
        &mut found,
    );
    found.sort();
    found.dedup();
    found
}

#[test]
fn help_lists_every_variable_the_programs_read_with_its_default() {
    let help = |binary: &str| {
        let output = run_binary(binary, &["--help"], &[], "");
        assert!(output.status.success(), "{binary} --help");
        String::from_utf8(output.stdout).unwrap()
    };
    let helps = [
        (help("sortie-mcp"), Reader::Mcp),
        (help("sortie-runner"), Reader::Runner),
        (help("sortie"), Reader::Cli),
    ];
    for (text, reader) in &helps {
        assert!(text.contains("Environment variables"), "{text}");
        assert!(text.contains("Examples:"), "{text}");
        // `sortie` lists the variables that change what it does (cli::CLI_VARIABLES); the
        // others it reads are only checked at start, and its help says so.
        for var in ENV_VARS.iter().filter(|v| match reader {
            Reader::Cli => sortie_mcp::cli::CLI_VARIABLES.contains(&v.name),
            _ => v.read_by == Reader::Both || v.read_by == *reader,
        }) {
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} ", var.name)))
                .unwrap_or_else(|| panic!("{} missing from --help:\n{text}", var.name));
            assert!(
                line.contains(&format!("[{}]", var.default)),
                "{line}: no default"
            );
        }
    }
    // The table covers what the code reads: the configuration and every other lookup.
    let asked = std::cell::RefCell::new(Vec::new());
    let _ = sortie_mcp::config::Config::from_vars(&|name| {
        asked.borrow_mut().push(name.to_string());
        None
    });
    let mut read = variables_read_in_sources();
    read.extend(asked.into_inner());
    assert!(read.contains(&"SORTIE_PG_BIN".to_string()), "{read:?}");
    assert!(
        read.contains(&"SORTIE_MAX_CONCURRENT".to_string()),
        "{read:?}"
    );
    for name in read.iter().filter(|n| *n != "HOME") {
        assert!(
            helps.iter().any(|(text, _)| text.contains(name.as_str())),
            "{name} is read but no --help lists it"
        );
    }
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    for binary in BINARIES {
        let output = run_binary(binary, &["--version"], &[], "");
        let text = String::from_utf8(output.stdout).unwrap();
        let commit = text
            .split("(commit ")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .unwrap_or_else(|| panic!("no commit in {text:?}"));
        // The build ran in this checkout: the commit is one of its own (or the build was made
        // outside a checkout, which this test never does).
        let known = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(known.success(), "{binary} --version: {text:?}");
        assert!(text.starts_with(&format!("{binary} ")), "{text:?}");
    }
}

/// `scripts/setup` on a machine without Rust, or with Debian's old cargo, says what is missing
/// and the command that gets it, before it installs anything.
#[test]
fn setup_says_how_to_get_rust_before_doing_anything() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = std::env::temp_dir().join(format!("sortie-setup-test-{}", std::process::id()));
    let bin = tmp.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // Only the tools the check itself uses: no cargo, no apt-get, no sudo.
    for tool in ["dirname", "awk", "sort", "head", "id"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8(found.stdout).unwrap();
        std::os::unix::fs::symlink(path.trim(), bin.join(tool)).unwrap();
    }
    let setup = |home: &std::path::Path| {
        Command::new("/bin/bash")
            .arg(root.join("scripts/setup"))
            .arg("--deps")
            .env_clear()
            .env("PATH", &bin)
            .env("HOME", home)
            .output()
            .unwrap()
    };
    let missing = setup(&tmp);
    let said = String::from_utf8_lossy(&missing.stderr).to_string();
    assert_eq!(missing.status.code(), Some(1), "{said}");
    assert!(said.contains("cargo (Rust) is not installed"), "{said}");
    assert!(said.contains("https://sh.rustup.rs"), "{said}");
    assert!(
        !said.contains("installing"),
        "nothing else was started: {said}"
    );

    std::fs::write(bin.join("cargo"), "#!/bin/sh\necho 'cargo 1.63.0'\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("cargo"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = setup(&tmp);
    let said = String::from_utf8_lossy(&old.stderr).to_string();
    assert_eq!(old.status.code(), Some(1), "{said}");
    assert!(said.contains("cargo 1.63.0"), "{said}");
    assert!(said.contains("older than Rust 1.95"), "{said}");
    assert!(said.contains("https://sh.rustup.rs"), "{said}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// With no DATABASE_URL, a SORTIE_PG_BIN without the server binaries is named at start instead
/// of being passed over for another PostgreSQL, and no cluster is made.
#[test]
fn a_wrong_sortie_pg_bin_stops_both_binaries_naming_it() {
    let data = std::env::temp_dir().join(format!("sortie-pg-bin-test-{}", std::process::id()));
    let data_dir = data.to_string_lossy().to_string();
    for binary in BINARIES {
        assert_refused_at_start(
            binary,
            &[
                ("SORTIE_DATA_DIR", &data_dir),
                ("SORTIE_PG_BIN", "/nonexistent-postgresql/bin"),
            ],
            &[
                "SORTIE_PG_BIN=\"/nonexistent-postgresql/bin\" is invalid",
                "initdb",
            ],
        );
    }
    assert!(!data.exists(), "no cluster was made");
}
