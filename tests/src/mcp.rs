//! A real MCP client talking to the real `sortie-mcp` binary over stdio.

use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::service::RunningService;
use rmcp::transport::{ConfigureCommandExt, TokioChildProcess};
use rmcp::{RoleClient, ServiceExt};
use serde_json::Value;

use crate::database::TestDb;
use crate::programs::binary;

pub struct McpClient {
    pub service: RunningService<RoleClient, ()>,
}

/// The outcome of one tool call: the structured JSON, and whether it was a tool error.
#[derive(Debug)]
pub struct Outcome {
    pub is_error: bool,
    pub value: Value,
    pub text: String,
}

impl Outcome {
    pub fn code(&self) -> &str {
        self.value["error"]["code"].as_str().unwrap_or("")
    }
}

impl McpClient {
    /// Starts `sortie-mcp` against the test database with extra environment variables.
    pub async fn start(db: &TestDb, env: &[(&str, String)]) -> McpClient {
        let mut all: Vec<(String, String)> = vec![("DATABASE_URL".into(), db.connection_string())];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Self::start_with(all).await
    }

    pub async fn start_with(env: Vec<(String, String)>) -> McpClient {
        let program = binary("sortie-mcp");
        let transport =
            TokioChildProcess::new(tokio::process::Command::new(program).configure(|cmd| {
                for key in [
                    "DATABASE_URL",
                    "SORTIE_ROLE",
                    "SORTIE_STEP_ID",
                    "SORTIE_CAMPAIGN_ID",
                    "SORTIE_CLAIM_TOKEN",
                ] {
                    cmd.env_remove(key);
                }
                for (k, v) in &env {
                    cmd.env(k, v);
                }
                cmd.env("RUST_LOG", "warn");
            }))
            .expect("spawn sortie-mcp");
        let service = ().serve(transport).await.expect("MCP initialize");
        McpClient { service }
    }

    pub async fn tool_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .service
            .list_all_tools()
            .await
            .expect("tools/list")
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        names.sort();
        names
    }

    pub async fn call(&self, tool: &str, args: Value) -> Outcome {
        let arguments = match args {
            Value::Object(map) => map,
            other => panic!("tool arguments must be an object, not {other}"),
        };
        let result: CallToolResult = self
            .service
            .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(arguments))
            .await
            .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"));
        let text = result
            .content
            .iter()
            .filter_map(|c| c.as_text().map(|t| t.text.clone()))
            .collect::<Vec<_>>()
            .join("\n");
        Outcome {
            is_error: result.is_error.unwrap_or(false),
            value: result.structured_content.unwrap_or(Value::Null),
            text,
        }
    }

    /// A call that must succeed; returns its JSON.
    pub async fn ok(&self, tool: &str, args: Value) -> Value {
        let outcome = self.call(tool, args).await;
        assert!(!outcome.is_error, "{tool} failed: {}", outcome.text);
        outcome.value
    }

    pub async fn stop(self) {
        let _ = self.service.cancel().await;
    }
}
