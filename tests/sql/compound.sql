-- Compound steps: thresholds, for_each with collect, nested for_each, empty fan-outs, and the
-- start of a compound step in the log (SPEC §3, §3a, §13).
SELECT plan(10);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"step_type": "parallel_group", "action": "race", "completion_threshold": 1,
                      "children": [{"action": "fast"}, {"action": "slow"}]}]') AS ids \gset
SELECT t.claim(:'c') AS fast \gset
SELECT is(t.one(format('SELECT count(*) FROM sortie.events WHERE campaign_id = %L AND kind = %L AND step_id = %s',
                        :'c', 'step.started', t.step(:'c', 'race')))::integer, 1,
          'a compound step starting is an event');
SELECT sortie.complete_step(t.id(:'fast'), t.token(:'fast'), 'first!');
SELECT is(t.status(t.step(:'c', 'race')), 'done', 'a met threshold settles the group');
SELECT is(t.status(t.step(:'c', 'slow')), 'skipped', 'the rest is skipped');
SELECT is(t.one(format('SELECT skip_cause FROM sortie.steps WHERE id = %s', t.step(:'c', 'slow'))), 'threshold', 'as not needed');

SELECT t.campaign() AS fe \gset
SELECT t.add(:'fe', '[{"step_type": "for_each", "action": "outer", "items": ["A", "B"],
                       "template": {"step_type": "for_each", "action": "inner {item}", "items": ["{item}/x", "{item}/y"],
                                    "template": {"action": "do {item}"}},
                       "collect": {"action": "merge"}}]') AS feids \gset
SELECT is(t.run_all(:'fe'), ARRAY['do A/x', 'do A/y', 'do B/x', 'do B/y', 'merge'],
          'a nested for_each takes its own item; the outer one reaches it through its fields; collect comes last');
SELECT is(t.one(format('SELECT array_agg(action::text ORDER BY id) FROM sortie.steps WHERE campaign_id = %L AND action LIKE %L',
                        :'fe', 'inner%'))::text[],
          ARRAY['inner A', 'inner B'], 'the inner loops'' own fields take the outer item');

SELECT t.campaign() AS empty \gset
SELECT t.add(:'empty', '[{"step_type": "for_each", "action": "nothing", "key": "n", "items": [], "template": {"action": "x {item}"}},
                         {"action": "then", "depends_on": ["n"]}]') AS eids \gset
SELECT is(t.status(t.step(:'empty', 'nothing')), 'done', 'a for_each over no items is done at once');
SELECT is(t.one(format('SELECT output FROM sortie.steps WHERE id = %s', t.step(:'empty', 'nothing'))), '[]', 'with [] as its output');
SELECT is(t.run_all(:'empty'), ARRAY['then'], 'and releases its dependents');

SELECT t.invariants_hold();
SELECT * FROM finish();
