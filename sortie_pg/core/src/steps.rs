//! Step JSON (SPEC §3a): parsing, validation and expansion into a flat, insert-ready list.
//!
//! Everything that can be decided without the database is decided here, before a single row
//! is written: unknown step types and fields, missing actions, unknown keys, duplicate keys,
//! cycles (including a step that waits on its own ancestor), thresholds out of range.
//! What needs the database (existing ids, their campaign) is checked by the extension.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{RuleError, RuleResult};
use crate::fingerprint::fingerprint;

/// Upper bound on the steps one call may create, so a runaway plan cannot fill the table.
pub const MAX_STEPS_PER_CALL: usize = 200_000;
const MAX_ACTION_CHARS: usize = 20_000;
const MAX_NAME_CHARS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepType {
    Atomic,
    Sequence,
    ParallelGroup,
    ForEach,
}

impl StepType {
    fn parse(text: &str) -> RuleResult<Self> {
        match text {
            "atomic" => Ok(Self::Atomic),
            "sequence" => Ok(Self::Sequence),
            "parallel_group" => Ok(Self::ParallelGroup),
            "for_each" => Ok(Self::ForEach),
            other => Err(RuleError::invalid(format!(
                "unknown step_type '{other}': use atomic, sequence, parallel_group or for_each"
            ))),
        }
    }
}

/// One step ready to insert. `parent` and `local_deps` are indexes into `Expansion::nodes`;
/// a parent always comes before its children.
#[derive(Debug, Clone, Serialize)]
pub struct FlatStep {
    pub parent: Option<usize>,
    /// Depth below the call's top level (0 for top-level steps).
    pub level: u32,
    /// Order among siblings, used for a compound step's output.
    pub position: u32,
    pub step_type: StepType,
    pub action: String,
    pub agent: Option<String>,
    pub input: Option<Value>,
    pub key: Option<String>,
    pub failure_policy: Option<String>,
    pub max_attempts: Option<i64>,
    pub requires_locks: Vec<String>,
    pub completion_threshold: Option<i64>,
    /// SPEC §17: a shell command that must exit 0 before the step is done.
    pub verify: Option<String>,
    pub local_deps: Vec<usize>,
    pub existing_deps: Vec<i64>,
    pub fingerprint: String,
    /// Number of children of a compound step.
    pub members: u32,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Expansion {
    pub nodes: Vec<FlatStep>,
    pub top_level: Vec<usize>,
    pub keys: BTreeMap<String, usize>,
}

impl Expansion {
    pub fn max_level(&self) -> u32 {
        self.nodes.iter().map(|n| n.level).max().unwrap_or(0)
    }
}

enum DepRef {
    Key(String),
    Id(i64),
}

struct Builder {
    nodes: Vec<FlatStep>,
    pending_deps: Vec<Vec<DepRef>>,
    keys: BTreeMap<String, usize>,
}

/// Parses and validates a list of step objects.
pub fn expand(steps: &Value) -> RuleResult<Expansion> {
    let list = steps
        .as_array()
        .ok_or_else(|| RuleError::invalid("steps must be a JSON array of step objects"))?;
    if list.is_empty() {
        return Err(RuleError::invalid("steps is empty: give at least one step"));
    }
    let mut builder = Builder {
        nodes: Vec::new(),
        pending_deps: Vec::new(),
        keys: BTreeMap::new(),
    };
    let mut top_level = Vec::with_capacity(list.len());
    for (position, step) in list.iter().enumerate() {
        top_level.push(builder.parse(step, None, 0, position as u32, "steps")?);
    }
    builder.resolve_deps()?;
    inherit_failure_policy(&mut builder.nodes);
    find_cycle(&builder.nodes)?;
    Ok(Expansion {
        nodes: builder.nodes,
        top_level,
        keys: builder.keys,
    })
}

/// Sequence semantics: child k depends on child k-1.
fn chain_sequence(nodes: &mut [FlatStep], children: &[usize]) {
    for pair in children.windows(2) {
        nodes[pair[1]].local_deps.push(pair[0]);
    }
}

/// A step without its own failure policy takes its nearest ancestor's; the extension fills
/// the rest from the campaign. Parents precede children, so one forward pass suffices.
fn inherit_failure_policy(nodes: &mut [FlatStep]) {
    for i in 0..nodes.len() {
        if nodes[i].failure_policy.is_none() {
            if let Some(parent) = nodes[i].parent {
                nodes[i].failure_policy = nodes[parent].failure_policy.clone();
            }
        }
    }
}

const COMMON_FIELDS: &[&str] = &[
    "step_type",
    "action",
    "agent",
    "input",
    "key",
    "depends_on",
    "failure_policy",
    "max_attempts",
    "requires_locks",
];

impl Builder {
    fn parse(
        &mut self,
        value: &Value,
        parent: Option<usize>,
        level: u32,
        position: u32,
        path: &str,
    ) -> RuleResult<usize> {
        if self.nodes.len() >= MAX_STEPS_PER_CALL {
            return Err(RuleError::invalid(format!(
                "more than {MAX_STEPS_PER_CALL} steps in one call"
            )));
        }
        let object = value
            .as_object()
            .ok_or_else(|| RuleError::invalid(format!("{path}: a step must be a JSON object")))?;
        let step_type = match object.get("step_type") {
            None | Some(Value::Null) => StepType::Atomic,
            Some(Value::String(s)) => StepType::parse(s).map_err(|e| at(path, e))?,
            Some(_) => {
                return Err(RuleError::invalid(format!(
                    "{path}.step_type must be a string"
                )))
            }
        };
        let extra: &[&str] = match step_type {
            // SPEC §17: only an atomic step is done by a worker, so only it can be checked.
            StepType::Atomic => &["verify"],
            StepType::Sequence => &["steps"],
            StepType::ParallelGroup => &["children", "completion_threshold"],
            StepType::ForEach => &["items", "template", "collect", "completion_threshold"],
        };
        if let Some(unknown) = object
            .keys()
            .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
        {
            let mut allowed: Vec<&str> = COMMON_FIELDS.to_vec();
            allowed.extend_from_slice(extra);
            return Err(RuleError::invalid(format!(
                "{path}: unknown field '{unknown}' for a {step_type:?} step (allowed: {})",
                allowed.join(", ")
            )));
        }
        if step_type == StepType::ForEach && object.get("collect").is_some_and(|c| !c.is_null()) {
            return self.parse_for_each_with_collect(object, parent, level, position, path);
        }

        let index = self.nodes.len();
        let node = FlatStep {
            parent,
            level,
            position,
            step_type,
            action: required_text(object, "action", MAX_ACTION_CHARS, path)?,
            agent: optional_text(object, "agent", MAX_NAME_CHARS, path)?,
            input: object.get("input").filter(|v| !v.is_null()).cloned(),
            key: optional_text(object, "key", MAX_NAME_CHARS, path)?,
            failure_policy: failure_policy(object, path)?,
            max_attempts: optional_int(object, "max_attempts", 1, 100, path)?,
            requires_locks: lock_keys(object, path)?,
            completion_threshold: optional_int(object, "completion_threshold", 1, i64::MAX, path)?,
            verify: optional_text(object, "verify", MAX_ACTION_CHARS, path)?,
            local_deps: Vec::new(),
            existing_deps: Vec::new(),
            fingerprint: String::new(),
            members: 0,
        };
        self.nodes.push(node);
        self.pending_deps.push(dep_refs(object, path)?);
        if let Some(key) = self.nodes[index].key.clone() {
            if self.keys.insert(key.clone(), index).is_some() {
                return Err(RuleError::invalid(format!(
                    "{path}: key '{key}' is used twice in this call"
                )));
            }
        }

        let children = match step_type {
            StepType::Atomic => {
                let n = &mut self.nodes[index];
                n.fingerprint = fingerprint(&n.action, n.agent.as_deref(), n.input.as_ref());
                Vec::new()
            }
            StepType::Sequence => self.parse_children(object, "steps", index, level, path)?,
            StepType::ParallelGroup => {
                self.parse_children(object, "children", index, level, path)?
            }
            StepType::ForEach => self.parse_items(object, index, level, path)?,
        };
        if step_type == StepType::Sequence {
            chain_sequence(&mut self.nodes, &children);
        }
        let members = children.len() as u32;
        let node = &mut self.nodes[index];
        node.members = members;
        if let Some(threshold) = node.completion_threshold {
            if step_type == StepType::Atomic || step_type == StepType::Sequence {
                return Err(RuleError::invalid(format!(
                    "{path}: completion_threshold applies to parallel_group and for_each steps"
                )));
            }
            if threshold > i64::from(members) {
                return Err(RuleError::invalid(format!(
                    "{path}: completion_threshold {threshold} is more than its {members} children"
                )));
            }
        }
        Ok(index)
    }

    fn parse_children(
        &mut self,
        object: &Map<String, Value>,
        field: &str,
        index: usize,
        level: u32,
        path: &str,
    ) -> RuleResult<Vec<usize>> {
        let list = object.get(field).and_then(Value::as_array).ok_or_else(|| {
            RuleError::invalid(format!("{path}.{field} must be an array of steps"))
        })?;
        if list.is_empty() {
            return Err(RuleError::invalid(format!(
                "{path}.{field} is empty: a compound step needs at least one child"
            )));
        }
        list.iter()
            .enumerate()
            .map(|(i, child)| {
                self.parse(
                    child,
                    Some(index),
                    level + 1,
                    i as u32,
                    &format!("{path}.{field}[{i}]"),
                )
            })
            .collect()
    }

    /// `for_each` items become children built from the template with `{item}` placeholders
    /// replaced in the parsed template's strings (SPEC §12: never text substitution).
    fn parse_items(
        &mut self,
        object: &Map<String, Value>,
        index: usize,
        level: u32,
        path: &str,
    ) -> RuleResult<Vec<usize>> {
        let items = object
            .get("items")
            .and_then(Value::as_array)
            .ok_or_else(|| RuleError::invalid(format!("{path}.items must be an array")))?;
        let template = object
            .get("template")
            .filter(|t| t.is_object())
            .ok_or_else(|| RuleError::invalid(format!("{path}.template must be a step object")))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let item_path = format!("{path}.items[{i}]");
                let step = substitute(template, item, &item_path)?;
                self.parse(&step, Some(index), level + 1, i as u32, &item_path)
            })
            .collect()
    }

    /// A `for_each` with `collect` is a sequence of the fan-out and the collect step, so that
    /// whoever depends on the for_each waits for the collect too. The outer sequence takes the
    /// for_each's key, dependencies and action.
    fn parse_for_each_with_collect(
        &mut self,
        object: &Map<String, Value>,
        parent: Option<usize>,
        level: u32,
        position: u32,
        path: &str,
    ) -> RuleResult<usize> {
        let mut outer = Map::new();
        let mut fan_out = object.clone();
        fan_out.remove("collect");
        for moved in ["key", "depends_on", "failure_policy"] {
            if let Some(v) = fan_out.remove(moved) {
                outer.insert(moved.into(), v);
            }
        }
        outer.insert("step_type".into(), Value::from("sequence"));
        outer.insert(
            "action".into(),
            object.get("action").cloned().unwrap_or(Value::Null),
        );
        outer.insert(
            "steps".into(),
            Value::Array(vec![Value::Object(fan_out), object["collect"].clone()]),
        );
        self.parse(&Value::Object(outer), parent, level, position, path)
    }

    fn resolve_deps(&mut self) -> RuleResult<()> {
        for (index, refs) in std::mem::take(&mut self.pending_deps)
            .into_iter()
            .enumerate()
        {
            for dep in refs {
                match dep {
                    DepRef::Key(key) => {
                        let target = *self.keys.get(&key).ok_or_else(|| {
                            RuleError::invalid(format!(
                                "depends_on names key '{key}', which no step of this call has"
                            ))
                        })?;
                        if target == index {
                            return Err(RuleError::cycle(format!(
                                "step '{key}' depends on itself"
                            )));
                        }
                        self.nodes[index].local_deps.push(target);
                    }
                    DepRef::Id(id) => self.nodes[index].existing_deps.push(id),
                }
            }
            let node = &mut self.nodes[index];
            node.local_deps.sort_unstable();
            node.local_deps.dedup();
            node.existing_deps.sort_unstable();
            node.existing_deps.dedup();
        }
        Ok(())
    }
}

fn at(path: &str, error: RuleError) -> RuleError {
    RuleError {
        code: error.code,
        message: format!("{path}: {}", error.message),
    }
}

fn required_text(
    object: &Map<String, Value>,
    field: &str,
    max: usize,
    path: &str,
) -> RuleResult<String> {
    match object.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => check_length(s, field, max, path),
        Some(Value::String(_)) => Err(RuleError::invalid(format!("{path}.{field} is empty"))),
        None | Some(Value::Null) => Err(RuleError::invalid(format!("{path}: missing '{field}'"))),
        Some(_) => Err(RuleError::invalid(format!(
            "{path}.{field} must be a string"
        ))),
    }
}

fn optional_text(
    object: &Map<String, Value>,
    field: &str,
    max: usize,
    path: &str,
) -> RuleResult<Option<String>> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => required_text(object, field, max, path).map(Some),
    }
}

fn check_length(s: &str, field: &str, max: usize, path: &str) -> RuleResult<String> {
    if s.chars().count() > max {
        return Err(RuleError::invalid(format!(
            "{path}.{field} is longer than {max} characters"
        )));
    }
    if s.contains('\0') {
        return Err(RuleError::invalid(format!(
            "{path}.{field} contains a NUL character"
        )));
    }
    Ok(s.to_owned())
}

fn optional_int(
    object: &Map<String, Value>,
    field: &str,
    min: i64,
    max: i64,
    path: &str,
) -> RuleResult<Option<i64>> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(RuleError::invalid(format!(
                "{path}.{field} must be an integer from {min} to {max}"
            ))),
        },
    }
}

fn failure_policy(object: &Map<String, Value>, path: &str) -> RuleResult<Option<String>> {
    match object.get("failure_policy") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(p)) if p == "continue" || p == "fail_fast" => Ok(Some(p.clone())),
        Some(_) => Err(RuleError::invalid(format!(
            "{path}.failure_policy must be 'continue' or 'fail_fast'"
        ))),
    }
}

fn lock_keys(object: &Map<String, Value>, path: &str) -> RuleResult<Vec<String>> {
    match object.get("requires_locks") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(keys)) => keys
            .iter()
            .map(|k| match k.as_str().map(str::trim) {
                Some(s) if !s.is_empty() && !s.trim_start_matches("shared:").is_empty() => {
                    check_length(s, "requires_locks", MAX_NAME_CHARS, path)
                }
                _ => Err(RuleError::invalid(format!(
                    "{path}.requires_locks must hold non-empty strings"
                ))),
            })
            .collect(),
        Some(_) => Err(RuleError::invalid(format!(
            "{path}.requires_locks must be an array of strings"
        ))),
    }
}

fn dep_refs(object: &Map<String, Value>, path: &str) -> RuleResult<Vec<DepRef>> {
    let list = match object.get("depends_on") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => {
            return Err(RuleError::invalid(format!(
                "{path}.depends_on must be an array of step ids or keys"
            )))
        }
    };
    list.iter()
        .map(|d| match d {
            Value::String(key) if !key.is_empty() => Ok(DepRef::Key(key.clone())),
            Value::Number(n) if n.as_i64().is_some_and(|id| id > 0) => Ok(DepRef::Id(n.as_i64().unwrap_or_default())),
            _ => Err(RuleError::invalid(format!(
                "{path}.depends_on entries are step ids (positive integers) or keys (strings), not {d}"
            ))),
        })
        .collect()
}

/// Replaces `{item}` and `{item.path.to.field}` in every string of `template` with the item's
/// values. A string that is exactly one placeholder takes the value itself (keeping its JSON
/// type); inside longer text, strings are inserted as they are and other values as JSON.
///
/// A `for_each` nested in the template keeps its own `template` untouched: there `{item}` is
/// the inner loop's item (SPEC §13). The outer item reaches the inner loop through the inner
/// loop's other fields (its `items`, `action`, `collect`), which are substituted here.
fn substitute(template: &Value, item: &Value, path: &str) -> RuleResult<Value> {
    Ok(match template {
        Value::Object(map) if map.get("step_type").and_then(Value::as_str) == Some("for_each") => {
            Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let value = if k == "template" {
                            v.clone()
                        } else {
                            substitute(v, item, path)?
                        };
                        Ok((k.clone(), value))
                    })
                    .collect::<RuleResult<Map<_, _>>>()?,
            )
        }
        Value::String(s) => substitute_text(s, item, path)?,
        Value::Array(list) => Value::Array(
            list.iter()
                .map(|v| substitute(v, item, path))
                .collect::<RuleResult<_>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    // A verify command is shell text: items go in quoted, never as code.
                    let value = match (k.as_str(), v) {
                        ("verify", Value::String(text)) => {
                            Value::String(substitute_shell(text, item, path)?)
                        }
                        _ => substitute(v, item, path)?,
                    };
                    Ok((k.clone(), value))
                })
                .collect::<RuleResult<Map<_, _>>>()?,
        ),
        other => other.clone(),
    })
}

/// `{item}` placeholders of a shell command (a step's `verify`), each value inserted as one
/// single-quoted shell word, so an item with quotes, `;` or `$(…)` stays data.
fn substitute_shell(text: &str, item: &Value, path: &str) -> RuleResult<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{item") {
        let after = &rest[start + 5..];
        let Some(end) = after.find('}') else { break };
        let field_path = &after[..end];
        if !(field_path.is_empty() || field_path.starts_with('.')) {
            out.push_str(&rest[..start + 5]);
            rest = after;
            continue;
        }
        let value = lookup(item, field_path, path)?;
        let word = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        out.push_str(&rest[..start]);
        out.push('\'');
        out.push_str(&word.replace('\'', "'\\''"));
        out.push('\'');
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn substitute_text(text: &str, item: &Value, path: &str) -> RuleResult<Value> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{item") {
        let after = &rest[start + 5..];
        let Some(end) = after.find('}') else { break };
        let field_path = &after[..end];
        let valid = field_path.is_empty()
            || (field_path.starts_with('.')
                && field_path[1..].split('.').all(|seg| {
                    !seg.is_empty()
                        && seg
                            .chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
                }));
        if !valid {
            out.push_str(&rest[..start + 5]);
            rest = after;
            continue;
        }
        let value = lookup(item, field_path, path)?;
        if start == 0 && end + 6 == rest.len() && out.is_empty() {
            return Ok(value.clone());
        }
        out.push_str(&rest[..start]);
        match value {
            Value::String(s) => out.push_str(s),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn lookup<'a>(item: &'a Value, field_path: &str, path: &str) -> RuleResult<&'a Value> {
    let mut current = item;
    for segment in field_path.split('.').skip(1) {
        let next = match current {
            Value::Object(map) => map.get(segment),
            Value::Array(list) => segment.parse::<usize>().ok().and_then(|i| list.get(i)),
            _ => None,
        };
        current = next.ok_or_else(|| {
            RuleError::invalid(format!(
                "{path}: the template uses {{item{field_path}}} but this item has no '{segment}'"
            ))
        })?;
    }
    Ok(current)
}

/// Refuses any set of steps that could never all finish (see [`wait_cycle`]).
fn find_cycle(nodes: &[FlatStep]) -> RuleResult<()> {
    let parents: Vec<Option<usize>> = nodes.iter().map(|n| n.parent).collect();
    let deps: Vec<(usize, usize)> = nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.local_deps.iter().map(move |&dep| (i, dep)))
        .collect();
    match wait_cycle(&parents, &deps) {
        None => Ok(()),
        Some(i) => {
            let node = &nodes[i];
            let name = node
                .key
                .clone()
                .unwrap_or_else(|| node.action.chars().take(60).collect());
            Err(RuleError::cycle(format!(
                "the dependencies form a cycle through step '{name}': no order can run them all"
            )))
        }
    }
}

/// A step on a cycle of waits, if there is one. Steps are indexes `0..parents.len()`;
/// `parents[i]` is step i's compound parent, `deps` are `(step, depends_on)` pairs. Each step
/// has a start and an end event; a dependency orders dep.end before start, a compound step's
/// start comes before its children's and its end after theirs. A cycle among these events is a
/// deadlock — which also catches a step depending on its own ancestor or descendant.
pub fn wait_cycle(parents: &[Option<usize>], deps: &[(usize, usize)]) -> Option<usize> {
    let n = parents.len();
    let start = |i: usize| 2 * i;
    let end = |i: usize| 2 * i + 1;
    let mut edges: Vec<Vec<usize>> = vec![Vec::new(); 2 * n];
    for (i, parent) in parents.iter().enumerate() {
        edges[start(i)].push(end(i));
        if let Some(parent) = *parent {
            edges[start(parent)].push(start(i));
            edges[end(i)].push(end(parent));
        }
    }
    for &(step, dep) in deps {
        edges[end(dep)].push(start(step));
    }
    // Iterative three-colour DFS: deep nesting must not overflow the stack.
    let mut colour = vec![0u8; 2 * n];
    for root in 0..2 * n {
        if colour[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        colour[root] = 1;
        while let Some(&mut (vertex, ref mut next)) = stack.last_mut() {
            if let Some(&to) = edges[vertex].get(*next) {
                *next += 1;
                match colour[to] {
                    0 => {
                        colour[to] = 1;
                        stack.push((to, 0));
                    }
                    1 => return Some(to / 2),
                    _ => {}
                }
            } else {
                colour[vertex] = 2;
                stack.pop();
            }
        }
    }
    None
}

#[cfg(test)]
#[path = "steps_tests.rs"]
mod tests;
