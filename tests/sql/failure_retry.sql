-- Failure and retry: back-off, the last attempt, the skip cascade and fail_fast (SPEC §3).
SELECT plan(11);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"action": "flaky", "key": "f", "max_attempts": 2}, {"action": "needs flaky", "depends_on": ["f"], "key": "n"},
                     {"action": "needs needs", "depends_on": ["n"]}]') AS ids \gset
SELECT t.claim(:'c') AS first \gset
SELECT sortie.fail_step(t.id(:'first'), t.token(:'first'), 'timeout') AS failed \gset
SELECT is(:'failed'::jsonb ->> 'status', 'pending', 'a failed attempt with attempts left is retried');
SELECT ok(t.one(format('SELECT not_before FROM sortie.steps WHERE id = %s', t.id(:'first')))::timestamptz > now(), 'after a back-off');
SELECT is(t.claim(:'c') ->> 'step_id', NULL, 'nothing is claimable during the back-off');
SELECT t.clock_ahead(3600);
SELECT t.claim(:'c') AS second \gset
SELECT is(t.id(:'second'), t.id(:'first'), 'after the back-off it is claimed again');
SELECT is(sortie.fail_step(t.id(:'second'), t.token(:'second'), 'timeout again') ->> 'status', 'failed',
          'the last attempt fails the step');
SELECT is(t.status(t.step(:'c', 'needs flaky')), 'skipped', 'its dependents are skipped');
SELECT is(t.status(t.step(:'c', 'needs needs')), 'skipped', 'transitively');
SELECT is(t.one(format('SELECT skip_cause FROM sortie.steps WHERE id = %s', t.step(:'c', 'needs needs'))), 'dependency', 'because of a dependency');
SELECT is(t.campaign_status(:'c'), 'failed', 'a top-level step failed: the campaign fails when drained');

SELECT t.campaign('none', '{"failure_policy": "fail_fast"}') AS ff \gset
SELECT t.add(:'ff', '[{"action": "doomed", "max_attempts": 1}, {"action": "bystander"}]') AS ffids \gset
SELECT t.claim(:'ff') AS doomed \gset
SELECT sortie.fail_step(t.id(:'doomed'), t.token(:'doomed'), 'broken');
SELECT is(t.campaign_status(:'ff'), 'failed', 'fail_fast: one failure ends the campaign at once');

SELECT t.invariants_hold();
SELECT * FROM finish();
