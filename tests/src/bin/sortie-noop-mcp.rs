//! A do-nothing MCP server over stdio, for `sortie-bench side-by-side`: its one tool, `noop`,
//! answers at once. Its round trip is the floor of the client, the transport and rmcp, which
//! sortie-mcp's figures are read against (SPEC §18: server time is p50 minus this floor).
//! With DATABASE_URL set, a second tool, `commit`, inserts one small row into a table of its own
//! and commits it (synchronous_commit on): the floor of any durable write through this stack
//! (tokio-postgres, one round trip, one WAL flush), which a create_campaign cannot go below.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler, ServiceExt};

#[derive(Clone)]
struct Noop {
    tool_router: ToolRouter<Noop>,
    /// The connection and its prepared insert: one round trip per call, as sortie-mcp's
    /// cached statements take.
    db: Option<std::sync::Arc<(tokio_postgres::Client, tokio_postgres::Statement)>>,
}

#[tool_router]
impl Noop {
    #[tool(description = "Does nothing and answers {}.")]
    async fn noop(&self) -> CallToolResult {
        CallToolResult::structured(serde_json::json!({}))
    }

    #[tool(description = "Inserts one row and commits it; answers {}.")]
    async fn commit(&self) -> CallToolResult {
        let Some(db) = &self.db else {
            return CallToolResult::error(vec![rmcp::model::ContentBlock::text("no DATABASE_URL")]);
        };
        let (client, insert) = &**db;
        match client.execute(insert, &[]).await {
            Ok(_) => CallToolResult::structured(serde_json::json!({})),
            Err(e) => CallToolResult::error(vec![rmcp::model::ContentBlock::text(e.to_string())]),
        }
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
    let db = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(
                    "SET synchronous_commit = on;
                     CREATE TABLE IF NOT EXISTS noop_commit_floor (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at timestamptz NOT NULL)",
                )
                .await?;
            let insert = client
                .prepare("INSERT INTO noop_commit_floor (at) VALUES (now())")
                .await?;
            Some(std::sync::Arc::new((client, insert)))
        }
        Err(_) => None,
    };
    let server = Noop {
        tool_router: Noop::tool_router(),
        db,
    };
    let service = server
        .serve((tokio::io::stdin(), tokio::io::stdout()))
        .await?;
    service.waiting().await?;
    Ok(())
}
