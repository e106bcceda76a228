//! Markdown workflows (SPEC §7): reads a workflow folder into the definition JSON the
//! extension's `load_workflow` checks and pins. This module only converts files to JSON; what
//! a valid definition is and how instances move is decided in the extension.
//!
//! A folder holds `index.md` (a `# Title`, then the steps as `- [Step Name](steps/x.md)` links)
//! and the step files, each with `# Orchestrator Guidance` and `# Client Instructions`
//! sections. `{{file:path}}` includes another file of the folder (resolved from the folder's
//! root, at most 10 deep, no cycles, never outside the folder). Lines `on <status>: <Step Name>`
//! declare transitions.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

const MAX_INCLUDE_DEPTH: usize = 10;

/// The workflows of `dir`: every sub-folder with an `index.md`, sorted by name.
pub fn list(dir: &Path) -> Result<Vec<String>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().join("index.md").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Reads workflow `name` of `dir` into its definition.
pub fn load(dir: &Path, name: &str) -> Result<Value, String> {
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\']) {
        return Err(format!("{name:?} is not a workflow name"));
    }
    let root = dir
        .join(name)
        .canonicalize()
        .map_err(|_| format!("workflow {name} does not exist in {}", dir.display()))?;
    let index = expand(&root, &root.join("index.md"), &mut Vec::new())?;
    let mut steps = Vec::new();
    for (step_name, link) in step_links(&index) {
        let text = expand(&root, &root.join(&link), &mut Vec::new())
            .map_err(|e| format!("step {step_name:?}: {e}"))?;
        steps.push(step(&step_name, &text)?);
    }
    Ok(json!({"name": name, "goal": title(&index).unwrap_or_default(), "steps": steps}))
}

/// The file's text with its includes expanded. `stack` holds the files being expanded, to
/// refuse cycles; includes are resolved from the workflow's root and must stay inside it.
fn expand(root: &Path, file: &Path, stack: &mut Vec<PathBuf>) -> Result<String, String> {
    let shown = file
        .strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string();
    let path = file
        .canonicalize()
        .map_err(|_| format!("{shown} does not exist"))?;
    if !path.starts_with(root) {
        return Err(format!("{shown} is outside the workflow folder"));
    }
    if stack.contains(&path) {
        return Err(format!("{shown} includes itself (an include cycle)"));
    }
    if stack.len() > MAX_INCLUDE_DEPTH {
        return Err(format!(
            "includes nest deeper than {MAX_INCLUDE_DEPTH} at {shown}"
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let text = editor_neutral(&text);
    stack.push(path);
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find("{{file:") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        out.push_str(&rest[..start]);
        let target = rest[start + "{{file:".len()..start + len].trim();
        out.push_str(&expand(root, &root.join(target), stack)?);
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    stack.pop();
    Ok(out)
}

fn title(markdown: &str) -> Option<String> {
    markdown
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .map(|t| t.trim().to_string())
}

/// `- [Step Name](steps/x.md)` lines, in order.
fn step_links(index: &str) -> Vec<(String, String)> {
    index
        .lines()
        .filter_map(|line| {
            let item = line.trim_start().strip_prefix(['-', '*'])?.trim_start();
            let (name, rest) = item.strip_prefix('[')?.split_once("](")?;
            let (link, _) = rest.split_once(')')?;
            Some((name.trim().to_string(), link.trim().to_string()))
        })
        .collect()
}

fn step(name: &str, text: &str) -> Result<Value, String> {
    let guidance = section(text, "orchestrator guidance");
    let instructions = section(text, "client instructions")
        .ok_or_else(|| format!("step {name:?} has no \"# Client Instructions\" section"))?;
    let mut transitions = Map::new();
    for line in guidance.as_deref().unwrap_or_default().lines() {
        if let Some((status, target)) = transition(line) {
            if transitions
                .insert(status.clone(), Value::String(target))
                .is_some()
            {
                return Err(format!(
                    "step {name:?} declares two transitions on {status}"
                ));
            }
        }
    }
    let mut step = json!({"name": name, "instructions": instructions, "text": text});
    if let Some(guidance) = guidance {
        step["guidance"] = Value::String(guidance);
    }
    if !transitions.is_empty() {
        step["transitions"] = Value::Object(transitions);
    }
    Ok(step)
}

/// The text under a heading (any level) called `heading`, up to the next heading of the same
/// or a higher level.
fn section(text: &str, heading: &str) -> Option<String> {
    let mut level = None;
    let mut body = Vec::new();
    for line in text.lines() {
        let hashes = line.chars().take_while(|c| *c == '#').count();
        let is_heading = hashes > 0 && line[hashes..].starts_with(' ');
        match level {
            None if is_heading && line[hashes..].trim().eq_ignore_ascii_case(heading) => {
                level = Some(hashes)
            }
            Some(l) if is_heading && hashes <= l => break,
            Some(_) => body.push(line),
            None => {}
        }
    }
    level.map(|_| body.join("\n").trim().to_string())
}

/// `on <status>: <Step Name>` (optionally a list item; the name may be quoted or bracketed).
fn transition(line: &str) -> Option<(String, String)> {
    let line = line.trim().trim_start_matches(['-', '*']).trim_start();
    let rest = line
        .strip_prefix("on ")
        .or_else(|| line.strip_prefix("On "))?;
    let (status, target) = rest.split_once(':')?;
    let status = status.trim();
    if status.is_empty()
        || !status
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
    {
        return None;
    }
    let target = target
        .trim()
        .trim_matches(|c| matches!(c, '"' | '\'' | '`' | '[' | ']' | '.'));
    (!target.is_empty()).then(|| (status.to_string(), target.to_string()))
}

/// A file as its author meant it, whatever the editor saved (SPEC §13): a leading UTF-8
/// byte-order mark is dropped and Windows line ends become `\n`, so neither a title nor an
/// `on <status>:` line is lost to them.
fn editor_neutral(text: &str) -> String {
    text.strip_prefix('\u{feff}')
        .unwrap_or(text)
        .replace("\r\n", "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(files: &[(&str, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sortie-wf-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        for (path, text) in files {
            let path = dir.join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    const INDEX: &str = "# Review a change\n\nSteps:\n\n- [Read Diff](steps/read.md)\n- [Verdict](steps/verdict.md)\n";

    #[test]
    fn a_byte_order_mark_or_windows_line_ends_lose_nothing() {
        let bom = "\u{feff}";
        let dir = folder(&[
            ("wf/index.md", &format!("{bom}{}", INDEX.replace('\n', "\r\n"))),
            ("wf/steps/read.md", &format!("{bom}# Orchestrator Guidance\r\non success: Verdict\r\n\r\n# Client Instructions\r\nRead it. {{{{file:shared/tone.md}}}}\r\n")),
            ("wf/steps/verdict.md", &format!("{bom}# Orchestrator Guidance\non done: FINISH\n# Client Instructions\nSay yes or no.\n")),
            ("wf/shared/tone.md", &format!("{bom}Be brief.")),
        ]);
        let def = load(&dir, "wf").unwrap();
        assert_eq!(def["goal"], "Review a change");
        assert_eq!(def["steps"][0]["name"], "Read Diff");
        assert_eq!(
            def["steps"][0]["transitions"],
            json!({"success": "Verdict"})
        );
        assert_eq!(def["steps"][0]["instructions"], "Read it. Be brief.");
        assert_eq!(def["steps"][1]["transitions"], json!({"done": "FINISH"}));
    }

    #[test]
    fn a_folder_becomes_a_definition_with_sections_includes_and_transitions() {
        let dir = folder(&[
            ("wf/index.md", INDEX),
            ("wf/steps/read.md", "# Orchestrator Guidance\non success: Verdict\n- on failed: \"FINISH\"\n\n# Client Instructions\nRead it. {{file:shared/tone.md}}\n"),
            ("wf/steps/verdict.md", "# Orchestrator Guidance\nDecide.\n# Client Instructions\nSay yes or no.\n"),
            ("wf/shared/tone.md", "Be brief."),
        ]);
        let def = load(&dir, "wf").unwrap();
        assert_eq!(def["goal"], "Review a change");
        assert_eq!(def["steps"][0]["name"], "Read Diff");
        assert_eq!(def["steps"][0]["instructions"], "Read it. Be brief.");
        assert_eq!(
            def["steps"][0]["transitions"],
            json!({"success": "Verdict", "failed": "FINISH"})
        );
        assert_eq!(def["steps"][1]["guidance"], "Decide.");
        assert!(def["steps"][1].get("transitions").is_none());
        assert_eq!(list(&dir).unwrap(), ["wf"]);
    }

    #[test]
    fn includes_may_not_leave_the_folder_loop_or_nest_too_deep() {
        const ONE_STEP: &str = "# T\n- [A](steps/a.md)\n";
        let escape = folder(&[
            ("wf/index.md", ONE_STEP),
            ("secret.md", "outside"),
            (
                "wf/steps/a.md",
                "# Client Instructions\n{{file:../secret.md}}",
            ),
        ]);
        assert!(load(&escape, "wf")
            .unwrap_err()
            .contains("outside the workflow folder"));
        let cycle = folder(&[
            ("wf/index.md", ONE_STEP),
            ("wf/steps/a.md", "# Client Instructions\n{{file:b.md}}"),
            ("wf/b.md", "{{file:steps/a.md}}"),
        ]);
        assert!(load(&cycle, "wf").unwrap_err().contains("include cycle"));
        // d0 includes d1 … includes d12: twelve levels.
        let mut deep: Vec<(String, String)> = (0..12)
            .map(|i| (format!("wf/d{i}.md"), format!("{{{{file:d{}.md}}}}", i + 1)))
            .collect();
        deep.push(("wf/d12.md".into(), "bottom".into()));
        deep.push(("wf/index.md".into(), "# T\n- [A](d0.md)\n".into()));
        let deep: Vec<(&str, &str)> = deep.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let deep = folder(&deep);
        assert!(load(&deep, "wf").unwrap_err().contains("deeper than 10"));
        assert!(load(&deep, "../wf")
            .unwrap_err()
            .contains("not a workflow name"));
    }

    #[test]
    fn a_step_without_client_instructions_is_refused() {
        let dir = folder(&[
            ("wf/index.md", "# T\n- [A](steps/a.md)\n"),
            (
                "wf/steps/a.md",
                "# Orchestrator Guidance\nnothing for the client\n",
            ),
        ]);
        assert!(load(&dir, "wf")
            .unwrap_err()
            .contains("Client Instructions"));
    }
}
