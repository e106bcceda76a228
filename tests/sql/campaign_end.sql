-- When a campaign ends (SPEC §3, §13, §17): never before its first steps, by the done/failed
-- rule, and by its success contract.
SELECT plan(17);

SELECT t.campaign() AS waiting \gset
SELECT sortie.pause_campaign(:'waiting');
SELECT sortie.resume_campaign(:'waiting');
SELECT is(t.campaign_status(:'waiting'), 'active', 'a campaign that never had a step is waiting, not drained');
SELECT throws_ok(format('SELECT sortie.finish_campaign(%L)', :'waiting'), 'SR002', NULL,
                 'finish_campaign refuses to end it for want of steps');
SELECT is(ARRAY(SELECT sortie.campaigns_to_plan(10, false, 0)), '{}'::uuid[], 'a runner without a planner is not handed it');

SELECT t.campaign('llm', '{"plan_delay": 30}') AS planned \gset
SELECT ok(NOT :'planned' = ANY (ARRAY(SELECT sortie.campaigns_to_plan(10, true, 30))), 'not planned within its plan delay');
SELECT t.clock_ahead(31);
SELECT ok(:'planned' = ANY (ARRAY(SELECT sortie.campaigns_to_plan(10, true, 30))), 'planned after it');
SELECT t.clock_ahead(0);

-- A success contract without a benchmark: the workers' metric notes decide.
SELECT t.campaign('none', '{"success_metric": "acc", "success_target": 0.9}') AS low \gset
SELECT t.add(:'low', '[{"action": "measure"}]') AS lowids \gset
SELECT sortie.add_note(:'low', 'acc=0.4', ARRAY['metric:acc']);
SELECT t.run_all(:'low');
SELECT is(t.campaign_status(:'low'), 'failed', 'an unmet contract fails the drained campaign');
SELECT matches(t.one(format('SELECT status_reason FROM sortie.campaigns WHERE id = %L', :'low')), '^success contract not met', 'and says so');

SELECT t.campaign('none', '{"success_metric": "acc", "success_target": 0.9}') AS high \gset
SELECT t.add(:'high', '[{"action": "measure"}]') AS highids \gset
SELECT sortie.add_note(:'high', 'acc=0.95', ARRAY['metric:acc']);
SELECT t.run_all(:'high');
SELECT is(t.campaign_status(:'high'), 'done', 'a met contract ends it done');

-- With a benchmark command, the drain waits for the benchmark's run.
SELECT t.campaign('none', '{"success_metric": "acc", "success_target": 0.9, "benchmark_command": "make bench"}') AS bench \gset
SELECT t.add(:'bench', '[{"action": "train"}]') AS benchids \gset
SELECT t.run_all(:'bench');
SELECT is(t.campaign_status(:'bench'), 'active', 'a drained campaign with a benchmark waits for its run');
SELECT is(sortie.take_benchmark() ->> 'benchmark_command', 'make bench', 'a runner takes the due benchmark');
SELECT is(sortie.record_benchmark(:'bench', 0, E'epoch 1\nacc=0.5\nacc=0.92\nloss=0.1') ->> 'status', 'done',
          'the last metric line decides: the contract is met');

-- A run that started before new steps measured old work: it judges nothing and runs again.
SELECT t.campaign('none', '{"success_metric": "acc", "success_target": 0.9, "benchmark_command": "make bench"}') AS stale \gset
SELECT t.add(:'stale', '[{"action": "first try"}]') AS staleids \gset
SELECT t.run_all(:'stale');
SELECT sortie.take_benchmark();
SELECT t.add(:'stale', '[{"action": "the fix"}]') AS fixids \gset
SELECT t.run_all(:'stale');
SELECT is(sortie.record_benchmark(:'stale', 0, 'acc=0.5') ->> 'stale', 'true', 'a run older than the last steps is stale');
SELECT is(t.campaign_status(:'stale'), 'active', 'and does not end the campaign');
SELECT is(sortie.check_success(:'stale') ->> 'iterations_used', '0', 'nor counts an iteration');
SELECT sortie.take_benchmark();
SELECT is(sortie.record_benchmark(:'stale', 0, 'acc=0.95') ->> 'status', 'done', 'the run after the fix decides');

-- A planner's done on a campaign that never had a step says what happened.
SELECT t.campaign('llm', '{"plan_delay": 0}') AS nothing \gset
SELECT sortie.apply_plan(:'nothing', '{"done": true}');
SELECT is(t.one(format('SELECT status_reason FROM sortie.campaigns WHERE id = %L', :'nothing')),
          'its planner found nothing to do: no step was ever added', 'not "all steps done"');

SELECT t.invariants_hold();
SELECT * FROM finish();
