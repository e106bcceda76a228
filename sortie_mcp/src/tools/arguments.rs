//! What the server does with a tool call's arguments before they are deserialised (SPEC §14,
//! second and fifth bullets), driven by the tool's own input schema so that it holds for every
//! tool alike:
//! - an unknown parameter name is refused, naming it and listing the tool's parameters;
//! - `campaign_id` is taken as `id` by tools that name their campaign `id`;
//! - `null` on an optional parameter means "not given";
//! - a string that parses as JSON of the declared type is taken as that value (clients that
//!   send arrays and objects as JSON text);
//! - a value of another type is refused naming the parameter;
//! - `maxLength` (of a value, or of each item of an array) is checked before any work.

use serde_json::{Map, Value};

/// The schema keyword (stripped from what clients see) that lets an object parameter also be
/// given as a plain string, e.g. `continuation`.
pub const ACCEPTS_STRING: &str = "x-sortie-accepts-string";

/// A refusal's sentence; the caller gives it the code `invalid_argument`.
pub type Refusal = String;

/// Checks and normalises `arguments` of `tool` against its (raw, schemars) input schema.
pub fn prepare(
    tool: &str,
    schema: &Map<String, Value>,
    arguments: Option<Map<String, Value>>,
) -> Result<Map<String, Value>, Refusal> {
    let empty = Map::new();
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut out = Map::new();
    for (name, value) in arguments.unwrap_or_default() {
        let name = if !properties.contains_key(&name)
            && name == "campaign_id"
            && properties.contains_key("id")
        {
            "id".to_string()
        } else {
            name
        };
        let Some(property) = properties.get(&name) else {
            let known: Vec<&str> = properties.keys().map(String::as_str).collect();
            return Err(format!(
                "unknown parameter '{name}' for {tool}; its parameters are: {}",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        if value.is_null() {
            if required.contains(&name.as_str()) {
                return Err(format!(
                    "parameter '{name}' is required and may not be null"
                ));
            }
            continue;
        }
        let value = coerce(&name, property, value)?;
        if let Some(previous) = out.get(&name) {
            if previous != &value {
                return Err(format!(
                    "parameter '{name}' was given twice (as id and campaign_id) with different values"
                ));
            }
        }
        out.insert(name, value);
    }
    for name in required {
        if !out.contains_key(name) {
            return Err(format!("missing required parameter '{name}' for {tool}"));
        }
    }
    Ok(out)
}

/// The JSON type a property declares: its `type`, the non-null one of a type array, or the
/// first typed branch of an `anyOf`.
pub fn declared_type(property: &Value) -> Option<&str> {
    match property.get("type") {
        Some(Value::String(t)) => return Some(t),
        Some(Value::Array(types)) => {
            return types
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null");
        }
        _ => {}
    }
    property
        .get("anyOf")
        .or_else(|| property.get("oneOf"))
        .and_then(Value::as_array)?
        .iter()
        .filter_map(declared_type)
        .find(|t| *t != "null")
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn fits(value: &Value, declared: &str) -> bool {
    match declared {
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        other => type_of(value) == other,
    }
}

fn article(t: &str) -> &'static str {
    match t {
        "array" | "object" | "integer" => "an",
        _ => "a",
    }
}

fn coerce(name: &str, property: &Value, value: Value) -> Result<Value, Refusal> {
    let Some(declared) = declared_type(property) else {
        return Ok(value);
    };
    let accepts_string = property.get(ACCEPTS_STRING) == Some(&Value::Bool(true));
    let value = match value {
        Value::String(text) if declared != "string" => {
            match serde_json::from_str::<Value>(text.trim()) {
                Ok(parsed) if fits(&parsed, declared) => parsed,
                _ => Value::String(text),
            }
        }
        other => other,
    };
    let fits_declared = fits(&value, declared) || (accepts_string && value.is_string());
    if !fits_declared {
        return Err(format!(
            "parameter '{name}' must be {} {declared}{}, not {} {}",
            article(declared),
            if accepts_string { " or a string" } else { "" },
            article(type_of(&value)),
            type_of(&value)
        ));
    }
    if declared == "string" && property.get("format").and_then(Value::as_str) == Some("uuid") {
        let text = value.as_str().unwrap_or_default();
        if uuid::Uuid::parse_str(text).is_err() {
            return Err(format!("parameter '{name}' must be a UUID, not {value}"));
        }
    }
    check_length(name, property, &value)?;
    check_range(name, property, &value)?;
    check_agents(name, &value)?;
    if let (Value::Array(items), Some(item_schema)) = (&value, property.get("items")) {
        if let Some(item_type) = declared_type(item_schema) {
            for (i, item) in items.iter().enumerate() {
                if !fits(item, item_type) {
                    return Err(format!(
                        "parameter '{name}' must hold {item_type} items; item {i} is {} {}",
                        article(type_of(item)),
                        type_of(item)
                    ));
                }
                check_length(name, item_schema, item)?;
            }
        }
    }
    Ok(value)
}

/// Integers must fit the Rust type behind them (schemars writes it as `format`), so an
/// overflow is refused naming the parameter rather than by serde's anonymous message.
fn check_range(name: &str, property: &Value, value: &Value) -> Result<(), Refusal> {
    let (low, high): (i128, i128) = match property.get("format").and_then(Value::as_str) {
        Some("int32") => (i32::MIN.into(), i32::MAX.into()),
        Some("uint32") => (0, u32::MAX.into()),
        Some("int64") => (i64::MIN.into(), i64::MAX.into()),
        _ => return Ok(()),
    };
    let n: Option<i128> = value
        .as_i64()
        .map(i128::from)
        .or_else(|| value.as_u64().map(i128::from));
    match n {
        Some(n) if n < low || n > high => Err(format!(
            "parameter '{name}' is {value}, outside {low}..={high}"
        )),
        _ => Ok(()),
    }
}

/// SPEC §14: an agent name is at most 200 characters wherever it appears, in steps nested in
/// `steps`, `subtasks` or `continuation` too.
fn check_agents(name: &str, value: &Value) -> Result<(), Refusal> {
    fn walk(value: &Value, path: &mut String, name: &str) -> Result<(), Refusal> {
        match value {
            Value::Object(map) => {
                for (key, item) in map {
                    if let (true, Some(agent)) = (key == "agent", item.as_str()) {
                        let length = agent.chars().count();
                        if length > AGENT_MAX_CHARS {
                            return Err(format!(
                                "parameter '{name}': {path}.agent is {length} characters long; at most {AGENT_MAX_CHARS} are allowed"
                            ));
                        }
                    }
                    let before = path.len();
                    path.push('.');
                    path.push_str(key);
                    walk(item, path, name)?;
                    path.truncate(before);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let before = path.len();
                    path.push_str(&format!("[{i}]"));
                    walk(item, path, name)?;
                    path.truncate(before);
                }
            }
            _ => {}
        }
        Ok(())
    }
    walk(value, &mut name.to_string(), name)
}

const AGENT_MAX_CHARS: usize = 200;

fn check_length(name: &str, property: &Value, value: &Value) -> Result<(), Refusal> {
    let (Some(max), Some(text)) = (
        property.get("maxLength").and_then(Value::as_u64),
        value.as_str(),
    ) else {
        return Ok(());
    };
    let length = text.chars().count() as u64;
    if length > max {
        return Err(format!(
            "parameter '{name}' is {length} characters long; at most {max} are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Map<String, Value> {
        json!({
            "type": "object",
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "steps": {"type": "array", "items": {"type": "object"}},
                "summary": {"type": "string"},
                "tags": {"type": ["array", "null"], "items": {"type": "string", "maxLength": 3}},
                "limit": {"type": ["integer", "null"], "format": "int32"},
                "continuation": {"type": "object", ACCEPTS_STRING: true},
            },
            "required": ["id"],
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn run(args: Value) -> Result<Value, String> {
        prepare("t", &schema(), args.as_object().cloned()).map(Value::Object)
    }

    const ID: &str = "6f1c1d1e-0000-4000-8000-000000000001";

    #[test]
    fn json_text_of_the_declared_type_is_taken_as_that_value() {
        let out = run(
            json!({"id": ID, "steps": "[{\"action\":\"a\"}]", "limit": "5",
            "continuation": "{\"action\":\"m\"}"}),
        )
        .unwrap();
        assert_eq!(out["steps"], json!([{"action": "a"}]));
        assert_eq!(out["limit"], json!(5));
        assert_eq!(out["continuation"], json!({"action": "m"}));
        let out = run(json!({"id": ID, "continuation": "merge", "summary": "[1]"})).unwrap();
        assert_eq!(out["continuation"], json!("merge"));
        assert_eq!(out["summary"], json!("[1]"));
    }

    #[test]
    fn null_is_not_given_and_unknown_names_are_refused() {
        let out = run(json!({"id": ID, "summary": null})).unwrap();
        assert!(out.get("summary").is_none());
        let e = run(json!({"id": ID, "output": "x"})).unwrap_err();
        assert!(e.contains("'output'") && e.contains("summary"), "{e}");
        assert!(run(json!({"id": null})).unwrap_err().contains("'id'"));
    }

    #[test]
    fn campaign_id_is_taken_as_id_and_type_errors_name_the_parameter() {
        assert_eq!(run(json!({"campaign_id": ID})).unwrap()["id"], json!(ID));
        assert!(run(json!({"id": "nope"})).unwrap_err().contains("'id'"));
        assert!(run(json!({"id": ID, "steps": "not json"}))
            .unwrap_err()
            .contains("'steps'"));
        assert!(run(json!({"id": ID, "tags": ["abcd"]}))
            .unwrap_err()
            .contains("'tags'"));
        assert!(run(json!({"id": ID, "tags": [1]}))
            .unwrap_err()
            .contains("'tags'"));
        let long = "a".repeat(201);
        let nested = json!({"id": ID, "steps": [{"action": "a", "steps": [{"action": "b", "agent": long}]}]});
        let e = run(nested).unwrap_err();
        assert!(e.contains("'steps'") && e.contains("agent"), "{e}");
        let e = run(json!({"id": ID, "limit": 10_000_000_000_i64})).unwrap_err();
        assert!(e.contains("'limit'"), "{e}");
    }
}
