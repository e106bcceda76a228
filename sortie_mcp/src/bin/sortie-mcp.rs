//! `sortie-mcp`: the MCP server, on stdio (default) or streamable HTTP (`--http ADDR`).

use std::net::SocketAddr;

use clap::Parser;
use rmcp::ServiceExt;
use sortie_mcp::config::Config;
use sortie_mcp::tools::SortieServer;

#[derive(Parser)]
#[command(name = "sortie-mcp", version, about = "Sortie's MCP server")]
struct Cli {
    /// Serve streamable HTTP on this address (e.g. 127.0.0.1:8765) instead of stdio;
    /// requires SORTIE_HTTP_TOKEN.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sortie_mcp::init_logging();
    let config = Config::from_env()?;
    let server = SortieServer::new(config);
    if let Some(addr) = cli.http {
        return sortie_mcp::http::serve(server, addr, std::env::var("SORTIE_HTTP_TOKEN").ok())
            .await;
    }
    // Sortie's own framing: every request line is answered, even one rmcp could not decode.
    let service = server
        .serve(sortie_mcp::transport::LineTransport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
