//! Dedup fingerprint (SPEC §3): sha256 over the normalised action, agent and input.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Trimmed, whitespace runs collapsed to one space, lower case.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// `input` is rendered as compact JSON with sorted keys (serde_json's default map is ordered),
/// so two inputs that differ only in key order or spacing share a fingerprint.
pub fn fingerprint(action: &str, agent: Option<&str>, input: Option<&Value>) -> String {
    let input_text = match input {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let joined = format!(
        "{}|{}|{}",
        normalise(action),
        normalise(agent.unwrap_or("")),
        normalise(&input_text)
    );
    hex::encode(Sha256::digest(joined.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whitespace_and_case_do_not_change_the_fingerprint() {
        let a = fingerprint("  Search   the\tWeb ", Some("Researcher"), None);
        let b = fingerprint("search the web", Some("researcher"), None);
        assert_eq!(a, b);
    }

    #[test]
    fn different_agents_or_inputs_give_different_fingerprints() {
        let base = fingerprint("x", Some("a"), Some(&json!({"q": 1})));
        assert_ne!(base, fingerprint("x", Some("b"), Some(&json!({"q": 1}))));
        assert_ne!(base, fingerprint("x", Some("a"), Some(&json!({"q": 2}))));
    }

    #[test]
    fn key_order_of_the_input_does_not_matter() {
        let a = fingerprint("x", None, Some(&json!({"a": 1, "b": 2})));
        let b = fingerprint(
            "x",
            None,
            Some(&serde_json::from_str(r#"{"b":2,"a":1}"#).unwrap()),
        );
        assert_eq!(a, b);
    }
}
