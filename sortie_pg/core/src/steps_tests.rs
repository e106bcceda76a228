use super::*;
use serde_json::json;

fn codes(result: RuleResult<Expansion>) -> &'static str {
    result.expect_err("expected a refusal").code
}

#[test]
fn atomic_steps_are_flat_and_independent() {
    let e = expand(&json!([{"action": "a"}, {"action": "b", "agent": "x"}])).unwrap();
    assert_eq!(e.nodes.len(), 2);
    assert_eq!(e.top_level, vec![0, 1]);
    assert!(e
        .nodes
        .iter()
        .all(|n| n.local_deps.is_empty() && n.parent.is_none()));
    assert_eq!(e.nodes[0].fingerprint.len(), 64);
}

#[test]
fn sequence_children_depend_on_their_predecessor() {
    let e = expand(&json!([{"step_type": "sequence", "action": "s",
        "steps": [{"action": "1"}, {"action": "2"}, {"action": "3"}]}]))
    .unwrap();
    assert_eq!(e.nodes[0].members, 3);
    assert_eq!(e.nodes[1].local_deps, Vec::<usize>::new());
    assert_eq!(e.nodes[2].local_deps, vec![1]);
    assert_eq!(e.nodes[3].local_deps, vec![2]);
    assert!(e.nodes[1..]
        .iter()
        .all(|n| n.parent == Some(0) && n.level == 1));
}

#[test]
fn parallel_group_children_are_independent() {
    let e = expand(
        &json!([{"step_type": "parallel_group", "action": "p", "completion_threshold": 1,
        "children": [{"action": "1"}, {"action": "2"}]}]),
    )
    .unwrap();
    assert!(e.nodes[1..].iter().all(|n| n.local_deps.is_empty()));
    assert_eq!(e.nodes[0].completion_threshold, Some(1));
}

#[test]
fn for_each_substitutes_parsed_values_not_text() {
    let items = json!([{"name": "O'Brien \"quoted\" \\ back", "n": 3}, {"name": "plain", "n": 4}]);
    let e = expand(&json!([{"step_type": "for_each", "action": "each", "items": items,
        "template": {"action": "review {item.name}", "input": {"who": "{item.name}", "count": "{item.n}", "all": "{item}"}}}]))
    .unwrap();
    assert_eq!(e.nodes.len(), 3);
    assert_eq!(e.nodes[1].action, "review O'Brien \"quoted\" \\ back");
    let input = e.nodes[1].input.as_ref().unwrap();
    assert_eq!(input["who"], "O'Brien \"quoted\" \\ back");
    assert_eq!(
        input["count"], 3,
        "a whole-string placeholder keeps the item's JSON type"
    );
    assert_eq!(input["all"]["n"], 3);
    assert_eq!(e.nodes[2].action, "review plain");
}

#[test]
fn for_each_with_collect_becomes_fan_out_then_collect() {
    let e = expand(
        &json!([{"step_type": "for_each", "action": "each", "key": "fe", "items": [1, 2],
        "template": {"action": "do {item}"}, "collect": {"action": "merge"}}]),
    )
    .unwrap();
    // sequence(for_each(do 1, do 2), merge)
    assert_eq!(e.nodes[0].step_type, StepType::Sequence);
    assert_eq!(e.keys["fe"], 0);
    assert_eq!(e.nodes[1].step_type, StepType::ForEach);
    assert_eq!(e.nodes[2].action, "do 1");
    let collect = e.nodes.iter().position(|n| n.action == "merge").unwrap();
    assert_eq!(e.nodes[collect].local_deps, vec![1]);
}

#[test]
fn a_nested_for_each_substitutes_its_own_item_in_its_template() {
    let e = expand(
        &json!([{"step_type": "for_each", "action": "outer", "items": ["A", "B"],
        "template": {"step_type": "for_each", "action": "inner {item}", "items": ["x", "y"],
                     "template": {"action": "do {item}"}}}]),
    )
    .unwrap();
    let atomic: Vec<&str> = e
        .nodes
        .iter()
        .filter(|n| n.step_type == StepType::Atomic)
        .map(|n| n.action.as_str())
        .collect();
    assert_eq!(atomic, ["do x", "do y", "do x", "do y"]);
    let inner: Vec<&str> = e
        .nodes
        .iter()
        .filter(|n| n.level == 1)
        .map(|n| n.action.as_str())
        .collect();
    assert_eq!(
        inner,
        ["inner A", "inner B"],
        "the inner loop's own fields take the outer item"
    );
}

#[test]
fn the_outer_item_reaches_a_nested_loop_through_its_items_and_collect() {
    let e = expand(
        &json!([{"step_type": "for_each", "action": "outer", "items": ["A", "B"],
        "template": {"step_type": "sequence", "action": "per {item}", "steps": [
            {"step_type": "for_each", "action": "inner", "items": ["{item}/x", "{item}/y"],
             "template": {"action": "do {item}"}, "collect": {"action": "merge {item}"}}]}}]),
    )
    .unwrap();
    let atomic: Vec<&str> = e
        .nodes
        .iter()
        .filter(|n| n.step_type == StepType::Atomic)
        .map(|n| n.action.as_str())
        .collect();
    assert_eq!(
        atomic,
        ["do A/x", "do A/y", "merge A", "do B/x", "do B/y", "merge B"]
    );
}

#[test]
fn a_missing_item_field_is_refused() {
    let r = expand(
        &json!([{"step_type": "for_each", "action": "e", "items": [{"a": 1}],
        "template": {"action": "x {item.b}"}}]),
    );
    assert_eq!(codes(r), "invalid_argument");
}

#[test]
fn keys_resolve_and_ids_are_kept_for_the_database() {
    let e =
        expand(&json!([{"action": "a", "key": "a"}, {"action": "b", "depends_on": ["a", 42, 42]}]))
            .unwrap();
    assert_eq!(e.nodes[1].local_deps, vec![0]);
    assert_eq!(e.nodes[1].existing_deps, vec![42]);
}

#[test]
fn invalid_shapes_are_refused() {
    assert_eq!(codes(expand(&json!({"action": "a"}))), "invalid_argument");
    assert_eq!(codes(expand(&json!([]))), "invalid_argument");
    assert_eq!(
        codes(expand(&json!([{"step_type": "loop", "action": "a"}]))),
        "invalid_argument"
    );
    assert_eq!(codes(expand(&json!([{"agent": "x"}]))), "invalid_argument");
    assert_eq!(
        codes(expand(&json!([{"action": "  "}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "dependson": []}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "depends_on": ["nope"]}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "depends_on": [-1]}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(
            &json!([{"action": "a", "key": "k"}, {"action": "b", "key": "k"}])
        )),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(
            &json!([{"step_type": "sequence", "action": "s", "steps": []}])
        )),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(
            &json!([{"action": "a", "failure_policy": "explode"}])
        )),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "max_attempts": 0}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "completion_threshold": 1}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(
            &json!([{"step_type": "parallel_group", "action": "p", "completion_threshold": 3,
        "children": [{"action": "1"}]}])
        )),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a\u{0}"}]))),
        "invalid_argument"
    );
}

#[test]
fn cycles_are_refused() {
    assert_eq!(
        codes(expand(
            &json!([{"action": "a", "key": "a", "depends_on": ["b"]},
        {"action": "b", "key": "b", "depends_on": ["a"]}])
        )),
        "cycle"
    );
    assert_eq!(
        codes(expand(
            &json!([{"action": "a", "key": "a", "depends_on": ["a"]}])
        )),
        "cycle"
    );
}

#[test]
fn a_step_waiting_on_its_own_ancestor_is_a_cycle() {
    let r = expand(
        &json!([{"step_type": "parallel_group", "action": "p", "key": "p",
        "children": [{"action": "c", "depends_on": ["p"]}]}]),
    );
    assert_eq!(codes(r), "cycle");
    let r = expand(
        &json!([{"step_type": "parallel_group", "action": "p", "depends_on": ["c"],
        "children": [{"action": "c", "key": "c"}]}]),
    );
    assert_eq!(codes(r), "cycle");
}

#[test]
fn deep_chains_do_not_overflow_the_stack() {
    let steps: Vec<Value> = (0..50_000)
        .map(|i| if i == 0 { json!({"action": "s0", "key": "s0"}) }
             else { json!({"action": format!("s{i}"), "key": format!("s{i}"), "depends_on": [format!("s{}", i - 1)]}) })
        .collect();
    let e = expand(&Value::Array(steps)).unwrap();
    assert_eq!(e.nodes.len(), 50_000);
}

#[test]
fn children_inherit_the_nearest_failure_policy() {
    let e = expand(&json!([{"step_type": "parallel_group", "action": "p", "failure_policy": "fail_fast",
        "children": [{"action": "1"}, {"action": "2", "failure_policy": "continue"}]}, {"action": "x"}])).unwrap();
    assert_eq!(e.nodes[1].failure_policy.as_deref(), Some("fail_fast"));
    assert_eq!(e.nodes[2].failure_policy.as_deref(), Some("continue"));
    assert_eq!(e.nodes[3].failure_policy, None);
}

#[test]
fn verify_is_a_command_of_atomic_steps_only() {
    let e = expand(&json!([{"action": "build", "verify": "cargo test"}])).unwrap();
    assert_eq!(e.nodes[0].verify.as_deref(), Some("cargo test"));
    let compound = expand(
        &json!([{"step_type": "sequence", "action": "s", "verify": "true",
                                   "steps": [{"action": "a"}]}]),
    );
    assert_eq!(codes(compound), "invalid_argument");
    assert_eq!(
        codes(expand(&json!([{"action": "a", "verify": ""}]))),
        "invalid_argument"
    );
    assert_eq!(
        codes(expand(&json!([{"action": "a", "verify": 3}]))),
        "invalid_argument"
    );
}

#[test]
fn items_enter_a_verify_command_as_quoted_words() {
    let e = expand(&json!([{"step_type": "for_each", "action": "each", "items": ["x", "a'b; rm -rf /", {"f": "$(id)"}],
        "template": {"action": "make {item}", "verify": "test -f {item}.txt"}}])).unwrap();
    assert_eq!(e.nodes[1].verify.as_deref(), Some("test -f 'x'.txt"));
    assert_eq!(
        e.nodes[2].verify.as_deref(),
        Some("test -f 'a'\\''b; rm -rf /'.txt")
    );
    assert_eq!(
        e.nodes[3].verify.as_deref(),
        Some("test -f '{\"f\":\"$(id)\"}'.txt")
    );
    assert_eq!(
        e.nodes[2].action, "make a'b; rm -rf /",
        "other fields take the item as it is"
    );
}
