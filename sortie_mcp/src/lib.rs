//! Sortie's MCP server and runner. Both only call the extension's SQL functions; no DAG rule
//! lives here.

pub mod agent;
pub mod checks;
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
pub mod web;
pub mod workflows;

/// `--version` of both binaries: the crate version and the git commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SORTIE_GIT_COMMIT"),
    ")"
);

/// Logs go to stderr only: stdout carries nothing but JSON-RPC (SPEC §5). `RUST_LOG` is a full
/// filter; the seed's `LOG_LEVEL` (error, warn, info, debug, trace) sets Sortie's own level
/// when `RUST_LOG` is unset.
pub fn init_logging(env: &config::Env) {
    let filter = env
        .rust_log
        .as_deref()
        .and_then(|filter| tracing_subscriber::EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::new(log_filter(env.log_level.as_deref()))
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// The filter for a `LOG_LEVEL` value; anything unknown keeps the default (info).
pub fn log_filter(level: Option<&str>) -> String {
    let level = match level.map(|l| l.trim().to_ascii_lowercase()).as_deref() {
        Some(l @ ("error" | "warn" | "info" | "debug" | "trace")) => l.to_string(),
        Some("warning") => "warn".into(),
        _ => "info".into(),
    };
    format!("warn,sortie_mcp={level}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_level_sets_sorties_own_level() {
        assert_eq!(super::log_filter(Some("DEBUG")), "warn,sortie_mcp=debug");
        assert_eq!(super::log_filter(Some("warning")), "warn,sortie_mcp=warn");
        assert_eq!(super::log_filter(Some("loud")), "warn,sortie_mcp=info");
        assert_eq!(super::log_filter(None), "warn,sortie_mcp=info");
    }
}
