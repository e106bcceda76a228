//! `sortie-mcp`: the MCP server, on stdio (default) or streamable HTTP (`--http ADDR`).

use std::net::SocketAddr;

use clap::Parser;
use rmcp::ServiceExt;
use sortie_mcp::config::Config;
use sortie_mcp::tools::SortieServer;

#[derive(Parser)]
#[command(
    name = "sortie-mcp",
    version = sortie_mcp::VERSION,
    about = "Sortie's MCP server",
    after_help = sortie_mcp::config::env_help(sortie_mcp::config::Reader::Mcp, &[
        "sortie-mcp                       # stdio, embedded cluster",
        "DATABASE_URL=postgresql://me:secret@db.example:5432/app sortie-mcp",
        "SORTIE_HTTP_TOKEN=$(openssl rand -hex 16) sortie-mcp --http 127.0.0.1:8765",
    ])
)]
struct Cli {
    /// Serve streamable HTTP on this address (e.g. 127.0.0.1:8765) instead of stdio;
    /// requires SORTIE_HTTP_TOKEN or SORTIE_HTTP_TOKENS_FILE.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Allow --http on an address other machines reach (plain HTTP: put it behind TLS).
    #[arg(long, requires = "http")]
    allow_remote: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sortie_mcp::init_logging(sortie_mcp::config::Env::get());
    let config = Config::from_env()?;
    let server = SortieServer::new(config);
    if let Some(addr) = cli.http {
        let settings = sortie_mcp::http::HttpSettings::from_env()?;
        return sortie_mcp::http::serve(server, addr, cli.allow_remote, settings).await;
    }
    // Start-up check: the database is reached before the server answers `initialize`.
    server.connect_now().await?;
    // Sortie's own framing: every request line is answered, even one rmcp could not decode.
    let service = server
        .serve(sortie_mcp::transport::LineTransport::stdio(
            sortie_mcp::config::Env::get().max_request_bytes,
        ))
        .await?;
    service.waiting().await?;
    Ok(())
}
