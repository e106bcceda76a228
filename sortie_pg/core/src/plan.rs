//! Planner answers (SPEC §4): the shape of `apply_plan`'s plan, validated before anything is
//! applied so that a malformed answer changes nothing.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{RuleError, RuleResult};
use crate::steps::{expand, Expansion};

const FIELDS: &[&str] = &[
    "new_steps",
    "strategy_update",
    "progress_update",
    "notify",
    "done",
    "next_delay_minutes",
    "reasoning",
];
const LEVELS: &[&str] = &["milestone", "done", "error", "info"];

#[derive(Debug, Clone, Serialize)]
pub struct Notify {
    pub level: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub new_steps: Option<Expansion>,
    pub strategy_update: Option<String>,
    pub progress_update: Option<String>,
    pub notify: Option<Notify>,
    pub done: bool,
    pub next_delay_minutes: Option<f64>,
}

pub fn parse_plan(plan: &Value) -> RuleResult<Plan> {
    let object = plan
        .as_object()
        .ok_or_else(|| RuleError::invalid("plan must be a JSON object"))?;
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(RuleError::invalid(format!(
            "plan: unknown field '{unknown}' (allowed: {})",
            FIELDS.join(", ")
        )));
    }
    let new_steps = match object.get("new_steps") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) if list.is_empty() => None,
        Some(steps) => Some(expand(steps).map_err(|e| RuleError {
            code: e.code,
            message: format!("new_steps: {}", e.message),
        })?),
    };
    let done = match object.get("done") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(RuleError::invalid("plan.done must be true or false")),
    };
    if done && new_steps.is_some() {
        return Err(RuleError::invalid(
            "plan: done=true with new_steps is contradictory; give one or the other",
        ));
    }
    let next_delay_minutes = match object.get("next_delay_minutes") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(m) if (0.0..=10_080.0).contains(&m) => Some(m),
            _ => {
                return Err(RuleError::invalid(
                    "plan.next_delay_minutes must be a number from 0 to 10080",
                ))
            }
        },
    };
    Ok(Plan {
        new_steps,
        strategy_update: text(object, "strategy_update")?,
        progress_update: text(object, "progress_update")?,
        notify: notify(object)?,
        done,
        next_delay_minutes,
    })
}

fn text(object: &Map<String, Value>, field: &str) -> RuleResult<Option<String>> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if !s.contains('\0') => Ok(Some(s.clone())),
        Some(_) => Err(RuleError::invalid(format!("plan.{field} must be a string"))),
    }
}

fn notify(object: &Map<String, Value>) -> RuleResult<Option<Notify>> {
    match object.get("notify") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(Notify {
            level: "info".into(),
            message: s.clone(),
        })),
        Some(Value::Object(o)) => {
            let message = o
                .get("message")
                .and_then(Value::as_str)
                .filter(|m| !m.trim().is_empty())
                .ok_or_else(|| {
                    RuleError::invalid("plan.notify.message must be a non-empty string")
                })?;
            let level = o.get("level").and_then(Value::as_str).unwrap_or("info");
            if !LEVELS.contains(&level) {
                return Err(RuleError::invalid(format!(
                    "plan.notify.level must be one of {}",
                    LEVELS.join(", ")
                )));
            }
            Ok(Some(Notify {
                level: level.into(),
                message: message.into(),
            }))
        }
        Some(_) => Err(RuleError::invalid(
            "plan.notify must be a string or {level, message}",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_full_plan_parses() {
        let p = parse_plan(
            &json!({"new_steps": [{"action": "a"}], "strategy_update": "go wide",
            "progress_update": "half", "notify": {"level": "milestone", "message": "m"},
            "next_delay_minutes": 5, "reasoning": "because"}),
        )
        .unwrap();
        assert_eq!(p.new_steps.unwrap().nodes.len(), 1);
        assert_eq!(p.notify.unwrap().level, "milestone");
        assert!(!p.done);
    }

    #[test]
    fn malformed_plans_are_refused() {
        for bad in [
            json!([]),
            json!({"new_steps": [{"nope": 1}]}),
            json!({"done": "yes"}),
            json!({"surprise": 1}),
            json!({"next_delay_minutes": -1}),
            json!({"notify": {"level": "loud", "message": "x"}}),
            json!({"done": true, "new_steps": [{"action": "a"}]}),
        ] {
            assert!(parse_plan(&bad).is_err(), "{bad} should be refused");
        }
    }
}
