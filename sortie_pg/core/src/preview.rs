//! Output previews and ranged reads (SPEC §5 `get_my_context`, `read_step_output`). Offsets and
//! lengths count characters, not bytes, so a cut never splits a UTF-8 sequence.

use serde_json::{json, Value};

pub const MAX_READ_LIMIT: usize = 32_000;

/// Head and tail of `text` with the total length and, when cut, a hint naming the tool that
/// reads the rest.
pub fn preview(step_id: i64, text: &str, head: usize, tail: usize) -> Value {
    let total = text.chars().count();
    if total <= head + tail {
        return json!({"step_id": step_id, "preview": text, "total_chars": total, "truncated": false});
    }
    let head_part: String = text.chars().take(head).collect();
    let tail_part: String = text.chars().skip(total - tail).collect();
    let omitted = total - head - tail;
    json!({
        "step_id": step_id,
        "preview": format!("{head_part}\n[... {omitted} characters omitted ...]\n{tail_part}"),
        "total_chars": total,
        "truncated": true,
        "hint": format!(
            "read_step_output(step_id={step_id}, offset={head}, limit={}) returns the omitted part",
            omitted.min(MAX_READ_LIMIT)
        ),
    })
}

/// A window of `text`; `limit` is clamped to `MAX_READ_LIMIT`.
pub fn read_range(text: &str, offset: usize, limit: usize) -> Value {
    let limit = limit.min(MAX_READ_LIMIT);
    let total = text.chars().count();
    let content: String = text.chars().skip(offset).take(limit).collect();
    let returned = content.chars().count();
    let next = offset + returned;
    json!({
        "content": content,
        "offset": offset,
        "returned_chars": returned,
        "total_chars": total,
        "next_offset": if next < total { Value::from(next) } else { Value::Null },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_returned_whole() {
        let p = preview(1, "hello", 600, 200);
        assert_eq!(p["preview"], "hello");
        assert_eq!(p["truncated"], false);
        assert!(p.get("hint").is_none());
    }

    #[test]
    fn long_text_keeps_head_and_tail_and_names_the_reader_tool() {
        let text: String = "a".repeat(700) + &"b".repeat(300) + &"c".repeat(200);
        let p = preview(7, &text, 600, 200);
        let shown = p["preview"].as_str().unwrap();
        assert!(shown.starts_with(&"a".repeat(600)));
        assert!(shown.ends_with(&"c".repeat(200)));
        assert_eq!(p["total_chars"], 1200);
        assert!(p["hint"]
            .as_str()
            .unwrap()
            .contains("read_step_output(step_id=7, offset=600"));
    }

    #[test]
    fn ranges_count_characters_not_bytes() {
        let r = read_range("äöü€x", 1, 3);
        assert_eq!(r["content"], "öü€");
        assert_eq!(r["next_offset"], 4);
        let end = read_range("äöü€x", 4, 10);
        assert_eq!(end["content"], "x");
        assert!(end["next_offset"].is_null());
    }

    #[test]
    fn limit_is_capped() {
        let text = "x".repeat(40_000);
        assert_eq!(
            read_range(&text, 0, 100_000)["returned_chars"],
            MAX_READ_LIMIT
        );
    }
}
