//! `sortie`: see and steer campaigns from a terminal (SPEC §16). The commands live in
//! `sortie_mcp::cli`; this only parses the command line.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    default_sigpipe();
    let cli = sortie_mcp::cli::Cli::parse();
    sortie_mcp::init_logging(sortie_mcp::config::Env::get());
    sortie_mcp::cli::run(cli).await
}

/// `sortie campaigns --json | head` ends quietly, as Unix tools do, instead of panicking on a
/// closed pipe: SIGPIPE gets its default action back (Rust programs start with it ignored).
#[allow(unsafe_code)] // one libc call; see the SAFETY comment
fn default_sigpipe() {
    // SAFETY: signal(2) only sets how this process takes SIGPIPE; nothing here relies on it
    // being ignored (a write to a closed pipe then ends the process, as intended).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}
