//! `sortie`: see and steer campaigns from a terminal (SPEC §16). Every command is one or a few
//! extension calls (`list_campaigns`, `campaign_graph`, `events`, `activity`, `health`,
//! `pause_campaign`, …) rendered by the pure functions of `view` and `render`; nothing here
//! reads a table.

pub mod render;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::config::{Config, ENV_VARS};
use crate::db::{Db, DbError};
use crate::view::graph::{dot, mermaid, tree, Graph};

#[derive(Parser, Debug)]
#[command(
    name = "sortie",
    version = crate::VERSION,
    about = "See and steer Sortie campaigns: their steps, DAG, events and the installation's health",
    after_help = help_epilogue()
)]
pub struct Cli {
    /// Answer JSON (one document, or one per line for --follow and a live top).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List campaigns, newest first.
    ///
    /// Example: sortie campaigns --status active --limit 50
    Campaigns {
        /// Only campaigns in this status (active, paused, done, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// How many (1 to 200).
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// A campaign's step tree: status, agent, attempts, duration and the first line of output.
    ///
    /// Example: sortie show 3f0c6a52-7d3e-4b8e-9a57-0d4a3c0f5e11
    Show {
        /// The campaign's id.
        id: String,
    },
    /// A campaign's DAG as Mermaid or Graphviz DOT (statuses as styles, compound steps as
    /// subgraphs, spawned subtasks dashed, continuations bold).
    ///
    /// Example: sortie graph ID --format dot | dot -Tsvg > dag.svg
    Graph {
        /// The campaign's id.
        id: String,
        /// Mermaid (paste into Markdown) or Graphviz DOT (pipe to `dot -Tsvg`).
        #[arg(long, value_enum, default_value_t = GraphFormat::Mermaid)]
        format: GraphFormat,
    },
    /// The event log, oldest first (the newest events, then more with --follow).
    ///
    /// Example: sortie events --campaign ID --follow
    Events {
        /// Only this campaign's events.
        #[arg(long)]
        campaign: Option<String>,
        /// Keep printing events as they happen (LISTEN sortie_events) until interrupted.
        #[arg(long)]
        follow: bool,
        /// How many of the newest events to start with (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// Live view: running steps with their lease left and agent, and each campaign's progress.
    /// q or Ctrl-C quits.
    ///
    /// Example: sortie top --interval 2
    Top {
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Check the installation's health; exits 1 when a problem is found.
    ///
    /// Example: sortie doctor --grace 0
    Doctor {
        /// Seconds a condition must last before it counts as a problem.
        #[arg(long, default_value_t = 30.0)]
        grace: f64,
    },
    /// Pause a campaign: nothing new is dispatched; running steps finish.
    ///
    /// Example: sortie pause ID
    Pause { id: String },
    /// Resume a paused campaign.
    ///
    /// Example: sortie resume ID
    Resume { id: String },
    /// Cancel a campaign: its open steps are skipped.
    ///
    /// Example: sortie cancel ID --reason "wrong goal"
    Cancel {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// The variables that change what `sortie` does; the others of the table are still read and
/// checked at start, as by the other binaries, but only matter to them.
pub const CLI_VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "SORTIE_SCHEMA",
    "SORTIE_DATA_DIR",
    "SORTIE_PG_BIN",
    "XDG_DATA_HOME",
    "NO_COLOR",
    "RUST_LOG",
    "LOG_LEVEL",
];

const EXAMPLES: &[&str] = &[
    "sortie campaigns --status active          # campaigns, newest first",
    "sortie show 3f0c6a52-7d3e-4b8e-9a57-0d4a3c0f5e11   # the step tree",
    "sortie graph ID --format dot | dot -Tsvg > dag.svg",
    "sortie graph ID --format mermaid          # paste into a Markdown file",
    "sortie events --campaign ID --follow      # the event log, live",
    "sortie top                                # running steps and progress; q quits",
    "sortie doctor || echo 'something needs attention'",
    "sortie pause ID; sortie resume ID; sortie cancel ID --reason 'wrong goal'",
    "DATABASE_URL=postgresql://me:secret@db.example:5432/app sortie campaigns --json",
];

/// `--help`'s epilogue: the variables from config::ENV_VARS (the one table), then examples.
fn help_epilogue() -> String {
    let vars: Vec<_> = ENV_VARS
        .iter()
        .filter(|v| CLI_VARIABLES.contains(&v.name))
        .collect();
    let width = vars.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut text = String::from("Environment variables (default in brackets):\n");
    for v in vars {
        text.push_str(&format!(
            "  {:width$}  {} [{}]\n",
            v.name, v.meaning, v.default
        ));
    }
    text.push_str(
        "  (the other variables of sortie-mcp --help are checked at start as well)\n\nExamples:\n",
    );
    for example in EXAMPLES {
        text.push_str(&format!("  {example}\n"));
    }
    text
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
}

/// Colour only on a terminal, and never with NO_COLOR set (no-color.org).
pub fn use_colour(is_terminal: bool, no_colour: bool) -> bool {
    is_terminal && !no_colour
}

/// How the command failed: a refusal of ours or the extension's, with its stable code.
struct Failure {
    code: String,
    message: String,
    exit: u8,
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Failure {
        let message = e
            .message
            .strip_prefix(&format!("{}: ", e.code))
            .unwrap_or(&e.message)
            .to_string();
        Failure {
            code: e.code,
            message,
            exit: 1,
        }
    }
}

fn invalid(message: String) -> Failure {
    Failure {
        code: "invalid_argument".into(),
        message,
        exit: 2,
    }
}

fn campaign_id(raw: &str) -> Result<uuid::Uuid, Failure> {
    uuid::Uuid::parse_str(raw.trim()).map_err(|_| {
        invalid(format!(
            "{raw:?} is not a campaign id (a UUID, as `sortie campaigns` lists)"
        ))
    })
}

pub async fn run(cli: Cli) -> ExitCode {
    let json_mode = cli.json;
    let colour = use_colour(
        std::io::stdout().is_terminal(),
        crate::config::Env::get().no_color,
    );
    match execute(cli, colour).await {
        Ok(code) => code,
        Err(failure) => {
            if json_mode {
                println!(
                    "{}",
                    json!({"error": {"code": failure.code, "message": failure.message}})
                );
            }
            eprintln!("sortie: {}: {}", failure.code, failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

async fn connect() -> Result<Db, Failure> {
    let config = Config::from_env().map_err(|e| invalid(format!("{e:#}")))?;
    Db::connect(&config).await.map_err(|e| Failure {
        code: "unavailable".into(),
        message: format!("{e:#}"),
        exit: 1,
    })
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

async fn execute(cli: Cli, colour: bool) -> Result<ExitCode, Failure> {
    // Arguments are checked before the database is reached, so a typo costs nothing.
    let ids = match &cli.command {
        Command::Show { id }
        | Command::Graph { id, .. }
        | Command::Pause { id }
        | Command::Resume { id }
        | Command::Cancel { id, .. } => Some(campaign_id(id)?),
        Command::Events {
            campaign: Some(id), ..
        } => Some(campaign_id(id)?),
        _ => None,
    };
    if let Command::Top { interval, .. } = &cli.command {
        if !(0.1..=3600.0).contains(interval) {
            return Err(invalid("--interval must be 0.1 to 3600 seconds".into()));
        }
    }
    if let Command::Doctor { grace } = &cli.command {
        if !(0.0..=86_400.0).contains(grace) {
            return Err(invalid("--grace must be 0 to 86400 seconds".into()));
        }
    }
    let db = connect().await?;
    match cli.command {
        Command::Campaigns { status, limit } => {
            let answer = db
                .call(
                    "list_campaigns(status => $1, \"limit\" => $2)",
                    &[&status, &limit],
                )
                .await?;
            if cli.json {
                print_json(&answer);
            } else {
                print!("{}", render::campaigns(&answer, colour));
            }
        }
        Command::Show { .. } => {
            // The campaign is named (ids is Some): the delegated twin never takes a NULL.
            let id = ids.expect("show names a campaign");
            let answer = db.call("_campaign_graph_delegated($1)", &[&id]).await?;
            if cli.json {
                print_json(&answer);
            } else {
                let graph = Graph::from_json(&answer).map_err(|m| Failure {
                    code: "internal".into(),
                    message: m,
                    exit: 1,
                })?;
                print!("{}", render::campaign_header(&answer, colour));
                print!("{}", tree(&graph, colour));
            }
        }
        Command::Graph { format, .. } => {
            let id = ids.expect("graph names a campaign");
            let answer = db.call("_campaign_graph_delegated($1)", &[&id]).await?;
            if cli.json {
                print_json(&answer);
            } else {
                let graph = Graph::from_json(&answer).map_err(|m| Failure {
                    code: "internal".into(),
                    message: m,
                    exit: 1,
                })?;
                print!(
                    "{}",
                    match format {
                        GraphFormat::Mermaid => mermaid(&graph),
                        GraphFormat::Dot => dot(&graph),
                    }
                );
            }
        }
        Command::Events { follow, limit, .. } => {
            events(&db, ids, follow, limit, cli.json, colour).await?;
        }
        Command::Top { once, interval } => {
            top(
                &db,
                once,
                Duration::from_secs_f64(interval),
                cli.json,
                colour,
            )
            .await?;
        }
        Command::Doctor { grace } => {
            let seconds = format!("{grace} seconds");
            let answer = db
                .call("health(grace => $1::text::interval)", &[&seconds])
                .await?;
            if cli.json {
                print_json(&answer);
            } else {
                print!("{}", render::health(&answer, colour));
            }
            if answer["ok"] != true {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Pause { .. } => {
            let answer = db.call("_pause_campaign_delegated($1)", &[&ids]).await?;
            steer_result(&answer, "paused", cli.json);
        }
        Command::Resume { .. } => {
            let answer = db.call("_resume_campaign_delegated($1)", &[&ids]).await?;
            steer_result(&answer, "resumed", cli.json);
        }
        Command::Cancel { reason, .. } => {
            let answer = db
                .call("_cancel_campaign_delegated($1, $2)", &[&ids, &reason])
                .await?;
            steer_result(&answer, "cancelled", cli.json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The database went away (a restart, say): the live commands wait for it.
fn transient(e: &DbError) -> bool {
    matches!(e.code.as_str(), "unavailable" | "in_doubt")
}

fn steer_result(answer: &Value, verb: &str, json_mode: bool) {
    if json_mode {
        print_json(answer);
    } else {
        println!(
            "campaign {} {verb}: now {}",
            answer["id"].as_str().unwrap_or("?"),
            answer["status"].as_str().unwrap_or("?")
        );
    }
}

/// Prints the newest events, then (with `follow`) every later one. The extension wakes
/// `sortie_events` listeners at most once per `wake_interval()` a connection, so a wake-up is
/// followed by reads until `listen_poll_window()` has passed; a slow timer covers a lost
/// connection.
async fn events(
    db: &Db,
    campaign: Option<uuid::Uuid>,
    follow: bool,
    limit: i32,
    json_mode: bool,
    colour: bool,
) -> Result<(), Failure> {
    let mut wake = if follow {
        Some(crate::runner::listener::listen(db.connection_string()).await)
    } else {
        None
    };
    // The position `next_after` gives: it holds on every node (on Citus too).
    let mut after: Option<String> = None;
    let mut first = true;
    let mut poll_until = tokio::time::Instant::now();
    loop {
        loop {
            let page = match db
                .call(
                    "events(campaign_id => $1, after => $2, \"limit\" => $3)",
                    &[&campaign, &after, &(if first { limit } else { 1000 })],
                )
                .await
            {
                Ok(page) => page,
                // A follower outlives a database restart: say so and read again shortly.
                Err(e) if follow && !first && transient(&e) => {
                    eprintln!("sortie: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if json_mode && !follow {
                print_json(&page);
                return Ok(());
            }
            let rows = page["events"].as_array().cloned().unwrap_or_default();
            let mut stdout = std::io::stdout().lock();
            for event in &rows {
                let line = if json_mode {
                    event.to_string()
                } else {
                    render::event_line(event, colour)
                };
                if writeln!(stdout, "{line}").is_err() {
                    return Ok(()); // the reader went away (a closed pipe)
                }
            }
            let _ = stdout.flush();
            if let Some(next) = page["next_after"].as_str() {
                after = Some(next.to_string());
            }
            first = false;
            if page["has_more"] != true {
                break;
            }
        }
        let Some(wake) = wake.as_mut() else {
            return Ok(());
        };
        let pause = if tokio::time::Instant::now() < poll_until {
            Duration::from_millis(100)
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            woke = wake.recv() => {
                if woke.is_some() {
                    poll_until = tokio::time::Instant::now() + Duration::from_secs(1);
                }
            }
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Restores the terminal's mode when `top` ends, however it ends.
struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Key presses without Enter and without echo; Ctrl-C still interrupts.
    #[allow(unsafe_code)] // libc calls; see the SAFETY comment inside
    fn enter() -> RawMode {
        if !std::io::stdin().is_terminal() {
            return RawMode { saved: None };
        }
        // SAFETY: tcgetattr/tcsetattr on stdin with a zeroed struct they fill in.
        unsafe {
            let mut term: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut term) != 0 {
                return RawMode { saved: None };
            }
            let saved = term;
            term.c_lflag &= !(libc::ICANON | libc::ECHO);
            term.c_cc[libc::VMIN] = 1;
            term.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &term);
            RawMode { saved: Some(saved) }
        }
    }
}

impl Drop for RawMode {
    #[allow(unsafe_code)] // libc calls; see the SAFETY comment inside
    fn drop(&mut self) {
        if let Some(saved) = self.saved {
            // SAFETY: restores the settings read in enter().
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &saved);
            }
        }
    }
}

async fn top(
    db: &Db,
    once: bool,
    interval: Duration,
    json_mode: bool,
    colour: bool,
) -> Result<(), Failure> {
    let live = !once;
    let terminal = std::io::stdout().is_terminal();
    let _raw = if live { Some(RawMode::enter()) } else { None };
    let (quit_tx, mut quit) = tokio::sync::mpsc::channel::<()>(1);
    if live && std::io::stdin().is_terminal() {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut byte = [0u8; 1];
            while let Ok(1) = std::io::stdin().read(&mut byte) {
                if matches!(byte[0], b'q' | b'Q' | 3) {
                    let _ = quit_tx.blocking_send(());
                    return;
                }
            }
        });
    }
    loop {
        let answer = match db.call("activity()", &[]).await {
            Ok(answer) => answer,
            Err(e) if live && transient(&e) => {
                eprintln!("sortie: {e}; retrying");
                tokio::time::sleep(interval).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let frame = if json_mode {
            format!("{answer}\n")
        } else {
            render::top(&answer, colour)
        };
        let mut stdout = std::io::stdout().lock();
        if live && terminal && !json_mode {
            let _ = write!(stdout, "\x1b[H\x1b[2J");
        }
        if stdout.write_all(frame.as_bytes()).is_err() {
            return Ok(());
        }
        if live && terminal && !json_mode {
            let _ = writeln!(stdout, "\n(q quits)");
        }
        let _ = stdout.flush();
        drop(stdout);
        if once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = quit.recv() => return Ok(()),
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        let no_color = |value: Option<&str>| {
            crate::config::Env::from_vars(&|name| {
                (name == "NO_COLOR")
                    .then(|| value.map(Into::into))
                    .flatten()
            })
            .no_color
        };
        assert!(use_colour(true, no_color(None)));
        assert!(!use_colour(false, no_color(None)));
        assert!(!use_colour(true, no_color(Some("1"))));
        assert!(use_colour(true, no_color(Some(""))));
    }

    #[test]
    fn a_campaign_id_must_be_a_uuid() {
        assert!(campaign_id("3f0c6a52-7d3e-4b8e-9a57-0d4a3c0f5e11").is_ok());
        let refused = campaign_id("campaign-7").err().unwrap();
        assert_eq!(
            (refused.code.as_str(), refused.exit),
            ("invalid_argument", 2)
        );
    }

    #[test]
    fn help_lists_the_variables_that_matter_here_from_the_one_table() {
        let help = help_epilogue();
        for name in CLI_VARIABLES {
            assert!(
                ENV_VARS.iter().any(|v| v.name == *name),
                "{name} is not in ENV_VARS"
            );
            assert!(help.contains(&format!("  {name} ")), "{name}: {help}");
        }
        assert!(!help.contains("SORTIE_AGENT_COMMAND"));
    }

    #[test]
    fn every_command_has_an_example_in_its_help() {
        use clap::CommandFactory;
        let command = Cli::command();
        for sub in command.get_subcommands() {
            let help = sub
                .get_long_about()
                .map(|s| s.to_string())
                .unwrap_or_default();
            assert!(
                help.contains("Example: sortie "),
                "{}: {help}",
                sub.get_name()
            );
        }
    }
}
