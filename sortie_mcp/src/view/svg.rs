//! The web view's picture of a campaign: a layered drawing of the graph as SVG, drawn by the
//! server so the page needs no layout library. Steps are placed in rows by the longest chain
//! of edges (dependencies, spawns, continuations, and a compound step above its children).

use std::collections::HashMap;
use std::fmt::Write;

use super::graph::{one_line, status_colours, Graph};

const WIDTH: i64 = 210;
const HEIGHT: i64 = 58;
const GAP_X: i64 = 30;
const GAP_Y: i64 = 50;
const MARGIN: i64 = 20;

fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Row of every node: 0 for nodes nothing leads to, else one below the lowest of those
/// leading to it. Nodes on a cycle (never produced by the engine) stay in row 0.
fn rows(graph: &Graph) -> HashMap<i64, usize> {
    let mut incoming: HashMap<i64, Vec<i64>> = HashMap::new();
    let known: std::collections::HashSet<i64> = graph.nodes.iter().map(|n| n.id).collect();
    for edge in &graph.edges {
        if known.contains(&edge.from) && known.contains(&edge.to) {
            incoming.entry(edge.to).or_default().push(edge.from);
        }
    }
    for node in &graph.nodes {
        if let Some(parent) = node.parent_id.filter(|p| known.contains(p)) {
            if node.spawned_by.is_none() {
                incoming.entry(node.id).or_default().push(parent);
            }
        }
    }
    let mut row: HashMap<i64, usize> = HashMap::new();
    // Longest path by relaxation; at most one pass per node settles a DAG.
    for _ in 0..=graph.nodes.len() {
        let mut changed = false;
        for node in &graph.nodes {
            let best = incoming
                .get(&node.id)
                .into_iter()
                .flatten()
                .map(|from| row.get(from).copied().unwrap_or(0) + 1)
                .max()
                .unwrap_or(0)
                .min(graph.nodes.len());
            if row.get(&node.id) != Some(&best) {
                row.insert(node.id, best);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    row
}

/// The SVG of a campaign's graph. Each step is a `<g class="step status-…" data-id=…>` whose
/// rectangle's fill is its status colour; the page attaches clicks to `data-id`.
pub fn svg(graph: &Graph) -> String {
    let rows = rows(graph);
    let mut by_row: Vec<Vec<&super::graph::Node>> = Vec::new();
    for node in &graph.nodes {
        let r = rows.get(&node.id).copied().unwrap_or(0);
        if by_row.len() <= r {
            by_row.resize(r + 1, Vec::new());
        }
        by_row[r].push(node);
    }
    let mut place: HashMap<i64, (i64, i64)> = HashMap::new();
    let widest = by_row.iter().map(Vec::len).max().unwrap_or(0) as i64;
    for (r, nodes) in by_row.iter().enumerate() {
        let offset = (widest - nodes.len() as i64) * (WIDTH + GAP_X) / 2;
        for (i, node) in nodes.iter().enumerate() {
            place.insert(
                node.id,
                (
                    MARGIN + offset + i as i64 * (WIDTH + GAP_X),
                    MARGIN + r as i64 * (HEIGHT + GAP_Y),
                ),
            );
        }
    }
    let width = (2 * MARGIN + widest * (WIDTH + GAP_X)).max(300);
    let height = (2 * MARGIN + by_row.len() as i64 * (HEIGHT + GAP_Y)).max(120);
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"dag\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"Helvetica, Arial, sans-serif\" font-size=\"12\">\
<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#6b7280\"/></marker></defs>"
    );
    if graph.nodes.is_empty() {
        out.push_str("<text x=\"20\" y=\"40\" fill=\"#6b7280\">no steps yet</text>");
    }
    let draw_edge = |out: &mut String, from: i64, to: i64, kind: &str| {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (place.get(&from), place.get(&to)) else {
            return;
        };
        let (sx, sy, ex, ey) = (x1 + WIDTH / 2, y1 + HEIGHT, x2 + WIDTH / 2, y2);
        let style = match kind {
            "spawned" => "stroke-dasharray=\"6 4\" stroke-width=\"1.5\"",
            "continues" => "stroke-width=\"3\"",
            "contains" => "stroke-dasharray=\"2 3\" stroke-width=\"1\" stroke-opacity=\"0.6\"",
            _ => "stroke-width=\"1.5\"",
        };
        let mid = (sy + ey) / 2;
        let _ = write!(
            out,
            "<path class=\"edge edge-{kind}\" d=\"M {sx} {sy} C {sx} {mid}, {ex} {mid}, {ex} {ey}\" fill=\"none\" stroke=\"#6b7280\" {style} marker-end=\"url(#arrow)\"><title>{kind}</title></path>"
        );
    };
    for node in &graph.nodes {
        if let (Some(parent), None) = (node.parent_id, node.spawned_by) {
            draw_edge(&mut out, parent, node.id, "contains");
        }
    }
    for edge in &graph.edges {
        draw_edge(&mut out, edge.from, edge.to, &edge.kind);
    }
    for node in &graph.nodes {
        let Some(&(x, y)) = place.get(&node.id) else {
            continue;
        };
        let (fill, stroke) = status_colours(&node.status);
        let dash = if node.is_compound() {
            " stroke-dasharray=\"8 3\""
        } else {
            ""
        };
        let kind = if node.is_compound() {
            format!(" ({})", node.step_type)
        } else {
            String::new()
        };
        let _ = write!(
            out,
            "<g class=\"step status-{status}\" data-id=\"{id}\" data-status=\"{status}\" style=\"cursor:pointer\">\
<title>#{id} {title}</title>\
<rect x=\"{x}\" y=\"{y}\" rx=\"8\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"2\"{dash}/>\
<text x=\"{tx}\" y=\"{ty1}\" font-weight=\"bold\" fill=\"#111827\">#{id} {action}</text>\
<text x=\"{tx}\" y=\"{ty2}\" fill=\"#374151\">{status}{kind}{agent}</text></g>",
            status = xml(&node.status),
            id = node.id,
            title = xml(&node.action),
            tx = x + 10,
            ty1 = y + 22,
            ty2 = y + 42,
            action = xml(&one_line(&node.action, 24)),
            kind = xml(&kind),
            agent = node
                .agent
                .as_deref()
                .map(|a| format!(" · {}", xml(&one_line(a, 14))))
                .unwrap_or_default(),
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::super::graph::tests::sample;
    use super::*;

    #[test]
    fn every_step_is_drawn_in_its_status_colour_below_what_leads_to_it() {
        let graph = sample();
        let text = svg(&graph);
        for node in &graph.nodes {
            assert!(
                text.contains(&format!(
                    "data-id=\"{}\" data-status=\"{}\"",
                    node.id, node.status
                )),
                "#{} missing",
                node.id
            );
        }
        assert!(text.contains("fill=\"#d1fae5\"")); // done
        assert!(text.contains("read &quot;paper&quot; A"));
        assert!(text.contains("class=\"edge edge-continues\""));
        let rows = rows(&graph);
        assert_eq!(rows[&1], 0);
        assert!(rows[&6] > rows[&1] && rows[&7] > rows[&6] && rows[&2] > rows[&7]);
        assert!(rows[&3] > rows[&2]);
    }

    #[test]
    fn an_empty_campaign_says_so() {
        assert!(svg(&Graph::default()).contains("no steps yet"));
    }
}
