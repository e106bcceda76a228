//! Command checks (SPEC §17): a step's `verify` command and a campaign's `benchmark_command`,
//! run with `sh -c` in `SORTIE_WORKDIR` under `SORTIE_VERIFY_TIMEOUT`. What they print is
//! decoded lossily (U+0000 replaced), so any output can be stored.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// How a check command ended.
#[derive(Debug, Clone)]
pub struct CheckRun {
    /// The exit code; None when it was killed (timeout, signal) or could not start.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CheckRun {
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// What a failed check tells the agent on its retry: how it ended, then stdout and stderr.
    pub fn report(&self) -> String {
        let ended = match (self.exit_code, self.timed_out) {
            (_, true) => "it ran out of time and was stopped".to_string(),
            (Some(code), _) => format!("it exited with {code}"),
            (None, _) => "it was killed by a signal".to_string(),
        };
        let mut text = ended;
        for (name, stream) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if !stream.trim().is_empty() {
                text.push_str(&format!("\n--- {name}\n{}", stream.trim_end()));
            }
        }
        text
    }
}

/// Runs `command` with `sh -c` in `workdir` (the current directory when None), with `env` added
/// to the inherited environment (or replacing it when `clear_env`), stopped after `timeout`.
pub async fn run(
    command: &str,
    workdir: Option<&Path>,
    env: &[(String, String)],
    clear_env: bool,
    timeout: Duration,
) -> CheckRun {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that what it started goes with it (see finish()).
        .process_group(0)
        .kill_on_drop(true);
    if clear_env {
        cmd.env_clear();
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    if let Some(dir) = workdir {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CheckRun {
                exit_code: None,
                stdout: String::new(),
                stderr: format!("could not start `sh -c {command}`: {e}"),
                timed_out: false,
            }
        }
    };
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let read_out = tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut bytes).await;
        }
        bytes
    });
    let read_err = tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut bytes).await;
        }
        bytes
    });
    let group = child.id();
    let (exit_code, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(_)) => (None, false),
        Err(_) => (None, true),
    };
    let (stdout, stderr) = finish(group, read_out, read_err).await;
    CheckRun {
        exit_code,
        stdout,
        stderr,
        timed_out,
    }
}

/// After a command ended or ran out of time: whatever it left running in its process group
/// (a server it started, `make`'s children) is killed, so nothing holds its output pipes open,
/// and what it printed is read, for at most PIPE_GRACE more. Shared by checks and command
/// agents (SPEC §13, §17: a timeout stops the whole command, and no claim waits on an orphan).
pub async fn finish(
    group: Option<u32>,
    read_out: tokio::task::JoinHandle<Vec<u8>>,
    read_err: tokio::task::JoinHandle<Vec<u8>>,
) -> (String, String) {
    if let Some(pgid) = group {
        kill_group(pgid);
    }
    let stdout = tokio::time::timeout(PIPE_GRACE, read_out).await;
    let stderr = tokio::time::timeout(PIPE_GRACE, read_err).await;
    (
        text(&stdout.ok().and_then(Result::ok).unwrap_or_default()),
        text(&stderr.ok().and_then(Result::ok).unwrap_or_default()),
    )
}

/// How long output is still read once its command is gone.
const PIPE_GRACE: Duration = Duration::from_secs(5);

/// SIGKILL to every process of a group this process created.
#[allow(unsafe_code)] // one libc call; see the SAFETY comment
pub fn kill_group(pgid: u32) {
    // SAFETY: killpg(2) on the group of a child this process started with process_group(0).
    // The group outlives its leader while any member is left, and its id is not reused while
    // it exists; with no member left the call fails with ESRCH and does nothing.
    unsafe { libc::killpg(pgid as libc::pid_t, libc::SIGKILL) };
}

/// Bytes as storable text: lossy UTF-8, U+0000 replaced by U+FFFD.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_check_passes_on_exit_zero_and_reports_what_it_printed_otherwise() {
        let ok = run("echo fine", None, &[], false, Duration::from_secs(10)).await;
        assert!(ok.passed());
        assert_eq!(ok.stdout, "fine\n");
        let bad = run(
            "echo out; echo oops >&2; exit 3",
            None,
            &[],
            false,
            Duration::from_secs(10),
        )
        .await;
        assert!(!bad.passed());
        let report = bad.report();
        assert!(report.starts_with("it exited with 3"), "{report}");
        assert!(
            report.contains("--- stdout\nout") && report.contains("--- stderr\noops"),
            "{report}"
        );
        let slow = run("sleep 5", None, &[], false, Duration::from_millis(200)).await;
        assert!(slow.timed_out && !slow.passed());
        // What the command started goes with it: neither a timeout nor an exit waits for it.
        let started = std::time::Instant::now();
        let orphan = run(
            "sleep 30 & echo started; sleep 30",
            None,
            &[],
            false,
            Duration::from_millis(300),
        )
        .await;
        assert!(
            orphan.timed_out && orphan.stdout == "started\n",
            "{orphan:?}"
        );
        let left = run(
            "sleep 30 & echo done",
            None,
            &[],
            false,
            Duration::from_secs(10),
        )
        .await;
        assert!(left.passed() && left.stdout == "done\n", "{left:?}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let env = run(
            "printf %s \"$CHECK_VAR\"",
            Some(Path::new("/")),
            &[("CHECK_VAR".into(), "x\u{1}".into())],
            false,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(env.stdout, "x\u{1}");
    }
}
