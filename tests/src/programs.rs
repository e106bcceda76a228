//! The programs tests run: the project's binaries (built on first use), `sortie-runner`
//! processes, `psql`, stand-in agent scripts; and waiting for what they do.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::database::TestDb;

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
        // `cargo test` gives the test process the package's build variables
        // (CARGO_MANIFEST_DIR, CARGO_PKG_NAME, …). Some dependencies' build scripts (ring's)
        // rerun when one of them changes, so a nested build that inherits them rebuilds ring,
        // rustls, reqwest and every binary above them, and the next top-level build rebuilds
        // them all back: minutes of CI time, twice. The nested build gets the shell's
        // environment: cargo's own settings (CARGO_HOME, CARGO_TARGET_DIR, …) are kept.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name == "CARGO_MANIFEST_DIR"
                || name == "CARGO_MANIFEST_PATH"
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_CRATE_NAME"
                || name == "CARGO_TARGET_TMPDIR"
                || name == "OUT_DIR"
                || name.starts_with("CARGO_PKG_")
                || name.starts_with("CARGO_BIN_EXE_")
            {
                build.env_remove(name.as_ref());
            }
        }
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
    // For a flaky run's post-mortem: SORTIE_TEST_RUNNER_LOG=<file> appends every runner's log
    // (at info) to that file.
    match std::env::var_os("SORTIE_TEST_RUNNER_LOG") {
        Some(path) => runner_process_logged(db, args, env, std::path::Path::new(&path)),
        None => runner_command(db, args, env, "warn", Stdio::null())
            .spawn()
            .expect("start sortie-runner"),
    }
}

/// `runner_process` with the runner's log (at info) appended to `log`, for a test that shows
/// it when something went wrong.
pub fn runner_process_logged(
    db: &TestDb,
    args: &[&str],
    env: &[(&str, String)],
    log: &std::path::Path,
) -> std::process::Child {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("runner log file");
    runner_command(db, args, env, "info", Stdio::from(file))
        .spawn()
        .expect("start sortie-runner")
}

/// sortie-runner on `db` with `args`, RUST_LOG=`level` and stderr to `stderr`; `env` is set
/// after them.
fn runner_command(
    db: &TestDb,
    args: &[&str],
    env: &[(&str, String)],
    level: &str,
    stderr: Stdio,
) -> Command {
    let mut command = Command::new(binary("sortie-runner"));
    command
        .args(args)
        .env("DATABASE_URL", db.connection_string())
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(stderr);
    for (k, v) in env {
        command.env(k, v);
    }
    command
}
