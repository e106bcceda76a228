-- Completion, dependents, sequences and the campaign end rule (SPEC §3).
SELECT plan(10);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"step_type": "sequence", "action": "s", "key": "s", "steps": [{"action": "one"}, {"action": "two"}]},
                     {"action": "after", "depends_on": ["s"]}]') AS ids \gset

SELECT is(t.run_all(:'c'), ARRAY['one', 'two', 'after'], 'a sequence runs in order, its dependents after it');
SELECT is(t.status(t.step(:'c', 's')), 'done', 'the sequence is done when its members are');
SELECT is(t.one(format('SELECT output FROM sortie.steps WHERE id = %s', t.step(:'c', 's')))::jsonb -> 1 ->> 'output', 'ok',
          'its output lists the members'' outputs in order');
SELECT is(t.campaign_status(:'c'), 'done', 'planner none: a drained campaign ends by the rule');
SELECT is(t.one(format('SELECT status_reason FROM sortie.campaigns WHERE id = %L', :'c')), 'all steps done', 'and says why');
SELECT is(t.one(format('SELECT open_steps FROM sortie.campaigns WHERE id = %L', :'c'))::integer, 0, 'no open step is left counted');

SELECT t.campaign('llm') AS planned \gset
SELECT t.add(:'planned', '[{"action": "x"}]') AS x \gset
SELECT is(t.run_all(:'planned'), ARRAY['x'], 'the step runs');
SELECT is(t.campaign_status(:'planned'), 'active', 'an llm-planned campaign waits for its planner when drained');
SELECT is(t.one(format('SELECT count(*) FROM sortie.events WHERE campaign_id = %L AND kind = %L', :'planned', 'campaign.drained'))::integer, 1,
          'and announces it once');

SELECT t.invariants_hold();
SELECT * FROM finish();
