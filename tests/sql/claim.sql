-- Readiness, claims, leases and fencing (SPEC §3, §3a, §13).
SELECT plan(17);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"action": "a", "key": "a"}, {"action": "b", "depends_on": ["a"]}]') AS ids \gset

SELECT t.claim(:'c') AS first \gset
SELECT is(:'first'::jsonb ->> 'action', 'a', 'only the step without unmet dependencies is ready');
SELECT is(t.claim(:'c') ->> 'step_id', NULL, 'b waits for a: nothing else to claim');
SELECT is(t.status(t.id(:'first')), 'running', 'a claimed step is running');
SELECT ok(NOT t.one(format('SELECT dispatched FROM sortie.steps WHERE id = %s', t.id(:'first')))::boolean, 'a pull-mode claim uses no runner slot');
SELECT ok((sortie.heartbeat(t.id(:'first'), t.token(:'first'), 3600) ->> 'lease_expires_at')::timestamptz > now() + interval '59 minutes',
          'a heartbeat extends the lease');
SELECT throws_ok(format('SELECT sortie.complete_step(%s, %L, %L)', t.id(:'first'), gen_random_uuid(), 'x'),
                 'SR003', NULL, 'another token cannot complete the step (fencing)');
SELECT throws_ok(format('SELECT sortie.claim_step(%s, %L)', (string_to_array(trim(both '{}' from :'ids'), ','))[2], 'w'),
                 'SR002', NULL, 'a step with unmet dependencies cannot be claimed by name');

-- The lease runs out: the step is reset, its attempt counted, and the old claim is stale.
SELECT t.clock_ahead(7200);
SELECT is((sortie.reset_zombies() ->> 'reset')::integer, 1, 'an expired lease is reset');
SELECT is(t.status(t.id(:'first')), 'pending', 'the reset step is pending again');
SELECT throws_ok(format('SELECT sortie.complete_step(%s, %L, %L)', t.id(:'first'), t.token(:'first'), 'late'),
                 'SR003', NULL, 'the expired claim cannot complete it');

-- Runner dispatches share one cap (SPEC §13).
SELECT sortie.cancel_campaign(:'c');
SELECT t.campaign() AS r \gset
SELECT t.add(:'r', '[{"action": "x"}, {"action": "y"}, {"action": "z"}]') AS rids \gset
SELECT sortie.claim_next(owner => 'runner', max_dispatched => 1) AS dispatched \gset
SELECT ok((:'dispatched'::jsonb ->> 'step_id') IS NOT NULL, 'a runner claims within its cap');
SELECT is(sortie.claim_next(owner => 'runner', max_dispatched => 1) ->> 'reason', 'capacity',
          'a second dispatch waits for the slot');
SELECT ok(t.claim(:'r') ->> 'step_id' IS NOT NULL, 'a pull-mode claim does not');
SELECT sortie.cancel_campaign(:'r');

-- The ready floor (SPEC §18) is lowered by the rules themselves, not by a trigger: claims raise
-- it past the claimed steps, and a released step below it is found again.
SELECT t.campaign() AS f \gset
SELECT t.add(:'f', (SELECT jsonb_agg(jsonb_build_object('action', 'f' || i)) FROM generate_series(1, 40) i));
SELECT t.claim(:'f') AS held \gset
SELECT t.claim(:'f') FROM generate_series(1, 38);
SELECT ok(t.one(format('SELECT ready_floor FROM sortie.campaigns WHERE id = %L', :'f'))::bigint > t.id(:'held'),
          'claims raised the ready floor past the first claimed step');
SELECT sortie.release_step(t.id(:'held'), t.token(:'held'));
SELECT ok(t.one(format('SELECT ready_floor FROM sortie.campaigns WHERE id = %L', :'f'))::bigint <= t.id(:'held'),
          'releasing it lowered the floor to it');
SELECT is(t.claim(:'f') ->> 'step_id', t.id(:'held')::text, 'so the next claim takes it again');
SELECT sortie.cancel_campaign(:'f');

SELECT t.invariants_hold();
SELECT * FROM finish();
