//! `sortie-mcp`: the MCP server on stdio.

use rmcp::ServiceExt;
use sortie_mcp::config::Config;
use sortie_mcp::tools::SortieServer;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    sortie_mcp::init_logging();
    let config = Config::from_env()?;
    let service = SortieServer::new(config)
        .serve(rmcp::transport::stdio())
        .await?;
    service.waiting().await?;
    Ok(())
}
