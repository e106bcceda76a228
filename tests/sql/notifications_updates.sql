-- Notifications (SPEC §6, §13). (Delta reads need committed transactions: get_updates only
-- passes events of transactions older than every running one, so they are tested in Rust.)
SELECT plan(5);

SELECT t.campaign() AS c \gset
INSERT INTO sortie.notifications (campaign_id, level, message) VALUES (:'c', 'info', 'refused') RETURNING id AS refused \gset
INSERT INTO sortie.notifications (campaign_id, level, message) VALUES (:'c', 'info', 'flaky') RETURNING id AS flaky \gset
SELECT is(sortie.notification_delivered(:refused, false, 'webhook answered 400', false) ->> 'given_up', 'true',
          'a refusal is not retried');
SELECT is((SELECT count(*)::integer FROM generate_series(1, 10) g,
                  LATERAL sortie.notification_delivered(:flaky, false, 'webhook answered 503, try ' || g) r
            WHERE (r ->> 'given_up')::boolean), 1, 'the tenth failed attempt gives up');
SELECT t.clock_ahead(86400);
SELECT is(sortie.take_notifications(), '[]'::jsonb, 'given-up notifications are not taken again');
SELECT t.clock_ahead(0);

SELECT is(t.one(format('SELECT last_error FROM sortie.notifications WHERE campaign_id = %L AND id = %s', :'c', :flaky)), 'webhook answered 503, try 10',
          'the last error is kept');
SELECT t.invariants_hold();
SELECT * FROM finish();
