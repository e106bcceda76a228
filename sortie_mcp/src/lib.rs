//! Sortie's MCP server and runner. Both only call the extension's SQL functions; no DAG rule
//! lives here.

pub mod embedded;
