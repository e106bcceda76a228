-- The hand-written part of the 0.1.0 → 0.2.0 upgrade (scripts/make-upgrade puts it first):
-- what CREATE OR REPLACE cannot change. The rest of the upgrade is generated from the rules.

-- The schema bootstrap.sql chose: `sortie` for an extension created without SCHEMA.
DO $head$
DECLARE
    target text := CASE WHEN '@extschema@' = 'public' THEN 'sortie' ELSE '@extschema@' END;
    vector_schema text;
BEGIN
    SELECT n.nspname INTO vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    PERFORM set_config('search_path',
        format('%I, %I, pg_catalog, pg_temp', target, coalesce(vector_schema, 'public')), true);
END
$head$;

-- 0.2.0 has no triggers (Citus distributes no table with one, docs/scale-out.md): prune()
-- deletes a campaign's events itself. Its function goes with the other unused ones below.
DROP TRIGGER campaigns_forget_events ON campaigns;

-- 0.2.0 prefixes internal helpers with `_` (SPEC §15: the API apart). These three are used by a
-- column and constraints, so they are renamed rather than dropped and recreated.
ALTER FUNCTION priority_weight(text) RENAME TO _priority_weight;
ALTER FUNCTION campaign_row_consistent(campaign_status, timestamptz) RENAME TO _campaign_row_consistent;
ALTER FUNCTION step_row_consistent(step_status, step_type, timestamptz, uuid, integer, skip_cause)
    RENAME TO _step_row_consistent;

-- SPEC §17: benchmark runs; helper columns of the claim path (SPEC §18).
ALTER TABLE campaigns
    ADD COLUMN benchmark_due boolean NOT NULL DEFAULT false,
    ADD COLUMN benchmark_lease_until timestamptz,
    ADD COLUMN benchmark_seen_step bigint,
    ADD COLUMN benchmark_runs nonneg_int NOT NULL DEFAULT 0,
    ADD COLUMN last_benchmark jsonb,
    ADD COLUMN ready_floor bigint NOT NULL DEFAULT 0;

-- SPEC §17 step checks; SPEC §13 runner slots.
ALTER TABLE steps
    ADD COLUMN verify text,
    ADD COLUMN verification_requested_at timestamptz,
    ADD COLUMN verification text,
    ADD COLUMN dispatched boolean NOT NULL DEFAULT false;

-- SPEC §13: notifications given up.
ALTER TABLE notifications ADD COLUMN given_up_at timestamptz;
DROP INDEX notifications_undelivered;
CREATE INDEX notifications_undelivered ON notifications (next_attempt_at) WHERE NOT delivered AND given_up_at IS NULL;

CREATE INDEX steps_dispatched ON steps (id) WHERE status = 'running' AND dispatched;
CREATE INDEX steps_continued_by ON steps (continued_by) WHERE continued_by IS NOT NULL;
CREATE INDEX notes_step ON notes (step_id) WHERE step_id IS NOT NULL;


-- SPEC §10 delta reads: each campaign numbers its own events (events.seq, from the campaign's
-- event_seq) and each get_updates consumer keeps a position per campaign (event_positions),
-- in place of one cursor over transaction ids, which are a node's own (docs/scale-out.md).
-- Existing events are numbered in the order the old cursor read them, and each consumer's
-- position in a campaign is the last of its events that cursor had passed.
ALTER TABLE campaigns ADD COLUMN event_seq bigint NOT NULL DEFAULT 0 CHECK (event_seq >= 0);
ALTER TABLE events ADD COLUMN seq bigint;
UPDATE events e SET seq = n.seq
  FROM (SELECT tx, id, row_number() OVER (PARTITION BY campaign_id ORDER BY tx, id) AS seq FROM events) n
 WHERE e.tx = n.tx AND e.id = n.id;
ALTER TABLE events ALTER COLUMN seq SET NOT NULL;
UPDATE campaigns c SET event_seq = m.seq
  FROM (SELECT campaign_id, max(seq) AS seq FROM events GROUP BY campaign_id) m
 WHERE m.campaign_id = c.id;
DROP INDEX events_campaign_order;
CREATE UNIQUE INDEX events_campaign_seq ON events (campaign_id, seq);
CREATE TABLE event_positions (
    campaign_id uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    consumer    text NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (campaign_id, consumer)
);
INSERT INTO event_positions (campaign_id, consumer, seq)
SELECT e.campaign_id, k.consumer, max(e.seq)
  FROM cursors k
  JOIN events e ON (e.tx, e.id) <= (k.last_tx, k.last_event_id)
   AND (k.consumer LIKE '%@*' OR e.campaign_id::text = substring(k.consumer FROM '@([^@]*)$'))
 WHERE e.campaign_id IN (SELECT id FROM campaigns)
 GROUP BY e.campaign_id, k.consumer;
ALTER TABLE cursors DROP COLUMN last_tx, DROP COLUMN last_event_id;
