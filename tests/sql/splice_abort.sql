-- Splices and aborts (SPEC §3, §13): dependents rewired to the continuation, cycles refused,
-- the depth limit, and an abort skipping an open subtree.
SELECT plan(12);

SELECT t.campaign() AS c \gset
SELECT t.add(:'c', '[{"step_type": "sequence", "action": "seq", "steps": [{"action": "a", "verify": "true"}, {"action": "b"}]}]') AS ids \gset
SELECT t.claim(:'c') AS a \gset
SELECT throws_ok(format('SELECT sortie.spawn_and_continue(%s, %L, %L, %L)', t.id(:'a'), t.token(:'a'),
                        jsonb_build_array(jsonb_build_object('action', 'sub', 'depends_on', jsonb_build_array(t.step(:'c', 'b')))),
                        '"merge"'),
                 'SR007', NULL, 'a subtask depending on a later sibling would close a cycle');
SELECT throws_ok(format('SELECT sortie.spawn_and_continue(%s, %L, %L, %L)', t.id(:'a'), t.token(:'a'),
                        jsonb_build_array(jsonb_build_object('action', 'sub', 'depends_on', jsonb_build_array(t.step(:'c', 'seq')))),
                        '"merge"'),
                 'SR007', NULL, 'so would one depending on its compound ancestor');
SELECT is(t.status(t.id(:'a')), 'running', 'the refused spawner keeps its claim');
SELECT sortie.spawn_and_continue(t.id(:'a'), t.token(:'a'), '[{"action": "part 1"}, {"action": "part 2"}]', '"merge the parts"')
    AS spliced \gset
SELECT is(t.one(format('SELECT verify FROM sortie.steps WHERE id = %s', :'spliced'::jsonb ->> 'continuation_id')), 'true',
          'the continuation takes the spawner''s check');
SELECT is(t.one(format('SELECT d.depends_on FROM sortie.step_dependencies d WHERE d.campaign_id = %L AND d.step_id = %s',
                        :'c', t.step(:'c', 'b')))::bigint,
          (:'spliced'::jsonb ->> 'continuation_id')::bigint, 'what waited for the spawner waits for the continuation');
SELECT is(t.run_all(:'c'), ARRAY['part 1', 'part 2', 'merge the parts'], 'the parts run first, then the continuation');
SELECT is(t.status(t.step(:'c', 'merge the parts')), 'running', 'which waits for its check');
SELECT t.step(:'c', 'merge the parts') AS merge_id \gset
SELECT t.one(format('SELECT claim_token FROM sortie.steps WHERE id = %s', :merge_id)) AS merge_token \gset
SELECT sortie.record_verification(:merge_id, :'merge_token', true, 'exit 0');
SELECT is(t.status(t.step(:'c', 'merge the parts')), 'done', 'done once the check passed');
SELECT is(t.run_all(:'c'), ARRAY['b'], 'and the sibling after it');

SELECT t.campaign() AS ab \gset
SELECT t.add(:'ab', '[{"step_type": "parallel_group", "action": "search", "key": "g", "children": [{"action": "look here"}, {"action": "look there"}]},
                      {"action": "report", "depends_on": ["g"]}]') AS abids \gset
SELECT t.claim(:'ab') AS finder \gset
SELECT sortie.abort_branch(t.step(:'ab', 'search'), t.token(:'finder'), t.id(:'finder'), 'found it here', 'no need to look further');
SELECT is(t.status(t.step(:'ab', 'look there')), 'skipped', 'an abort skips the open rest of the branch');
SELECT is(t.run_all(:'ab'), ARRAY['report'], 'and the branch counts as resolved for its dependents');

SELECT t.invariants_hold();
SELECT * FROM finish();
