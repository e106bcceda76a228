//! Pictures of a campaign (SPEC §16) as pure functions of `campaign_graph()`'s answer: the step
//! tree of `sortie show`, Mermaid and DOT for `sortie graph` and the MCP graph resource, and the
//! SVG the web view draws. Nothing here touches the database.

pub mod graph;
pub mod svg;

pub use graph::{Graph, Node};
