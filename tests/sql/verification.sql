-- Command-checked completion of a step (SPEC §17).
SELECT plan(9);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"action": "fix the parser", "verify": "cargo test", "max_attempts": 2}, {"action": "after", "key": "x"}]') AS ids \gset
SELECT t.claim(:'c') AS w \gset
SELECT sortie.complete_step(t.id(:'w'), t.token(:'w'), 'fixed it', 10) AS pending \gset
SELECT is(:'pending'::jsonb ->> 'verification', 'pending', 'completing a checked step asks for its check');
SELECT is(t.status(t.id(:'w')), 'running', 'the step stays running meanwhile');
SELECT is(t.one(format('SELECT tokens_used FROM sortie.campaigns WHERE id = %L', :'c'))::integer, 10, 'the tokens are charged at once');
SELECT is(sortie.record_verification(t.id(:'w'), t.token(:'w'), false, '2 tests failed') ->> 'status', 'pending',
          'a failed check is a failed attempt, retried');
SELECT matches(t.one(format('SELECT error FROM sortie.steps WHERE id = %s', t.id(:'w'))), '2 tests failed', 'with the output as its error');
SELECT t.clock_ahead(3600);
SELECT t.claim(:'c') AS again \gset
SELECT sortie.complete_step(t.id(:'again'), t.token(:'again'), 'fixed it properly');
SELECT throws_ok(format('SELECT sortie.record_verification(%s, %L, true)', t.id(:'w'), t.token(:'w')), 'SR003', NULL,
                 'the first claim cannot record a check any more');
SELECT is(sortie.record_verification(t.id(:'again'), t.token(:'again'), true, 'all green') ->> 'status', 'done',
          'a passing check makes the step done');
SELECT is(t.one(format('SELECT verification FROM sortie.steps WHERE id = %s', t.id(:'again'))), 'all green', 'its output is kept');

SELECT t.run_all(:'c');
SELECT t.invariants_hold();
SELECT * FROM finish();
