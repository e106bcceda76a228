-- Input requests, token budgets and advisory dedup (SPEC §3).
SELECT plan(9);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"action": "ask first"}]') AS ids \gset
SELECT t.claim(:'c') AS asker \gset
SELECT sortie.request_input(t.id(:'asker'), t.token(:'asker'), 'left or right?');
SELECT is(t.status(t.id(:'asker')), 'waiting_input', 'a question parks the step');
SELECT throws_ok(format('SELECT sortie.complete_step(%s, %L, %L)', t.id(:'asker'), t.token(:'asker'), 'x'),
                 'SR003', NULL, 'the asking claim is spent');
SELECT sortie.provide_input(:'c', t.id(:'asker'), 'left');
SELECT is(t.status(t.id(:'asker')), 'pending', 'an answer makes it claimable again');
SELECT is(t.one(format('SELECT answer FROM sortie.steps WHERE id = %s', t.id(:'asker'))), 'left', 'with the answer kept');

SELECT t.campaign('none', '{"token_budget": 100}') AS b \gset
SELECT t.add(:'b', '[{"action": "spend"}, {"action": "more"}]') AS bids \gset
SELECT t.claim(:'b') AS spender \gset
SELECT sortie.complete_step(t.id(:'spender'), t.token(:'spender'), 'spent', 150);
SELECT is(t.campaign_status(:'b'), 'paused', 'a spent budget pauses the campaign');
SELECT is(t.claim(:'b') ->> 'step_id', NULL, 'and nothing more is claimed');

SELECT t.campaign() AS d \gset
SELECT sortie.add_steps(:'d', '[{"action": "same work"}]');
SELECT is(jsonb_array_length(sortie.add_steps(:'d', '[{"action": "same work"}]') -> 'duplicates'), 1,
          'the same step again is reported as a duplicate');
SELECT is(t.one(format('SELECT count(*) FROM sortie.steps WHERE campaign_id = %L', :'d'))::integer, 2, 'but added: dedup is advice');

SELECT sortie.cancel_campaign(:'b');
SELECT sortie.cancel_campaign(:'d');
SELECT t.invariants_hold();
SELECT * FROM finish();
