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

