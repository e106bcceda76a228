//! Schemas that work in every mainstream front-end (SPEC §14, third bullet). schemars writes
//! `$schema`, type arrays for optional values (`["string", "null"]`), formats such as `uuid` and
//! `int64`, and leaves objects open; `portable` rewrites each tool's input schema into the
//! common subset, and `output_schema` gives every tool an `outputSchema`.
//!
//! An object whose keys are free (a workflow context, a step's input) is written with
//! `additionalProperties: false` and a `patternProperties` that admits any key: it stays
//! closed by the rule and open in meaning.

use schemars::{json_schema, Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::arguments::ACCEPTS_STRING;

/// `steps` and `subtasks`: an array of step objects (SPEC §3a).
pub fn step_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": step_object()})
}

/// Note tags: each at most 200 characters (SPEC §14, lengths before work).
pub fn tags(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "array", "items": {"type": "string", "maxLength": 200}})
}

/// `context`, `report`, `context_updates`: a JSON object with keys of the caller's choosing.
pub fn free_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "object", "patternProperties": {"^.*$": {}}, "additionalProperties": false})
}

/// `continuation`: `{action, agent?, input?}`, or the action alone as a string.
pub fn continuation(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        ACCEPTS_STRING: true,
        "properties": {
            "action": {"type": "string", "description": "What the continuation step does."},
            "agent": {"type": "string", "maxLength": 200},
            "input": {"type": "object", "patternProperties": {"^.*$": {}}, "additionalProperties": false},
        },
        "required": ["action"],
        "additionalProperties": false,
    })
}

/// A step object (SPEC §3a). Its children are step objects too; since `$ref` is not portable,
/// they are described as open objects.
fn step_object() -> Value {
    let open =
        json!({"type": "object", "patternProperties": {"^.*$": {}}, "additionalProperties": false});
    let open_list = json!({"type": "array", "items": open});
    json!({
        "type": "object",
        "properties": {
            "action": {"type": "string", "description": "What the step does."},
            "agent": {"type": "string", "maxLength": 200, "description": "Which agent runs it."},
            "input": {"type": "object", "patternProperties": {"^.*$": {}}, "additionalProperties": false,
                      "description": "The step's input (an object; a string is accepted too)."},
            "key": {"type": "string", "description": "A name other steps of this call use in depends_on."},
            "depends_on": {"type": "array",
                           "description": "Keys of steps in this call (strings) or ids of existing steps (integers)."},
            "failure_policy": {"type": "string"},
            "max_attempts": {"type": "integer"},
            "requires_locks": {"type": "array", "items": {"type": "string"}},
            "step_type": {"type": "string", "description": "atomic (default), sequence, parallel_group or for_each."},
            "steps": open_list,
            "children": open_list,
            "completion_threshold": {"type": "integer"},
            "items": {"type": "array", "items": {"type": "object", "patternProperties": {"^.*$": {}}, "additionalProperties": false}},
            "template": open,
            "collect": open,
        },
        "required": ["action"],
        "patternProperties": {"^.*$": {}},
        "additionalProperties": false,
    })
}

/// The input schema as clients see it: no `$schema`/`$ref`/`$defs`, no type arrays, every
/// property typed, every object closed, no format but `date-time`, no private keywords.
pub fn portable(raw: &Map<String, Value>) -> Map<String, Value> {
    let defs = raw
        .get("$defs")
        .or_else(|| raw.get("definitions"))
        .cloned()
        .unwrap_or(Value::Null);
    let mut value = Value::Object(raw.clone());
    rewrite(&mut value, &defs, 0);
    match value {
        Value::Object(mut map) => {
            map.insert("type".into(), json!("object"));
            map.entry("properties").or_insert_with(|| json!({}));
            map.insert("additionalProperties".into(), json!(false));
            map
        }
        _ => Map::new(),
    }
}

fn rewrite(value: &mut Value, defs: &Value, depth: usize) {
    let Value::Object(map) = value else {
        return;
    };
    // Inline references (none of our parameter types nests a struct, but stay safe).
    if let Some(Value::String(reference)) = map.get("$ref").cloned() {
        let name = reference.rsplit('/').next().unwrap_or_default();
        if let Some(target) = defs.get(name).cloned().filter(|_| depth < 16) {
            map.remove("$ref");
            if let Value::Object(target) = target {
                for (k, v) in target {
                    map.entry(k).or_insert(v);
                }
            }
        }
    }
    for key in ["$schema", "$ref", "$defs", "definitions", "$id", "nullable"] {
        map.remove(key);
    }
    map.retain(|k, _| !k.starts_with("x-"));
    if map.get("default") == Some(&Value::Null) {
        map.remove("default");
    }
    // Option<T> as ["T", "null"]: optional means "not required", so the null goes.
    if let Some(Value::Array(types)) = map.get("type").cloned() {
        let kept: Vec<&Value> = types
            .iter()
            .filter(|t| t.as_str() != Some("null"))
            .collect();
        map.insert(
            "type".into(),
            kept.first()
                .map(|t| (*t).clone())
                .unwrap_or(json!("string")),
        );
    }
    // Option<Struct> as anyOf [T, null].
    if let Some(Value::Array(branches)) = map.get("anyOf").cloned() {
        let kept: Vec<Value> = branches
            .into_iter()
            .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            .collect();
        if kept.len() == 1 {
            map.remove("anyOf");
            if let Value::Object(only) = &kept[0] {
                for (k, v) in only {
                    map.entry(k.clone()).or_insert(v.clone());
                }
            }
        } else {
            map.insert("anyOf".into(), Value::Array(kept));
        }
    }
    if map
        .get("format")
        .is_some_and(|f| f.as_str() != Some("date-time"))
    {
        map.remove("format");
    }
    // Integer bounds schemars derives from the Rust type (u32 ≥ 0 and the like) are kept.
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        for property in properties.values_mut() {
            if property.get("type").is_none() && property.get("anyOf").is_none() {
                // An untyped property (serde_json::Value): say it is an object.
                if let Value::Object(p) = property {
                    p.insert("type".into(), json!("object"));
                }
            }
            rewrite(property, defs, depth + 1);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get_mut(key) {
            if child.is_object() {
                rewrite(child, defs, depth + 1);
            }
        }
    }
    if let Some(Value::Array(branches)) = map.get_mut("anyOf") {
        for branch in branches {
            rewrite(branch, defs, depth + 1);
        }
    }
    if map.get("type").and_then(Value::as_str) == Some("object") {
        if !map.contains_key("properties") && !map.contains_key("patternProperties") {
            map.insert("patternProperties".into(), json!({"^.*$": {}}));
        }
        map.insert("additionalProperties".into(), json!(false));
    }
}

/// What every error result carries as `structuredContent` (SPEC §5): the stable code and a
/// sentence. Each tool's output schema admits it, so clients that validate error results too
/// (the TypeScript SDK) accept them.
pub fn error_property() -> Value {
    json!({
        "type": "object",
        "description": "Present when the call failed (isError): a stable code and a sentence to act on.",
        "properties": {
            "code": {"type": "string"},
            "message": {"type": "string"},
        },
        "required": ["code", "message"],
        "additionalProperties": false,
    })
}

/// The `outputSchema` of a tool: the keys its result is known to carry, typed, plus `error` for
/// failures and `replayed` for repeated calls. Every result is a JSON object; keys beside the
/// listed ones (added by later versions) are admitted.
pub fn output_schema(tool: &str) -> Map<String, Value> {
    let mut properties = Map::new();
    properties.insert("error".into(), error_property());
    properties.insert(
        "replayed".into(),
        json!({"type": "boolean", "description": "true when this is the kept result of an earlier call with the same request_id (or the same claim)."}),
    );
    for (name, schema) in known_keys(tool) {
        properties.insert(name.into(), schema);
    }
    json!({
        "type": "object",
        "properties": properties,
        "patternProperties": {"^.*$": {}},
        "additionalProperties": false,
    })
    .as_object()
    .cloned()
    .unwrap_or_default()
}

/// Keys whose type never varies in a tool's successful result (nullable ones are left to the
/// open part of the schema, since type arrays are not portable). None is required: an error
/// result carries only `error`.
fn known_keys(tool: &str) -> Vec<(&'static str, Value)> {
    let text = |d: &str| json!({"type": "string", "description": d});
    let integer = |d: &str| json!({"type": "integer", "description": d});
    let boolean = |d: &str| json!({"type": "boolean", "description": d});
    let open = |d: &str| json!({"type": "object", "description": d, "patternProperties": {"^.*$": {}}, "additionalProperties": false});
    let rows = |d: &str| {
        json!({"type": "array", "description": d, "items": {"type": "object",
            "patternProperties": {"^.*$": {}}, "additionalProperties": false}})
    };
    match tool {
        "create_campaign" => vec![
            ("id", text("The campaign's UUID.")),
            ("name", text("Its display name.")),
            ("status", text("active, or paused for a dry run.")),
        ],
        "get_campaign" => vec![
            ("id", text("The campaign's UUID.")),
            ("status", text("active, paused, done, failed or cancelled.")),
            ("steps", rows("One page of steps, in id order.")),
            ("step_counts", open("Steps by status.")),
            ("recent_notes", rows("The newest notes, previews.")),
        ],
        "list_campaigns" => vec![("campaigns", rows("One page of campaigns, newest first."))],
        "add_steps" => vec![
            ("created", integer("Steps created.")),
            ("keys", open("The id of each key given.")),
        ],
        "complete_step" => vec![
            ("step_id", integer("The step.")),
            (
                "status",
                text("done, or skipped when it was skipped while you worked."),
            ),
            ("accepted", boolean("Whether your completion was taken.")),
        ],
        "fail_step" => vec![
            ("step_id", integer("The step.")),
            ("status", text("pending (it will be retried) or failed.")),
            ("will_retry", boolean("Whether another attempt follows.")),
        ],
        "add_note" => vec![("note_id", integer("The new note."))],
        "get_notes" => vec![("notes", rows("One page of notes, newest first."))],
        "search_notes" => vec![("results", rows("Ranked hits, each with score and mode."))],
        "list_workflows" => vec![("workflows", rows("The workflows available."))],
        _ => Vec::new(),
    }
}
