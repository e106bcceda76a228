//! A do-nothing MCP server over stdio, for `sortie-bench side-by-side`: its one tool, `noop`,
//! answers at once. Its round trip is the floor of the client, the transport and rmcp, which
//! sortie-mcp's figures are read against (SPEC §18: server time is p50 minus this floor).

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};

#[derive(Clone)]
struct Noop {
    tool_router: ToolRouter<Noop>,
}

#[tool_router]
impl Noop {
    #[tool(description = "Does nothing and answers {}.")]
    async fn noop(&self) -> CallToolResult {
        CallToolResult::structured(serde_json::json!({}))
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Noop {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_server_info(
            Implementation::new("sortie-noop-mcp", env!("CARGO_PKG_VERSION")),
        )
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let server = Noop {
        tool_router: Noop::tool_router(),
    };
    let service = server
        .serve((tokio::io::stdin(), tokio::io::stdout()))
        .await?;
    service.waiting().await?;
    Ok(())
}
