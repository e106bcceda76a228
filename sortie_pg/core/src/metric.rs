//! Success-contract metrics (SPEC §3): a note tagged `metric:<name>` whose content is
//! `name=value` or just `value`.

/// The metric value a note's content carries, if it carries one for `name`.
pub fn parse_metric(name: &str, content: &str) -> Option<f64> {
    let content = content.trim();
    let value = match content.split_once('=') {
        Some((key, value)) if key.trim() == name => value,
        Some(_) => return None,
        None => content,
    };
    value.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Whether `value` meets `target` in `direction` (`max`: at least the target; `min`: at most).
pub fn metric_met(value: f64, target: f64, direction: &str) -> bool {
    match direction {
        "min" => value <= target,
        _ => value >= target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_note_forms_parse() {
        assert_eq!(parse_metric("acc", "acc=0.91"), Some(0.91));
        assert_eq!(parse_metric("acc", " acc = 3 "), Some(3.0));
        assert_eq!(parse_metric("acc", "0.5"), Some(0.5));
    }

    #[test]
    fn another_metric_or_garbage_is_ignored() {
        assert_eq!(parse_metric("acc", "loss=0.2"), None);
        assert_eq!(parse_metric("acc", "high"), None);
        assert_eq!(parse_metric("acc", "NaN"), None);
    }

    #[test]
    fn direction_decides_what_meets_the_target() {
        assert!(metric_met(0.9, 0.8, "max"));
        assert!(!metric_met(0.7, 0.8, "max"));
        assert!(metric_met(0.1, 0.2, "min"));
        assert!(!metric_met(0.3, 0.2, "min"));
    }
}
