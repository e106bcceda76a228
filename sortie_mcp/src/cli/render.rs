//! Text of the `sortie` commands, as pure functions of the extension's JSON answers.

use std::fmt::Write;

use serde_json::Value;

use crate::view::graph::{one_line, paint};

fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

fn bold(s: &str, colour: bool) -> String {
    if colour {
        format!("\x1b[1m{s}\x1b[0m")
    } else {
        s.to_string()
    }
}

fn campaign_status(status: &str, colour: bool) -> String {
    // Campaign statuses painted like the step statuses they resemble.
    let like = match status {
        "active" => "running",
        "paused" => "waiting_input",
        "cancelled" => "skipped",
        other => other,
    };
    if colour {
        paint(like, true).replace(like, status)
    } else {
        status.to_string()
    }
}

/// `sortie campaigns`: one line a campaign.
pub fn campaigns(answer: &Value, colour: bool) -> String {
    let rows = answer["campaigns"].as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no campaigns\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}",
        bold(
            &format!(
                "{:36}  {:9}  {:6}  {:>4}  NAME",
                "ID", "STATUS", "PRIO", "OPEN"
            ),
            colour
        )
    );
    for c in rows {
        let status = text(&c, "status");
        let _ = write!(
            out,
            "{:36}  {}{}  {:6}  {:>4}  {}",
            text(&c, "id"),
            campaign_status(status, colour),
            " ".repeat(9usize.saturating_sub(status.len())),
            text(&c, "priority"),
            c["open_steps"].as_i64().unwrap_or(0),
            one_line(text(&c, "name"), 60)
        );
        if let Some(progress) = c["progress"].as_str().filter(|p| !p.is_empty()) {
            let _ = write!(out, " — {}", one_line(progress, 60));
        }
        out.push('\n');
    }
    if let Some(cursor) = answer["next_cursor"].as_str() {
        let _ = writeln!(out, "(more: newest first; older ones after {cursor})");
    }
    out
}

/// The lines above `sortie show`'s tree.
pub fn campaign_header(graph: &Value, colour: bool) -> String {
    let c = &graph["campaign"];
    let mut out = format!(
        "{} {} ({})\n",
        bold(text(c, "name"), colour),
        text(c, "id"),
        campaign_status(text(c, "status"), colour)
    );
    let _ = writeln!(out, "goal: {}", one_line(text(c, "goal"), 100));
    if let Some(reason) = c["status_reason"].as_str() {
        let _ = writeln!(out, "reason: {}", one_line(reason, 100));
    }
    let counts = graph["step_counts"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let mut parts: Vec<String> = crate::view::graph::STATUSES
        .iter()
        .filter_map(|s| {
            counts
                .get(*s)
                .and_then(Value::as_i64)
                .map(|n| format!("{n} {s}"))
        })
        .collect();
    if parts.is_empty() {
        parts.push("no steps".into());
    }
    let _ = writeln!(out, "steps: {}", parts.join(" · "));
    if graph["truncated"] == true {
        let _ = writeln!(
            out,
            "(showing the first {} of {} steps)",
            graph["nodes"].as_array().map_or(0, Vec::len),
            graph["total_steps"]
        );
    }
    out.push('\n');
    out
}

/// One event of `sortie events`.
pub fn event_line(event: &Value, colour: bool) -> String {
    let at = text(event, "at");
    let at = at.get(..19).unwrap_or(at).replace('T', " ");
    let kind = text(event, "kind");
    let kind_shown = if colour {
        let like = if kind.ends_with(".done") {
            "done"
        } else if kind.ends_with(".failed") {
            "failed"
        } else if kind.ends_with(".skipped") || kind.ends_with(".cancelled") {
            "skipped"
        } else if kind.ends_with(".claimed") || kind.ends_with(".started") {
            "running"
        } else {
            "pending"
        };
        paint(like, true).replace(like, &format!("{kind:16}"))
    } else {
        format!("{kind:16}")
    };
    let mut line = format!(
        "{at}  #{:<7} {kind_shown}",
        event["id"].as_i64().unwrap_or(0)
    );
    if let Some(campaign) = event["campaign_id"].as_str() {
        let _ = write!(line, " campaign {}", campaign.get(..8).unwrap_or(campaign));
    }
    if let Some(step) = event["step_id"].as_i64() {
        let _ = write!(line, " step #{step}");
    }
    if let Some(payload) = event["payload"].as_object().filter(|p| !p.is_empty()) {
        let _ = write!(
            line,
            "  {}",
            one_line(&Value::Object(payload.clone()).to_string(), 100)
        );
    }
    line
}

/// One frame of `sortie top`.
pub fn top(answer: &Value, colour: bool) -> String {
    let mut out = String::new();
    let at = text(answer, "at");
    let _ = writeln!(
        out,
        "{}  {}",
        bold("sortie top", colour),
        at.get(..19).unwrap_or(at).replace('T', " ")
    );
    let running = answer["running"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\n{}",
        bold(&format!("RUNNING ({})", running.len()), colour)
    );
    if running.is_empty() {
        out.push_str("  nothing is running\n");
    }
    for r in &running {
        let left = r["lease_seconds_left"].as_f64().unwrap_or(0.0);
        let lease = if left < 0.0 {
            paint("lease expired", colour).replace("failed", "lease expired")
        } else {
            format!(
                "lease {}",
                crate::view::graph::duration((left * 1000.0) as i64)
            )
        };
        let _ = writeln!(
            out,
            "  #{:<7} {:<40} {:<14} {:>8}  {}  {}",
            r["step_id"].as_i64().unwrap_or(0),
            one_line(text(r, "action"), 40),
            one_line(r["agent"].as_str().unwrap_or("-"), 14),
            crate::view::graph::duration(
                (r["running_seconds"].as_f64().unwrap_or(0.0) * 1000.0) as i64
            ),
            lease,
            one_line(text(r, "campaign_name"), 30)
        );
    }
    let campaigns = answer["campaigns"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\n{}",
        bold(&format!("CAMPAIGNS ({})", campaigns.len()), colour)
    );
    if campaigns.is_empty() {
        out.push_str("  no active or paused campaign\n");
    }
    for c in &campaigns {
        let counts = &c["step_counts"];
        let n = |s: &str| counts[s].as_i64().unwrap_or(0);
        let total: i64 = crate::view::graph::STATUSES.iter().map(|s| n(s)).sum();
        let finished = n("done") + n("failed") + n("skipped");
        let _ = writeln!(
            out,
            "  {} {}{} {} {:>4}/{:<4} done {} · running {} · ready {} · failed {}  {}",
            text(c, "id").get(..8).unwrap_or(""),
            campaign_status(text(c, "status"), colour),
            " ".repeat(9usize.saturating_sub(text(c, "status").len())),
            progress_bar(finished, total),
            finished,
            total,
            n("done"),
            c["running_steps"].as_i64().unwrap_or(0),
            c["ready_steps"].as_i64().unwrap_or(0),
            n("failed"),
            one_line(text(c, "name"), 40)
        );
    }
    out
}

/// `[#####.....]`: finished steps of all.
pub fn progress_bar(finished: i64, total: i64) -> String {
    let width = 10;
    let filled = if total > 0 {
        ((finished.clamp(0, total) * width) / total) as usize
    } else {
        0
    };
    format!(
        "[{}{}]",
        "#".repeat(filled),
        ".".repeat(width as usize - filled)
    )
}

/// `sortie doctor`: the problems first, then the facts.
pub fn health(answer: &Value, colour: bool) -> String {
    let mut out = String::new();
    let problems = answer["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "{}",
            paint("done", colour).replace("done", "healthy: no problem found")
        );
    } else {
        let _ = writeln!(out, "{} problem(s):", problems.len());
        for p in &problems {
            let _ = writeln!(
                out,
                "  {} {}",
                paint("failed", colour).replace("failed", text(p, "code")),
                text(p, "message")
            );
        }
    }
    out.push('\n');
    match answer["oldest_transaction"].as_object() {
        Some(_) => {
            let t = &answer["oldest_transaction"];
            let _ = writeln!(
                out,
                "oldest open transaction: pid {} ({}), open {} s{}",
                t["pid"],
                text(t, "state"),
                t["age_seconds"],
                if t["holds_back_cleanup"] == true {
                    ", holds back vacuum's clean-up"
                } else {
                    ""
                }
            );
        }
        None => out.push_str("oldest open transaction: none\n"),
    }
    let leases = &answer["expired_leases"];
    let _ = writeln!(
        out,
        "expired leases not reset: {}",
        leases["count"].as_i64().unwrap_or(0)
    );
    let notes = &answer["undelivered_notifications"];
    let _ = writeln!(
        out,
        "undelivered notifications: {} ({} given up)",
        notes["count"].as_i64().unwrap_or(0),
        notes["given_up"].as_i64().unwrap_or(0)
    );
    let stalled = answer["stalled_campaigns"].as_array().map_or(0, Vec::len);
    let _ = writeln!(
        out,
        "active campaigns with nothing ready or running: {stalled}"
    );
    out.push_str("dead rows:");
    for t in answer["tables"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            " {} {}/{} ({:.0}%)",
            text(t, "table"),
            t["dead_rows"],
            t["live_rows"].as_i64().unwrap_or(0) + t["dead_rows"].as_i64().unwrap_or(0),
            t["dead_ratio"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn doctor_lists_problems_first_and_names_the_open_transaction() {
        let answer = json!({"ok": false,
            "problems": [{"code": "open_transaction", "message": "pid 42 has been idle in a transaction for 12.5 s"}],
            "oldest_transaction": {"pid": 42, "state": "idle in transaction", "age_seconds": 12.5,
                                   "has_transaction_id": true, "holds_back_cleanup": true},
            "expired_leases": {"count": 0}, "undelivered_notifications": {"count": 1, "given_up": 0},
            "stalled_campaigns": [], "tables": [{"table": "steps", "live_rows": 90, "dead_rows": 10, "dead_ratio": 0.1}]});
        let text = health(&answer, false);
        assert!(
            text.starts_with(
                "1 problem(s):\n  open_transaction pid 42 has been idle in a transaction"
            ),
            "{text}"
        );
        assert!(text
            .contains("pid 42 (idle in transaction), open 12.5 s, holds back vacuum's clean-up"));
        assert!(text.contains("steps 10/100 (10%)"));
        let fine = health(&json!({"ok": true, "problems": []}), false);
        assert!(fine.starts_with("healthy"));
    }

    #[test]
    fn top_shows_running_steps_with_lease_and_progress() {
        let answer = json!({"at": "2026-01-01T10:00:00+00:00",
            "running": [{"step_id": 7, "action": "write the report", "agent": "writer",
                         "running_seconds": 65.0, "lease_seconds_left": 835.0, "campaign_name": "docs"}],
            "campaigns": [{"id": "3f0c6a52-7d3e-4b8e-9a57-0d4a3c0f5e11", "name": "docs", "status": "active",
                           "running_steps": 1, "ready_steps": 2,
                           "step_counts": {"done": 5, "running": 1, "pending": 4}}]});
        let text = top(&answer, false);
        assert!(text.contains("RUNNING (1)"));
        assert!(text.contains("#7       write the report"), "{text}");
        assert!(text.contains("1m05s") && text.contains("lease 13m55s"));
        assert!(
            text.contains("3f0c6a52 active    [#####.....]    5/10"),
            "{text}"
        );
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn campaigns_and_events_are_one_line_each() {
        let list = json!({"campaigns": [{"id": "3f0c6a52-7d3e-4b8e-9a57-0d4a3c0f5e11", "name": "n",
            "status": "active", "priority": "normal", "open_steps": 3, "progress": "half way"}]});
        let text = campaigns(&list, false);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.contains("active     normal     3  n — half way"),
            "{text}"
        );
        let line = event_line(
            &json!({"id": 12, "kind": "step.done", "at": "2026-01-01T10:00:00.123+00:00",
            "campaign_id": "3f0c6a52-7d3e", "step_id": 4, "payload": {"tokens": 3}}),
            false,
        );
        assert_eq!(line, "2026-01-01 10:00:00  #12      step.done        campaign 3f0c6a52 step #4  {\"tokens\":3}");
    }
}
