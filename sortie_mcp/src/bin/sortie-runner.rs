//! `sortie-runner`: hands ready steps to agents and keeps campaigns moving (SPEC §6).

use clap::{Parser, Subcommand};
use sortie_mcp::config::Config;
use sortie_mcp::db::Db;
use sortie_mcp::runner::Runner;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "sortie-runner",
    version = sortie_mcp::VERSION,
    about = "Dispatches ready Sortie steps to agents",
    after_help = sortie_mcp::config::env_help(sortie_mcp::config::Reader::Runner, &[
        "sortie-runner --once             # one tick on the embedded cluster (cron)",
        "SORTIE_DISPATCH=command SORTIE_AGENT_COMMAND='claude -p' sortie-runner",
        "DATABASE_URL=postgresql://me:secret@db.example:5432/app SORTIE_MAX_CONCURRENT=8 sortie-runner",
    ])
)]
struct Cli {
    /// Run one tick and exit once every dispatch it started has finished (for cron).
    #[arg(long)]
    once: bool,
    /// Embed every note that has no embedding yet, then exit.
    #[arg(long, conflicts_with = "once")]
    backfill: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bundled example campaign end to end with the bundled example agent.
    Demo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sortie_mcp::init_logging(sortie_mcp::config::Env::get());
    let config = Config::from_env()?;
    let db = Db::connect(&config).await?;
    let (stop, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop.send(true);
    });
    match cli.command {
        Some(Command::Demo) => sortie_mcp::demo::run(db, config, shutdown).await,
        None => {
            let url = db.connection_string().to_string();
            let runner = Runner::new(db, config, url, shutdown)?;
            if cli.backfill {
                let mut total = 0;
                loop {
                    let n = runner.backfill_embeddings().await?;
                    if n == 0 {
                        println!("embedded {total} notes");
                        return Ok(());
                    }
                    total += n;
                }
            }
            if cli.once {
                runner.once().await
            } else {
                runner.run().await
            }
        }
    }
}
