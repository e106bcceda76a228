//! `sortie-runner`: hands ready steps to agents and keeps campaigns moving (SPEC §6).

use clap::{Parser, Subcommand};
use sortie_mcp::config::Config;
use sortie_mcp::db::Db;

#[derive(Parser)]
#[command(
    name = "sortie-runner",
    version,
    about = "Dispatches ready Sortie steps to agents"
)]
struct Cli {
    /// Run one tick and exit once its dispatches are finished (for cron).
    #[arg(long)]
    once: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a small example campaign end to end and print its step tree.
    Demo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sortie_mcp::init_logging();
    let cli = Cli::parse();
    let config = Config::from_env()?;
    let db = Db::connect(&config).await?;
    match cli.command {
        Some(Command::Demo) => sortie_mcp::demo::run(&db, &config).await,
        None => sortie_mcp::runner::run(&db, &config, cli.once).await,
    }
}
