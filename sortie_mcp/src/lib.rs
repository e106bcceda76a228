//! Sortie's MCP server and runner. Both only call the extension's SQL functions; no DAG rule
//! lives here.

pub mod cli;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod embed;
pub mod embedded;
pub mod http;
pub mod llm;
pub mod resources;
pub mod runner;
pub mod tools;
pub mod transport;
pub mod view;
pub mod view;
pub mod workflows;

/// Logs go to stderr only: stdout carries nothing but JSON-RPC (SPEC §5).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sortie_mcp=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
