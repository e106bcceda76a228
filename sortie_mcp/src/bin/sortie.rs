//! `sortie`: see and steer campaigns from a terminal (SPEC §16). The commands live in
//! `sortie_mcp::cli`; this only parses the command line.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = sortie_mcp::cli::Cli::parse();
    sortie_mcp::init_logging();
    sortie_mcp::cli::run(cli).await
}
