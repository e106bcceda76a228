//! A campaign's graph as `campaign_graph()` answers it, and its text renderings.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct Node {
    pub id: i64,
    pub parent_id: Option<i64>,
    pub position: i64,
    pub action: String,
    pub agent: Option<String>,
    pub step_type: String,
    pub status: String,
    pub skip_cause: Option<String>,
    pub attempts: i64,
    /// Attempts made: the failed ones and the one running or that succeeded.
    pub tries: Option<i64>,
    pub max_attempts: Option<i64>,
    pub continuation_of: Option<i64>,
    pub continued_by: Option<i64>,
    pub spawned_by: Option<i64>,
    pub claim_owner: Option<String>,
    pub duration_ms: Option<i64>,
    pub lease_expires_at: Option<String>,
    pub output_line: Option<String>,
    pub output_chars: Option<i64>,
    pub error: Option<String>,
    pub question: Option<String>,
}

impl Node {
    pub fn is_compound(&self) -> bool {
        self.step_type != "atomic"
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Edge {
    pub from: i64,
    pub to: i64,
    /// `dependency`, `spawned` or `continues`.
    pub kind: String,
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    pub name: String,
    pub status: String,
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

/// Fill and stroke of each step status: one palette for DOT, Mermaid and the web view.
pub fn status_colours(status: &str) -> (&'static str, &'static str) {
    match status {
        "running" => ("#dbeafe", "#2563eb"),
        "waiting_input" => ("#fef3c7", "#d97706"),
        "done" => ("#d1fae5", "#059669"),
        "failed" => ("#fee2e2", "#dc2626"),
        "skipped" => ("#e5e7eb", "#6b7280"),
        _ => ("#f9fafb", "#9ca3af"),
    }
}

pub const STATUSES: [&str; 6] = [
    "pending",
    "running",
    "waiting_input",
    "done",
    "failed",
    "skipped",
];

impl Graph {
    /// From `campaign_graph()`'s JSON.
    pub fn from_json(value: &Value) -> Result<Graph, String> {
        let nodes: Vec<Node> = serde_json::from_value(value["nodes"].clone())
            .map_err(|e| format!("campaign_graph nodes: {e}"))?;
        let edges: Vec<Edge> = serde_json::from_value(value["edges"].clone())
            .map_err(|e| format!("campaign_graph edges: {e}"))?;
        Ok(Graph {
            name: value["campaign"]["name"].as_str().unwrap_or("").to_string(),
            status: value["campaign"]["status"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            nodes,
            edges,
        })
    }

    fn node(&self, id: i64) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Children of each step in tree order (position, then id); `None` holds the roots. A
    /// step whose parent is not in the graph (a truncated answer) is a root.
    pub fn children(&self) -> BTreeMap<Option<i64>, Vec<&Node>> {
        let known: std::collections::HashSet<i64> = self.nodes.iter().map(|n| n.id).collect();
        let mut children: BTreeMap<Option<i64>, Vec<&Node>> = BTreeMap::new();
        for node in &self.nodes {
            let parent = node.parent_id.filter(|p| known.contains(p));
            children.entry(parent).or_default().push(node);
        }
        for list in children.values_mut() {
            list.sort_by_key(|n| (n.position, n.id));
        }
        children
    }

    /// The compound step whose subgraph holds a node: its parent when that parent is compound,
    /// else the container of the atomic spawner (spawned subtasks sit beside their spawner).
    fn container(&self, node: &Node) -> Option<i64> {
        let mut parent = node.parent_id;
        while let Some(id) = parent {
            match self.node(id) {
                Some(p) if p.is_compound() => return Some(id),
                Some(p) => parent = p.parent_id,
                None => return None,
            }
        }
        None
    }

    fn contained(&self) -> HashMap<Option<i64>, Vec<&Node>> {
        let mut by_container: HashMap<Option<i64>, Vec<&Node>> = HashMap::new();
        for node in &self.nodes {
            by_container
                .entry(self.container(node))
                .or_default()
                .push(node);
        }
        by_container
    }
}

/// `sortie show`'s step tree: one line a step, status, agent, attempts, duration and the first
/// line of the output.
pub fn tree(graph: &Graph, colour: bool) -> String {
    let children = graph.children();
    let mut out = String::new();
    fn walk(
        out: &mut String,
        children: &BTreeMap<Option<i64>, Vec<&Node>>,
        parent: Option<i64>,
        prefix: &str,
        colour: bool,
    ) {
        let Some(list) = children.get(&parent) else {
            return;
        };
        for (i, node) in list.iter().enumerate() {
            let last = i + 1 == list.len();
            let (branch, next) = if parent.is_none() {
                ("", String::new())
            } else if last {
                ("└─ ", format!("{prefix}   "))
            } else {
                ("├─ ", format!("{prefix}│  "))
            };
            out.push_str(prefix);
            out.push_str(branch);
            out.push_str(&step_line(node, colour));
            out.push('\n');
            walk(out, children, Some(node.id), &next, colour);
        }
    }
    walk(&mut out, &children, None, "", colour);
    out
}

/// One step of the tree.
pub fn step_line(node: &Node, colour: bool) -> String {
    let mut line = format!("#{} {}", node.id, paint(&node.status, colour));
    if node.is_compound() {
        let _ = write!(line, " [{}]", node.step_type);
    }
    let _ = write!(line, " {}", one_line(&node.action, 60));
    if let Some(agent) = &node.agent {
        let _ = write!(line, " · {agent}");
    }
    if !node.is_compound() {
        let tries = node.tries.unwrap_or(node.attempts);
        let _ = write!(
            line,
            " · {} attempt{}",
            tries,
            if tries == 1 { "" } else { "s" }
        );
    }
    if let Some(ms) = node.duration_ms {
        let _ = write!(line, " · {}", duration(ms));
    }
    if let Some(spawner) = node.spawned_by {
        let _ = write!(line, " · spawned by #{spawner}");
    }
    if let Some(of) = node.continuation_of {
        let _ = write!(line, " · continues #{of}");
    }
    if let Some(by) = node.continued_by {
        let _ = write!(line, " · continued by #{by}");
    }
    let detail = match node.status.as_str() {
        "failed" => node.error.as_deref(),
        "waiting_input" => node.question.as_deref(),
        // A compound step's output is its members' outputs as JSON (SPEC §13); the members
        // are the lines below it, each with its own.
        _ if node.is_compound() => node.error.as_deref(),
        _ => node.output_line.as_deref().or(node.error.as_deref()),
    };
    if let Some(text) = detail.filter(|t| !t.trim().is_empty()) {
        let mut shown = one_line(text, 80);
        // `output_line` is already the first line: say when the output goes on.
        let is_output = node.output_line.as_deref() == Some(text);
        if is_output
            && !shown.ends_with('…')
            && node.output_chars.unwrap_or(0) > text.chars().count() as i64
        {
            shown.push_str(" …");
        }
        let _ = write!(line, " — {shown}");
    }
    line
}

/// A status word, in its colour on a terminal.
pub fn paint(status: &str, colour: bool) -> String {
    if !colour {
        return status.to_string();
    }
    let code = match status {
        "running" => "34",
        "waiting_input" => "33",
        "done" => "32",
        "failed" => "31",
        "skipped" => "90",
        _ => "37",
    };
    format!("\x1b[{code}m{status}\x1b[0m")
}

/// `1.2s`, `3m04s`, `2h05m`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// The first line of a text, cut to `max` characters with an ellipsis.
pub fn one_line(text: &str, max: usize) -> String {
    let first = text.trim().lines().next().unwrap_or("").trim();
    if first.chars().count() > max {
        let cut: String = first.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else if text.trim().lines().nth(1).is_some() {
        format!("{first} …")
    } else {
        first.to_string()
    }
}

/// A node's label: id, action (cut) and status.
fn label(node: &Node) -> String {
    let mut text = format!("#{} {}", node.id, one_line(&node.action, 40));
    if node.is_compound() {
        let _ = write!(text, " ({})", node.step_type);
    }
    if let Some(agent) = &node.agent {
        let _ = write!(text, "\n{agent}");
    }
    let _ = write!(text, "\n{}", node.status);
    text
}

/// Mermaid flowchart: statuses as classes, compound steps as subgraphs, spawned subtasks as
/// dashed edges labelled `spawned`, continuations as thick edges labelled `continues`.
pub fn mermaid(graph: &Graph) -> String {
    let escape = |s: &str| {
        s.replace('"', "#quot;")
            .replace('\n', "<br/>")
            .replace(['`', '\r'], " ")
    };
    let mut out = String::from("flowchart TD\n");
    for status in STATUSES {
        let (fill, stroke) = status_colours(status);
        let dash = if status == "skipped" {
            ",stroke-dasharray:4 3"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    classDef {status} fill:{fill},stroke:{stroke},color:#111827{dash}"
        );
    }
    let contained = graph.contained();
    fn emit(
        out: &mut String,
        contained: &HashMap<Option<i64>, Vec<&Node>>,
        container: Option<i64>,
        indent: usize,
        escape: &dyn Fn(&str) -> String,
    ) {
        let pad = "    ".repeat(indent);
        for node in contained.get(&container).into_iter().flatten() {
            if node.is_compound() {
                let _ = writeln!(
                    out,
                    "{pad}subgraph s{}[\"{}\"]",
                    node.id,
                    escape(&label(node))
                );
                emit(out, contained, Some(node.id), indent + 1, escape);
                let _ = writeln!(out, "{pad}end");
                let _ = writeln!(out, "{pad}class s{} {}", node.id, node.status);
            } else {
                let _ = writeln!(
                    out,
                    "{pad}s{}[\"{}\"]:::{}",
                    node.id,
                    escape(&label(node)),
                    node.status
                );
            }
        }
    }
    emit(&mut out, &contained, None, 1, &escape);
    for edge in &graph.edges {
        let arrow = match edge.kind.as_str() {
            "spawned" => "-. spawned .->",
            "continues" => "== continues ==>",
            _ => "-->",
        };
        let _ = writeln!(out, "    s{} {arrow} s{}", edge.from, edge.to);
    }
    out
}

/// Graphviz DOT: statuses as fill colours, compound steps as clusters (each with a header
/// node edges attach to), spawned subtasks dashed, continuations bold.
pub fn dot(graph: &Graph) -> String {
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "digraph campaign {{\n    label=\"{}\";\n    labelloc=t;\n    rankdir=TB;\n    compound=true;\n    node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\", fontsize=10];\n    edge [fontname=\"Helvetica\", fontsize=9];",
        escape(&graph.name)
    );
    let contained = graph.contained();
    fn emit(
        out: &mut String,
        contained: &HashMap<Option<i64>, Vec<&Node>>,
        container: Option<i64>,
        indent: usize,
        escape: &dyn Fn(&str) -> String,
    ) {
        let pad = "    ".repeat(indent);
        for node in contained.get(&container).into_iter().flatten() {
            let (fill, stroke) = status_colours(&node.status);
            let style = if node.status == "skipped" {
                "rounded,filled,dashed"
            } else {
                "rounded,filled"
            };
            if node.is_compound() {
                let _ = writeln!(out, "{pad}subgraph cluster_{} {{", node.id);
                let _ = writeln!(
                    out,
                    "{pad}    label=\"{}\";\n{pad}    style=\"rounded,filled\";\n{pad}    fillcolor=\"{fill}\";\n{pad}    color=\"{stroke}\";\n{pad}    class=\"{}\";",
                    escape(&format!("#{} {} ({})", node.id, one_line(&node.action, 40), node.step_type)),
                    node.status
                );
                let _ = writeln!(
                    out,
                    "{pad}    s{} [label=\"{}\", shape=plaintext, style=\"\", class=\"{}\"];",
                    node.id,
                    escape(&node.status),
                    node.status
                );
                emit(out, contained, Some(node.id), indent + 1, escape);
                let _ = writeln!(out, "{pad}}}");
            } else {
                let _ = writeln!(
                    out,
                    "{pad}s{} [label=\"{}\", fillcolor=\"{fill}\", color=\"{stroke}\", style=\"{style}\", class=\"{}\"];",
                    node.id,
                    escape(&label(node)),
                    node.status
                );
            }
        }
    }
    emit(&mut out, &contained, None, 1, &escape);
    let compound: std::collections::HashSet<i64> = graph
        .nodes
        .iter()
        .filter(|n| n.is_compound())
        .map(|n| n.id)
        .collect();
    for edge in &graph.edges {
        let mut attributes: Vec<String> = match edge.kind.as_str() {
            "spawned" => vec!["style=dashed".into(), "label=\"spawned\"".into()],
            "continues" => vec!["style=bold".into(), "label=\"continues\"".into()],
            _ => vec![],
        };
        if compound.contains(&edge.from) {
            attributes.push(format!("ltail=cluster_{}", edge.from));
        }
        if compound.contains(&edge.to) {
            attributes.push(format!("lhead=cluster_{}", edge.to));
        }
        let attributes = if attributes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", attributes.join(", "))
        };
        let _ = writeln!(out, "    s{} -> s{}{attributes};", edge.from, edge.to);
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// research (spliced: two subtasks and a continuation) → a parallel group of two, and write.
    pub fn sample() -> Graph {
        Graph::from_json(&json!({
            "campaign": {"name": "demo \"quoted\"", "status": "active"},
            "nodes": [
                {"id": 1, "position": 0, "action": "research", "step_type": "atomic", "status": "done",
                 "attempts": 1, "duration_ms": 1200, "continued_by": 7, "output_line": "found 3 papers"},
                {"id": 2, "position": 1, "action": "probe", "step_type": "parallel_group", "status": "pending"},
                {"id": 3, "parent_id": 2, "position": 0, "action": "probe a", "step_type": "atomic",
                 "status": "pending", "agent": "prober"},
                {"id": 4, "parent_id": 2, "position": 1, "action": "probe b", "step_type": "atomic", "status": "skipped"},
                {"id": 5, "position": 2, "action": "write", "step_type": "atomic", "status": "pending"},
                {"id": 6, "parent_id": 1, "position": 0, "action": "read \"paper\" A", "step_type": "atomic",
                 "status": "running", "spawned_by": 1, "attempts": 1},
                {"id": 7, "position": 0, "action": "synthesise", "step_type": "atomic", "status": "pending",
                 "continuation_of": 1},
                {"id": 8, "parent_id": 1, "position": 1, "action": "read B", "step_type": "atomic",
                 "status": "failed", "spawned_by": 1, "attempts": 3, "error": "boom\nstack"}
            ],
            "edges": [
                {"from": 7, "to": 2, "kind": "dependency"},
                {"from": 7, "to": 5, "kind": "dependency"},
                {"from": 6, "to": 7, "kind": "dependency"},
                {"from": 8, "to": 7, "kind": "dependency"},
                {"from": 1, "to": 6, "kind": "spawned"},
                {"from": 1, "to": 8, "kind": "spawned"},
                {"from": 1, "to": 7, "kind": "continues"}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn the_tree_nests_children_under_their_parent_with_status_and_output() {
        let text = tree(&sample(), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        assert!(lines[0].starts_with("#1 done research"), "{text}");
        assert!(lines[0].contains("1.2s") && lines[0].contains("found 3 papers"));
        assert!(lines[0].contains("continued by #7"));
        assert!(
            lines[1].starts_with("├─ #6 running read \"paper\" A"),
            "{text}"
        );
        assert!(lines[1].contains("spawned by #1"));
        assert!(lines[2].starts_with("└─ #8 failed read B"), "{text}");
        assert!(lines[2].contains("3 attempts") && lines[2].ends_with("— boom …"));
        assert!(text.contains("#7 pending synthesise") && text.contains("continues #1"));
        assert!(text.contains("#2 pending [parallel_group] probe"));
        assert!(text.contains("├─ #3 pending probe a · prober"));
        assert!(!text.contains('\x1b'));
        assert!(tree(&sample(), true).contains("\x1b[32mdone\x1b[0m"));
    }

    /// A done compound step's output is its members' outputs as JSON: the tree leaves it to
    /// the members' own lines rather than print the JSON.
    #[test]
    fn a_done_compound_step_shows_its_members_not_its_json_output() {
        let graph = Graph::from_json(&json!({
            "campaign": {"name": "c", "status": "done"},
            "nodes": [
                {"id": 1, "position": 0, "action": "checks", "step_type": "parallel_group", "status": "done",
                 "output_line": "[{\"output\": \"lint ok\", \"status\": \"done\", \"step_id\": 2}]",
                 "output_chars": 55},
                {"id": 2, "parent_id": 1, "position": 0, "action": "lint", "step_type": "atomic",
                 "status": "done", "attempts": 1, "output_line": "lint ok"}
            ],
            "edges": []
        }))
        .unwrap();
        let text = tree(&graph, false);
        assert!(
            text.starts_with("#1 done [parallel_group] checks\n"),
            "{text}"
        );
        assert!(
            text.contains("└─ #2 done lint · 1 attempt — lint ok"),
            "{text}"
        );
        assert!(!text.contains("step_id"), "{text}");
    }

    #[test]
    fn mermaid_has_every_step_classes_subgraphs_and_edge_kinds() {
        let text = mermaid(&sample());
        assert!(text.starts_with("flowchart TD\n"));
        for id in [1, 3, 4, 5, 6, 7, 8] {
            assert!(
                text.contains(&format!("s{id}[\"")),
                "s{id} missing:\n{text}"
            );
        }
        assert!(
            text.contains("subgraph s2[\"#2 probe (parallel_group)"),
            "{text}"
        );
        assert!(text.contains("class s2 pending"));
        assert!(text.contains(":::skipped"));
        assert!(text.contains("s1 -. spawned .-> s6"));
        assert!(text.contains("s1 == continues ==> s7"));
        assert!(text.contains("s7 --> s2"));
        assert!(text.contains("read #quot;paper#quot; A"), "{text}");
        // The subtasks sit beside their spawner, not inside a subgraph of it.
        assert!(!text.contains("subgraph s1"));
        let opened = text
            .lines()
            .filter(|l| l.trim_start().starts_with("subgraph "))
            .count();
        let closed = text.lines().filter(|l| l.trim() == "end").count();
        assert_eq!(opened, closed);
    }

    #[test]
    fn dot_has_every_step_clusters_and_styled_edges() {
        let text = dot(&sample());
        for id in 1..=8 {
            assert!(
                text.contains(&format!("    s{id} [")),
                "s{id} missing:\n{text}"
            );
        }
        assert!(text.contains("subgraph cluster_2 {"));
        assert!(text.contains("s7 -> s2 [lhead=cluster_2];"), "{text}");
        assert!(text.contains("s1 -> s6 [style=dashed, label=\"spawned\"];"));
        assert!(text.contains("s1 -> s7 [style=bold, label=\"continues\"];"));
        assert!(text.contains("label=\"demo \\\"quoted\\\"\""));
        assert!(text.contains("fillcolor=\"#d1fae5\""));
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn one_line_cuts_long_and_multi_line_text() {
        assert_eq!(one_line("short", 10), "short");
        assert_eq!(one_line("first\nsecond", 10), "first …");
        assert_eq!(one_line("abcdefghijkl", 5), "abcd…");
        assert_eq!(duration(61_000), "1m01s");
        assert_eq!(duration(7_500_000), "2h05m");
    }
}
