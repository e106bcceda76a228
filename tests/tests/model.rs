//! Model-based property test (SPEC §11): random operation sequences run against the extension
//! and against a small reference model of the rules; every step's status and the campaign's
//! are compared after each operation.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sortie_tests::fixtures::*;
use sortie_tests::TestDb;
use uuid::Uuid;

const MAX_DEPTH: i64 = 2;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Pending,
    Running,
    Done,
    Failed,
    Skipped(bool), // resolved: skipped by an abort or a met threshold
}

impl St {
    fn open(self) -> bool {
        matches!(self, St::Pending | St::Running)
    }
    fn name(self) -> &'static str {
        match self {
            St::Pending => "pending",
            St::Running => "running",
            St::Done => "done",
            St::Failed => "failed",
            St::Skipped(_) => "skipped",
        }
    }
}

#[derive(Clone, Debug)]
struct Step {
    parent: Option<i64>,
    group: bool,
    depth: i64,
    status: St,
    deps: BTreeSet<i64>,
    continued_by: Option<i64>,
    token: Option<Uuid>,
}

#[derive(Default)]
struct Model {
    steps: BTreeMap<i64, Step>,
    campaign: &'static str,
}

impl Model {
    fn children(&self, id: i64) -> Vec<i64> {
        self.steps
            .iter()
            .filter(|(_, s)| s.parent == Some(id))
            .map(|(k, _)| *k)
            .collect()
    }
    fn members(&self, id: i64) -> Vec<i64> {
        self.children(id)
            .into_iter()
            .filter(|c| self.steps[c].continued_by.is_none())
            .collect()
    }
    fn gate_open(&self, id: i64) -> bool {
        match self.steps[&id].parent {
            None => true,
            Some(p) if !self.steps[&p].group => true,
            Some(p) => self.deps_done(p) && self.gate_open(p),
        }
    }
    fn deps_done(&self, id: i64) -> bool {
        self.steps[&id]
            .deps
            .iter()
            .all(|d| self.steps[d].status == St::Done)
    }
    fn ready(&self) -> Option<i64> {
        if self.campaign != "active" {
            return None;
        }
        self.steps
            .iter()
            .find(|(id, s)| {
                !s.group && s.status == St::Pending && self.deps_done(**id) && self.gate_open(**id)
            })
            .map(|(k, _)| *k)
    }
    fn newest(&self, mut id: i64) -> i64 {
        while let Some(next) = self.steps[&id].continued_by {
            id = next;
        }
        id
    }

    fn skip_cascade(&mut self, seeds: Vec<i64>, resolved: bool) {
        let mut reach: BTreeSet<i64> = BTreeSet::new();
        let mut frontier = seeds;
        while let Some(x) = frontier.pop() {
            if !reach.insert(x) {
                continue;
            }
            for (id, s) in &self.steps {
                if s.deps.contains(&x) || s.parent == Some(x) {
                    frontier.push(*id);
                }
            }
        }
        let victims: Vec<i64> = reach
            .into_iter()
            .filter(|id| self.steps[id].status.open())
            .collect();
        for v in &victims {
            self.steps.get_mut(v).unwrap().status = St::Skipped(resolved);
        }
        let mut parents: Vec<(i64, i64)> = victims
            .iter()
            .filter(|v| self.steps[*v].continued_by.is_none())
            .filter_map(|v| self.steps[v].parent.map(|p| (self.steps[v].depth, p)))
            .collect();
        parents.sort_by(|a, b| b.cmp(a));
        parents.dedup_by_key(|x| x.1);
        for (_, p) in parents {
            self.member_settled(p);
        }
    }

    fn member_settled(&mut self, p: i64) {
        if !self.steps[&p].group || !self.steps[&p].status.open() {
            return;
        }
        let members = self.members(p);
        let resolved = members
            .iter()
            .filter(|m| matches!(self.steps[*m].status, St::Done | St::Skipped(true)))
            .count();
        let failed = members
            .iter()
            .filter(|m| matches!(self.steps[*m].status, St::Failed | St::Skipped(false)))
            .count();
        if resolved >= members.len() {
            self.settle_done(p);
        } else if members.len() - failed < members.len() {
            self.settle_failed(p);
        }
    }

    /// A claim of `id`: it runs, and so does every compound ancestor not yet started.
    fn claim(&mut self, id: i64, token: Option<Uuid>) {
        let s = self.steps.get_mut(&id).unwrap();
        s.status = St::Running;
        s.token = token;
        let mut up = self.steps[&id].parent;
        while let Some(p) = up {
            let parent = self.steps.get_mut(&p).unwrap();
            if parent.status != St::Pending {
                break;
            }
            parent.status = St::Running;
            up = parent.parent;
        }
    }

    fn settle_done(&mut self, id: i64) {
        self.steps.get_mut(&id).unwrap().status = St::Done;
        self.after_done(id);
    }

    fn after_done(&mut self, id: i64) {
        if let Some(p) = self.steps[&id].parent {
            if self.steps[&id].continued_by.is_none() {
                self.member_settled(p);
            }
        }
        self.check_drained();
    }

    fn settle_failed(&mut self, id: i64) {
        self.steps.get_mut(&id).unwrap().status = St::Failed;
        let open_children: Vec<i64> = self
            .children(id)
            .into_iter()
            .filter(|c| self.steps[c].status.open())
            .collect();
        if !open_children.is_empty() {
            self.skip_cascade(open_children, false);
        }
        if let Some(p) = self.steps[&id].parent {
            self.member_settled(p);
        }
        let dependents: Vec<i64> = self
            .steps
            .iter()
            .filter(|(_, s)| s.deps.contains(&id))
            .map(|(k, _)| *k)
            .collect();
        if !dependents.is_empty() {
            self.skip_cascade(dependents, false);
        }
        self.check_drained();
    }

    fn check_drained(&mut self) {
        if self.campaign != "active"
            || self.steps.values().any(|s| s.status.open())
            || self.steps.is_empty()
        {
            return;
        }
        let ok = self
            .steps
            .values()
            .filter(|s| s.parent.is_none() && s.continued_by.is_none())
            .all(|s| matches!(s.status, St::Done | St::Skipped(true)));
        self.campaign = if ok { "done" } else { "failed" };
    }

    fn doomed_skip(&mut self, new_ids: &[i64]) {
        let doomed: Vec<i64> = new_ids
            .iter()
            .copied()
            .filter(|id| {
                self.steps[id]
                    .deps
                    .iter()
                    .any(|d| matches!(self.steps[d].status, St::Failed | St::Skipped(_)))
            })
            .collect();
        if !doomed.is_empty() {
            self.skip_cascade(doomed, false);
        }
        self.check_drained();
    }
}

async fn assert_invariants(db: &TestDb, seed: u64, op: usize) {
    let problems: Vec<String> = db
        .client
        .query("SELECT sortie.check_invariants()", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        problems.is_empty(),
        "seed {seed}, op {op}: invariants: {problems:?}"
    );
}

async fn compare(db: &TestDb, model: &Model, c: Uuid, seed: u64, op: usize, what: &str) {
    let rows = db
        .client
        .query(
            "SELECT id, status FROM sortie.steps WHERE campaign_id = $1 ORDER BY id",
            &[&c],
        )
        .await
        .unwrap();
    let actual: BTreeMap<i64, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: BTreeMap<i64, String> = model
        .steps
        .iter()
        .map(|(k, s)| (*k, s.status.name().to_string()))
        .collect();
    assert_eq!(
        actual, expected,
        "seed {seed}, op {op} ({what}): step statuses differ"
    );
    assert_eq!(
        campaign_status(db, c).await,
        model.campaign,
        "seed {seed}, op {op} ({what}): campaign status"
    );
}

#[tokio::test]
async fn random_operation_sequences_match_the_reference_model() {
    let db = TestDb::new().await;
    let mut seen = BTreeMap::new();
    for seed in 0..12u64 {
        run_sequence(&db, seed, 120, &mut seen).await;
    }
    // Guard against a vacuous run: every kind of operation was exercised.
    for kind in [
        "add",
        "claim",
        "batch claim",
        "complete",
        "batch complete",
        "fail",
        "zombie reset",
        "splice",
        "abort",
        "campaign end",
    ] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 3,
            "too few '{kind}' operations: {seen:?}"
        );
    }
    db.finish().await;
}

async fn new_campaign(db: &TestDb) -> Uuid {
    let created = db
        .ok(
            "sortie.create_campaign(goal => 'model', planner => 'none', max_depth => 2)",
            &[],
        )
        .await;
    Uuid::parse_str(created["id"].as_str().unwrap()).unwrap()
}

async fn run_sequence(
    db: &TestDb,
    seed: u64,
    ops: usize,
    seen: &mut BTreeMap<&'static str, usize>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = new_campaign(db).await;
    let mut model = Model {
        campaign: "active",
        ..Default::default()
    };
    for op in 0..ops {
        if model.campaign != "active" {
            *seen.entry("campaign end").or_default() += 1;
            c = new_campaign(db).await;
            model = Model {
                campaign: "active",
                ..Default::default()
            };
        }
        let running: Vec<i64> = model
            .steps
            .iter()
            .filter(|(_, s)| s.status == St::Running && !s.group)
            .map(|(k, _)| *k)
            .collect();
        let roll = rng.random_range(0..100);
        let what;
        if roll < 25 || model.steps.is_empty() {
            what = "add";
            let existing: Vec<i64> = model.steps.keys().copied().collect();
            let mut deps = Vec::new();
            for _ in 0..rng.random_range(0..3) {
                if !existing.is_empty() {
                    deps.push(existing[rng.random_range(0..existing.len())]);
                }
            }
            let group = rng.random_bool(0.3);
            let step = if group {
                json!({"step_type": "parallel_group", "action": format!("g{op}"), "depends_on": deps, "max_attempts": null,
                       "children": (0..rng.random_range(2..4)).map(|i| json!({"action": format!("g{op}.{i}"), "max_attempts": 1})).collect::<Vec<_>>()})
            } else {
                json!({"action": format!("a{op}"), "depends_on": deps, "max_attempts": 1})
            };
            let answer = add(db, c, json!([step])).await;
            let id = ids(&answer["step_ids"])[0];
            let resolved: BTreeSet<i64> = deps.iter().map(|d| model.newest(*d)).collect();
            model.steps.insert(
                id,
                Step {
                    parent: None,
                    group,
                    depth: 0,
                    status: St::Pending,
                    deps: resolved,
                    continued_by: None,
                    token: None,
                },
            );
            let mut new_ids = vec![id];
            if group {
                let rows = db
                    .client
                    .query(
                        "SELECT id FROM sortie.steps WHERE parent_id = $1 ORDER BY position",
                        &[&id],
                    )
                    .await
                    .unwrap();
                for r in rows {
                    let child: i64 = r.get(0);
                    model.steps.insert(
                        child,
                        Step {
                            parent: Some(id),
                            group: false,
                            depth: 1,
                            status: St::Pending,
                            deps: BTreeSet::new(),
                            continued_by: None,
                            token: None,
                        },
                    );
                    new_ids.push(child);
                }
            }
            model.doomed_skip(&new_ids);
        } else if (47..55).contains(&roll) {
            // SPEC §18: a batch takes the claims the single claims would take, one after another.
            what = "batch claim";
            let n = rng.random_range(1..5i32);
            let v = db
                .ok(
                    "sortie.claim_next(owner => 'model', campaign_id => $1, max_steps => $2)",
                    &[&c, &n],
                )
                .await;
            let claimed: Vec<_> = v
                .as_array()
                .unwrap()
                .iter()
                .filter_map(parse_claim)
                .collect();
            let mut expected = Vec::new();
            while expected.len() < n as usize {
                let Some(id) = model.ready() else { break };
                expected.push(id);
                model.claim(id, None);
            }
            assert_eq!(
                claimed.iter().map(|s| s.step_id).collect::<Vec<_>>(),
                expected,
                "seed {seed}, op {op}: the batch claimed other steps"
            );
            for step in claimed {
                model.steps.get_mut(&step.step_id).unwrap().token = Some(step.token);
            }
            assert_invariants(db, seed, op).await;
        } else if roll < 55 {
            what = "claim";
            let v = db
                .ok(
                    "sortie.claim_next(owner => 'model', campaign_id => $1)",
                    &[&c],
                )
                .await;
            let claimed = parse_claim(&v);
            let expected = model.ready();
            assert_eq!(
                claimed.as_ref().map(|s| s.step_id),
                expected,
                "seed {seed}, op {op}: claim_next picked another step"
            );
            if let Some(step) = claimed {
                model.claim(step.step_id, Some(step.token));
            }
        } else if running.is_empty() {
            continue;
        } else {
            let id = running[rng.random_range(0..running.len())];
            let token = model.steps[&id].token.unwrap();
            if (68..75).contains(&roll) {
                // Several running steps (top-level ones go set-wise, members one at a time), one
                // of them twice and one with a stale claim: the stale one and the repeat are
                // refused or replayed, the rest done in (step) order.
                what = "batch complete";
                let mut chosen: Vec<i64> = running
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.6))
                    .collect();
                if chosen.is_empty() {
                    chosen.push(id);
                }
                let mut items: Vec<serde_json::Value> = chosen
                    .iter()
                    .map(|s| json!({"step_id": s, "claim_token": model.steps[s].token.unwrap(), "summary": "ok", "tokens_used": 2}))
                    .collect();
                items.push(json!({"step_id": chosen[0], "claim_token": model.steps[&chosen[0]].token.unwrap(), "summary": "ok", "tokens_used": 2}));
                items.push(json!({"step_id": id, "claim_token": Uuid::new_v4()}));
                items.reverse();
                let answer = db
                    .ok(
                        "sortie.complete_steps($1)",
                        &[&serde_json::Value::Array(items)],
                    )
                    .await;
                chosen.sort();
                let mut accepted = Vec::new();
                for s in &chosen {
                    // A member whose parent settled under an earlier item is skipped.
                    if model.steps[s].status == St::Running {
                        model.settle_done(*s);
                        accepted.push(*s);
                    }
                }
                let done: Vec<i64> = answer["completed"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|a| a["accepted"] == true && a.get("replayed").is_none())
                    .map(|a| a["step_id"].as_i64().unwrap())
                    .collect();
                assert_eq!(
                    done, accepted,
                    "seed {seed}, op {op}: the batch completed other steps: {answer}"
                );
                let refused = answer["refused"].as_array().unwrap();
                assert!(
                    refused
                        .iter()
                        .any(|r| r["step_id"] == id && r["code"] == "stale_claim"),
                    "seed {seed}, op {op}: the stale item is not refused: {answer}"
                );
                assert_invariants(db, seed, op).await;
            } else if roll < 75 {
                what = "complete";
                db.ok("sortie.complete_step($1, $2, 'ok')", &[&id, &token])
                    .await;
                model.settle_done(id);
            } else if roll < 83 {
                what = "fail";
                db.ok("sortie.fail_step($1, $2, 'no')", &[&id, &token])
                    .await;
                model.settle_failed(id);
            } else if roll < 88 {
                what = "zombie reset";
                db.client.execute("UPDATE sortie.steps SET lease_expires_at = now() - interval '1 second' WHERE id = $1", &[&id]).await.unwrap();
                db.ok("sortie.reset_zombies()", &[]).await;
                model.settle_failed(id);
            } else if roll < 94 {
                what = "splice";
                let result = db
                    .call("sortie.spawn_and_continue($1, $2, '[{\"action\": \"sub x\", \"max_attempts\": 1}, {\"action\": \"sub y\", \"max_attempts\": 1}]', '\"cont\"')",
                          &[&id, &token])
                    .await;
                let depth = model.steps[&id].depth;
                if depth + 1 > MAX_DEPTH {
                    assert_eq!(result.unwrap_err().code, "depth_limit");
                } else {
                    let answer = result.unwrap();
                    let subtasks = ids(&answer["subtask_ids"]);
                    let cont = answer["continuation_id"].as_i64().unwrap();
                    for s in &subtasks {
                        model.steps.insert(
                            *s,
                            Step {
                                parent: Some(id),
                                group: false,
                                depth: depth + 1,
                                status: St::Pending,
                                deps: BTreeSet::new(),
                                continued_by: None,
                                token: None,
                            },
                        );
                    }
                    let parent = model.steps[&id].parent;
                    for step in model.steps.values_mut() {
                        if step.deps.remove(&id) {
                            step.deps.insert(cont);
                        }
                    }
                    // The continuation keeps max_attempts 1 from its spawner.
                    model.steps.insert(
                        cont,
                        Step {
                            parent,
                            group: false,
                            depth,
                            status: St::Pending,
                            deps: subtasks.iter().copied().collect(),
                            continued_by: None,
                            token: None,
                        },
                    );
                    let spawner = model.steps.get_mut(&id).unwrap();
                    spawner.status = St::Done;
                    spawner.continued_by = Some(cont);
                }
            } else {
                what = "abort";
                let target = model.steps[&id]
                    .parent
                    .filter(|p| model.steps[p].group && model.steps[p].status.open());
                let Some(target) = target else { continue };
                db.ok(
                    "sortie.abort_branch($1, $2, $3, 'out', 'reason')",
                    &[&target, &token, &id],
                )
                .await;
                model.steps.get_mut(&target).unwrap().status = St::Done;
                model.steps.get_mut(&id).unwrap().status = St::Done;
                let children = model.children(target);
                model.skip_cascade(children, true);
                model.after_done(target);
            }
        }
        *seen.entry(what).or_default() += 1;
        compare(db, &model, c, seed, op, what).await;
    }
}
