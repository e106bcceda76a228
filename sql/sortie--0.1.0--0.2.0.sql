-- The upgrade of the sortie extension from 0.1.0 to 0.2.0. Written by scripts/make-upgrade:
-- do not edit; edit sql/upgrade/0.1.0--0.2.0.head.sql or the rules and run it again.
SET LOCAL check_function_bodies = off;

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

-- Functions of 0.1.0 that nothing depends on are dropped; the new ones follow.
DO $drop$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
         WHERE NOT EXISTS (SELECT 1 FROM pg_depend u
                            WHERE u.refclassid = 'pg_proc'::regclass AND u.refobjid = p.oid AND u.deptype = 'n')
    LOOP
        EXECUTE format('DROP FUNCTION %s', f);
    END LOOP;
END
$drop$;

-- sql/bootstrap.sql
CREATE OR REPLACE FUNCTION _raise(code text, message text) RETURNS void
-- VOLATILE: it never returns, and a call with constant arguments must not be folded (and so
-- raised) by the planner while it plans a statement that may never reach it.
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    RAISE EXCEPTION USING
        MESSAGE = code || ': ' || message,
        ERRCODE = CASE code
            WHEN 'not_found'        THEN 'SR001'
            WHEN 'invalid_state'    THEN 'SR002'
            WHEN 'stale_claim'      THEN 'SR003'
            WHEN 'depth_limit'      THEN 'SR004'
            WHEN 'invalid_argument' THEN 'SR005'
            WHEN 'budget_exhausted' THEN 'SR006'
            WHEN 'cycle'            THEN 'SR007'
            WHEN 'skipped'          THEN 'SR008'
            WHEN 'forbidden'        THEN 'SR009'
            WHEN 'choice_required'  THEN 'SR010'
            ELSE 'SR000'
        END;
END
$$;

-- sql/bootstrap.sql
CREATE OR REPLACE FUNCTION _clock() RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN coalesce(nullif(current_setting('sortie.fake_now', true), '')::timestamptz, now());
END
$$;

-- sql/bootstrap.sql
CREATE OR REPLACE FUNCTION _priority_weight(priority text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE priority WHEN 'urgent' THEN 8 WHEN 'high' THEN 4 WHEN 'normal' THEN 2
                           WHEN 'low' THEN 1 WHEN 'background' THEN 0.5 END::double precision $$;

-- sql/bootstrap.sql
CREATE OR REPLACE FUNCTION _campaign_row_consistent(p_status campaign_status, p_completed_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    -- A campaign has ended exactly when it has an end time.
    RETURN (p_status IN ('done', 'failed', 'cancelled')) = (p_completed_at IS NOT NULL);
END
$$;

-- sql/bootstrap.sql
CREATE OR REPLACE FUNCTION _step_row_consistent(p_status step_status, p_step_type step_type, p_completed_at timestamptz,
                                    p_claim_token uuid, p_members integer, p_skip_cause skip_cause)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN (p_status IN ('done', 'failed', 'skipped')) = (p_completed_at IS NOT NULL)
       -- A live claim is a running atomic step's; a skipped step keeps its revoked token so a
       -- late worker is told `skipped` rather than `stale_claim`.
       AND (p_status <> 'running' OR p_step_type <> 'atomic' OR p_claim_token IS NOT NULL)
       AND (p_claim_token IS NULL OR p_status IN ('running', 'skipped'))
       AND (p_step_type <> 'atomic' OR p_members = 0)
       AND (p_status <> 'skipped' OR p_skip_cause IS NOT NULL);
END
$$;

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_expand_steps"(
	"steps" jsonb /* JsonB */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'expand_steps_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_metric_met"(
	"value" double precision, /* f64 */
	"target" double precision, /* f64 */
	"direction" TEXT /* & str */
) RETURNS bool /* bool */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'metric_met_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_name_from_goal"(
	"goal" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'name_from_goal_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_parse_metric"(
	"name" TEXT, /* & str */
	"content" TEXT /* & str */
) RETURNS double precision /* Option < f64 > */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'parse_metric_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_parse_plan"(
	"plan" jsonb /* JsonB */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'parse_plan_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_preview"(
	"step_id" bigint, /* i64 */
	"text" TEXT, /* & str */
	"head" INT, /* i32 */
	"tail" INT /* i32 */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'preview_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_read_range"(
	"text" TEXT, /* & str */
	"offset" INT, /* i32 */
	"limit" INT /* i32 */
) RETURNS jsonb /* JsonB */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'read_range_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_step_fingerprint"(
	"action" TEXT, /* & str */
	"agent" TEXT, /* Option < & str > */
	"input" jsonb /* Option < JsonB > */
) RETURNS TEXT /* String */
IMMUTABLE PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'step_fingerprint_wrapper';

-- sortie_pg/src/pure.rs
CREATE OR REPLACE FUNCTION "_wait_cycle_step"(
	"ids" bigint[], /* Vec < i64 > */
	"parents" bigint[], /* Vec < Option < i64 > > */
	"dep_steps" bigint[], /* Vec < i64 > */
	"dep_on" bigint[] /* Vec < i64 > */
) RETURNS bigint /* Option < i64 > */
IMMUTABLE STRICT PARALLEL SAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wait_cycle_step_wrapper';

-- sql/engine/events.sql
CREATE OR REPLACE FUNCTION _require(p_given boolean, p_name text) RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    IF NOT coalesce(p_given, false) THEN
        PERFORM _raise('invalid_argument', p_name || ' is required');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION wake_interval() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '100 milliseconds' $$;

CREATE OR REPLACE FUNCTION listen_poll_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '1 second' $$;

CREATE OR REPLACE FUNCTION _take_event_seq(p_campaign uuid, p_count integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_last bigint;
BEGIN
    UPDATE campaigns SET event_seq = event_seq + p_count WHERE id = p_campaign RETURNING event_seq INTO v_last;
    IF v_last IS NULL THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    RETURN v_last;
END
$$;

CREATE OR REPLACE FUNCTION _emit(p_campaign uuid, p_step bigint, p_kind text, p_payload jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
    v_seq bigint;
    v_at timestamptz;
    v_woke text := current_setting('sortie.woke_at', true);
BEGIN
    v_seq := _take_event_seq(p_campaign, 1);
    -- Read into a variable first: Citus takes no volatile function in a change's values.
    v_at := clock_timestamp();
    INSERT INTO events (campaign_id, step_id, kind, payload, seq, at)
    VALUES (p_campaign, p_step, p_kind, coalesce(p_payload, '{}'), v_seq, v_at)
    RETURNING id INTO v_id;
    -- Seconds since the epoch: independent of the session's DateStyle.
    IF coalesce(v_woke, '') = ''
       OR v_woke::double precision <= extract(epoch FROM clock_timestamp() - wake_interval()) THEN
        PERFORM set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false);
        PERFORM pg_notify('sortie_events', json_build_object(
            'id', v_id, 'campaign_id', p_campaign, 'seq', v_seq, 'step_id', p_step, 'kind', p_kind)::text);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _emit_many(p_campaign uuid, p_steps bigint[], p_kind text, p_payload jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
    v_step bigint;
    v_last bigint;
    v_at timestamptz;
    v_woke text := current_setting('sortie.woke_at', true);
BEGIN
    IF cardinality(p_steps) IS NULL OR cardinality(p_steps) = 0 THEN
        RETURN;
    END IF;
    v_last := _take_event_seq(p_campaign, cardinality(p_steps));
    v_at := clock_timestamp();
    WITH added AS (
        INSERT INTO events (campaign_id, step_id, kind, payload, seq, at)
        SELECT p_campaign, s.id, p_kind, coalesce(p_payload, '{}'), v_last - cardinality(p_steps) + s.n, v_at
          FROM unnest(p_steps) WITH ORDINALITY AS s(id, n)
         ORDER BY s.n
        RETURNING id, step_id)
    SELECT a.id, a.step_id INTO v_id, v_step FROM added a ORDER BY a.id DESC LIMIT 1;
    IF coalesce(v_woke, '') = ''
       OR v_woke::double precision <= extract(epoch FROM clock_timestamp() - wake_interval()) THEN
        PERFORM set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false);
        PERFORM pg_notify('sortie_events', json_build_object(
            'id', v_id, 'campaign_id', p_campaign, 'seq', v_last, 'step_id', v_step, 'kind', p_kind)::text);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _notify_campaign(p_campaign uuid, p_level text, p_message text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_channel text;
BEGIN
    SELECT c.channel INTO v_channel FROM campaigns c WHERE c.id = p_campaign;
    IF FOUND THEN
        INSERT INTO notifications (campaign_id, level, message, channel)
        VALUES (p_campaign, p_level, p_message, v_channel);
    END IF;
END
$$;

-- sql/engine/locking.sql
CREATE OR REPLACE FUNCTION _on_citus() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT current_setting('citus.version', true) IS NOT NULL $$;

CREATE OR REPLACE FUNCTION _lock_campaign(p_campaign uuid) RETURNS campaigns
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    IF p_campaign IS NULL THEN
        PERFORM _raise('invalid_argument', 'a campaign id is required');
    END IF;
    SELECT * INTO c FROM campaigns WHERE id = p_campaign FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    RETURN c;
END
$$;

CREATE OR REPLACE FUNCTION _lock_step_campaign(p_step bigint) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid;
BEGIN
    IF p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'a step id is required (pass step_id, or run with SORTIE_STEP_ID set)');
    END IF;
    IF _on_citus() THEN
        SELECT s.campaign_id INTO v_campaign FROM steps s WHERE s.id = p_step;
        SELECT c.id INTO v_campaign FROM campaigns c WHERE c.id = v_campaign FOR UPDATE;
    ELSE
        SELECT c.id INTO v_campaign
          FROM campaigns c
         WHERE c.id = (SELECT s.campaign_id FROM steps s WHERE s.id = p_step)
           FOR UPDATE;
    END IF;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist', p_step));
    END IF;
    RETURN v_campaign;
END
$$;

CREATE OR REPLACE FUNCTION _lock_named_step_campaign(p_campaign uuid, p_step bigint) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_campaign IS NULL OR p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _lock_campaign(p_campaign);
    PERFORM 1 FROM steps s WHERE s.campaign_id = p_campaign AND s.id = p_step;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', p_step, p_campaign));
    END IF;
    RETURN p_campaign;
END
$$;

CREATE OR REPLACE FUNCTION _lock_step(p_step bigint) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid := _lock_step_campaign(p_step);
    s steps;
BEGIN
    SELECT * INTO s FROM steps WHERE campaign_id = v_campaign AND id = p_step FOR UPDATE;
    RETURN s;
END
$$;

CREATE OR REPLACE FUNCTION _check_claim(s steps, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_token IS NULL THEN
        PERFORM _raise('invalid_argument', format(
            '%s needs the claim token of step %s (claim_token, or SORTIE_CLAIM_TOKEN)', p_call, s.id));
    END IF;
    IF s.status = 'skipped' AND s.claim_token = p_token THEN
        PERFORM _raise('skipped', format(
            'step %s was skipped (%s) while you worked on it; stop, nothing more is needed', s.id,
            coalesce(s.error, s.skip_cause)));
    END IF;
    IF s.claim_token IS DISTINCT FROM p_token THEN
        PERFORM _raise('stale_claim', format(
            'your claim on step %s is no longer valid (its lease expired or it was reset); stop working on it',
            s.id));
    END IF;
    IF s.status <> 'running' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not running; %s is not possible', s.id, s.status, p_call));
    END IF;
    RETURN s;
END
$$;

CREATE OR REPLACE FUNCTION _lock_claimed_step(p_step bigint, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN _check_claim(_lock_step(p_step), p_token, p_call);
END
$$;

CREATE OR REPLACE FUNCTION _lock_claimed_step_in(p_campaign uuid, p_step bigint, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    s steps;
BEGIN
    IF p_campaign IS NULL OR p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _lock_campaign(p_campaign);
    SELECT * INTO s FROM steps WHERE campaign_id = p_campaign AND id = p_step FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', p_step, p_campaign));
    END IF;
    RETURN _check_claim(s, p_token, p_call);
END
$$;

-- sql/engine/counters.sql
CREATE OR REPLACE FUNCTION _bump_counters(p_campaign uuid, p_open integer, p_running integer, p_ready integer)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_open <> 0 OR p_running <> 0 OR p_ready <> 0 THEN
        UPDATE campaigns
           SET open_steps = open_steps + p_open,
               running_steps = running_steps + p_running,
               ready_steps = ready_steps + p_ready,
               updated_at = now()
         WHERE id = p_campaign;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _provisional_slot_seconds() RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 60::double precision $$;

CREATE OR REPLACE FUNCTION _can_dispatch(p_status text, p_max_parallel integer, p_running integer,
                             p_token_budget bigint, p_tokens_used bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status = 'active'
       AND (p_max_parallel IS NULL OR p_running < p_max_parallel)
       AND (p_token_budget IS NULL OR p_tokens_used < p_token_budget)
$$;

CREATE OR REPLACE FUNCTION _count_claim(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE campaigns
       SET running_steps = running_steps + 1, ready_steps = ready_steps - 1,
           slot_seconds_used = slot_seconds_used + _provisional_slot_seconds(), updated_at = now()
     WHERE id = p_campaign AND ready_steps > 0
       AND _can_dispatch(status, max_parallel, running_steps, token_budget, tokens_used);
    RETURN FOUND;
END
$$;

CREATE OR REPLACE FUNCTION _uncount_claim(p_campaign uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE campaigns
       SET running_steps = running_steps - 1, ready_steps = ready_steps + 1,
           slot_seconds_used = slot_seconds_used - _provisional_slot_seconds()
     WHERE id = p_campaign;
END
$$;

CREATE OR REPLACE FUNCTION _slot_correction(p_claimed_at timestamptz) RETURNS double precision
LANGUAGE sql STABLE
AS $$ SELECT extract(epoch FROM _clock() - p_claimed_at)::double precision - _provisional_slot_seconds() $$;

CREATE OR REPLACE FUNCTION _leave_running(p_campaign uuid, p_step bigint, p_claimed_at timestamptz, p_locks text[],
                              p_open integer DEFAULT 0, p_ready integer DEFAULT 0, p_tokens bigint DEFAULT 0,
                              OUT open_steps integer, OUT status text, OUT token_budget bigint)
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_correction double precision := _slot_correction(p_claimed_at);
BEGIN
    UPDATE campaigns c
       SET slot_seconds_used = greatest(c.slot_seconds_used + v_correction, 0),
           tokens_used = c.tokens_used + p_tokens,
           running_steps = c.running_steps - 1, open_steps = c.open_steps + p_open,
           ready_steps = c.ready_steps + p_ready, updated_at = now()
     WHERE c.id = p_campaign
    RETURNING c.open_steps, c.status, c.token_budget INTO open_steps, status, token_budget;
    IF cardinality(p_locks) > 0 THEN
        DELETE FROM resource_leases WHERE campaign_id = p_campaign AND step_id = p_step;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _running_count() RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(running_steps), 0)::bigint FROM campaigns WHERE status IN ('active', 'paused'));
END
$$;

-- sql/engine/lock_keys.sql
CREATE OR REPLACE FUNCTION _lock_key(p_entry text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN starts_with(p_entry, 'shared:') THEN substr(p_entry, 8) ELSE p_entry END $$;

CREATE OR REPLACE FUNCTION _lock_mode(p_entry text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN starts_with(p_entry, 'shared:') THEN 'shared' ELSE 'exclusive' END $$;

CREATE OR REPLACE FUNCTION _locks_conflict(p_locks text[], p_step bigint, p_keys text[], p_modes text[], p_steps bigint[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT cardinality(p_locks) > 0 AND EXISTS (
        SELECT 1
          FROM (SELECT CASE WHEN starts_with(e, 'shared:') THEN substr(e, 8) ELSE e END AS key,
                       starts_with(e, 'shared:') AS shared
                  FROM unnest(p_locks) e) w
          JOIN unnest(p_keys, p_modes, p_steps) AS l(key, mode, step_id)
            ON (l.key = w.key OR starts_with(l.key, w.key || '/') OR starts_with(w.key, l.key || '/'))
         WHERE (p_step IS NULL OR l.step_id <> p_step)
           AND NOT (l.mode = 'shared' AND w.shared));
$$;

CREATE OR REPLACE FUNCTION _live_leases(OUT keys text[], OUT modes text[], OUT steps bigint[])
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    SELECT coalesce(array_agg(l.key), '{}'), coalesce(array_agg(l.mode), '{}'), coalesce(array_agg(l.step_id), '{}')
      INTO keys, modes, steps
      FROM resource_leases l
     WHERE l.expires_at > _clock();
END
$$;

CREATE OR REPLACE FUNCTION _locks_busy(p_locks text[], p_step bigint) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    l record;
BEGIN
    IF cardinality(p_locks) = 0 THEN
        RETURN false;
    END IF;
    SELECT * INTO l FROM _live_leases();
    RETURN _locks_conflict(p_locks, p_step, l.keys, l.modes, l.steps);
END
$$;

CREATE OR REPLACE FUNCTION _take_locks(p_step bigint, p_campaign uuid, p_locks text[], p_expires timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_root text;
BEGIN
    IF cardinality(p_locks) = 0 THEN
        RETURN true;
    END IF;
    FOR v_root IN SELECT DISTINCT split_part(_lock_key(e), '/', 1) AS r FROM unnest(p_locks) e ORDER BY r LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('sortie.lock:' || v_root, 0));
    END LOOP;
    IF _locks_busy(p_locks, p_step) THEN
        RETURN false;
    END IF;
    INSERT INTO resource_leases (key, mode, campaign_id, step_id, expires_at)
    SELECT DISTINCT ON (_lock_key(e)) _lock_key(e), _lock_mode(e), p_campaign, p_step, p_expires
      FROM unnest(p_locks) e
     ORDER BY _lock_key(e), _lock_mode(e) = 'shared'
    ON CONFLICT (key, step_id) DO UPDATE SET expires_at = EXCLUDED.expires_at;
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION reap_leases() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_campaigns uuid[];
    v_steps bigint[];
    v_running bigint[];
    v_reaped integer;
BEGIN
    SELECT coalesce(array_agg(DISTINCT l.campaign_id), '{}'), coalesce(array_agg(DISTINCT l.step_id), '{}')
      INTO v_campaigns, v_steps
      FROM resource_leases l;
    SELECT coalesce(array_agg(s.id), '{}') INTO v_running
      FROM steps s
     WHERE s.campaign_id = ANY (v_campaigns) AND s.id = ANY (v_steps) AND s.status = 'running';
    WITH reaped AS (
        DELETE FROM resource_leases l
         WHERE l.expires_at < _clock()
            OR (l.step_id = ANY (v_steps) AND NOT l.step_id = ANY (v_running))
        RETURNING 1)
    SELECT count(*)::integer INTO v_reaped FROM reaped;
    RETURN v_reaped;
END
$$;

-- sql/engine/readiness.sql
CREATE OR REPLACE FUNCTION _lower_ready_floor(p_campaign uuid, p_step bigint) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE campaigns SET ready_floor = p_step
     WHERE id = p_campaign AND p_step IS NOT NULL AND ready_floor > p_step;
END
$$;

CREATE OR REPLACE FUNCTION _unblocked(p_campaign uuid, p_steps bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer := 0;
    v_compound bigint[];
    v_children bigint[];
    v_first bigint;
    v_empty steps;
BEGIN
    WHILE cardinality(p_steps) > 0 LOOP
        SELECT count(*) FILTER (WHERE step_type = 'atomic'),
               min(id) FILTER (WHERE step_type = 'atomic'),
               coalesce(array_agg(id) FILTER (WHERE step_type <> 'atomic'), '{}')
          INTO v_ready, v_first, v_compound
          FROM steps WHERE campaign_id = p_campaign AND id = ANY (p_steps) AND status = 'pending' AND remaining_deps = 0;
        PERFORM _bump_counters(p_campaign, 0, 0, v_ready);
        PERFORM _lower_ready_floor(p_campaign, v_first);
        EXIT WHEN cardinality(v_compound) = 0;
        -- A compound step with no members (a for_each over no items) has nothing to wait for.
        -- A loop, not a call per row of the query: a rule called inside a query on a shard may
        -- not run queries of its own (Citus).
        FOR v_empty IN SELECT * FROM steps p
                        WHERE p.campaign_id = p_campaign AND p.id = ANY (v_compound) AND p.members = 0
                        ORDER BY p.id LOOP
            PERFORM _settle_compound_done(v_empty);
        END LOOP;
        WITH opened AS (
            UPDATE steps SET remaining_deps = remaining_deps - 1
             WHERE campaign_id = p_campaign AND parent_id = ANY (v_compound) AND status = 'pending'
            RETURNING id, remaining_deps)
        SELECT coalesce(array_agg(id) FILTER (WHERE remaining_deps = 0), '{}') INTO v_children FROM opened;
        p_steps := v_children;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION _release_dependents(p_campaign uuid, p_steps bigint[]) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer;
    v_first bigint;
    v_compound bigint[];
BEGIN
    WITH needs AS (
        SELECT d.step_id, count(*)::integer AS n
          FROM step_dependencies d
         WHERE d.campaign_id = p_campaign AND d.depends_on = ANY (p_steps)
         GROUP BY d.step_id),
    released AS (
        UPDATE steps s SET remaining_deps = s.remaining_deps - n.n
          FROM needs n
         WHERE s.campaign_id = p_campaign AND s.id = n.step_id AND s.status = 'pending'
        RETURNING s.id, s.step_type, s.remaining_deps)
    SELECT count(*) FILTER (WHERE remaining_deps = 0 AND step_type = 'atomic'),
           min(id) FILTER (WHERE remaining_deps = 0 AND step_type = 'atomic'),
           array_agg(id) FILTER (WHERE remaining_deps = 0 AND step_type <> 'atomic')
      INTO v_ready, v_first, v_compound
      FROM released;
    IF v_first IS NOT NULL THEN
        PERFORM _lower_ready_floor(p_campaign, v_first);
    END IF;
    IF v_compound IS NOT NULL THEN
        PERFORM _unblocked(p_campaign, v_compound);
    END IF;
    RETURN v_ready;
END
$$;

CREATE OR REPLACE FUNCTION _ready_floor_slack() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 32::bigint $$;

CREATE OR REPLACE FUNCTION _ready_steps(p_campaign uuid, p_agent text, p_limit integer)
RETURNS TABLE (step_id bigint, campaign_id uuid, action text, agent text, depth integer, created_at timestamptz)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    l record;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    SELECT * INTO l FROM _live_leases();
    RETURN QUERY
    SELECT s.id, s.campaign_id, s.action::text, s.agent, s.depth::integer, s.created_at
      FROM steps s JOIN campaigns c ON c.id = s.campaign_id
     WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0
       AND s.not_before <= v_now
       AND (p_campaign IS NULL OR s.campaign_id = p_campaign)
       AND (p_agent IS NULL OR s.agent IS NULL OR s.agent = p_agent)
       AND c.status = 'active' AND (c.token_budget IS NULL OR c.tokens_used < c.token_budget)
       AND NOT _locks_conflict(s.requires_locks, NULL, l.keys, l.modes, l.steps)
     ORDER BY c.slot_seconds_used / c.weight, s.id
     LIMIT greatest(p_limit, 0);
END
$$;

CREATE OR REPLACE FUNCTION ready_steps(campaign_id uuid DEFAULT NULL, agent text DEFAULT NULL, "limit" integer DEFAULT 100)
RETURNS TABLE (step_id bigint, campaign_id uuid, action text, agent text, depth integer, created_at timestamptz)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT * FROM _ready_steps($1, $2, $3) $$;

-- sql/engine/skip_cascade.sql
CREATE OR REPLACE FUNCTION _skip_cascade(p_campaign uuid, p_seeds bigint[], p_cause text, p_reason text)
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE
-- One parent with thousands of children skews parent_id's statistics until a per-row seq scan
-- looks cheap and the walk turns quadratic; every edge of the walk has an index.
SET enable_seqscan = off
AS $$
DECLARE
    v_skipped bigint[];
    v_open integer;
    v_running integer;
    v_ready integer;
    v_parent record;
BEGIN
    WITH RECURSIVE reach(id) AS (
        SELECT unnest(p_seeds)
        UNION
        SELECT next.id
          FROM reach r
          CROSS JOIN LATERAL (
              SELECT d.step_id AS id FROM step_dependencies d
               WHERE d.campaign_id = p_campaign AND d.depends_on = r.id
              UNION ALL
              SELECT c.id FROM steps c WHERE c.campaign_id = p_campaign AND c.parent_id = r.id) next
    ),
    victims AS (
        SELECT s.id, s.status, s.step_type, s.remaining_deps
          FROM steps s JOIN reach USING (id)
         WHERE s.campaign_id = p_campaign AND s.status IN ('pending', 'running', 'waiting_input')
    ),
    skipped AS (
        UPDATE steps s
           SET status = 'skipped', skip_cause = p_cause, error = p_reason,
               completed_at = _clock(), lease_expires_at = NULL
          FROM victims v
         WHERE s.campaign_id = p_campaign AND s.id = v.id
        RETURNING s.id, v.status AS was, v.step_type, v.remaining_deps
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}'),
           count(*),
           count(*) FILTER (WHERE was = 'running' AND step_type = 'atomic'),
           count(*) FILTER (WHERE was = 'pending' AND step_type = 'atomic' AND remaining_deps = 0)
      INTO v_skipped, v_open, v_running, v_ready
      FROM skipped;

    IF v_open = 0 THEN
        RETURN v_skipped;
    END IF;
    -- Leases are a table every node holds (a reference table under Citus, where a change is a
    -- commit on every node): touched only when a skipped running step held lock keys.
    IF v_running > 0 AND EXISTS (SELECT 1 FROM steps s
                                  WHERE s.campaign_id = p_campaign AND s.id = ANY (v_skipped)
                                    AND cardinality(s.requires_locks) > 0) THEN
        DELETE FROM resource_leases WHERE campaign_id = p_campaign AND step_id = ANY (v_skipped);
    END IF;
    PERFORM _bump_counters(p_campaign, -v_open, -v_running, -v_ready);
    PERFORM _emit(p_campaign, NULL, 'step.skipped',
                 jsonb_build_object('step_ids', to_jsonb(v_skipped), 'cause', p_cause, 'reason', p_reason));

    -- Parents lost members: their counters are updated, and those still open are decided,
    -- deepest first, so a child compound settles before its own parent looks at it.
    FOR v_parent IN
        SELECT s.parent_id AS id, count(*) AS lost,
               count(*) FILTER (WHERE s.skip_cause IN ('abort', 'threshold')) AS resolved
          FROM steps s
         WHERE s.campaign_id = p_campaign AND s.id = ANY (v_skipped) AND s.parent_id IS NOT NULL
           AND s.continued_by IS NULL
         GROUP BY s.parent_id
         ORDER BY max(s.depth) DESC, s.parent_id
    LOOP
        PERFORM _member_settled(p_campaign, v_parent.id, v_parent.resolved::integer,
                               (v_parent.lost - v_parent.resolved)::integer, NULL);
    END LOOP;
    RETURN v_skipped;
END
$$;

-- sql/engine/compound.sql
CREATE OR REPLACE FUNCTION _member_settled(p_campaign uuid, p_parent bigint, p_resolved integer, p_failed integer,
                               p_failed_step bigint)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    p steps;
    v_threshold integer;
    v_policy text;
BEGIN
    UPDATE steps
       SET members_resolved = members_resolved + p_resolved,
           members_failed = members_failed + p_failed
     WHERE campaign_id = p_campaign AND id = p_parent AND step_type <> 'atomic'
    RETURNING * INTO p;
    IF NOT FOUND OR p.status NOT IN ('pending', 'running') THEN
        RETURN;
    END IF;
    v_threshold := coalesce(p.completion_threshold, p.members);
    IF p.members_resolved >= v_threshold THEN
        PERFORM _settle_compound_done(p);
        RETURN;
    END IF;
    IF p_failed_step IS NOT NULL THEN
        SELECT failure_policy INTO v_policy FROM steps WHERE campaign_id = p_campaign AND id = p_failed_step;
    END IF;
    IF v_policy = 'fail_fast' THEN
        PERFORM _settle_failed(p, format('fail_fast: child step %s failed', p_failed_step));
    ELSIF p.members - p.members_failed < v_threshold THEN
        PERFORM _settle_failed(p, format('%s of %s children failed; the completion threshold %s can no longer be met',
                                        p.members_failed, p.members, v_threshold));
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _settle_compound_done(p steps) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_rest bigint[];
    v_output text;
BEGIN
    -- Done first, so the skips below find their parent settled and do not re-enter. (The time
    -- in a variable: Citus refuses a STABLE function inside COALESCE in a distributed change.)
    UPDATE steps SET status = 'done', completed_at = v_now, started_at = coalesce(started_at, v_now)
     WHERE campaign_id = p.campaign_id AND id = p.id;
    SELECT coalesce(array_agg(id), '{}') INTO v_rest
      FROM steps WHERE campaign_id = p.campaign_id AND parent_id = p.id AND status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_rest) > 0 THEN
        PERFORM _skip_cascade(p.campaign_id, v_rest, 'threshold',
                             format('step %s met its completion threshold without it', p.id));
    END IF;
    -- A compound step with no members (a for_each over no items) outputs [] (SPEC §13). Read
    -- before the update: Citus takes no STABLE function inside COALESCE in a distributed change.
    SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', c.id, 'status', c.status, 'output', c.output)
                              ORDER BY c.position, c.id), '[]')::text
      INTO v_output
      FROM steps c
     WHERE c.campaign_id = p.campaign_id AND c.parent_id = p.id AND c.continued_by IS NULL;
    UPDATE steps SET output = v_output WHERE campaign_id = p.campaign_id AND id = p.id;
    PERFORM _bump_counters(p.campaign_id, -1, 0, 0);
    PERFORM _after_done(p.campaign_id, p.id, p.parent_id);
END
$$;

-- sql/engine/campaign_end.sql
CREATE OR REPLACE FUNCTION _has_had_steps(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM steps WHERE campaign_id = p_campaign);
END
$$;

CREATE OR REPLACE FUNCTION _check_drained(p_campaign uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    SELECT * INTO c FROM campaigns WHERE id = p_campaign;
    -- A workflow instance has no steps of its own: it ends when an advance reaches FINISH.
    IF c.open_steps > 0 OR c.status NOT IN ('active', 'paused') OR c.workflow IS NOT NULL THEN
        RETURN;
    END IF;
    -- SPEC §13: a campaign that never had a step is waiting for its first steps (add_steps, or
    -- the planner once its plan delay has passed), not drained.
    IF NOT _has_had_steps(p_campaign) THEN
        RETURN;
    END IF;
    -- SPEC §17: a campaign with a benchmark command is judged by it; a runner runs it and
    -- record_benchmark() decides what follows.
    IF c.benchmark_command IS NOT NULL THEN
        IF NOT c.benchmark_due THEN
            UPDATE campaigns SET benchmark_due = true, benchmark_lease_until = NULL WHERE id = p_campaign;
            PERFORM _emit(p_campaign, NULL, 'campaign.benchmark_due');
        END IF;
        RETURN;
    END IF;
    IF c.planner = 'none' THEN
        PERFORM _finish_drained(c);
    ELSE
        PERFORM _emit(p_campaign, NULL, 'campaign.drained');
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION _finish_drained(c campaigns) RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_unresolved bigint[];
    v_success jsonb;
BEGIN
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO v_unresolved
      FROM steps
     WHERE campaign_id = c.id AND parent_id IS NULL AND continued_by IS NULL
       AND NOT (status = 'done' OR (status = 'skipped' AND skip_cause IN ('abort', 'threshold')));
    IF cardinality(v_unresolved) > 0 THEN
        PERFORM _end_campaign(c.id, 'failed', format('top-level steps did not succeed: %s', array_to_string(v_unresolved, ', ')));
        RETURN 'failed';
    END IF;
    IF c.success_metric IS NOT NULL AND c.success_target IS NOT NULL THEN
        v_success := check_success(c.id);
        IF (v_success ->> 'met')::boolean IS NOT TRUE THEN
            PERFORM _end_campaign(c.id, 'failed', format('success contract not met: %s', v_success ->> 'reason'));
            RETURN 'failed';
        END IF;
        PERFORM _end_campaign(c.id, 'done', format('success contract met: %s', v_success ->> 'reason'));
        RETURN 'done';
    END IF;
    -- Only a planner's `done` ends a campaign that never had a step (SPEC §13: never having
    -- had one is not being drained); it says so rather than "all steps done".
    IF NOT _has_had_steps(c.id) THEN
        PERFORM _end_campaign(c.id, 'done', 'its planner found nothing to do: no step was ever added');
        RETURN 'done';
    END IF;
    PERFORM _end_campaign(c.id, 'done', 'all steps done');
    RETURN 'done';
END
$$;

CREATE OR REPLACE FUNCTION _end_campaign(p_campaign uuid, p_status text, p_reason text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_open bigint[];
BEGIN
    IF p_status <> 'done' THEN
        SELECT coalesce(array_agg(id), '{}') INTO v_open FROM steps
         WHERE campaign_id = p_campaign AND status IN ('pending', 'running', 'waiting_input');
        IF cardinality(v_open) > 0 THEN
            PERFORM _skip_cascade(p_campaign, v_open, 'campaign', format('campaign %s', p_status));
        END IF;
    END IF;
    UPDATE campaigns
       SET status = p_status, status_reason = p_reason, completed_at = _clock(), updated_at = now(),
           planner_lease_until = NULL
     WHERE id = p_campaign AND status IN ('active', 'paused');
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM _emit(p_campaign, NULL, 'campaign.' || p_status, jsonb_build_object('reason', p_reason));
    PERFORM _notify_campaign(p_campaign, CASE p_status WHEN 'done' THEN 'done' ELSE 'error' END,
        format('Campaign %s: %s', p_status, p_reason));
END
$$;

CREATE OR REPLACE FUNCTION finish_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is already %s', c.id, c.status));
    END IF;
    IF c.open_steps > 0 THEN
        PERFORM _raise('invalid_state', format('campaign %s still has %s open steps', c.id, c.open_steps));
    END IF;
    -- SPEC §13: never having had a step is waiting, not being drained.
    IF NOT _has_had_steps(c.id) THEN
        PERFORM _raise('invalid_state', format('campaign %s has had no steps yet: add_steps to it, or cancel_campaign to end it',
                                              c.id));
    END IF;
    RETURN jsonb_build_object('id', c.id, 'status', _finish_drained(c));
END
$$;

-- sql/engine/completion.sql
CREATE OR REPLACE FUNCTION _after_done(p_campaign uuid, p_step bigint, p_parent bigint) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM _emit(p_campaign, p_step, 'step.done');
    PERFORM _bump_counters(p_campaign, 0, 0, _release_dependents(p_campaign, ARRAY[p_step]));
    IF p_parent IS NOT NULL THEN
        PERFORM _member_settled(p_campaign, p_parent, 1, 0, NULL);
    END IF;
    PERFORM _check_drained(p_campaign);
END
$$;

CREATE OR REPLACE FUNCTION complete_step(step_id bigint, claim_token uuid, summary text DEFAULT '', tokens_used bigint DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tokens bigint := _check_tokens(tokens_used);
BEGIN
    RETURN _complete_step_in(_lock_step_campaign(step_id), step_id, claim_token, summary, v_tokens);
END
$$;

CREATE OR REPLACE FUNCTION _complete_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid, summary text DEFAULT '',
                                         tokens_used bigint DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tokens bigint := _check_tokens(tokens_used);
BEGIN
    RETURN _complete_step_in(_lock_named_step_campaign(campaign_id, step_id), step_id, claim_token, summary, v_tokens);
END
$$;

CREATE OR REPLACE FUNCTION _complete_step_in(p_campaign uuid, step_id bigint, claim_token uuid, summary text, p_tokens bigint)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_parent bigint;
    v_claimed_at timestamptz;
    v_locks text[];
    v_ready integer;
    v_open integer;
    v_status text;
    v_budget bigint;
    s steps;
BEGIN
    UPDATE steps
       SET status = 'done', output = coalesce(summary, ''), tokens_used = steps.tokens_used + p_tokens,
           duration_ms = (extract(epoch FROM _clock() - claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = p_campaign AND id = step_id
       AND steps.claim_token = _complete_step_in.claim_token AND status = 'running' AND steps.verify IS NULL
    RETURNING parent_id, claimed_at, requires_locks INTO v_parent, v_claimed_at, v_locks;
    IF NOT FOUND THEN
        SELECT * INTO s FROM steps WHERE steps.campaign_id = p_campaign AND id = step_id;
        -- SPEC §17: a step with a check stays running, the summary stored, until its command
        -- passed (record_verification); the caller runs the command.
        IF s.verify IS NOT NULL AND s.status = 'running' AND s.claim_token = claim_token THEN
            UPDATE steps
               SET output = coalesce(summary, ''), tokens_used = steps.tokens_used + p_tokens,
                   verification_requested_at = _clock()
             WHERE steps.campaign_id = p_campaign AND id = s.id;
            -- Tokens were spent whatever the check says.
            IF p_tokens > 0 THEN
                UPDATE campaigns SET tokens_used = campaigns.tokens_used + p_tokens WHERE id = p_campaign;
                PERFORM _enforce_budget(p_campaign);
            END IF;
            PERFORM _emit(p_campaign, s.id, 'step.verifying', jsonb_build_object('verify', s.verify));
            RETURN jsonb_build_object('step_id', s.id, 'status', 'running', 'accepted', true,
                                      'verification', 'pending', 'verify', s.verify,
                                      'message', 'the step is done once its verify command passes');
        END IF;
        -- A worker whose step was skipped under it (abort, cancel) is told so; what it
        -- produced is kept on the step for audit, and nothing else changes.
        IF s.status = 'skipped' AND s.claim_token = claim_token THEN
            UPDATE steps SET output = coalesce(steps.output, summary) WHERE steps.campaign_id = p_campaign AND id = s.id;
            RETURN jsonb_build_object('step_id', s.id, 'status', 'skipped', 'accepted', false,
                'message', format('step %s was skipped (%s) while you worked; your output was kept for the record',
                                  s.id, coalesce(s.error, s.skip_cause)));
        END IF;
        -- SPEC §14: the claim that completed the step, repeating itself, gets its first answer.
        IF _finished_claim(p_campaign, s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', p_tokens)) IS NOT NULL THEN
            RETURN _finished_claim(p_campaign, s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', p_tokens));
        END IF;
        PERFORM _check_claim(s, claim_token, 'complete_step');
        PERFORM _raise('invalid_state', format('step %s cannot be completed', s.id));
    END IF;
    PERFORM _emit(p_campaign, step_id, 'step.done');
    v_ready := _release_dependents(p_campaign, ARRAY[step_id]);
    -- One campaign update for every counter this completion moves: it stops running, is no
    -- longer open, made v_ready steps ready and spent p_tokens.
    SELECT r.open_steps, r.status, r.token_budget INTO v_open, v_status, v_budget
      FROM _leave_running(p_campaign, step_id, v_claimed_at, v_locks,
                         p_open => -1, p_ready => v_ready, p_tokens => p_tokens) r;
    IF v_parent IS NOT NULL THEN
        PERFORM _member_settled(p_campaign, v_parent, 1, 0, NULL);
    END IF;
    IF v_parent IS NOT NULL OR v_open = 0 OR v_budget IS NOT NULL THEN
        PERFORM _check_drained(p_campaign);
        IF v_budget IS NOT NULL THEN
            PERFORM _enforce_budget(p_campaign);
        END IF;
        SELECT status INTO v_status FROM campaigns WHERE id = p_campaign;
    END IF;
    RETURN _keep_finished_claim(p_campaign, step_id, claim_token, 'complete_step',
                                jsonb_build_object('summary', summary, 'tokens_used', p_tokens),
                                jsonb_build_object('step_id', step_id, 'status', 'done', 'accepted', true,
                                                   'campaign_status', v_status));
END
$$;

CREATE OR REPLACE FUNCTION record_verification(step_id bigint, claim_token uuid, passed boolean, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _record_verification_in(_lock_claimed_step(step_id, claim_token, 'record_verification'), step_id, claim_token, passed, output);
END
$$;

CREATE OR REPLACE FUNCTION _record_verification_delegated(campaign_id uuid, step_id bigint, claim_token uuid, passed boolean, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _record_verification_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'record_verification'), step_id, claim_token, passed, output);
END
$$;

CREATE OR REPLACE FUNCTION _record_verification_in(s steps, step_id bigint, claim_token uuid, passed boolean, output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_ready integer;
    v_status text;
    v_open integer;
    v_output text := right(coalesce(output, ''), 4000);
BEGIN
    PERFORM _require(passed IS NOT NULL, 'passed');
    IF s.verify IS NULL OR s.verification_requested_at IS NULL OR s.verification_requested_at < s.claimed_at THEN
        PERFORM _raise('invalid_state', format('step %s has no verification pending: complete_step asks for it', s.id));
    END IF;
    IF NOT coalesce(passed, false) THEN
        v_status := _attempt_failed(s, format('verification failed: `%s` did not pass:%s%s', s.verify, E'\n', v_output));
        SELECT status INTO v_status FROM steps WHERE steps.campaign_id = s.campaign_id AND id = s.id;
        RETURN jsonb_build_object('step_id', s.id, 'status', v_status, 'accepted', false, 'verification', 'failed',
                                  'will_retry', v_status = 'pending');
    END IF;
    UPDATE steps
       SET status = 'done', verification = v_output,
           duration_ms = (extract(epoch FROM _clock() - s.claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _emit(s.campaign_id, s.id, 'step.done', jsonb_build_object('verified', true));
    v_ready := _release_dependents(s.campaign_id, ARRAY[s.id]);
    SELECT r.open_steps INTO v_open
      FROM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1, p_ready => v_ready) r;
    IF s.parent_id IS NOT NULL THEN
        PERFORM _member_settled(s.campaign_id, s.parent_id, 1, 0, NULL);
    END IF;
    PERFORM _check_drained(s.campaign_id);
    SELECT status INTO v_status FROM campaigns WHERE id = s.campaign_id;
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'accepted', true, 'verification', 'passed',
                              'campaign_status', v_status);
END
$$;

CREATE OR REPLACE FUNCTION _complete_many(p_campaign uuid, p_ids bigint[], p_tokens uuid[], p_summaries text[], p_used bigint[])
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_count integer := cardinality(p_ids);
    v_done integer;
    v_claimed timestamptz[];
    v_leased bigint[];
    v_slot double precision;
    v_claimed_at timestamptz;
    v_ready integer;
    v_open integer;
    v_before text;
    v_after text;
    v_answers jsonb;
BEGIN
    SELECT c.slot_seconds_used INTO v_slot FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    WITH done AS (
        UPDATE steps s
           SET status = 'done', output = i.summary, tokens_used = s.tokens_used + i.used,
               duration_ms = (extract(epoch FROM v_now - s.claimed_at) * 1000)::bigint,
               completed_at = v_now, claim_token = NULL, lease_expires_at = NULL
          FROM unnest(p_ids, p_tokens, p_summaries, p_used) AS i(id, token, summary, used)
         WHERE s.campaign_id = p_campaign AND s.id = i.id AND s.claim_token = i.token
           AND s.status = 'running' AND s.verify IS NULL AND s.parent_id IS NULL
        RETURNING s.id, s.claimed_at, cardinality(s.requires_locks) > 0 AS leased)
    SELECT count(*), array_agg(d.claimed_at ORDER BY d.id),
           coalesce(array_agg(d.id ORDER BY d.id) FILTER (WHERE d.leased), '{}')
      INTO v_done, v_claimed, v_leased
      FROM done d;
    -- The items were chosen under the campaign lock (_complete_run_items): each one completes.
    IF v_done <> v_count THEN
        RAISE EXCEPTION 'complete_steps: % of % items chosen for the set-wise path completed', v_done, v_count;
    END IF;
    PERFORM _emit_many(p_campaign, p_ids, 'step.done');
    v_ready := _release_dependents(p_campaign, p_ids);
    FOREACH v_claimed_at IN ARRAY v_claimed LOOP
        v_slot := greatest(v_slot + _slot_correction(v_claimed_at), 0);
    END LOOP;
    UPDATE campaigns c
       SET slot_seconds_used = v_slot,
           tokens_used = c.tokens_used + (SELECT sum(u) FROM unnest(p_used) u),
           running_steps = c.running_steps - v_count, open_steps = c.open_steps - v_count,
           ready_steps = c.ready_steps + v_ready, updated_at = now()
     WHERE c.id = p_campaign
    RETURNING c.open_steps, c.status INTO v_open, v_before;
    v_after := v_before;
    IF cardinality(v_leased) > 0 THEN
        DELETE FROM resource_leases WHERE campaign_id = p_campaign AND step_id = ANY (v_leased);
    END IF;
    IF v_open = 0 THEN
        PERFORM _check_drained(p_campaign);
        SELECT c.status INTO v_after FROM campaigns c WHERE c.id = p_campaign;
    END IF;
    -- SPEC §14, as _keep_finished_claim keeps each.
    DELETE FROM finished_claims f
     WHERE f.campaign_id = p_campaign
       AND f.claim_token IN (SELECT o.claim_token FROM finished_claims o
                              WHERE o.campaign_id = p_campaign AND o.created_at < now() - _idempotency_retention()
                              ORDER BY o.created_at LIMIT 10 * v_count);
    WITH answers AS (
        SELECT k.id, k.token, k.summary, k.used,
               jsonb_build_object('step_id', k.id, 'status', 'done', 'accepted', true,
                                  'campaign_status', CASE WHEN k.n = v_count THEN v_after ELSE v_before END) AS answer,
               k.n
          FROM unnest(p_ids, p_tokens, p_summaries, p_used) WITH ORDINALITY AS k(id, token, summary, used, n)),
    kept AS (
        INSERT INTO finished_claims (campaign_id, claim_token, step_id, call, arguments_hash, result)
        SELECT p_campaign, a.token, a.id, 'complete_step',
               _arguments_hash(jsonb_build_object('summary', a.summary, 'tokens_used', a.used)), a.answer
          FROM answers a
        ON CONFLICT DO NOTHING)
    SELECT jsonb_agg(a.answer ORDER BY a.n) INTO v_answers FROM answers a;
    RETURN v_answers;
END
$$;

CREATE OR REPLACE FUNCTION _complete_run_items(p_campaign uuid, p_items jsonb, p_steps bigint[], p_campaigns uuid[])
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_budget bigint;
    v_tokens bigint;
    v_ords bigint[];
    v_ids bigint[];
    v_claims uuid[];
    v_fit bigint[];
BEGIN
    SELECT c.token_budget, c.tokens_used INTO v_budget, v_tokens
      FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    IF NOT FOUND OR v_budget IS NOT NULL OR v_tokens > 8000000000000000000 THEN
        RETURN '{}';
    END IF;
    -- The well-formed first items of their steps, from the items alone. Arrays, not a join with
    -- steps: a cached generic plan cannot know there are few items and would read the campaign.
    SELECT coalesce(array_agg(f.ordinality ORDER BY f.id), '{}'), coalesce(array_agg(f.id ORDER BY f.id), '{}'),
           coalesce(array_agg(f.token ORDER BY f.id), '{}')
      INTO v_ords, v_ids, v_claims
      FROM (SELECT i.ordinality, i.id,
                   CASE WHEN jsonb_typeof(i.v -> 'claim_token') = 'string'
                             AND i.v ->> 'claim_token' ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                        THEN (i.v ->> 'claim_token')::uuid END AS token
              FROM (SELECT e.ordinality, m.id, e.value AS v,
                           min(e.ordinality) OVER (PARTITION BY m.id) AS first_for_step
                      FROM jsonb_array_elements(p_items) WITH ORDINALITY e
                      JOIN unnest(p_steps, p_campaigns) AS m(id, campaign_id)
                        ON m.campaign_id = p_campaign
                       AND m.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                            AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                       THEN (e.value ->> 'step_id')::numeric::bigint END) i
             WHERE i.ordinality = i.first_for_step
               AND i.v ->> 'step_id' ~ '^[0-9]{1,19}$'
               AND (coalesce(jsonb_typeof(i.v -> 'tokens_used'), 'null') = 'null'
                    OR (jsonb_typeof(i.v -> 'tokens_used') = 'number' AND i.v ->> 'tokens_used' ~ '^[0-9]{1,15}$'))) f
     WHERE f.token IS NOT NULL;
    IF cardinality(v_ids) = 0 THEN
        RETURN '{}';
    END IF;
    -- Their steps as complete_step would find them.
    SELECT coalesce(array_agg(s.id), '{}') INTO v_fit
      FROM steps s
      JOIN unnest(v_ids, v_claims) AS c(id, token) ON c.id = s.id
     WHERE s.campaign_id = p_campaign AND s.id = ANY (v_ids)
       AND s.claim_token = c.token AND s.status = 'running'
       AND s.step_type = 'atomic' AND s.parent_id IS NULL AND s.verify IS NULL
       AND s.tokens_used < 8000000000000000000;
    -- Less those with a compound dependent (opening one writes events of its own).
    SELECT coalesce(array_agg(x), '{}') INTO v_fit
      FROM unnest(v_fit) x
     WHERE x <> ALL (coalesce((SELECT array_agg(d.depends_on)
                                 FROM step_dependencies d
                                 JOIN steps t ON t.campaign_id = d.campaign_id AND t.id = d.step_id
                                WHERE d.campaign_id = p_campaign AND d.depends_on = ANY (v_fit)
                                  AND t.step_type <> 'atomic'), '{}'));
    RETURN ARRAY(SELECT o FROM unnest(v_ords, v_ids) AS a(o, id) WHERE a.id = ANY (v_fit));
END
$$;

CREATE OR REPLACE FUNCTION complete_steps(items jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_item record;
    v_step_ids bigint[];
    v_campaigns uuid[];
    v_campaign uuid;
    v_fast boolean := NOT _on_citus();
    v_run_items bigint[] := '{}';
    -- The pending run of set-wise items (in step order) and its campaign.
    v_run_campaign uuid;
    v_ids bigint[] := '{}';
    v_tokens uuid[] := '{}';
    v_summaries text[] := '{}';
    v_used bigint[] := '{}';
    v_completed jsonb := '[]';
    v_refused jsonb := '[]';
    v_code text;
    v_message text;
BEGIN
    IF items IS NULL OR jsonb_typeof(items) <> 'array' OR jsonb_array_length(items) NOT BETWEEN 1 AND 1000 THEN
        PERFORM _raise('invalid_argument', 'items must be a JSON array of 1 to 1000 {step_id, claim_token, summary, tokens_used} objects');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(items) e WHERE jsonb_typeof(e) <> 'object') THEN
        PERFORM _raise('invalid_argument', 'each item must be an object {step_id, claim_token, summary, tokens_used}');
    END IF;
    -- The items' steps and their campaigns, for the order only; each item is checked below.
    -- bigint, not numeric: `id = numeric` cannot use the primary key (a scan of steps per batch).
    -- Read apart from the items: under Citus, steps is distributed by campaign, and the steps
    -- of a batch are looked up by id across campaigns.
    v_step_ids := ARRAY(SELECT CASE WHEN jsonb_typeof(e -> 'step_id') = 'number'
                                         AND (e ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                    THEN (e ->> 'step_id')::numeric::bigint END
                          FROM jsonb_array_elements(items) e);
    SELECT coalesce(array_agg(s.id), '{}'), coalesce(array_agg(s.campaign_id), '{}') INTO v_step_ids, v_campaigns
      FROM steps s
     WHERE s.id = ANY (v_step_ids);
    FOR v_item IN
        SELECT e.value AS item, e.ordinality, s.campaign_id
          FROM jsonb_array_elements(items) WITH ORDINALITY e
          LEFT JOIN unnest(v_step_ids, v_campaigns) AS s(id, campaign_id)
            ON s.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                           THEN (e.value ->> 'step_id')::numeric::bigint END
         ORDER BY s.campaign_id, s.id, e.ordinality
    LOOP
        -- Consecutive set-wise items gather into a run; any other item first completes the run
        -- before it, so that answers and events keep the one-at-a-time order.
        IF cardinality(v_ids) > 0
           AND (v_item.campaign_id IS DISTINCT FROM v_run_campaign OR NOT v_item.ordinality = ANY (v_run_items)) THEN
            v_completed := v_completed || _complete_many(v_run_campaign, v_ids, v_tokens, v_summaries, v_used);
            v_ids := '{}'; v_tokens := '{}'; v_summaries := '{}'; v_used := '{}';
        END IF;
        -- Entering a campaign (in id order, so the lock order stays campaign, then steps): the
        -- items that may go set-wise, chosen under its lock.
        IF v_fast AND v_item.campaign_id IS NOT NULL AND v_item.campaign_id IS DISTINCT FROM v_campaign THEN
            v_campaign := v_item.campaign_id;
            v_run_items := _complete_run_items(v_campaign, items, v_step_ids, v_campaigns);
        END IF;
        IF v_fast AND v_item.ordinality = ANY (v_run_items) AND v_item.campaign_id = v_campaign THEN
            v_run_campaign := v_campaign;
            v_ids := v_ids || (v_item.item ->> 'step_id')::bigint;
            v_tokens := v_tokens || (v_item.item ->> 'claim_token')::uuid;
            v_summaries := v_summaries || coalesce(v_item.item ->> 'summary', '');
            v_used := v_used || coalesce((v_item.item ->> 'tokens_used')::bigint, 0);
            CONTINUE;
        END IF;
        BEGIN
            IF jsonb_typeof(v_item.item -> 'step_id') IS DISTINCT FROM 'number'
               OR jsonb_typeof(v_item.item -> 'claim_token') IS DISTINCT FROM 'string' THEN
                PERFORM _raise('invalid_argument', 'step_id (a number) and claim_token (a string) are required');
            END IF;
            v_completed := v_completed || jsonb_build_array(complete_step(
                (v_item.item ->> 'step_id')::bigint,
                (v_item.item ->> 'claim_token')::uuid,
                coalesce(v_item.item ->> 'summary', ''),
                coalesce((v_item.item ->> 'tokens_used')::bigint, 0)));
        EXCEPTION
            WHEN SQLSTATE 'SR001' OR SQLSTATE 'SR002' OR SQLSTATE 'SR003' OR SQLSTATE 'SR005'
                 OR SQLSTATE 'SR006' OR SQLSTATE 'SR008' OR SQLSTATE 'SR009'
                 OR invalid_text_representation OR numeric_value_out_of_range THEN
                GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT;
                v_code := CASE WHEN v_message ~ '^[a-z_]+: ' THEN split_part(v_message, ': ', 1) ELSE 'invalid_argument' END;
                v_refused := v_refused || jsonb_build_array(jsonb_build_object(
                    'step_id', v_item.item -> 'step_id', 'code', v_code,
                    'message', CASE WHEN v_message ~ '^[a-z_]+: ' THEN substr(v_message, length(v_code) + 3) ELSE v_message END));
        END;
    END LOOP;
    IF cardinality(v_ids) > 0 THEN
        v_completed := v_completed || _complete_many(v_run_campaign, v_ids, v_tokens, v_summaries, v_used);
    END IF;
    RETURN jsonb_build_object('completed', v_completed, 'refused', v_refused);
END
$$;

-- sql/engine/failure_retry.sql
CREATE OR REPLACE FUNCTION _settle_failed(s steps, p_error text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_open_children bigint[];
    v_dependents bigint[];
BEGIN
    UPDATE steps SET status = 'failed', error = p_error, completed_at = _clock(),
                     claim_token = NULL, claim_owner = NULL, lease_expires_at = NULL
     WHERE campaign_id = s.campaign_id AND id = s.id;
    -- An atomic step only fails from running, and its caller has already taken it off the
    -- running count and released its lock keys (leave_running); a compound step is never
    -- counted as running or ready and holds no keys.
    PERFORM _bump_counters(s.campaign_id, -1, 0, 0);
    PERFORM _emit(s.campaign_id, s.id, 'step.failed', jsonb_build_object('error', p_error));

    -- A failed compound step's open children have nothing left to serve.
    SELECT coalesce(array_agg(id), '{}') INTO v_open_children
      FROM steps WHERE campaign_id = s.campaign_id AND parent_id = s.id AND status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_open_children) > 0 THEN
        PERFORM _skip_cascade(s.campaign_id, v_open_children, 'parent', format('parent step %s failed', s.id));
    END IF;

    -- The parent hears of this failure before of the skips it causes, so its verdict names it;
    -- with fail_fast the parent fails at once, which skips the open siblings.
    IF s.parent_id IS NOT NULL AND s.continued_by IS NULL THEN
        PERFORM _member_settled(s.campaign_id, s.parent_id, 0, 1, s.id);
    END IF;

    SELECT coalesce(array_agg(step_id), '{}') INTO v_dependents
      FROM step_dependencies WHERE campaign_id = s.campaign_id AND depends_on = s.id;
    IF cardinality(v_dependents) > 0 THEN
        PERFORM _skip_cascade(s.campaign_id, v_dependents, 'dependency', format('dependency step %s failed', s.id));
    END IF;

    IF s.parent_id IS NULL AND s.failure_policy = 'fail_fast' THEN
        PERFORM _end_campaign(s.campaign_id, 'failed', format('step %s failed under fail_fast', s.id));
        RETURN;
    END IF;
    PERFORM _check_drained(s.campaign_id);
END
$$;

CREATE OR REPLACE FUNCTION _retry_backoff(p_attempts integer) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT make_interval(secs => least(10 * power(2, greatest(p_attempts - 1, 0)), 600)) $$;

CREATE OR REPLACE FUNCTION _attempt_failed(s steps, p_error text) RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks);
    IF s.attempts + 1 < s.max_attempts THEN
        UPDATE steps
           SET status = 'pending', attempts = attempts + 1, error = p_error,
               not_before = _clock() + _retry_backoff(s.attempts + 1),
               claim_token = NULL, claim_owner = NULL, lease_expires_at = NULL
         WHERE campaign_id = s.campaign_id AND id = s.id;
        PERFORM _bump_counters(s.campaign_id, 0, 0, 1);
        PERFORM _lower_ready_floor(s.campaign_id, s.id);
        PERFORM _emit(s.campaign_id, s.id, 'step.retry', jsonb_build_object('error', p_error, 'attempts', s.attempts + 1));
        RETURN 'pending';
    END IF;
    UPDATE steps SET attempts = attempts + 1 WHERE campaign_id = s.campaign_id AND id = s.id RETURNING * INTO s;
    PERFORM _settle_failed(s, p_error);
    RETURN 'failed';
END
$$;

CREATE OR REPLACE FUNCTION fail_step(step_id bigint, claim_token uuid, error text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _fail_step_in(_lock_step_campaign(step_id), step_id, claim_token, error);
END
$$;

CREATE OR REPLACE FUNCTION _fail_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid, error text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _fail_step_in(_lock_named_step_campaign(campaign_id, step_id), step_id, claim_token, error);
END
$$;

CREATE OR REPLACE FUNCTION _fail_step_in(p_campaign uuid, step_id bigint, claim_token uuid, error text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    -- SPEC §14: the claim that failed the step, repeating itself, gets its first answer.
    v_replay jsonb := _finished_claim(p_campaign, step_id, claim_token, 'fail_step', jsonb_build_object('error', error));
    s steps;
    v_now text;
    v_not_before timestamptz;
BEGIN
    IF v_replay IS NOT NULL THEN
        RETURN v_replay;
    END IF;
    SELECT * INTO s FROM steps x WHERE x.campaign_id = p_campaign AND x.id = step_id FOR UPDATE;
    s := _check_claim(s, claim_token, 'fail_step');
    v_now := _attempt_failed(s, coalesce(nullif(error, ''), 'failed without a reason'));
    -- Read apart from the call below: a rule called in a query over a per-campaign table may
    -- not run queries of its own (Citus runs the whole query on the campaign's shard).
    SELECT x.not_before INTO v_not_before FROM steps x
     WHERE x.campaign_id = p_campaign AND x.id = s.id AND x.status = 'pending';
    RETURN _keep_finished_claim(p_campaign, s.id, claim_token, 'fail_step', jsonb_build_object('error', error),
        jsonb_build_object('step_id', s.id, 'status', v_now,
        'attempts', s.attempts + 1, 'max_attempts', s.max_attempts, 'will_retry', v_now = 'pending',
        'not_before', v_not_before));
END
$$;

-- sql/engine/scope.sql
CREATE OR REPLACE FUNCTION _worker_confined() RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT pg_has_role(session_user, 'sortie_worker', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_coordinator', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_runner', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_reader', 'MEMBER');
$$;

CREATE OR REPLACE FUNCTION _worker_campaign(p_campaign uuid, p_step bigint, p_token uuid, p_call text)
RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_campaign uuid;
BEGIN
    IF p_token IS NULL THEN
        IF _worker_confined() THEN
            PERFORM _raise('forbidden', format(
                '%s needs the claim token of your step (claim_token, or SORTIE_CLAIM_TOKEN): a worker sees only the campaign of the step it holds',
                p_call));
        END IF;
        RETURN p_campaign;
    END IF;
    IF p_step IS NOT NULL THEN
        SELECT s.campaign_id INTO v_campaign FROM steps s
         WHERE s.id = p_step AND s.claim_token = p_token AND s.status = 'running';
    ELSE
        SELECT s.campaign_id INTO v_campaign FROM steps s
         WHERE s.claim_token = p_token AND s.status = 'running' AND s.step_type = 'atomic';
    END IF;
    IF v_campaign IS NULL THEN
        PERFORM _raise('stale_claim', format(
            '%s: the claim token is not the current claim of %s (its lease expired, it was reset or it finished); stop working on it',
            p_call, CASE WHEN p_step IS NULL THEN 'a running step' ELSE 'step ' || p_step END));
    END IF;
    IF p_campaign IS NOT NULL AND p_campaign <> v_campaign THEN
        PERFORM _raise('forbidden', format(
            '%s: campaign %s is not the campaign of your step; a worker sees only its own campaign',
            p_call, p_campaign));
    END IF;
    RETURN v_campaign;
END
$$;

CREATE OR REPLACE FUNCTION _worker_claim_in(p_campaign uuid, p_step bigint, p_token uuid, p_call text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_token IS NULL THEN
        PERFORM _worker_campaign(p_campaign, NULL, NULL, p_call);
        RETURN;
    END IF;
    IF p_step IS NOT NULL THEN
        PERFORM 1 FROM steps s
         WHERE s.campaign_id = p_campaign AND s.id = p_step AND s.claim_token = p_token AND s.status = 'running';
    ELSE
        PERFORM 1 FROM steps s
         WHERE s.campaign_id = p_campaign AND s.claim_token = p_token AND s.status = 'running'
           AND s.step_type = 'atomic';
    END IF;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Refused: _worker_campaign (which looks in every campaign) says why, `forbidden` or
    -- `stale_claim`, in its words.
    PERFORM _worker_campaign(p_campaign, p_step, p_token, p_call);
END
$$;

CREATE OR REPLACE FUNCTION claim_session(claim_token uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_step bigint;
    v_campaign uuid;
BEGIN
    SELECT s.id, s.campaign_id INTO v_step, v_campaign FROM steps s
     WHERE s.claim_token = claim_token AND s.status = 'running' AND s.step_type = 'atomic';
    IF v_step IS NULL THEN
        PERFORM _raise('stale_claim', 'this claim token is not the current claim of a running step');
    END IF;
    RETURN jsonb_build_object('step_id', v_step, 'campaign_id', v_campaign);
END
$$;

-- sql/engine/claim.sql
CREATE OR REPLACE FUNCTION _take_step(p_step bigint, p_campaign uuid, p_parent bigint, p_locks text[],
                          p_owner text, p_lease_seconds integer, p_dispatched boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_expires timestamptz := v_now + make_interval(secs => p_lease_seconds);
    v_token uuid := gen_random_uuid();
    v_parent bigint := p_parent;
    v_started bigint;
    v_action text;
    v_agent text;
    v_depth integer;
    v_attempts integer;
    v_claimed boolean;
BEGIN
    IF cardinality(p_locks) > 0 AND NOT _take_locks(p_step, p_campaign, p_locks, v_expires) THEN
        RETURN NULL;
    END IF;
    UPDATE steps
       SET status = 'running', claim_token = v_token, claim_owner = p_owner,
           claimed_at = v_now, heartbeat_at = v_now, lease_expires_at = v_expires,
           started_at = coalesce(started_at, v_now), dispatched = p_dispatched
     WHERE campaign_id = p_campaign AND id = p_step
    RETURNING action, agent, depth, attempts INTO v_action, v_agent, v_depth, v_attempts;
    v_claimed := FOUND;
    -- A compound step becomes running when its first child starts (its parents with it), and
    -- says so in the log like any other step (SPEC §13).
    WHILE v_parent IS NOT NULL LOOP
        UPDATE steps SET status = 'running', started_at = v_now
         WHERE campaign_id = p_campaign AND id = v_parent AND status = 'pending'
        RETURNING id, parent_id INTO v_started, v_parent;
        EXIT WHEN NOT FOUND;
        PERFORM _emit(p_campaign, v_started, 'step.started', jsonb_build_object('step_type', 'compound'));
    END LOOP;
    PERFORM _emit(p_campaign, p_step, 'step.claimed', jsonb_build_object('owner', p_owner));
    RETURN CASE WHEN v_claimed THEN jsonb_build_object(
        'step_id', p_step, 'campaign_id', p_campaign, 'action', v_action, 'agent', v_agent, 'depth', v_depth,
        'claim_token', v_token, 'lease_expires_at', v_expires, 'attempts', v_attempts) END;
END
$$;

CREATE OR REPLACE FUNCTION _check_lease_seconds(p_lease_seconds integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM _raise('invalid_argument', 'lease_seconds must be from 1 to 604800 (one week)');
    END IF;
    RETURN p_lease_seconds;
END
$$;

CREATE OR REPLACE FUNCTION _claim_in_campaign(p_campaign uuid, p_owner text, p_agent text, p_lease_seconds integer,
                                  p_dispatched boolean DEFAULT false, p_lock_keys_here boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_step bigint;
    v_parent bigint;
    v_locks text[];
    v_claim jsonb;
    v_floor bigint;
    v_first bigint;
    v_after bigint;
    v_now timestamptz := _clock();
    v_citus boolean := _on_citus();
BEGIN
    SELECT ready_floor INTO v_floor FROM campaigns WHERE id = p_campaign;
    -- The first ready step whatever its agent, back-off or lock keys: no ready step lies below
    -- it, so the floor may rise to it.
    IF v_citus THEN
        SELECT id INTO v_first
          FROM steps
         WHERE campaign_id = p_campaign AND id >= v_floor
           AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
         ORDER BY campaign_id, id
         LIMIT 1;
    ELSE
        SELECT id INTO v_first
          FROM steps
         WHERE (campaign_id, id) >= (p_campaign, v_floor) AND campaign_id <= p_campaign
           AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
         ORDER BY campaign_id, id
         LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_first - v_floor > _ready_floor_slack() THEN
        UPDATE campaigns SET ready_floor = v_first WHERE id = p_campaign;
    END IF;
    v_after := v_first - 1;
    LOOP
        IF v_citus THEN
            SELECT id, parent_id, requires_locks INTO v_step, v_parent, v_locks
              FROM steps
             WHERE campaign_id = p_campaign AND id > v_after
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
        ELSE
            SELECT id, parent_id, requires_locks INTO v_step, v_parent, v_locks
              FROM steps
             -- The row comparison is an index condition only an index led by (campaign_id, id)
             -- can take: with a plain `id > v_after` a cached generic plan walked the primary
             -- key through other campaigns' history (13 ms at 10^5 steps, docs/benchmarks.md).
             -- And it is the only lower bound on campaign_id: beside `campaign_id = p_campaign`
             -- the B-tree starts the scan at the equality, the campaign's first entry, and walks
             -- every entry before (p_campaign, v_after); `campaign_id <= p_campaign` ends it.
             WHERE (campaign_id, id) > (p_campaign, v_after) AND campaign_id <= p_campaign
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        -- A claim delegated to a Citus worker (_claim_next_delegated) does not take lock keys,
        -- which are serialised on the coordinator: it says so, and its caller claims there.
        IF NOT p_lock_keys_here AND cardinality(v_locks) > 0 THEN
            RETURN jsonb_build_object('step_id', NULL, 'reason', 'lock_keys');
        END IF;
        v_claim := _take_step(v_step, p_campaign, v_parent, v_locks, p_owner, p_lease_seconds, p_dispatched);
        IF v_claim IS NOT NULL THEN
            RETURN v_claim;
        END IF;
        v_after := v_step;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION _take_plain_steps(p_campaign uuid, p_steps bigint[], p_owner text, p_now timestamptz,
                                 p_expires timestamptz, p_dispatched boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_tokens uuid[] := ARRAY(SELECT gen_random_uuid() FROM generate_series(1, cardinality(p_steps)));
    v_claims jsonb;
BEGIN
    WITH taken AS (
        UPDATE steps s
           SET status = 'running', claim_token = t.token, claim_owner = p_owner,
               claimed_at = p_now, heartbeat_at = p_now, lease_expires_at = p_expires,
               started_at = coalesce(s.started_at, p_now), dispatched = p_dispatched
          FROM unnest(p_steps, v_tokens) AS t(id, token)
         WHERE s.campaign_id = p_campaign AND s.id = t.id
        RETURNING s.id, s.action, s.agent, s.depth, s.attempts, t.token)
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'step_id', t.id, 'campaign_id', p_campaign, 'action', t.action, 'agent', t.agent,
               'depth', t.depth, 'claim_token', t.token, 'lease_expires_at', p_expires,
               'attempts', t.attempts) ORDER BY t.id), '[]')
      INTO v_claims
      FROM taken t;
    PERFORM _emit_many(p_campaign, p_steps, 'step.claimed', jsonb_build_object('owner', p_owner));
    RETURN v_claims;
END
$$;

CREATE OR REPLACE FUNCTION _claim_many(p_campaign uuid, p_owner text, p_agent text, p_lease_seconds integer,
                           p_dispatched boolean, p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_expires timestamptz := _clock() + make_interval(secs => p_lease_seconds);
    v_ready integer;
    v_room integer;
    v_floor bigint;
    v_first bigint;
    v_after bigint;
    v_got integer := 0;
    v_asked integer;
    v_seen integer;
    v_plain bigint[];
    v_claim jsonb;
    v_claims jsonb := '[]';
    r record;
BEGIN
    SELECT c.ready_steps, c.ready_floor,
           CASE WHEN NOT _can_dispatch(c.status, c.max_parallel, c.running_steps, c.token_budget, c.tokens_used) THEN 0
                WHEN c.max_parallel IS NULL THEN p_limit
                ELSE c.max_parallel - c.running_steps END
      INTO v_ready, v_floor, v_room
      FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    v_room := least(p_limit, v_ready, v_room);
    IF v_room <= 0 THEN
        RETURN '[]';
    END IF;
    -- The floor as _claim_in_campaign keeps it.
    SELECT id INTO v_first
      FROM steps
     WHERE (campaign_id, id) >= (p_campaign, v_floor) AND campaign_id <= p_campaign
       AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
     ORDER BY campaign_id, id
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN '[]';
    END IF;
    IF v_first - v_floor > _ready_floor_slack() THEN
        UPDATE campaigns SET ready_floor = v_first WHERE id = p_campaign;
    END IF;
    v_after := v_first - 1;
    -- Rounds: a step whose lock keys are busy is passed over, and the next round looks further.
    LOOP
        v_plain := '{}';
        v_asked := v_room - v_got;
        v_seen := 0;
        FOR r IN
            SELECT id, parent_id, requires_locks
              FROM steps
             WHERE (campaign_id, id) > (p_campaign, v_after) AND campaign_id <= p_campaign
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT v_asked
               FOR UPDATE SKIP LOCKED
        LOOP
            v_after := r.id;
            v_seen := v_seen + 1;
            IF r.parent_id IS NULL AND coalesce(cardinality(r.requires_locks), 0) = 0 THEN
                v_plain := v_plain || r.id;
            ELSE
                -- The plain steps before it first, so that the events keep the claims' order.
                IF cardinality(v_plain) > 0 THEN
                    v_claims := v_claims || _take_plain_steps(p_campaign, v_plain, p_owner, v_now, v_expires, p_dispatched);
                    v_got := v_got + cardinality(v_plain);
                    v_plain := '{}';
                END IF;
                v_claim := _take_step(r.id, p_campaign, r.parent_id, r.requires_locks, p_owner, p_lease_seconds, p_dispatched);
                IF v_claim IS NOT NULL THEN
                    v_claims := v_claims || jsonb_build_array(v_claim);
                    v_got := v_got + 1;
                END IF;
            END IF;
        END LOOP;
        IF cardinality(v_plain) > 0 THEN
            v_claims := v_claims || _take_plain_steps(p_campaign, v_plain, p_owner, v_now, v_expires, p_dispatched);
            v_got := v_got + cardinality(v_plain);
        END IF;
        -- Done when the batch is full or the read found fewer steps than it asked for.
        EXIT WHEN v_got >= v_room OR v_seen < v_asked;
    END LOOP;
    IF v_got = 0 THEN
        RETURN '[]';
    END IF;
    UPDATE campaigns
       SET running_steps = running_steps + v_got, ready_steps = ready_steps - v_got,
           slot_seconds_used = slot_seconds_used + v_got * _provisional_slot_seconds(), updated_at = now()
     WHERE id = p_campaign;
    RETURN (SELECT jsonb_agg(c ORDER BY (c ->> 'step_id')::bigint) FROM jsonb_array_elements(v_claims) c);
END
$$;

CREATE OR REPLACE FUNCTION _claim_one(p_owner text, p_agent text, p_campaign uuid, p_lease integer, p_dispatched boolean,
                           p_lock_keys_here boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid;
    v_claim jsonb;
    v_busy uuid[] := '{}';
    v_round integer;
BEGIN
    IF p_campaign IS NOT NULL THEN
        -- One update locks the campaign and counts the claim; it is taken back when no ready
        -- step fits after all (agent, back-off, lock keys).
        IF NOT _count_claim(p_campaign) THEN
            PERFORM 1 FROM campaigns x WHERE x.id = p_campaign;
            IF NOT FOUND THEN
                PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
            END IF;
            RETURN NULL;
        END IF;
        v_claim := _claim_in_campaign(p_campaign, p_owner, p_agent, p_lease, p_dispatched, p_lock_keys_here);
        IF v_claim IS NULL OR v_claim ->> 'step_id' IS NULL THEN
            PERFORM _uncount_claim(p_campaign);
        END IF;
        RETURN v_claim;
    END IF;
    -- Round 1 skips campaigns another transaction holds; round 2 waits for them, but only if
    -- round 1 found nothing. Each try runs in a subtransaction that is undone when it claims
    -- nothing, so a claimer never keeps a campaign it did not use and never waits while
    -- holding one: two claimers cannot deadlock.
    FOR v_round IN 1..2 LOOP
        FOR v_campaign IN
            SELECT x.id FROM campaigns x
             WHERE x.ready_steps > 0
               AND _can_dispatch(x.status, x.max_parallel, x.running_steps, x.token_budget, x.tokens_used)
               AND (v_round = 1 OR x.id = ANY (v_busy))
             ORDER BY x.slot_seconds_used / x.weight, x.created_at
        LOOP
            BEGIN
                IF v_round = 1 THEN
                    PERFORM 1 FROM campaigns x WHERE x.id = v_campaign FOR UPDATE SKIP LOCKED;
                ELSE
                    PERFORM 1 FROM campaigns x WHERE x.id = v_campaign FOR UPDATE;
                END IF;
                IF NOT FOUND THEN
                    v_busy := v_busy || v_campaign;
                ELSE
                    -- Undone with the subtransaction when nothing is claimed.
                    v_claim := CASE WHEN _count_claim(v_campaign)
                                    THEN _claim_in_campaign(v_campaign, p_owner, p_agent, p_lease, p_dispatched) END;
                    IF v_claim IS NULL THEN
                        RAISE EXCEPTION 'nothing to claim here' USING ERRCODE = 'SR099';
                    END IF;
                    RETURN v_claim;
                END IF;
            EXCEPTION WHEN SQLSTATE 'SR099' THEN
                NULL;
            END;
        END LOOP;
        EXIT WHEN cardinality(v_busy) = 0;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION claim_next(owner text, agent text DEFAULT NULL, campaign_id uuid DEFAULT NULL,
                           lease_seconds integer DEFAULT 900, max_dispatched integer DEFAULT NULL,
                           max_steps integer DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
    v_dispatched boolean := max_dispatched IS NOT NULL;
    v_limit integer := coalesce(max_steps, 1);
    v_claim jsonb;
    v_claims jsonb := '[]';
BEGIN
    PERFORM _check_owner(owner);
    -- SPEC §15: a worker claims only within the campaign of the claim it holds (scope.sql).
    campaign_id := _worker_campaign(campaign_id, NULL, claim_token, 'claim_next');
    IF max_steps IS NOT NULL AND max_steps NOT BETWEEN 1 AND 1000 THEN
        PERFORM _raise('invalid_argument', 'max_steps must be from 1 to 1000');
    END IF;
    -- A runner's dispatch (SPEC §13): claims of all runners take turns on one advisory lock, so
    -- two runners cannot both see the last free slot; pull-mode claims neither wait nor count.
    IF v_dispatched THEN
        IF max_dispatched < 1 THEN
            PERFORM _raise('invalid_argument', 'max_dispatched must be at least 1');
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended('sortie.runner_slots', 0));
        v_limit := least(v_limit, max_dispatched - (SELECT count(*) FROM steps x WHERE x.status = 'running' AND x.dispatched)::integer);
        IF v_limit <= 0 THEN
            RETURN CASE WHEN max_steps IS NULL THEN jsonb_build_object('step_id', NULL, 'reason', 'capacity') ELSE '[]' END;
        END IF;
    END IF;
    -- A batch in one campaign is taken set-wise (_claim_many); across campaigns each claim is
    -- placed by fair share in turn. Under Citus the loop: its statements are the routed ones.
    IF max_steps IS NOT NULL AND campaign_id IS NOT NULL AND NOT _on_citus() THEN
        RETURN _claim_many(campaign_id, owner, agent, v_lease, v_dispatched, v_limit);
    END IF;
    FOR i IN 1..v_limit LOOP
        v_claim := _claim_one(owner, agent, campaign_id, v_lease, v_dispatched);
        EXIT WHEN v_claim IS NULL;
        v_claims := v_claims || jsonb_build_array(v_claim);
    END LOOP;
    IF max_steps IS NOT NULL THEN
        RETURN v_claims;
    END IF;
    RETURN coalesce(v_claims -> 0, jsonb_build_object('step_id', NULL));
END
$$;

CREATE OR REPLACE FUNCTION _claim_next_delegated(campaign_id uuid, owner text, agent text DEFAULT NULL,
                                      lease_seconds integer DEFAULT 900, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
BEGIN
    PERFORM _check_owner(owner);
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _worker_claim_in(campaign_id, NULL, claim_token, 'claim_next');
    RETURN coalesce(_claim_one(owner, agent, campaign_id, v_lease, false, false), jsonb_build_object('step_id', NULL));
END
$$;

CREATE OR REPLACE FUNCTION _claim_candidates("limit" integer DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM _worker_campaign(NULL, NULL, NULL, 'claim_next');
    IF NOT _on_citus() THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT coalesce(jsonb_agg(x.id ORDER BY x.share, x.created_at), '[]')
              FROM (SELECT c.id, c.slot_seconds_used / c.weight AS share, c.created_at
                      FROM campaigns c
                     WHERE c.ready_steps > 0
                       AND _can_dispatch(c.status, c.max_parallel, c.running_steps, c.token_budget, c.tokens_used)
                     ORDER BY share, c.created_at
                     LIMIT least(greatest(coalesce("limit", 5), 1), 20)) x);
END
$$;

CREATE OR REPLACE FUNCTION claim_step(step_id bigint, owner text, lease_seconds integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
    s steps := _lock_step(step_id);
    c campaigns;
    v_claim jsonb;
BEGIN
    PERFORM _check_owner(owner);
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    IF s.step_type <> 'atomic' THEN
        PERFORM _raise('invalid_state', format('step %s is a %s step; only its atomic children are dispatched', s.id, s.step_type));
    ELSIF s.status <> 'pending' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not pending', s.id, s.status));
    ELSIF s.remaining_deps > 0 THEN
        PERFORM _raise('invalid_state', format('step %s still waits for %s dependencies', s.id, s.remaining_deps));
    ELSIF s.not_before > _clock() THEN
        PERFORM _raise('invalid_state', format('step %s is backing off until %s', s.id, s.not_before));
    ELSIF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s', c.id, c.status));
    ELSIF c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN
        PERFORM _raise('budget_exhausted', format('campaign %s has used its token budget', c.id));
    ELSIF c.max_parallel IS NOT NULL AND c.running_steps >= c.max_parallel THEN
        PERFORM _raise('invalid_state', format('campaign %s already runs max_parallel = %s steps', c.id, c.max_parallel));
    END IF;
    v_claim := _take_step(s.id, s.campaign_id, s.parent_id, s.requires_locks, owner, v_lease);
    IF v_claim IS NULL THEN
        PERFORM _raise('invalid_state', format('step %s needs lock keys another running step holds', s.id));
    END IF;
    IF NOT _count_claim(s.campaign_id) THEN
        RAISE EXCEPTION 'internal: campaign % counts no ready step while step % is ready', s.campaign_id, s.id
              USING ERRCODE = 'internal_error';
    END IF;
    RETURN v_claim;
END
$$;

CREATE OR REPLACE FUNCTION _check_owner(p_owner text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_owner IS NULL OR btrim(p_owner) = '' THEN
        PERFORM _raise('invalid_argument', 'owner is required: name the worker or runner that claims');
    END IF;
    RETURN p_owner;
END
$$;

CREATE OR REPLACE FUNCTION dispatch_blockers(max_dispatched integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    l record;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    -- Lock keys are tested against the leases read once (_locks_conflict, lock_keys.sql).
    SELECT * INTO l FROM _live_leases();
    RETURN (
    WITH ready AS (
        SELECT CASE
                   WHEN c.status <> 'active' THEN 'campaign_' || c.status
                   WHEN c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN 'budget'
                   WHEN c.max_parallel IS NOT NULL AND c.running_steps >= c.max_parallel THEN 'max_parallel'
                   WHEN s.not_before > v_now THEN 'backoff'
                   WHEN _locks_conflict(s.requires_locks, NULL, l.keys, l.modes, l.steps) THEN 'locks'
                   ELSE 'claimable' END AS held_by
          FROM steps s JOIN campaigns c ON c.id = s.campaign_id
         WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0
           AND c.status IN ('active', 'paused')
    ),
    slots AS (SELECT count(*) AS in_use FROM steps WHERE status = 'running' AND dispatched)
    SELECT jsonb_build_object(
        'ready_steps', (SELECT count(*) FROM ready),
        'held_back', coalesce((SELECT jsonb_object_agg(held_by, n)
                                 FROM (SELECT held_by, count(*) AS n FROM ready GROUP BY held_by) g), '{}'),
        'runner_slots', jsonb_build_object('in_use', (SELECT in_use FROM slots), 'cap', max_dispatched),
        'capacity_reached', max_dispatched IS NOT NULL AND (SELECT in_use FROM slots) >= max_dispatched));
END
$$;

-- sql/engine/leases.sql
CREATE OR REPLACE FUNCTION heartbeat(step_id bigint, claim_token uuid, extend_leases_sec integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(extend_leases_sec);
BEGIN
    RETURN _heartbeat_in(_lock_step_campaign(step_id), step_id, claim_token, v_lease);
END
$$;

CREATE OR REPLACE FUNCTION _heartbeat_in(p_campaign uuid, p_step bigint, p_token uuid, p_lease integer) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_expires timestamptz := _clock() + make_interval(secs => p_lease);
    s steps;
BEGIN
    PERFORM 1 FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    SELECT * INTO s FROM steps WHERE campaign_id = p_campaign AND id = p_step FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', p_step, p_campaign));
    END IF;
    PERFORM _check_claim(s, p_token, 'heartbeat');
    UPDATE steps SET heartbeat_at = _clock(), lease_expires_at = v_expires
     WHERE campaign_id = p_campaign AND id = p_step;
    IF cardinality(s.requires_locks) > 0 THEN
        UPDATE resource_leases SET expires_at = v_expires
         WHERE resource_leases.campaign_id = p_campaign AND resource_leases.step_id = p_step;
    END IF;
    RETURN jsonb_build_object('step_id', s.id, 'status', 'running', 'lease_expires_at', v_expires);
END
$$;

CREATE OR REPLACE FUNCTION _heartbeat_delegated(campaign_id uuid, step_id bigint, claim_token uuid,
                                    extend_leases_sec integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(extend_leases_sec);
BEGIN
    IF campaign_id IS NULL OR step_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    RETURN _heartbeat_in(campaign_id, step_id, claim_token, v_lease);
END
$$;

CREATE OR REPLACE FUNCTION reset_zombies("limit" integer DEFAULT 1000) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_zombie record;
    s steps;
    v_reset jsonb := '[]';
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    FOR v_zombie IN
        SELECT id, campaign_id FROM steps
         WHERE status = 'running' AND step_type = 'atomic' AND lease_expires_at < v_now
         ORDER BY campaign_id, id
         LIMIT greatest("limit", 0)
    LOOP
        PERFORM _lock_campaign(v_zombie.campaign_id);
        SELECT * INTO s FROM steps WHERE campaign_id = v_zombie.campaign_id AND id = v_zombie.id;
        CONTINUE WHEN s.status <> 'running' OR s.lease_expires_at >= v_now;
        v_reset := v_reset || jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                                  'now', _attempt_failed(s, 'lease expired'));
    END LOOP;
    RETURN jsonb_build_object('reset', jsonb_array_length(v_reset), 'steps', v_reset);
END
$$;

CREATE OR REPLACE FUNCTION release_step(step_id bigint, claim_token uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _release_step_in(_lock_claimed_step(step_id, claim_token, 'release_step'), step_id, claim_token);
END
$$;

CREATE OR REPLACE FUNCTION _release_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _release_step_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'release_step'), step_id, claim_token);
END
$$;

CREATE OR REPLACE FUNCTION _release_step_in(s steps, step_id bigint, claim_token uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks);
    UPDATE steps SET status = 'pending', claim_token = NULL, claim_owner = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _bump_counters(s.campaign_id, 0, 0, 1);
    PERFORM _lower_ready_floor(s.campaign_id, s.id);
    PERFORM _emit(s.campaign_id, s.id, 'step.released');
    RETURN jsonb_build_object('step_id', s.id, 'status', 'pending');
END
$$;

-- sql/engine/budget.sql
CREATE OR REPLACE FUNCTION _enforce_budget(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    UPDATE campaigns SET status = 'paused', status_reason = 'budget_exhausted', updated_at = now()
     WHERE id = p_campaign AND status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
    RETURNING * INTO c;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM _emit(c.id, NULL, 'campaign.paused', jsonb_build_object('reason', 'budget_exhausted',
                 'tokens_used', c.tokens_used, 'token_budget', c.token_budget));
    PERFORM _notify_campaign(c.id, 'milestone', format('Campaign %s paused: token budget exhausted (%s of %s tokens)',
                                                      c.name, c.tokens_used, c.token_budget));
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION enforce_budgets() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_id uuid;
    v_paused integer := 0;
BEGIN
    FOR v_id IN SELECT id FROM campaigns
                 WHERE status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
                 ORDER BY id LOOP
        PERFORM _lock_campaign(v_id);
        IF _enforce_budget(v_id) THEN
            v_paused := v_paused + 1;
        END IF;
    END LOOP;
    RETURN v_paused;
END
$$;

CREATE OR REPLACE FUNCTION _check_tokens(p_tokens bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_tokens IS NOT NULL AND p_tokens < 0 THEN
        PERFORM _raise('invalid_argument', 'tokens_used cannot be negative');
    END IF;
    RETURN coalesce(p_tokens, 0);
END
$$;

-- sql/engine/input.sql
CREATE OR REPLACE FUNCTION request_input(step_id bigint, claim_token uuid, question text, partial_output text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _request_input_in(_lock_claimed_step(step_id, claim_token, 'request_input'), step_id, claim_token, question, partial_output);
END
$$;

CREATE OR REPLACE FUNCTION _request_input_delegated(campaign_id uuid, step_id bigint, claim_token uuid, question text, partial_output text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _request_input_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'request_input'), step_id, claim_token, question, partial_output);
END
$$;

CREATE OR REPLACE FUNCTION _request_input_in(s steps, step_id bigint, claim_token uuid, question text, partial_output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
BEGIN
    IF question IS NULL OR btrim(question) = '' THEN
        PERFORM _raise('invalid_argument', 'question is empty: ask what you need decided');
    END IF;
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks);
    UPDATE steps
       SET status = 'waiting_input', question = _request_input_in.question, answer = NULL,
           output = coalesce(partial_output, steps.output),
           claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _emit(s.campaign_id, s.id, 'input.requested', jsonb_build_object('question', question));
    PERFORM _notify_campaign(s.campaign_id, 'milestone', format('Step %s asks: %s', s.id, question));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'waiting_input',
        'message', 'your step is paused; it will be dispatched again with the answer');
END
$$;

CREATE OR REPLACE FUNCTION provide_input(id uuid, step_id bigint, answer text, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns := _lock_campaign(id);
    s steps;
BEGIN
    PERFORM _require(step_id IS NOT NULL, 'step_id');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer)),
                        _keep(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer),
                              provide_input(id => id, step_id => step_id, answer => answer)));
    END IF;
    IF answer IS NULL OR btrim(answer) = '' THEN
        PERFORM _raise('invalid_argument', 'answer is empty');
    END IF;
    SELECT * INTO s FROM steps WHERE steps.campaign_id = c.id AND steps.id = step_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s has no step %s', c.id, step_id));
    END IF;
    IF s.status <> 'waiting_input' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not waiting for input', s.id, s.status));
    END IF;
    UPDATE steps SET status = 'pending', answer = provide_input.answer, not_before = '-infinity'
     WHERE steps.campaign_id = c.id AND steps.id = s.id;
    PERFORM _bump_counters(c.id, 0, 0, 1);
    PERFORM _lower_ready_floor(c.id, s.id);
    PERFORM _emit(c.id, s.id, 'input.provided', jsonb_build_object('answer', answer));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'pending', 'question', s.question, 'answer', answer);
END
$$;

-- sql/engine/add_steps.sql
CREATE OR REPLACE FUNCTION _newest_continuation(p_campaign uuid, p_step bigint) RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (
        WITH RECURSIVE chain(id, next) AS (
            SELECT s.id, s.continued_by FROM steps s WHERE s.campaign_id = p_campaign AND s.id = p_step
            UNION ALL
            SELECT s.id, s.continued_by FROM steps s JOIN chain c ON s.id = c.next WHERE s.campaign_id = p_campaign
        )
        SELECT chain.id FROM chain WHERE chain.next IS NULL);
END
$$;

CREATE OR REPLACE FUNCTION _unwrap(p_answer jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_answer ? 'error' THEN
        PERFORM _raise(p_answer #>> '{error,code}', p_answer #>> '{error,message}');
    END IF;
    RETURN p_answer -> 'ok';
END
$$;

CREATE OR REPLACE FUNCTION _insert_steps(c campaigns, p_expansion jsonb, p_parent bigint, p_depth integer,
                             p_max_depth integer DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_nodes jsonb := p_expansion -> 'nodes';
    v_count integer := jsonb_array_length(p_expansion -> 'nodes');
    v_ids bigint[];
    v_existing bigint[];
    v_found bigint[];
    v_resolved bigint[];
    v_missing bigint;
    v_zero bigint[];
    v_doomed bigint[];
    v_duplicates jsonb;
    v_keys jsonb;
BEGIN
    IF p_max_depth IS NOT NULL AND p_depth + (p_expansion ->> 'max_level')::integer > p_max_depth THEN
        PERFORM _raise('depth_limit', format(
            'these steps would reach depth %s, beyond the campaign''s max_depth %s; complete your step yourself instead',
            p_depth + (p_expansion ->> 'max_level')::integer, p_max_depth));
    END IF;

    -- Dependencies on existing steps: they must exist in this campaign (SPEC §12: a missing
    -- id is never counted as satisfied).
    SELECT coalesce(array_agg(DISTINCT d::bigint), '{}') INTO v_existing
      FROM jsonb_array_elements(v_nodes) n, jsonb_array_elements_text(n -> 'existing_deps') d;
    IF cardinality(v_existing) > 0 THEN
        v_found := ARRAY(SELECT s.id FROM steps s WHERE s.campaign_id = c.id AND s.id = ANY (v_existing));
        SELECT x INTO v_missing FROM unnest(v_existing) x WHERE NOT x = ANY (v_found) LIMIT 1;
        IF v_missing IS NOT NULL THEN
            PERFORM _raise('not_found', format('depends_on names step %s, which is not a step of campaign %s',
                                              v_missing, c.id));
        END IF;
        -- Each resolved to its newest continuation, before the statements that use them: a
        -- rule called inside a query on a shard may not run queries of its own (Citus).
        v_resolved := ARRAY(SELECT _newest_continuation(c.id, x) FROM unnest(v_existing) x);
    END IF;

    -- Ids are taken up front so that parents and local dependencies resolve in one INSERT.
    SELECT array_agg(nextval(pg_get_serial_sequence('steps', 'id')) ORDER BY g) INTO v_ids
      FROM generate_series(1, v_count) g;

    INSERT INTO steps (id, campaign_id, parent_id, depth, position, action, agent, step_type,
                       failure_policy, completion_threshold, members, remaining_deps, input,
                       fingerprint, max_attempts, requires_locks, verify, created_at)
    OVERRIDING SYSTEM VALUE
    SELECT v_ids[i],
           c.id,
           CASE WHEN n ->> 'parent' IS NULL THEN p_parent ELSE v_ids[(n ->> 'parent')::integer + 1] END,
           p_depth + (n ->> 'level')::integer,
           (n ->> 'position')::integer,
           n ->> 'action',
           n ->> 'agent',
           n ->> 'step_type',
           coalesce(n ->> 'failure_policy', c.failure_policy),
           (n ->> 'completion_threshold')::integer,
           (n ->> 'members')::integer,
           -- the gate of a new compound parent; dependencies are counted below
           CASE WHEN n ->> 'parent' IS NULL THEN 0 ELSE 1 END,
           n -> 'input',
           nullif(n ->> 'fingerprint', ''),
           coalesce((n ->> 'max_attempts')::integer, 3),
           ARRAY(SELECT jsonb_array_elements_text(n -> 'requires_locks')),
           n ->> 'verify',
           _clock()
      FROM jsonb_array_elements(v_nodes) WITH ORDINALITY AS t(n, i);

    INSERT INTO step_dependencies (campaign_id, step_id, depends_on)
    SELECT DISTINCT c.id, v_ids[i], dep
      FROM jsonb_array_elements(v_nodes) WITH ORDINALITY AS t(n, i),
           LATERAL (SELECT v_ids[l::integer + 1] AS dep FROM jsonb_array_elements_text(n -> 'local_deps') l
                    UNION ALL
                    SELECT v_resolved[array_position(v_existing, e::bigint)]
                      FROM jsonb_array_elements_text(n -> 'existing_deps') e) deps;

    UPDATE steps s
       SET remaining_deps = s.remaining_deps + open.n
      FROM (SELECT d.campaign_id, d.step_id, count(*) AS n
              FROM step_dependencies d JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
             WHERE d.campaign_id = c.id AND d.step_id = ANY (v_ids) AND x.status <> 'done'
             GROUP BY d.campaign_id, d.step_id) open
     WHERE s.campaign_id = open.campaign_id AND s.id = open.step_id AND s.campaign_id = c.id;

    PERFORM _bump_counters(c.id, v_count, 0, 0);
    SELECT coalesce(array_agg(id), '{}') INTO v_zero
      FROM steps WHERE campaign_id = c.id AND id = ANY (v_ids) AND remaining_deps = 0;
    PERFORM _unblocked(c.id, v_zero);

    -- A step that depends on a failed or skipped step can never run (SPEC §12: never pending
    -- forever): it is skipped now, with everything that waits on it.
    SELECT coalesce(array_agg(DISTINCT d.step_id), '{}') INTO v_doomed
      FROM step_dependencies d JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
     WHERE d.campaign_id = c.id AND d.step_id = ANY (v_ids) AND x.status IN ('failed', 'skipped');
    IF cardinality(v_doomed) > 0 THEN
        PERFORM _skip_cascade(c.id, v_doomed, 'dependency', 'a dependency had already failed or been skipped');
    END IF;

    -- Advisory dedup: an atomic step matching a non-failed step of the campaign.
    SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', n.id, 'duplicate_of', d.id) ORDER BY n.id), '[]')
      INTO v_duplicates
      FROM steps n
      CROSS JOIN LATERAL (
          SELECT o.id FROM steps o
           -- The campaign by equality here too: Citus routes a lateral subquery with a LIMIT to
           -- one shard only so.
           WHERE o.campaign_id = c.id AND o.fingerprint = n.fingerprint AND o.id < n.id AND o.status <> 'failed'
           ORDER BY o.id LIMIT 1) d
     WHERE n.campaign_id = c.id AND n.id = ANY (v_ids) AND n.fingerprint IS NOT NULL;

    SELECT coalesce(jsonb_object_agg(k, v_ids[(v)::integer + 1]), '{}') INTO v_keys
      FROM jsonb_each_text(p_expansion -> 'keys') AS kv(k, v);

    PERFORM _emit(c.id, NULL, 'steps.added', jsonb_build_object('created', v_count, 'duplicates', v_duplicates));
    RETURN jsonb_build_object(
        'step_ids', (SELECT jsonb_agg(v_ids[(t)::integer + 1] ORDER BY o)
                       FROM jsonb_array_elements_text(p_expansion -> 'top_level') WITH ORDINALITY AS x(t, o)),
        'keys', v_keys,
        'created', v_count,
        'duplicates', v_duplicates);
END
$$;

CREATE OR REPLACE FUNCTION add_steps(campaign_id uuid, steps jsonb, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_expansion jsonb;
    c campaigns;
BEGIN
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _require(steps IS NOT NULL, 'steps: a JSON array of steps');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'add_steps', jsonb_build_object('campaign_id', campaign_id, 'steps', steps)),
                        _keep(request_id, 'add_steps', jsonb_build_object('campaign_id', campaign_id, 'steps', steps),
                              add_steps(campaign_id => campaign_id, steps => steps)));
    END IF;
    v_expansion := _unwrap(_expand_steps(steps));
    c := _lock_campaign(campaign_id);
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; steps can only be added to an active or paused campaign',
                                              c.id, c.status));
    END IF;
    -- SPEC §13: the plan delay held the planner off until the coordinator's first steps; they
    -- are here, so once they drain the planner may follow at once.
    IF c.next_action_at > _clock() AND NOT _has_had_steps(c.id) THEN
        UPDATE campaigns SET next_action_at = _clock() WHERE id = c.id;
    END IF;
    RETURN _insert_steps(c, v_expansion, NULL, 0);
END
$$;

-- sql/engine/splice.sql
CREATE OR REPLACE FUNCTION _spawn_allowed(p_depth integer, p_max_depth integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT p_depth + 1 <= p_max_depth $$;

CREATE OR REPLACE FUNCTION can_spawn(step_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT _spawn_allowed(s.depth, c.max_depth)
              FROM steps s JOIN campaigns c ON c.id = s.campaign_id
             WHERE s.id = $1);
END
$$;

CREATE OR REPLACE FUNCTION _steps_waiting_for(p_campaign uuid, p_step bigint) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE down(id, started_after) AS (
        SELECT p_step, false
        UNION
        SELECT next.id, next.started_after
          FROM down
         CROSS JOIN LATERAL (
             SELECT d.step_id AS id, true AS started_after FROM step_dependencies d
              WHERE d.campaign_id = p_campaign AND d.depends_on = down.id
             UNION ALL
             SELECT s.parent_id, false FROM steps s
              WHERE s.campaign_id = p_campaign AND s.id = down.id AND s.parent_id IS NOT NULL
             UNION ALL
             SELECT s.id, true FROM steps s
              WHERE s.campaign_id = p_campaign AND s.parent_id = down.id AND down.started_after
         ) next
    )
    SELECT DISTINCT down.id FROM down;
END
$$;

CREATE OR REPLACE FUNCTION spawn_and_continue(step_id bigint, claim_token uuid, subtasks jsonb, continuation jsonb,
                                   partial_output text DEFAULT '', request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_arguments jsonb;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('step_id', step_id, 'claim_token', claim_token, 'subtasks', subtasks,
                                          'continuation', continuation, 'partial_output', partial_output);
        RETURN coalesce(_replay(request_id, 'spawn_and_continue', v_arguments),
                        _keep(request_id, 'spawn_and_continue', v_arguments, spawn_and_continue(
                            step_id => step_id, claim_token => claim_token, subtasks => subtasks,
                            continuation => continuation, partial_output => partial_output)));
    END IF;
    RETURN _spawn_and_continue_in(_lock_claimed_step(step_id, claim_token, 'spawn_and_continue'), subtasks,
                                  continuation, partial_output);
END
$$;

CREATE OR REPLACE FUNCTION _spawn_and_continue_delegated(campaign_id uuid, step_id bigint, claim_token uuid, subtasks jsonb,
                                              continuation jsonb, partial_output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _spawn_and_continue_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'spawn_and_continue'),
                                  subtasks, continuation, partial_output);
END
$$;

CREATE OR REPLACE FUNCTION _spawn_and_continue_in(s steps, subtasks jsonb, continuation jsonb, partial_output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_expansion jsonb;
    v_spawned jsonb;
    v_subtask_ids bigint[];
    v_cont_action text;
    v_cont_agent text;
    v_cont_input jsonb;
    v_cont bigint;
    v_cont_deps integer;
    v_deps bigint[];
    v_waiting bigint[];
    v_dep bigint;
    v_cycle_dep bigint;
BEGIN
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    IF subtasks IS NULL OR jsonb_typeof(subtasks) <> 'array' OR jsonb_array_length(subtasks) = 0 THEN
        PERFORM _raise('invalid_argument', 'subtasks must list at least one step; to finish alone, call complete_step');
    END IF;
    IF NOT _spawn_allowed(s.depth, c.max_depth) THEN
        PERFORM _raise('depth_limit', format('step %s is at depth %s and the campaign''s max_depth is %s; complete it yourself',
                                            s.id, s.depth, c.max_depth));
    END IF;
    CASE jsonb_typeof(continuation)
        WHEN 'string' THEN
            v_cont_action := continuation #>> '{}';
        WHEN 'object' THEN
            IF EXISTS (SELECT 1 FROM jsonb_object_keys(continuation) k WHERE k NOT IN ('action', 'agent', 'input')) THEN
                PERFORM _raise('invalid_argument', 'continuation takes action, agent and input only');
            END IF;
            v_cont_action := continuation ->> 'action';
            v_cont_agent := continuation ->> 'agent';
            v_cont_input := continuation -> 'input';
        ELSE
            NULL;
    END CASE;
    IF v_cont_action IS NULL OR btrim(v_cont_action) = '' THEN
        PERFORM _raise('invalid_argument', 'continuation is required: the action that resumes your work once the subtasks are done');
    END IF;
    v_expansion := _unwrap(_expand_steps(subtasks));
    -- SPEC §13: once rewired, whatever waited for this step waits for the continuation, which
    -- waits for the subtasks; a subtask depending on any of those would wait for itself.
    -- The subtasks' dependencies on steps of this campaign, lowest first; the first whose newest
    -- continuation waits for this step is reported. One statement each, no rule called inside
    -- a query on a shard (Citus).
    v_deps := ARRAY(SELECT DISTINCT e::bigint
                      FROM jsonb_array_elements(v_expansion -> 'nodes') n,
                           jsonb_array_elements_text(n -> 'existing_deps') e);
    v_deps := ARRAY(SELECT o.id FROM steps o WHERE o.campaign_id = s.campaign_id AND o.id = ANY (v_deps) ORDER BY o.id);
    IF cardinality(v_deps) > 0 THEN
        v_waiting := ARRAY(SELECT _steps_waiting_for(s.campaign_id, s.id));
        FOREACH v_dep IN ARRAY v_deps LOOP
            IF _newest_continuation(s.campaign_id, v_dep) = ANY (v_waiting) THEN
                v_cycle_dep := v_dep;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF v_cycle_dep IS NOT NULL THEN
        PERFORM _raise('cycle', format(
            'a subtask depends on step %s, which waits for step %s; once the continuation takes step %s''s place they would wait for each other forever. A subtask cannot depend on work that waits for its spawner: drop that dependency',
            v_cycle_dep, s.id, s.id));
    END IF;

    -- New work first, so the campaign never looks drained in between.
    v_spawned := _insert_steps(c, v_expansion, s.id, s.depth + 1, c.max_depth);
    SELECT array_agg(x::bigint) INTO v_subtask_ids FROM jsonb_array_elements_text(v_spawned -> 'step_ids') x;
    -- Counted before the insert: Citus takes no subquery in an INSERT's VALUES.
    SELECT count(*) INTO v_cont_deps
      FROM steps x WHERE x.campaign_id = s.campaign_id AND x.id = ANY (v_subtask_ids) AND x.status <> 'done';

    INSERT INTO steps (campaign_id, parent_id, depth, position, action, agent, step_type, failure_policy,
                       remaining_deps, input, fingerprint, continuation_of, max_attempts, requires_locks, verify,
                       created_at)
    -- The continuation finishes the spawner's work, so the spawner's check (SPEC §17) is its.
    VALUES (s.campaign_id, s.parent_id, s.depth, s.position, v_cont_action, coalesce(v_cont_agent, s.agent), 'atomic',
            s.failure_policy, v_cont_deps,
            coalesce(v_cont_input, s.input),
            _step_fingerprint(v_cont_action, coalesce(v_cont_agent, s.agent), coalesce(v_cont_input, s.input)),
            s.id, s.max_attempts, s.requires_locks, s.verify, _clock())
    RETURNING id INTO v_cont;
    INSERT INTO step_dependencies (campaign_id, step_id, depends_on)
    SELECT s.campaign_id, v_cont, x FROM unnest(v_subtask_ids) x;
    -- Everything that waited for the spawner now waits for the continuation.
    UPDATE step_dependencies SET depends_on = v_cont
     WHERE step_dependencies.campaign_id = s.campaign_id AND step_dependencies.depends_on = s.id;
    PERFORM _bump_counters(s.campaign_id, 1, 0, 0);
    PERFORM _unblocked(s.campaign_id, ARRAY[v_cont]);

    -- The spawner is done but hands its place among its parent's members to the continuation,
    -- so it is neither counted by the parent nor releases anyone.
    UPDATE steps
       SET status = 'done', output = coalesce(partial_output, ''), continued_by = v_cont,
           duration_ms = (extract(epoch FROM _clock() - s.claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1);
    PERFORM _emit(s.campaign_id, s.id, 'step.spliced', jsonb_build_object(
        'subtask_ids', to_jsonb(v_subtask_ids), 'continuation_id', v_cont));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'subtask_ids', to_jsonb(v_subtask_ids),
                              'continuation_id', v_cont, 'keys', v_spawned -> 'keys',
                              'duplicates', v_spawned -> 'duplicates');
END
$$;

-- sql/engine/abort.sql
CREATE OR REPLACE FUNCTION abort_branch(target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _abort_branch_in(_lock_claimed_step(step_id, claim_token, 'abort_branch'), target_id, claim_token, step_id, output, reason);
END
$$;

CREATE OR REPLACE FUNCTION _abort_branch_delegated(campaign_id uuid, target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _abort_branch_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'abort_branch'), target_id, claim_token, step_id, output, reason);
END
$$;

CREATE OR REPLACE FUNCTION _abort_branch_in(caller steps, target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    t steps;
    v_is_ancestor boolean;
    v_children bigint[];
    v_skipped bigint[];
    v_note bigint;
    v_now timestamptz := _clock();
BEGIN
    PERFORM _require(target_id IS NOT NULL, 'target_id');
    IF reason IS NULL OR btrim(reason) = '' THEN
        PERFORM _raise('invalid_argument', 'reason is required: say why this branch is pointless');
    END IF;
    SELECT * INTO t FROM steps WHERE campaign_id = caller.campaign_id AND id = target_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s is not a step of your campaign', target_id));
    END IF;
    WITH RECURSIVE up(id, parent_id) AS (
        SELECT id, parent_id FROM steps WHERE campaign_id = caller.campaign_id AND id = caller.parent_id
        UNION ALL
        SELECT s.id, s.parent_id FROM steps s JOIN up ON s.id = up.parent_id WHERE s.campaign_id = caller.campaign_id
    )
    SELECT EXISTS (SELECT 1 FROM up WHERE up.id = t.id) INTO v_is_ancestor;
    IF NOT v_is_ancestor THEN
        PERFORM _raise('invalid_argument', format('step %s is not an ancestor of your step %s; you can only abort a branch you are inside',
                                                 t.id, caller.id));
    END IF;
    IF t.status IN ('done', 'failed', 'skipped') THEN
        PERFORM _raise('invalid_state', format('step %s is already %s and cannot be aborted', t.id, t.status));
    END IF;

    -- Settle target and caller first, so that the skips below find both closed.
    -- (The time in a variable: Citus refuses a STABLE function inside COALESCE in a
    -- distributed change.)
    UPDATE steps SET status = 'done', output = _abort_branch_in.output, completed_at = v_now,
                     started_at = coalesce(started_at, v_now)
     WHERE campaign_id = t.campaign_id AND id = t.id;
    UPDATE steps SET status = 'done', output = reason, completed_at = _clock(), claim_token = NULL,
                     lease_expires_at = NULL,
                     duration_ms = (extract(epoch FROM _clock() - caller.claimed_at) * 1000)::bigint
     WHERE campaign_id = caller.campaign_id AND id = caller.id;
    PERFORM _emit(caller.campaign_id, caller.id, 'step.done', jsonb_build_object('aborted_branch', t.id));
    -- As in complete_step: the caller's counters and the steps it made ready in one update.
    PERFORM _leave_running(caller.campaign_id, caller.id, caller.claimed_at, caller.requires_locks,
                          p_open => -1, p_ready => _release_dependents(caller.campaign_id, ARRAY[caller.id]));

    SELECT coalesce(array_agg(id), '{}') INTO v_children FROM steps WHERE campaign_id = t.campaign_id AND parent_id = t.id;
    v_skipped := _skip_cascade(caller.campaign_id, v_children, 'abort',
                              format('branch %s aborted by step %s: %s', t.id, caller.id, reason));
    -- The caller counts as a resolved member of its parent, which is closed by now.
    IF caller.continued_by IS NULL THEN
        PERFORM _member_settled(caller.campaign_id, caller.parent_id, 1, 0, NULL);
    END IF;

    INSERT INTO notes (campaign_id, step_id, agent, content, tags)
    VALUES (caller.campaign_id, caller.id, caller.agent,
            format('Aborted branch at step %s (%s): %s', t.id, t.action, reason), ARRAY['abort'])
    RETURNING id INTO v_note;
    PERFORM _emit(caller.campaign_id, caller.id, 'note.added', jsonb_build_object('note_id', v_note, 'tags', ARRAY['abort']));

    PERFORM _bump_counters(t.campaign_id, -1, 0, 0);
    PERFORM _after_done(t.campaign_id, t.id, t.parent_id);
    RETURN jsonb_build_object('target_id', t.id, 'status', 'done', 'skipped', to_jsonb(v_skipped), 'note_id', v_note);
END
$$;

-- sql/engine/campaigns.sql
CREATE OR REPLACE FUNCTION _campaign_summary(c campaigns) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', c.id, 'name', c.name, 'goal', c.goal, 'status', c.status, 'status_reason', c.status_reason,
        'priority', c.priority, 'progress', c.progress, 'strategy', c.strategy, 'guidance', c.guidance,
        'channel', c.channel, 'max_depth', c.max_depth, 'max_parallel', c.max_parallel,
        'token_budget', c.token_budget, 'tokens_used', c.tokens_used, 'failure_policy', c.failure_policy,
        'planner', c.planner, 'open_steps', c.open_steps, 'running_steps', c.running_steps,
        'success_metric', c.success_metric, 'success_target', c.success_target,
        'success_direction', c.success_direction, 'max_iterations', c.max_iterations,
        'next_action_at', c.next_action_at, 'created_at', c.created_at, 'updated_at', c.updated_at,
        'completed_at', c.completed_at);
$$;

CREATE OR REPLACE FUNCTION create_campaign(
    goal text,
    name text DEFAULT NULL,
    channel text DEFAULT NULL,
    priority text DEFAULT 'normal',
    max_depth integer DEFAULT 4,
    token_budget bigint DEFAULT NULL,
    dry_run boolean DEFAULT false,
    success_metric text DEFAULT NULL,
    success_target double precision DEFAULT NULL,
    success_direction text DEFAULT 'max',
    benchmark_command text DEFAULT NULL,
    scope text DEFAULT NULL,
    max_iterations integer DEFAULT NULL,
    max_parallel integer DEFAULT NULL,
    planner text DEFAULT 'llm',
    failure_policy text DEFAULT 'continue',
    context jsonb DEFAULT '{}',
    steps jsonb DEFAULT NULL,
    plan_delay double precision DEFAULT 10,
    request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_expansion jsonb;
    v_steps jsonb;
    v_arguments jsonb;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('goal', goal, 'name', name, 'channel', channel, 'priority', priority,
            'max_depth', max_depth, 'token_budget', token_budget, 'dry_run', dry_run, 'success_metric', success_metric,
            'success_target', success_target, 'success_direction', success_direction,
            'benchmark_command', benchmark_command, 'scope', scope, 'max_iterations', max_iterations,
            'max_parallel', max_parallel, 'planner', planner, 'failure_policy', failure_policy,
            'context', context, 'steps', steps, 'plan_delay', plan_delay);
        RETURN coalesce(_replay(request_id, 'create_campaign', v_arguments),
                        _keep(request_id, 'create_campaign', v_arguments, create_campaign(
                            goal => goal, name => name, channel => channel, priority => priority,
                            max_depth => max_depth, token_budget => token_budget, dry_run => dry_run,
                            success_metric => success_metric, success_target => success_target,
                            success_direction => success_direction, benchmark_command => benchmark_command,
                            scope => scope, max_iterations => max_iterations, max_parallel => max_parallel,
                            planner => planner, failure_policy => failure_policy, context => context,
                            steps => steps, plan_delay => plan_delay)));
    END IF;
    IF goal IS NULL OR btrim(goal) = '' THEN
        PERFORM _raise('invalid_argument', 'goal is required: say what the campaign should accomplish');
    END IF;
    IF coalesce(priority, 'normal') NOT IN ('urgent', 'high', 'normal', 'low', 'background') THEN
        PERFORM _raise('invalid_argument', format('priority %L is not one of urgent, high, normal, low, background', priority));
    END IF;
    IF coalesce(success_direction, 'max') NOT IN ('max', 'min') THEN
        PERFORM _raise('invalid_argument', 'success_direction must be max or min');
    END IF;
    IF coalesce(planner, 'llm') NOT IN ('llm', 'none') THEN
        PERFORM _raise('invalid_argument', 'planner must be llm or none');
    END IF;
    IF coalesce(failure_policy, 'continue') NOT IN ('continue', 'fail_fast') THEN
        PERFORM _raise('invalid_argument', 'failure_policy must be continue or fail_fast');
    END IF;
    IF max_depth IS NOT NULL AND max_depth NOT BETWEEN 0 AND 64 THEN
        PERFORM _raise('invalid_argument', 'max_depth must be from 0 to 64');
    END IF;
    IF max_parallel IS NOT NULL AND max_parallel < 1 THEN
        PERFORM _raise('invalid_argument', 'max_parallel must be at least 1 (omit it for no cap)');
    END IF;
    IF token_budget IS NOT NULL AND token_budget < 1 THEN
        PERFORM _raise('invalid_argument', 'token_budget must be positive (omit it for no budget)');
    END IF;
    IF max_iterations IS NOT NULL AND max_iterations < 1 THEN
        PERFORM _raise('invalid_argument', 'max_iterations must be positive');
    END IF;
    IF name IS NOT NULL AND length(name) NOT BETWEEN 1 AND 200 THEN
        PERFORM _raise('invalid_argument', 'name must be 1 to 200 characters');
    END IF;
    IF context IS NOT NULL AND jsonb_typeof(context) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context must be a JSON object');
    END IF;
    IF plan_delay IS NOT NULL AND NOT (plan_delay BETWEEN 0 AND 86400) THEN
        PERFORM _raise('invalid_argument', 'plan_delay must be from 0 to 86400 seconds');
    END IF;
    IF steps IS NOT NULL THEN
        v_expansion := _unwrap(_expand_steps(steps));
    END IF;

    INSERT INTO campaigns (name, goal, channel, priority, max_depth, token_budget, status, status_reason,
                           success_metric, success_target, success_direction, benchmark_command, scope,
                           max_iterations, max_parallel, planner, failure_policy, context, next_action_at)
    VALUES (coalesce(name, _name_from_goal(goal)), goal, channel, coalesce(priority, 'normal'),
            coalesce(max_depth, 4), token_budget,
            CASE WHEN dry_run THEN 'paused' ELSE 'active' END,
            CASE WHEN dry_run THEN 'dry_run: review, then resume_campaign' END,
            success_metric, success_target, coalesce(success_direction, 'max'), benchmark_command, scope,
            max_iterations, max_parallel, coalesce(planner, 'llm'), coalesce(failure_policy, 'continue'),
            coalesce(context, '{}'),
            -- SPEC §13: a campaign created without steps gives its coordinator plan_delay
            -- seconds to add them before the planner may.
            CASE WHEN v_expansion IS NULL THEN _clock() + make_interval(secs => coalesce(plan_delay, 10))
                 ELSE _clock() END)
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.created', jsonb_build_object('name', c.name));
    IF v_expansion IS NOT NULL THEN
        v_steps := _insert_steps(c, v_expansion, NULL, 0);
    END IF;
    RETURN jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status,
                              'next_action_at', c.next_action_at)
           || CASE WHEN v_steps IS NULL THEN '{}' ELSE jsonb_build_object('steps', v_steps) END;
END
$$;

CREATE OR REPLACE FUNCTION list_campaigns(status text DEFAULT NULL, "limit" integer DEFAULT 20, cursor text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_after_at timestamptz;
    v_after_id uuid;
    v_rows jsonb;
    v_limit integer := least(greatest(coalesce("limit", 20), 1), 200);
BEGIN
    IF status IS NOT NULL AND status NOT IN ('active', 'paused', 'done', 'failed', 'cancelled') THEN
        PERFORM _raise('invalid_argument', format('status %L is not one of active, paused, done, failed, cancelled', status));
    END IF;
    IF cursor IS NOT NULL THEN
        BEGIN
            v_after_at := split_part(cursor, '|', 1)::timestamptz;
            v_after_id := split_part(cursor, '|', 2)::uuid;
        EXCEPTION WHEN others THEN
            PERFORM _raise('invalid_argument', 'cursor is not one this function returned');
        END;
    END IF;
    SELECT coalesce(jsonb_agg(r ORDER BY r_at DESC, r_id DESC), '[]') INTO v_rows FROM (
        SELECT jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status, 'priority', c.priority,
                                  'progress', c.progress, 'open_steps', c.open_steps, 'created_at', c.created_at) AS r,
               c.created_at AS r_at, c.id AS r_id
          FROM campaigns c
         WHERE (list_campaigns.status IS NULL OR c.status = list_campaigns.status)
           AND (v_after_at IS NULL OR (c.created_at, c.id) < (v_after_at, v_after_id))
         ORDER BY c.created_at DESC, c.id DESC
         LIMIT v_limit + 1) page;
    RETURN jsonb_build_object(
        'campaigns', CASE WHEN jsonb_array_length(v_rows) > v_limit THEN v_rows - v_limit ELSE v_rows END,
        'next_cursor', CASE WHEN jsonb_array_length(v_rows) > v_limit
                            THEN (v_rows -> (v_limit - 1) ->> 'created_at') || '|' || (v_rows -> (v_limit - 1) ->> 'id') END);
END
$$;

CREATE OR REPLACE FUNCTION _step_row(s steps, p_depends_on jsonb) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'parent_id', s.parent_id, 'depth', s.depth, 'action', s.action, 'agent', s.agent,
        'step_type', s.step_type, 'status', s.status, 'attempts', s.attempts,
        'error', left(s.error, 300), 'question', s.question,
        'output_chars', length(s.output), 'continuation_of', s.continuation_of,
        'continued_by', s.continued_by, 'skip_cause', s.skip_cause,
        'depends_on', p_depends_on));
$$;

CREATE OR REPLACE FUNCTION get_campaign(id uuid, steps_limit integer DEFAULT 500, steps_cursor text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_after bigint;
    v_limit integer := least(greatest(coalesce(steps_limit, 500), 1), 5000);
    v_steps jsonb;
BEGIN
    IF get_campaign.id IS NULL THEN
        PERFORM _raise('invalid_argument', 'id is required: the campaign to read');
    END IF;
    IF steps_cursor IS NOT NULL THEN
        BEGIN
            v_after := steps_cursor::bigint;
        EXCEPTION WHEN others THEN
            PERFORM _raise('invalid_argument', 'steps_cursor is not one get_campaign returned');
        END;
    END IF;
    SELECT * INTO c FROM campaigns WHERE campaigns.id = get_campaign.id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', get_campaign.id));
    END IF;
    SELECT coalesce(jsonb_agg(_step_row(s, (SELECT jsonb_agg(d.depends_on ORDER BY d.depends_on)
                                              FROM step_dependencies d
                                             WHERE d.campaign_id = c.id AND d.step_id = s.id))
                              ORDER BY s.id), '[]') INTO v_steps
      FROM (SELECT * FROM steps
             WHERE campaign_id = c.id AND (v_after IS NULL OR steps.id > v_after)
             ORDER BY steps.id
             LIMIT v_limit + 1) s;
    RETURN _campaign_summary(c) || jsonb_build_object(
        'step_counts', (SELECT coalesce(jsonb_object_agg(status, n), '{}')
                          FROM (SELECT status, count(*) AS n FROM steps WHERE campaign_id = c.id GROUP BY status) t),
        'steps', CASE WHEN jsonb_array_length(v_steps) > v_limit THEN v_steps - v_limit ELSE v_steps END,
        'next_steps_cursor', CASE WHEN jsonb_array_length(v_steps) > v_limit
                                  THEN (v_steps -> (v_limit - 1) ->> 'id') END,
        'recent_notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'step_id', n.step_id, 'agent', n.agent,
                                    'content', left(n.content, 500), 'tags', n.tags, 'created_at', n.created_at)
                                    ORDER BY n.id DESC), '[]')
                           FROM (SELECT * FROM notes WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) n));
END
$$;

CREATE OR REPLACE FUNCTION steer_campaign(id uuid, guidance text, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance)),
                        _keep(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance),
                              steer_campaign(id => id, guidance => guidance)));
    END IF;
    IF guidance IS NULL OR btrim(guidance) = '' THEN
        PERFORM _raise('invalid_argument', 'guidance is empty: say what should change');
    END IF;
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s and can no longer be steered', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET guidance = campaigns.guidance || jsonb_build_array(jsonb_build_object('at', _clock(), 'text', steer_campaign.guidance)),
           updated_at = now(), next_action_at = _clock()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.steered', jsonb_build_object('guidance', steer_campaign.guidance));
    RETURN jsonb_build_object('id', c.id, 'guidance', c.guidance, 'strategy', c.strategy);
END
$$;

CREATE OR REPLACE FUNCTION pause_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; only an active campaign can be paused', c.id, c.status));
    END IF;
    UPDATE campaigns SET status = 'paused', status_reason = 'paused by request', updated_at = now()
     WHERE campaigns.id = c.id;
    PERFORM _emit(c.id, NULL, 'campaign.paused');
    RETURN jsonb_build_object('id', c.id, 'status', 'paused', 'running_steps', c.running_steps);
END
$$;

CREATE OR REPLACE FUNCTION resume_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'paused' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; only a paused campaign can be resumed', c.id, c.status));
    END IF;
    IF c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN
        PERFORM _raise('budget_exhausted', format(
            'campaign %s has used %s of its %s tokens; raise token_budget before resuming', c.id, c.tokens_used, c.token_budget));
    END IF;
    UPDATE campaigns SET status = 'active', status_reason = NULL, updated_at = now(), next_action_at = _clock()
     WHERE campaigns.id = c.id;
    PERFORM _emit(c.id, NULL, 'campaign.resumed');
    PERFORM _check_drained(c.id);
    RETURN jsonb_build_object('id', c.id, 'status', (SELECT status FROM campaigns WHERE campaigns.id = c.id));
END
$$;

CREATE OR REPLACE FUNCTION cancel_campaign(id uuid, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
    v_open integer := c.open_steps;
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is already %s', c.id, c.status));
    END IF;
    PERFORM _end_campaign(c.id, 'cancelled', coalesce(reason, 'cancelled by request'));
    RETURN jsonb_build_object('id', c.id, 'status', 'cancelled', 'skipped_steps', v_open);
END
$$;

-- sql/engine/success.sql
CREATE OR REPLACE FUNCTION check_success(id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_value double precision;
    v_note bigint;
    v_iterations integer;
BEGIN
    PERFORM _require(check_success.id IS NOT NULL, 'id');
    SELECT * INTO c FROM campaigns WHERE campaigns.id = check_success.id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', check_success.id));
    END IF;
    IF c.success_metric IS NULL THEN
        RETURN jsonb_build_object('met', NULL, 'reason', 'this campaign has no success contract (success_metric is not set)',
                                  'status', c.status);
    END IF;
    -- An iteration is a benchmark run when the campaign has a benchmark (SPEC §17: each run
    -- counts one, with or without a value; workers' own metric notes do not), otherwise a
    -- metric note with a value.
    SELECT CASE WHEN c.benchmark_command IS NOT NULL THEN c.benchmark_runs ELSE count(*) END
      INTO v_iterations FROM notes n
     WHERE n.campaign_id = c.id AND ('metric:' || c.success_metric) = ANY (n.tags)
       AND _parse_metric(c.success_metric, n.content) IS NOT NULL;
    SELECT _parse_metric(c.success_metric, n.content), n.id INTO v_value, v_note
      FROM notes n
     WHERE n.campaign_id = c.id AND ('metric:' || c.success_metric) = ANY (n.tags)
       AND _parse_metric(c.success_metric, n.content) IS NOT NULL
     ORDER BY n.id DESC LIMIT 1;
    RETURN jsonb_build_object(
        'met', CASE WHEN v_value IS NULL THEN false
                    WHEN c.success_target IS NULL THEN NULL
                    ELSE _metric_met(v_value, c.success_target, c.success_direction) END,
        'reason', CASE
            WHEN v_value IS NULL THEN format('no note tagged metric:%s with a value yet', c.success_metric)
            WHEN c.success_target IS NULL THEN format('%s = %s; no target set, so nothing to compare', c.success_metric, v_value)
            WHEN _metric_met(v_value, c.success_target, c.success_direction)
                THEN format('%s = %s meets the target %s (%s)', c.success_metric, v_value, c.success_target, c.success_direction)
            ELSE format('%s = %s does not meet the target %s (%s)', c.success_metric, v_value, c.success_target, c.success_direction) END,
        'metric', c.success_metric,
        'metric_value', v_value,
        'metric_note_id', v_note,
        'target', c.success_target,
        'direction', c.success_direction,
        'iterations_used', v_iterations,
        'max_iterations', c.max_iterations,
        'iterations_exhausted', c.max_iterations IS NOT NULL AND v_iterations >= c.max_iterations,
        'benchmark_command', c.benchmark_command,
        'last_run', c.last_benchmark,
        'status', c.status);
END
$$;

CREATE OR REPLACE FUNCTION take_benchmark(lease_seconds integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_id uuid;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    FOR v_id IN SELECT x.id FROM campaigns x
                 WHERE x.benchmark_due AND x.status = 'active'
                   AND (x.benchmark_lease_until IS NULL OR x.benchmark_lease_until <= v_now)
                 ORDER BY x.updated_at LOOP
        SELECT * INTO c FROM campaigns x
         WHERE x.id = v_id AND x.benchmark_due AND x.status = 'active'
           AND (x.benchmark_lease_until IS NULL OR x.benchmark_lease_until <= v_now)
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND;
    END LOOP;
    IF c.id IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE campaigns SET benchmark_lease_until = _clock() + make_interval(secs => greatest(coalesce(lease_seconds, 900), 1)),
                         benchmark_seen_step = (SELECT max(s.id) FROM steps s WHERE s.campaign_id = c.id)
     WHERE id = c.id;
    RETURN jsonb_build_object('campaign_id', c.id, 'benchmark_command', c.benchmark_command,
                              'success_metric', c.success_metric);
END
$$;

CREATE OR REPLACE FUNCTION record_benchmark(campaign_id uuid, exit_code integer, output text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns := _lock_campaign(campaign_id);
    v_line text;
    v_value double precision;
    v_success jsonb;
    v_status text;
BEGIN
    PERFORM _require(exit_code IS NOT NULL, 'exit_code');
    IF NOT c.benchmark_due OR c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s has no benchmark due', c.id));
    END IF;
    -- Steps added after the run started: it measured the work before them. It is kept as the
    -- last run but judges nothing and counts no iteration; the benchmark runs again once the
    -- campaign drains (at once if it already has).
    IF c.benchmark_seen_step IS NOT NULL
       AND EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id AND s.id > c.benchmark_seen_step) THEN
        UPDATE campaigns
           SET benchmark_due = (open_steps = 0), benchmark_lease_until = NULL, benchmark_seen_step = NULL,
               last_benchmark = jsonb_build_object('exit_code', exit_code, 'stale', true,
                                                   'output_tail', right(coalesce(output, ''), 2000), 'at', _clock()),
               updated_at = now()
         WHERE id = c.id;
        RETURN jsonb_build_object('campaign_id', c.id, 'status', c.status, 'stale', true,
                                  'message', 'steps were added while the benchmark ran: it runs again when they are done');
    END IF;
    IF c.success_metric IS NOT NULL THEN
        SELECT l.line, _parse_metric(c.success_metric, l.line) INTO v_line, v_value
          FROM regexp_split_to_table(coalesce(output, ''), E'\n') WITH ORDINALITY AS l(line, n)
         WHERE strpos(l.line, '=') > 0 AND _parse_metric(c.success_metric, l.line) IS NOT NULL
         ORDER BY l.n DESC
         LIMIT 1;
        IF v_line IS NOT NULL THEN
            PERFORM add_note(campaign_id => c.id, content => left(btrim(v_line), 1000),
                             tags => ARRAY['metric:' || c.success_metric, 'benchmark'], agent => 'benchmark');
        END IF;
    END IF;
    UPDATE campaigns
       SET benchmark_due = false, benchmark_lease_until = NULL, benchmark_seen_step = NULL,
           benchmark_runs = benchmark_runs + 1,
           last_benchmark = jsonb_build_object('exit_code', exit_code, 'metric_line', v_line, 'metric_value', v_value,
                                               'output_tail', right(coalesce(output, ''), 2000), 'at', _clock()),
           updated_at = now()
     WHERE id = c.id
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.benchmark_run', jsonb_build_object('exit_code', exit_code, 'metric_value', v_value));
    v_success := CASE WHEN c.success_metric IS NOT NULL THEN check_success(c.id) END;
    IF c.open_steps > 0 THEN
        v_status := c.status;
    ELSIF c.planner = 'llm' AND (v_success ->> 'met')::boolean IS NOT TRUE
          AND (v_success IS NULL OR (v_success ->> 'iterations_exhausted')::boolean IS NOT TRUE) THEN
        -- Not there yet: the planner is asked for more at once.
        UPDATE campaigns SET next_action_at = _clock() WHERE id = c.id;
        PERFORM _emit(c.id, NULL, 'campaign.drained');
        v_status := 'active';
    ELSE
        v_status := _finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', v_status, 'metric_value', v_value,
                              'metric_line', v_line, 'exit_code', exit_code,
                              'iterations_used', v_success -> 'iterations_used', 'met', v_success -> 'met');
END
$$;

-- sql/engine/planning.sql
CREATE OR REPLACE FUNCTION begin_planning(id uuid, lease_seconds integer DEFAULT 300) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'active' OR c.open_steps > 0 OR c.planner <> 'llm'
       OR (c.planner_lease_until IS NOT NULL AND c.planner_lease_until > _clock())
       OR (c.next_action_at IS NOT NULL AND c.next_action_at > _clock()) THEN
        RETURN jsonb_build_object('granted', false);
    END IF;
    UPDATE campaigns SET planner_lease_until = _clock() + make_interval(secs => greatest(lease_seconds, 1))
     WHERE campaigns.id = c.id;
    RETURN jsonb_build_object('granted', true);
END
$$;

CREATE OR REPLACE FUNCTION campaigns_to_plan("limit" integer DEFAULT 10, planner_configured boolean DEFAULT true,
                                  plan_delay double precision DEFAULT 10)
RETURNS SETOF uuid
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    -- Whether a campaign had steps is read in the query (as _has_had_steps() does), not by a
    -- call per campaign: Citus refuses a query nested in a query on a shard.
    RETURN QUERY
    SELECT c.id FROM campaigns c
     WHERE c.status = 'active' AND c.open_steps = 0 AND c.planner = 'llm'
       -- SPEC §17: its benchmark runs first; record_benchmark() hands it back.
       AND NOT c.benchmark_due
       AND CASE WHEN coalesce(planner_configured, true) THEN
                     (c.planner_lease_until IS NULL OR c.planner_lease_until <= v_now)
                 AND (c.next_action_at IS NULL OR c.next_action_at <= v_now)
                 AND (c.created_at + make_interval(secs => greatest(coalesce(plan_delay, 10), 0)) <= v_now
                      OR EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id))
                -- Nothing to plan with: only the planner's schedule would wait, so a drained
                -- campaign is handed over to be ended at once.
                ELSE EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id) END
     ORDER BY c.next_action_at NULLS FIRST, c.created_at
     LIMIT greatest("limit", 0);
END
$$;

CREATE OR REPLACE FUNCTION planner_context(campaign_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_success jsonb;
BEGIN
    IF campaign_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id is required');
    END IF;
    SELECT * INTO c FROM campaigns x WHERE x.id = campaign_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    -- Apart from the query below: a rule called in a query over a per-campaign table may not
    -- run queries of its own (Citus runs the whole query on the campaign's shard).
    IF c.success_metric IS NOT NULL THEN
        v_success := check_success(c.id);
    END IF;
    RETURN jsonb_build_object(
        'goal', c.goal, 'strategy', c.strategy, 'progress', c.progress, 'guidance', c.guidance,
        'scope', c.scope, 'max_depth', c.max_depth, 'tokens_used', c.tokens_used, 'token_budget', c.token_budget,
        'success_metric', c.success_metric, 'success_target', c.success_target,
        'success', v_success,
        'done', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action) ORDER BY s.id DESC), '[]')
                   FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status = 'done' AND s.step_type = 'atomic'
                          ORDER BY s.id DESC LIMIT 15) s),
        'failed', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action, 'error', left(s.error, 300))
                                             ORDER BY s.id DESC), '[]')
                     FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status = 'failed'
                            ORDER BY s.id DESC LIMIT 15) s),
        'open', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action, 'status', s.status)
                                           ORDER BY s.id DESC), '[]')
                   FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status IN ('pending', 'running', 'waiting_input')
                          AND s.step_type = 'atomic' ORDER BY s.id DESC LIMIT 15) s),
        'duplicates', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', n.id, 'action', n.action, 'status', n.status,
                                                                    'duplicate_of', d.id, 'duplicate_status', d.status)
                                                 ORDER BY n.id DESC), '[]')
                         FROM (SELECT * FROM steps s
                                WHERE s.campaign_id = c.id AND s.fingerprint IS NOT NULL
                                  AND (s.status = 'pending'
                                       OR s.id >= coalesce((SELECT min(r.id) FROM (SELECT x.id FROM steps x WHERE x.campaign_id = c.id
                                                                                    ORDER BY x.id DESC LIMIT 50) r), 0))) n
                        CROSS JOIN LATERAL (
                            SELECT o.id, o.status FROM steps o
                             WHERE o.campaign_id = c.id AND o.fingerprint = n.fingerprint AND o.id < n.id
                               AND o.status <> 'failed'
                             ORDER BY o.id LIMIT 1) d),
        'recent_notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'content', left(n.content, 500))
                                                   ORDER BY n.id DESC), '[]')
                           FROM (SELECT * FROM notes n WHERE n.campaign_id = c.id ORDER BY n.id DESC LIMIT 10) n));
END
$$;

CREATE OR REPLACE FUNCTION apply_plan(campaign_id uuid, plan jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_plan jsonb;
    c campaigns;
    v_steps jsonb;
    v_status text;
BEGIN
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _require(plan IS NOT NULL, 'plan');
    v_plan := _unwrap(_parse_plan(plan));
    c := _lock_campaign(campaign_id);
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; a plan cannot change it', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET strategy = coalesce(v_plan ->> 'strategy_update', strategy),
           progress = coalesce(v_plan ->> 'progress_update', progress),
           planner_iterations = planner_iterations + 1,
           planner_lease_until = NULL,
           -- A plan that neither adds steps nor ends the campaign would otherwise be asked again
           -- at once: it waits 5 minutes unless it names its own delay.
           next_action_at = _clock() + make_interval(secs => 60 * coalesce((v_plan ->> 'next_delay_minutes')::double precision,
                                                    CASE WHEN jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN 0 ELSE 5 END)),
           updated_at = now()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    IF v_plan -> 'notify' IS NOT NULL AND jsonb_typeof(v_plan -> 'notify') = 'object' THEN
        PERFORM _notify_campaign(c.id, v_plan #>> '{notify,level}', v_plan #>> '{notify,message}');
    END IF;
    IF jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN
        v_steps := _insert_steps(c, _unwrap(v_plan -> 'new_steps'), NULL, 0);
    END IF;
    PERFORM _emit(c.id, NULL, 'plan.applied', jsonb_build_object(
        'created', coalesce((v_steps ->> 'created')::integer, 0), 'done', (v_plan ->> 'done')::boolean));
    IF (v_plan ->> 'done')::boolean THEN
        IF c.open_steps > 0 THEN
            PERFORM _raise('invalid_state', format('the plan says done but campaign %s still has %s open steps', c.id, c.open_steps));
        END IF;
        v_status := _finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', coalesce(v_status, c.status),
                              'steps', v_steps, 'next_action_at', c.next_action_at);
END
$$;

-- sql/engine/context.sql
CREATE OR REPLACE FUNCTION get_my_context(step_id bigint, head integer DEFAULT 600, tail integer DEFAULT 200,
                               claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    IF step_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'step_id is required (or run with SORTIE_STEP_ID set)');
    END IF;
    -- SPEC §15: a worker reads the context of the step it holds, by its claim (scope.sql).
    PERFORM _worker_campaign(NULL, step_id, claim_token, 'get_my_context');
    SELECT * INTO s FROM steps WHERE id = step_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist', step_id));
    END IF;
    RETURN _context_of(s, head, tail);
END
$$;

CREATE OR REPLACE FUNCTION _get_my_context_delegated(campaign_id uuid, step_id bigint, head integer DEFAULT 600,
                                         tail integer DEFAULT 200, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    IF campaign_id IS NULL OR step_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _worker_claim_in(campaign_id, step_id, claim_token, 'get_my_context');
    SELECT * INTO s FROM steps x WHERE x.campaign_id = campaign_id AND x.id = step_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', step_id, campaign_id));
    END IF;
    RETURN _context_of(s, head, tail);
END
$$;

CREATE OR REPLACE FUNCTION _context_of(s steps, head integer, tail integer)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    c campaigns;
BEGIN
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    RETURN jsonb_build_object(
        'campaign', jsonb_build_object('id', c.id, 'name', c.name, 'goal', c.goal, 'status', c.status,
                                       'strategy', c.strategy, 'progress', c.progress, 'guidance', c.guidance,
                                       'success_metric', c.success_metric, 'success_target', c.success_target),
        'step', jsonb_strip_nulls(jsonb_build_object(
            'id', s.id, 'action', s.action, 'agent', s.agent, 'input', s.input, 'status', s.status,
            'depth', s.depth, 'max_depth', c.max_depth, 'can_spawn', _spawn_allowed(s.depth, c.max_depth),
            'attempts', s.attempts, 'max_attempts', s.max_attempts, 'last_error', s.error,
            'question', s.question, 'answer', s.answer, 'parent_id', s.parent_id,
            'continuation_of', s.continuation_of,
            'lease_expires_at', s.lease_expires_at)),
        -- The spliced step this one continues: its partial output and what its subtasks said.
        'continues', (SELECT _preview(p.id, coalesce(p.output, ''), head, tail) || jsonb_build_object('action', p.action)
                        FROM steps p WHERE p.campaign_id = s.campaign_id AND p.id = s.continuation_of),
        'upstream', (SELECT coalesce(jsonb_agg(_preview(u.id, coalesce(u.output, ''), head, tail)
                                               || jsonb_build_object('action', u.action, 'status', u.status,
                                                                     'via', via)
                                               ORDER BY u.id), '[]')
                       FROM (SELECT d.depends_on AS id, 'dependency' AS via FROM step_dependencies d
                              WHERE d.campaign_id = s.campaign_id AND d.step_id = s.id
                             UNION ALL
                             SELECT d.depends_on, 'ancestor ' || a.id
                               FROM step_dependencies d
                               JOIN LATERAL (WITH RECURSIVE up(id, parent_id) AS (
                                                 SELECT x.id, x.parent_id FROM steps x
                                                  WHERE x.campaign_id = s.campaign_id AND x.id = s.parent_id
                                                 UNION ALL
                                                 SELECT x.id, x.parent_id FROM steps x JOIN up ON x.id = up.parent_id
                                                  WHERE x.campaign_id = s.campaign_id)
                                             SELECT id FROM up) a ON d.step_id = a.id
                              WHERE d.campaign_id = s.campaign_id) deps
                       JOIN steps u ON u.campaign_id = s.campaign_id AND u.id = deps.id),
        'notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'step_id', n.step_id, 'agent', n.agent,
                                                               'content', left(n.content, 1000), 'tags', n.tags,
                                                               'created_at', n.created_at) ORDER BY n.id DESC), '[]')
                    FROM (SELECT * FROM notes WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) n),
        'hint', 'Previews show the head and tail of each output; read_step_output(step_id, offset, limit) reads the rest. '
                || 'When finished call complete_step; if stuck, fail_step or request_input.');
END
$$;

CREATE OR REPLACE FUNCTION read_step_output(step_id bigint, "offset" integer DEFAULT 0, "limit" integer DEFAULT 8000,
                                 field text DEFAULT 'output', campaign_id uuid DEFAULT NULL,
                                 reader_step_id bigint DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    PERFORM _require(step_id IS NOT NULL, 'step_id');
    IF coalesce(field, 'output') NOT IN ('output', 'input') THEN
        PERFORM _raise('invalid_argument', 'field must be output or input');
    END IF;
    IF coalesce("offset", 0) < 0 OR coalesce("limit", 8000) < 1 THEN
        PERFORM _raise('invalid_argument', 'offset must be 0 or more and limit at least 1 (at most 32000)');
    END IF;
    -- SPEC §15: with a claim token, the reader's campaign is its claim's (scope.sql).
    campaign_id := _worker_campaign(campaign_id, reader_step_id, claim_token, 'read_step_output');
    -- Only steps of the reader's own campaign are readable; another campaign's step reads as
    -- missing rather than revealing that it exists.
    IF campaign_id IS NOT NULL THEN
        SELECT * INTO s FROM steps x WHERE x.campaign_id = campaign_id AND x.id = step_id;
    ELSE
        SELECT * INTO s FROM steps x WHERE x.id = step_id;
    END IF;
    IF NOT FOUND
       OR (reader_step_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM steps r WHERE r.campaign_id = s.campaign_id AND r.id = reader_step_id)) THEN
        PERFORM _raise('not_found', format('step %s does not exist in your campaign', step_id));
    END IF;
    RETURN jsonb_build_object('step_id', s.id, 'field', coalesce(field, 'output'), 'status', s.status)
        || _read_range(CASE WHEN coalesce(field, 'output') = 'input' THEN coalesce(s.input #>> '{}', '') ELSE coalesce(s.output, '') END,
                      coalesce("offset", 0), coalesce("limit", 8000));
END
$$;

-- sql/engine/notes.sql
CREATE OR REPLACE FUNCTION _similarity_floor(embedding_model text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE embedding_model
               WHEN 'all-MiniLM-L6-v2' THEN 0.15
               WHEN 'sortie-hashing-v1' THEN 0.05
               ELSE 0.0 END;
$$;

CREATE OR REPLACE FUNCTION add_note(campaign_id uuid, content text, tags text[] DEFAULT '{}', step_id bigint DEFAULT NULL,
                         agent text DEFAULT NULL, embedding vector DEFAULT NULL, embedding_model text DEFAULT NULL,
                         request_id text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_arguments jsonb;
BEGIN
    -- SPEC §15: a worker writes notes only into the campaign of the step it holds (scope.sql).
    campaign_id := _worker_campaign(campaign_id, step_id, claim_token, 'add_note');
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- The embedding is not compared: the same text embeds the same way.
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('campaign_id', campaign_id, 'content', content, 'tags', tags,
                                          'step_id', step_id, 'agent', agent);
        RETURN coalesce(_replay(request_id, 'add_note', v_arguments),
                        _keep(request_id, 'add_note', v_arguments, add_note(
                            campaign_id => campaign_id, content => content, tags => tags, step_id => step_id,
                            agent => agent, embedding => embedding, embedding_model => embedding_model,
                            claim_token => claim_token)));
    END IF;
    RETURN _add_note_in(campaign_id, content, tags, step_id, agent, embedding, embedding_model);
END
$$;

CREATE OR REPLACE FUNCTION _add_note_delegated(campaign_id uuid, content text, tags text[] DEFAULT '{}', step_id bigint DEFAULT NULL,
                                    agent text DEFAULT NULL, embedding vector DEFAULT NULL,
                                    embedding_model text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _worker_claim_in(campaign_id, step_id, claim_token, 'add_note');
    RETURN _add_note_in(campaign_id, content, tags, step_id, agent, embedding, embedding_model);
END
$$;

CREATE OR REPLACE FUNCTION _add_note_in(campaign_id uuid, content text, tags text[], step_id bigint, agent text,
                             embedding vector, embedding_model text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_id bigint;
    v_agent text;
BEGIN
    IF content IS NULL OR btrim(content) = '' THEN
        PERFORM _raise('invalid_argument', 'content is empty: write what you found');
    END IF;
    -- SPEC §14: at most 100,000 characters (the MCP server checks before it embeds).
    IF length(content) > 100000 THEN
        PERFORM _raise('invalid_argument', format('content is %s characters long; at most 100000 are allowed: store large results as step output',
                                                 length(content)));
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(tags) t WHERE t IS NULL OR btrim(t) = '' OR length(t) > 200) THEN
        PERFORM _raise('invalid_argument', 'tags must be non-empty strings of at most 200 characters');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM campaigns WHERE id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    IF step_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = step_id AND s.campaign_id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s has no step %s', campaign_id, step_id));
    END IF;
    -- A worker's note carries its step's agent when the caller does not name one (read before
    -- the insert: Citus takes no subquery in an INSERT's VALUES).
    v_agent := coalesce(agent, (SELECT s.agent FROM steps s WHERE s.campaign_id = campaign_id AND s.id = step_id));
    INSERT INTO notes (campaign_id, step_id, agent, content, tags, embedding, embedding_model)
    VALUES (campaign_id, step_id, v_agent, content, coalesce(tags, '{}'), embedding, embedding_model)
    RETURNING id INTO v_id;
    PERFORM _emit(campaign_id, step_id, 'note.added', jsonb_build_object('note_id', v_id, 'tags', coalesce(tags, '{}')));
    RETURN jsonb_build_object('note_id', v_id, 'campaign_id', campaign_id, 'step_id', step_id,
                              'embedded', embedding IS NOT NULL,
                              -- SPEC §18: a note stored without its embedding (sortie-mcp embeds it just
                              -- after) is compared by its words until then.
                              'similar', CASE WHEN embedding IS NOT NULL
                                              THEN _similar_notes(campaign_id, embedding, embedding_model, 5, v_id)
                                              ELSE _similar_notes_by_words(campaign_id, content, 5, v_id) END);
END
$$;

CREATE OR REPLACE FUNCTION _similar_notes(campaign_id uuid, embedding vector, embedding_model text, k integer DEFAULT 5,
                              exclude bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    -- $1..$5: the arguments (named like the columns of notes).
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', near.id, 'content', left(near.content, 300),
                                                 'similarity', round(near.similarity::numeric, 4),
                                                 'possible_duplicate', near.similarity >= 0.9)
                              ORDER BY near.similarity DESC), '[]')
      FROM (SELECT n.id, n.content, 1 - (n.embedding <=> $2) AS similarity
              FROM notes n
             WHERE $2 IS NOT NULL AND n.campaign_id = $1 AND n.embedding IS NOT NULL
               AND n.embedding_model IS NOT DISTINCT FROM $3 AND n.id IS DISTINCT FROM $5
             ORDER BY n.embedding <=> $2
             LIMIT greatest($4, 0)) near
     -- SPEC §13: below the model's floor a note is not similar, however near it ranks.
     WHERE near.similarity >= _similarity_floor($3));
END
$$;

CREATE OR REPLACE FUNCTION notes_to_embed("limit" integer DEFAULT 100) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', n.id, 'content', n.content) ORDER BY n.id), '[]')
      FROM (SELECT x.id, x.content FROM notes x WHERE x.embedding IS NULL ORDER BY x.id LIMIT greatest($1, 0)) n);
END
$$;

CREATE OR REPLACE FUNCTION set_note_embedding(note_id bigint, embedding vector, embedding_model text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
BEGIN
    IF embedding IS NULL OR embedding_model IS NULL THEN
        PERFORM _raise('invalid_argument', 'an embedding and the model that made it are required');
    END IF;
    UPDATE notes SET embedding = set_note_embedding.embedding, embedding_model = set_note_embedding.embedding_model
     WHERE id = note_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('note %s does not exist', note_id));
    END IF;
    RETURN jsonb_build_object('note_id', note_id, 'embedding_model', embedding_model);
END
$$;

CREATE OR REPLACE FUNCTION get_notes(campaign_id uuid, tags text[] DEFAULT NULL, step_id bigint DEFAULT NULL,
                          "limit" integer DEFAULT 50, cursor text DEFAULT NULL, preview_chars integer DEFAULT NULL,
                          claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    -- SPEC §15: a worker reads the notes of its claim's campaign only (scope.sql). Found
    -- before the query rather than inside it: a rule called inside a query on a shard may not
    -- run queries of its own (Citus).
    v_campaign uuid := _worker_campaign($1, NULL, $7, 'get_notes');
BEGIN
    PERFORM _require(v_campaign IS NOT NULL, 'campaign_id');
    -- A cursor is a next_cursor this function answered (a note id); anything else would read
    -- as "no more notes".
    IF $5 IS NOT NULL AND $5 !~ '^[0-9]{1,18}$' THEN
        PERFORM _raise('invalid_argument', 'cursor is not one get_notes returned');
    END IF;
    -- $1..$7: the arguments (some named like the columns of notes).
    RETURN (
    WITH page AS (
        SELECT * FROM notes n
         WHERE n.campaign_id = v_campaign
           AND ($2 IS NULL OR n.tags && $2)
           AND ($3 IS NULL OR n.step_id = $3)
           AND ($5 IS NULL OR n.id < $5::bigint)
         ORDER BY n.id DESC
         LIMIT least(greatest(coalesce($4, 50), 1), 500) + 1),
    shown AS (
        SELECT * FROM page ORDER BY page.id DESC LIMIT least(greatest(coalesce($4, 50), 1), 500))
    SELECT jsonb_build_object(
        'notes', coalesce((SELECT jsonb_agg(jsonb_build_object(
               'id', n.id, 'step_id', n.step_id, 'agent', n.agent,
               'content', CASE WHEN $6 IS NULL THEN n.content ELSE left(n.content, greatest($6, 1)) END,
               'tags', n.tags, 'created_at', n.created_at)
               || CASE WHEN $6 IS NULL THEN '{}'::jsonb
                       ELSE jsonb_build_object('content_chars', length(n.content),
                                               'truncated', length(n.content) > greatest($6, 1)) END
               ORDER BY n.id DESC) FROM shown n), '[]'),
        'next_cursor', CASE WHEN (SELECT count(*) FROM page) > least(greatest(coalesce($4, 50), 1), 500)
                            THEN (SELECT min(shown.id) FROM shown)::text END));
END
$$;

CREATE OR REPLACE FUNCTION search_notes(query text, campaign_id uuid DEFAULT NULL, top_k integer DEFAULT 5,
                             tags text[] DEFAULT NULL, query_embedding vector DEFAULT NULL,
                             embedding_model text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_k integer := least(greatest(coalesce(top_k, 5), 1), 100);
    v_pool integer := least(greatest(coalesce(top_k, 5), 1), 100) * 4;
    -- Across campaigns, a word of the query that at most this many notes contain is rare.
    v_cap constant integer := 2000;
    v_tsquery tsquery;
    v_rare tsquery;
    v_common tsquery;
    v_terms text[];
    v_term text;
    v_rare_terms text[] := '{}';
    v_common_terms text[] := '{}';
    v_hits jsonb;
BEGIN
    IF query IS NULL OR btrim(query) = '' THEN
        PERFORM _raise('invalid_argument', 'query is empty: say what you are looking for');
    END IF;
    -- SPEC §15: a worker searches its claim's campaign only (scope.sql).
    campaign_id := _worker_campaign(campaign_id, NULL, claim_token, 'search_notes');
    IF campaign_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    -- SPEC §13: a query of only stop words, punctuation or symbols asks for nothing; every
    -- note would be as close to it as any other.
    IF numnode(plainto_tsquery('english', query)) = 0 THEN
        RETURN jsonb_build_object('results', '[]'::jsonb,
                                  'mode', CASE WHEN query_embedding IS NULL THEN 'lexical' ELSE 'hybrid' END,
                                  'reason', format('the query %s has no searchable words (only stop words, punctuation or symbols): name what you are looking for',
                                                   left(query, 200)));
    END IF;
    -- Any of the words, so a question phrased differently from the note still meets it. Within
    -- one campaign every match is ranked. Across campaigns, ranking every note that shares a
    -- common word costs time in proportion to the whole table, so the words are split by how
    -- many notes they match (counted up to v_cap + 1): every match of a rare word is a candidate
    -- and ranks first, as the rarer word says more; of the notes sharing only common words, the
    -- newest v_cap are. One count per word, each a statement of its own (not a subquery per
    -- word of one query: Citus plans no subquery correlated with a function's rows).
    v_terms := ARRAY(SELECT quote_literal(lexeme)::tsquery::text
                       FROM unnest(to_tsvector('english', query)) AS u(lexeme, positions, weights));
    FOREACH v_term IN ARRAY v_terms LOOP
        IF campaign_id IS NOT NULL
           OR (SELECT count(*) FROM (SELECT 1 FROM notes n
                                      WHERE n.content_tsv @@ v_term::tsquery
                                        AND (tags IS NULL OR n.tags && tags)
                                      LIMIT v_cap + 1) m) <= v_cap THEN
            v_rare_terms := v_rare_terms || v_term;
        ELSE
            v_common_terms := v_common_terms || v_term;
        END IF;
    END LOOP;
    v_rare := nullif(array_to_string(v_rare_terms, ' | '), '')::tsquery;
    v_common := nullif(array_to_string(v_common_terms, ' | '), '')::tsquery;
    v_tsquery := nullif(array_to_string(v_terms, ' | '), '')::tsquery;
    WITH candidates AS (
        SELECT n.campaign_id, n.id, n.content_tsv, true AS rare
          FROM notes n
         WHERE v_rare IS NOT NULL AND n.content_tsv @@ v_rare
           AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
           AND (tags IS NULL OR n.tags && tags)
        UNION ALL
        (SELECT n.campaign_id, n.id, n.content_tsv, false
           FROM notes n
          WHERE v_common IS NOT NULL AND n.content_tsv @@ v_common
            AND NOT (v_rare IS NOT NULL AND n.content_tsv @@ v_rare)
            AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
            AND (tags IS NULL OR n.tags && tags)
          ORDER BY n.id DESC
          LIMIT v_cap)
    ),
    lexical AS (
        SELECT c.campaign_id, c.id,
               row_number() OVER (ORDER BY c.rare DESC, ts_rank_cd(c.content_tsv, v_tsquery) DESC, c.id DESC) AS rank
          FROM candidates c
         ORDER BY c.rare DESC, ts_rank_cd(c.content_tsv, v_tsquery) DESC, c.id DESC
         LIMIT v_pool
    ),
    semantic AS (
        SELECT s.campaign_id, s.id, row_number() OVER (ORDER BY s.distance, s.id) AS rank, s.distance
          FROM (SELECT n.campaign_id, n.id, n.embedding <=> query_embedding AS distance
                  FROM notes n
                 WHERE query_embedding IS NOT NULL AND n.embedding IS NOT NULL
                   AND (embedding_model IS NULL OR n.embedding_model = embedding_model)
                   AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
                   AND (tags IS NULL OR n.tags && tags)
                 ORDER BY n.embedding <=> query_embedding
                 LIMIT v_pool) s
         -- SPEC §13: below the model's floor a hit is noise, not a match.
         WHERE 1 - s.distance >= _similarity_floor(embedding_model)
    ),
    fused AS (
        SELECT coalesce(l.campaign_id, s.campaign_id) AS campaign_id, coalesce(l.id, s.id) AS id,
               coalesce(1.0 / (60 + l.rank), 0) + coalesce(1.0 / (60 + s.rank), 0) AS score,
               CASE WHEN l.id IS NOT NULL AND s.id IS NOT NULL THEN 'hybrid'
                    WHEN s.id IS NOT NULL THEN 'semantic' ELSE 'lexical' END AS mode,
               1 - s.distance AS similarity
          FROM lexical l FULL JOIN semantic s ON s.campaign_id = l.campaign_id AND s.id = l.id
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'note_id', n.id, 'campaign_id', n.campaign_id, 'step_id', n.step_id, 'agent', n.agent,
               'content', n.content, 'tags', n.tags, 'created_at', n.created_at,
               'score', round(f.score::numeric, 6), 'mode', f.mode, 'similarity', round(f.similarity::numeric, 4))
               ORDER BY f.score DESC, n.id DESC), '[]')
      INTO v_hits
      FROM (SELECT * FROM fused ORDER BY score DESC, id DESC LIMIT v_k) f
      JOIN notes n ON n.campaign_id = f.campaign_id AND n.id = f.id;
    RETURN jsonb_build_object('results', v_hits,
                              'mode', CASE WHEN query_embedding IS NULL THEN 'lexical' ELSE 'hybrid' END);
END
$$;

-- sql/engine/note_words.sql
CREATE OR REPLACE FUNCTION _similar_notes_by_words(campaign_id uuid, content text, k integer DEFAULT 5,
                                       exclude bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tsv tsvector := to_tsvector('english', coalesce(content, ''));
    v_any tsquery;
BEGIN
    IF length(v_tsv) = 0 THEN
        RETURN '[]';
    END IF;
    -- Any shared lexeme, through the GIN index on content_tsv (quotes and backslashes escaped
    -- as tsquery reads them).
    SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery
      INTO v_any
      FROM unnest(tsvector_to_array(v_tsv)) l;
    -- The union of two lexeme sets is the length of the concatenated tsvectors (built in, no
    -- unnesting): shared = |a| + |b| - |a ∪ b|.
    RETURN (
        SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', best.id, 'content', left(n.content, 300),
                                                     'similarity', round(best.similarity::numeric, 4),
                                                     'possible_duplicate', best.similarity >= 0.9, 'by', 'words')
                                  ORDER BY best.similarity DESC, best.id DESC), '[]')
          FROM (SELECT s.id, s.similarity
                  FROM (SELECT x.id, (length(x.content_tsv) + length(v_tsv) - length(x.content_tsv || v_tsv))::double precision
                                     / length(x.content_tsv || v_tsv) AS similarity
                          FROM notes x
                         WHERE x.campaign_id = _similar_notes_by_words.campaign_id
                           AND x.id IS DISTINCT FROM exclude AND x.content_tsv @@ v_any
                         ORDER BY x.id DESC
                         LIMIT 300) s
                 WHERE s.similarity >= 0.2
                 ORDER BY s.similarity DESC, s.id DESC
                 LIMIT greatest(k, 0)) best
          JOIN notes n ON n.campaign_id = _similar_notes_by_words.campaign_id AND n.id = best.id);
END
$$;

-- sql/engine/updates.sql
CREATE OR REPLACE FUNCTION get_updates(id uuid DEFAULT NULL, consumer text DEFAULT 'default', "limit" integer DEFAULT 200)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_key text;
    v_position bigint;
    v_limit integer := least(greatest(coalesce("limit", 200), 1), 1000);
    v_page events[];
    v_done_campaigns uuid[];
    v_done_steps bigint[];
    v_note_campaigns uuid[];
    v_note_ids bigint[];
    v_completed jsonb;
    v_notes jsonb;
BEGIN
    IF consumer IS NULL OR btrim(consumer) = '' OR length(consumer) > 200 THEN
        PERFORM _raise('invalid_argument', 'consumer must be a name of 1 to 200 characters');
    END IF;
    IF id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', id));
    END IF;
    v_key := consumer || '@' || coalesce(id::text, '*');
    -- The consumer's row serialises its reads: two at once would hand out the same events.
    INSERT INTO cursors (consumer) VALUES (v_key) ON CONFLICT ON CONSTRAINT cursors_pkey DO NOTHING;
    UPDATE cursors SET updated_at = now() WHERE cursors.consumer = v_key;

    -- The page is an array, not a temporary table: creating and dropping a table per call
    -- bloats the catalog and makes every commit wait for its WAL flush. Its rows are built from
    -- their columns: Citus hands a whole row of a subquery back as a record it cannot read.
    IF id IS NOT NULL THEN
        SELECT coalesce(max(p.seq), 0) INTO v_position
          FROM event_positions p WHERE p.campaign_id = id AND p.consumer = v_key;
        SELECT coalesce(array_agg(ROW(e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq)::events
                                  ORDER BY e.seq), '{}') INTO v_page
          FROM (SELECT e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq FROM events e
                 WHERE e.campaign_id = id AND e.seq > v_position
                 ORDER BY e.seq
                 LIMIT v_limit) e;
    ELSE
        -- Every campaign with news (its event_seq past the consumer's position), the next
        -- `limit` of its events at most: the page takes them by their rank in their campaign,
        -- so each campaign's part of it is a run of its order with nothing skipped. A join on
        -- the campaign alone: under Citus each shard answers its own campaigns.
        SELECT coalesce(array_agg(ROW(e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq)::events
                                  ORDER BY e.rank, e.at, e.campaign_id), '{}') INTO v_page
          FROM (SELECT e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq,
                       e.seq - coalesce(p.seq, 0) AS rank
                  FROM campaigns c
                  LEFT JOIN event_positions p ON p.campaign_id = c.id AND p.consumer = v_key
                  JOIN events e ON e.campaign_id = c.id
                             AND e.seq > coalesce(p.seq, 0) AND e.seq <= coalesce(p.seq, 0) + v_limit
                 WHERE c.event_seq > coalesce(p.seq, 0)
                 ORDER BY rank, e.at, e.campaign_id
                 LIMIT v_limit) e;
    END IF;

    IF cardinality(v_page) > 0 THEN
        INSERT INTO event_positions (campaign_id, consumer, seq)
        SELECT e.campaign_id, v_key, max(e.seq) FROM unnest(v_page) e GROUP BY e.campaign_id
        ON CONFLICT ON CONSTRAINT event_positions_pkey DO UPDATE SET seq = excluded.seq;
    END IF;

    -- The steps and notes the page names, read by their ids rather than joined with the page:
    -- under Citus the page cannot travel to the workers (a distributed query takes no array of
    -- rows).
    SELECT coalesce(array_agg(e.campaign_id ORDER BY e.ordinality), '{}'), coalesce(array_agg(e.step_id ORDER BY e.ordinality), '{}')
      INTO v_done_campaigns, v_done_steps
      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.done';
    -- Only when the page has any: under Citus an empty list reaches every shard.
    v_completed := '[]';
    IF cardinality(v_done_steps) > 0 THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                  'action', s.action, 'output_preview', left(s.output, 300),
                                  'output_chars', length(s.output)) ORDER BY array_position(v_done_steps, s.id)), '[]')
          INTO v_completed
          FROM steps s
         WHERE s.campaign_id = ANY (v_done_campaigns) AND s.id = ANY (v_done_steps);
    END IF;
    SELECT coalesce(array_agg(e.campaign_id), '{}'), coalesce(array_agg((e.payload ->> 'note_id')::bigint), '{}')
      INTO v_note_campaigns, v_note_ids
      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'note.added';
    v_notes := '[]';
    IF cardinality(v_note_ids) > 0 THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', n.id, 'campaign_id', n.campaign_id,
                                  'step_id', n.step_id, 'agent', n.agent, 'tags', n.tags,
                                  'content', left(n.content, 500)) ORDER BY n.id DESC), '[]')
          INTO v_notes
          FROM notes n
         WHERE n.campaign_id = ANY (v_note_campaigns) AND n.id = ANY (v_note_ids);
    END IF;

    RETURN jsonb_build_object(
        'completed', v_completed,
        'failed', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                    'error', e.payload ->> 'error') ORDER BY e.ordinality), '[]')
                     FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.failed'),
        'retrying', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                      'error', e.payload ->> 'error', 'attempts', e.payload -> 'attempts') ORDER BY e.ordinality), '[]')
                       FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.retry'),
        'skipped', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id) || e.payload ORDER BY e.ordinality), '[]')
                      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.skipped'),
        'notes', v_notes,
        'campaigns', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id, 'event', e.kind,
                                      'reason', e.payload ->> 'reason', 'at', e.at) ORDER BY e.ordinality), '[]')
                        FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind LIKE 'campaign.%' OR e.kind = 'plan.applied'),
        -- Workflow instances move without steps: each move is listed with where it went.
        'workflow_moves', (SELECT coalesce(jsonb_agg(jsonb_build_object('instance_id', e.campaign_id,
                                           'from', e.payload ->> 'from', 'to', e.payload ->> 'to',
                                           'decided_by', e.payload ->> 'decided_by', 'at', e.at) ORDER BY e.ordinality), '[]')
                             FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'workflow.advanced'),
        -- Waiting steps are listed for as long as they wait, not only when they start waiting.
        'waiting_inputs', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                          'action', s.action, 'question', s.question) ORDER BY s.id), '[]')
                             FROM steps s
                            WHERE s.status = 'waiting_input' AND (id IS NULL OR s.campaign_id = id)
                              AND (id IS NOT NULL OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = s.campaign_id
                                                                AND c.status IN ('active', 'paused')))),
        'events_read', cardinality(v_page),
        'has_more', cardinality(v_page) = v_limit,
        -- SPEC §16 names the transaction holding events back; with events numbered per
        -- campaign none can: kept in the answer's shape for the clients that read it.
        'held_back_by', NULL::jsonb);
END
$$;

-- sql/engine/notifications.sql
CREATE OR REPLACE FUNCTION take_notifications("limit" integer DEFAULT 20, lease_seconds integer DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_due record;
    v_until timestamptz := _clock() + make_interval(secs => greatest(lease_seconds, 1));
    v_taken jsonb := '[]';
    v_count integer := 0;
    n notifications;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    IF greatest("limit", 0) = 0 THEN
        RETURN v_taken;
    END IF;
    FOR v_due IN SELECT x.campaign_id, x.id FROM notifications x
                  WHERE NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
                  ORDER BY x.id LOOP
        IF v_due.campaign_id IS NULL THEN
            -- Not a campaign's (written by hand): found by its id alone.
            SELECT * INTO n FROM notifications x
             WHERE x.campaign_id IS NULL AND x.id = v_due.id
               AND NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
               FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            UPDATE notifications x SET next_attempt_at = v_until WHERE x.campaign_id IS NULL AND x.id = n.id
            RETURNING * INTO n;
        ELSE
            SELECT * INTO n FROM notifications x
             WHERE x.campaign_id = v_due.campaign_id AND x.id = v_due.id
               AND NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
               FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            UPDATE notifications x SET next_attempt_at = v_until WHERE x.campaign_id = n.campaign_id AND x.id = n.id
            RETURNING * INTO n;
        END IF;
        v_taken := v_taken || jsonb_build_array(jsonb_build_object(
            'id', n.id, 'campaign_id', n.campaign_id, 'level', n.level, 'message', n.message,
            'channel', n.channel, 'delivery_attempts', n.delivery_attempts));
        v_count := v_count + 1;
        EXIT WHEN v_count >= "limit";
    END LOOP;
    RETURN v_taken;
END
$$;

CREATE OR REPLACE FUNCTION _notification_max_attempts() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 10 $$;

CREATE OR REPLACE FUNCTION notification_delivered(id bigint, ok boolean, error text DEFAULT NULL, retry boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    n notifications;
    -- The time in a variable, not a call inside the CASEs, and the back-off added in UTC (the
    -- same instant; timestamptz + interval is STABLE): Citus refuses STABLE functions inside
    -- CASE, and on a column, in a distributed change.
    v_now timestamptz := _clock();
BEGIN
    PERFORM _require(id IS NOT NULL, 'id');
    PERFORM _require(ok IS NOT NULL, 'ok');
    UPDATE notifications
       SET delivered = ok,
           delivered_at = CASE WHEN ok THEN v_now END,
           delivery_attempts = delivery_attempts + 1,
           last_error = CASE WHEN ok THEN NULL ELSE left(error, 1000) END,
           next_attempt_at = CASE WHEN ok THEN next_attempt_at
                                  ELSE ((v_now AT TIME ZONE 'UTC')
                                        + make_interval(secs => least(30 * power(2, delivery_attempts), 3600)))
                                       AT TIME ZONE 'UTC' END,
           given_up_at = CASE WHEN NOT ok AND (NOT coalesce(retry, true)
                                               OR delivery_attempts + 1 >= _notification_max_attempts())
                              THEN v_now END
     WHERE notifications.id = id AND NOT delivered AND given_up_at IS NULL
    RETURNING * INTO n;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('notification %s does not exist, was delivered or was given up', id));
    END IF;
    RETURN jsonb_build_object('id', n.id, 'delivered', n.delivered, 'delivery_attempts', n.delivery_attempts,
                              'next_attempt_at', n.next_attempt_at, 'given_up', n.given_up_at IS NOT NULL);
END
$$;

-- sql/engine/workflows.sql
CREATE OR REPLACE FUNCTION _workflow_finish() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'FINISH' $$;

CREATE OR REPLACE FUNCTION load_workflow(name text, definition jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_names text[];
    v_step jsonb;
    v_status text;
    v_target text;
    v_hash text;
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$' THEN
        PERFORM _raise('invalid_argument', format('workflow name %L must be 1 to 200 letters, digits, _ . or -', name));
    END IF;
    IF definition IS NULL OR jsonb_typeof(definition) <> 'object'
       OR jsonb_typeof(definition -> 'steps') IS DISTINCT FROM 'array' OR jsonb_array_length(definition -> 'steps') = 0 THEN
        PERFORM _raise('invalid_argument', format('workflow %s lists no steps', name));
    END IF;
    FOR v_step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        IF jsonb_typeof(v_step -> 'name') IS DISTINCT FROM 'string' OR btrim(v_step ->> 'name') = '' THEN
            PERFORM _raise('invalid_argument', format('workflow %s has a step without a name', name));
        END IF;
        IF upper(v_step ->> 'name') = _workflow_finish() THEN
            PERFORM _raise('invalid_argument', format('workflow %s: %s is reserved for the end of a workflow', name, _workflow_finish()));
        END IF;
        IF lower(v_step ->> 'name') = ANY (SELECT lower(n) FROM unnest(v_names) n) THEN
            PERFORM _raise('invalid_argument', format('workflow %s lists step %L twice', name, v_step ->> 'name'));
        END IF;
        IF jsonb_typeof(v_step -> 'instructions') IS DISTINCT FROM 'string' THEN
            PERFORM _raise('invalid_argument', format('workflow %s: step %L has no client instructions', name, v_step ->> 'name'));
        END IF;
        IF v_step ? 'transitions' AND jsonb_typeof(v_step -> 'transitions') <> 'object' THEN
            PERFORM _raise('invalid_argument', format('workflow %s: transitions of step %L must be an object', name, v_step ->> 'name'));
        END IF;
        v_names := v_names || (v_step ->> 'name');
    END LOOP;
    -- Every declared transition leads to a step of this workflow, or to FINISH.
    FOR v_step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        FOR v_status, v_target IN SELECT key, value #>> '{}' FROM jsonb_each(coalesce(v_step -> 'transitions', '{}')) LOOP
            IF _workflow_step_named(v_names, v_target) IS NULL THEN
                PERFORM _raise('invalid_argument', format('workflow %s: step %L goes to %L on %s, which is not a step of the workflow (nor %s)',
                                                         name, v_step ->> 'name', v_target, v_status, _workflow_finish()));
            END IF;
        END LOOP;
    END LOOP;
    v_hash := encode(sha256(convert_to(definition::text, 'UTF8')), 'hex');
    INSERT INTO workflows (name, hash, definition) VALUES (load_workflow.name, v_hash, definition)
    ON CONFLICT DO NOTHING;
    RETURN jsonb_build_object('name', name, 'hash', v_hash, 'steps', to_jsonb(v_names));
END
$$;

CREATE OR REPLACE FUNCTION _workflow_step_named(p_names text[], p_name text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN upper(btrim(p_name)) = _workflow_finish() THEN _workflow_finish()
                ELSE (SELECT n FROM unnest(p_names) n WHERE lower(n) = lower(btrim(p_name)) LIMIT 1) END
$$;

CREATE OR REPLACE FUNCTION _workflow_definition(c campaigns) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT w.definition FROM workflows w WHERE w.name = c.workflow AND w.hash = c.workflow_hash);
END
$$;

CREATE OR REPLACE FUNCTION _workflow_step_names(p_definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$ SELECT array_agg(s ->> 'name' ORDER BY o) FROM jsonb_array_elements(p_definition -> 'steps') WITH ORDINALITY AS t(s, o) $$;

CREATE OR REPLACE FUNCTION _workflow_step(p_definition jsonb, p_name text) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$ SELECT s FROM jsonb_array_elements(p_definition -> 'steps') s WHERE s ->> 'name' = p_name $$;

CREATE OR REPLACE FUNCTION _workflow_view(c campaigns, with_definition boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_def jsonb := _workflow_definition(c);
    v_step jsonb := _workflow_step(v_def, c.workflow_step);
BEGIN
    RETURN jsonb_build_object(
        'instance_id', c.id, 'workflow_name', c.workflow, 'workflow_hash', c.workflow_hash,
        'status', c.status, 'status_reason', c.status_reason, 'context', c.context,
        'current_step', CASE WHEN v_step IS NOT NULL THEN jsonb_build_object(
            'step_name', c.workflow_step, 'instructions', v_step ->> 'instructions',
            'transitions', coalesce(v_step -> 'transitions', '{}')) END,
        'valid_next_steps', to_jsonb(_workflow_step_names(v_def) || _workflow_finish()),
        'history', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_name', h.step_name, 'report', h.report,
                                   'outcome_status', h.outcome_status, 'determined_next_step', h.determined_next_step,
                                   'decided_by', h.decided_by, 'at', h.at) ORDER BY h.id), '[]')
                      FROM (SELECT * FROM workflow_history WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) h))
        || CASE WHEN with_definition THEN jsonb_build_object('definition', v_def) ELSE '{}' END;
END
$$;

CREATE OR REPLACE FUNCTION start_workflow(workflow_name text, workflow_hash text DEFAULT NULL, context jsonb DEFAULT '{}',
                               definition jsonb DEFAULT NULL, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_hash text := workflow_hash;
    v_def jsonb;
    v_first text;
    c campaigns;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- The definition is not compared: the folder may have been edited between the two calls.
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'start_workflow', jsonb_build_object('workflow_name', workflow_name, 'context', context)),
                        _keep(request_id, 'start_workflow', jsonb_build_object('workflow_name', workflow_name, 'context', context),
                              start_workflow(workflow_name => workflow_name, workflow_hash => workflow_hash,
                                             context => context, definition => definition)));
    END IF;
    IF definition IS NOT NULL THEN
        v_hash := load_workflow(workflow_name, definition) ->> 'hash';
        IF workflow_hash IS NOT NULL AND workflow_hash <> v_hash THEN
            PERFORM _raise('invalid_argument', format('workflow_hash %s is not the hash of the definition given (%s)', workflow_hash, v_hash));
        END IF;
    ELSIF v_hash IS NULL THEN
        PERFORM _raise('invalid_argument', 'pass the workflow_hash of a loaded definition, or the definition itself');
    END IF;
    SELECT w.definition INTO v_def FROM workflows w WHERE w.name = workflow_name AND w.hash = v_hash;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('workflow %s with hash %s is not loaded', workflow_name, v_hash));
    END IF;
    IF context IS NOT NULL AND jsonb_typeof(context) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context must be a JSON object');
    END IF;
    v_first := (_workflow_step_names(v_def))[1];
    INSERT INTO campaigns (name, goal, planner, context, workflow, workflow_hash, workflow_step)
    VALUES (left(workflow_name, 200), coalesce(nullif(btrim(v_def ->> 'goal'), ''), 'workflow ' || workflow_name),
            'none', coalesce(context, '{}'), workflow_name, v_hash, v_first)
    RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, determined_next_step, decided_by, at)
    VALUES (c.id, v_first, 'start', _clock());
    PERFORM _emit(c.id, NULL, 'campaign.created', jsonb_build_object('name', c.name, 'workflow', workflow_name));
    RETURN _workflow_view(c);
END
$$;

CREATE OR REPLACE FUNCTION get_workflow_status(instance_id uuid, with_definition boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    SELECT * INTO c FROM campaigns WHERE id = instance_id AND workflow IS NOT NULL;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('workflow instance %s does not exist', instance_id));
    END IF;
    RETURN _workflow_view(c, with_definition);
END
$$;

CREATE OR REPLACE FUNCTION _workflow_move(c campaigns, p_report jsonb, p_updates jsonb, p_next_step text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_def jsonb := _workflow_definition(c);
    v_names text[] := _workflow_step_names(v_def);
    v_transitions jsonb := coalesce(_workflow_step(v_def, c.workflow_step) -> 'transitions', '{}');
    v_status text := p_report ->> 'status';
    v_next text;
    v_how text := 'choice';
BEGIN
    IF v_transitions <> '{}' THEN
        IF v_status IS NULL OR NOT v_transitions ? v_status THEN
            PERFORM _raise('invalid_argument', format('step %L declares transitions on %s: report.status must be one of them, not %s',
                          c.workflow_step, (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(v_transitions) k),
                          coalesce(quote_literal(v_status), 'missing')));
        END IF;
        v_next := _workflow_step_named(v_names, v_transitions ->> v_status);
        v_how := 'transition';
    ELSIF p_next_step IS NULL THEN
        PERFORM _raise('choice_required', format('step %L declares no transitions: choose the next step, one of %s',
                      c.workflow_step, array_to_string(v_names || _workflow_finish(), ', ')));
    ELSE
        v_next := _workflow_step_named(v_names, p_next_step);
        IF v_next IS NULL THEN
            PERFORM _raise('invalid_argument', format('%L is not a step of workflow %s; choose one of %s',
                          p_next_step, c.workflow, array_to_string(v_names || _workflow_finish(), ', ')));
        END IF;
    END IF;
    UPDATE campaigns
       SET context = context || coalesce(p_updates, '{}'),
           workflow_step = CASE WHEN v_next = _workflow_finish() THEN NULL ELSE v_next END,
           updated_at = now()
     WHERE id = c.id
    RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, step_name, report, outcome_status, determined_next_step, decided_by, at)
    VALUES (c.id, p_report ->> 'step_id', p_report, v_status, v_next, v_how, _clock());
    PERFORM _emit(c.id, NULL, 'workflow.advanced',
                 jsonb_build_object('from', p_report ->> 'step_id', 'to', v_next, 'decided_by', v_how));
    IF v_next = _workflow_finish() THEN
        PERFORM _end_campaign(c.id, 'done', 'workflow finished');
        SELECT * INTO c FROM campaigns WHERE id = c.id;
    END IF;
    RETURN _workflow_view(c) || jsonb_build_object('decided_by', v_how);
END
$$;

CREATE OR REPLACE FUNCTION _lock_active_workflow(p_instance uuid, p_report jsonb, p_updates jsonb) RETURNS campaigns
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns := _lock_campaign(p_instance);
BEGIN
    IF c.workflow IS NULL THEN
        PERFORM _raise('not_found', format('campaign %s is not a workflow instance', p_instance));
    END IF;
    IF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('workflow instance %s is %s', c.id, c.status));
    END IF;
    IF p_report IS NOT NULL AND jsonb_typeof(p_report) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'report must be a JSON object');
    END IF;
    IF p_updates IS NOT NULL AND jsonb_typeof(p_updates) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context_updates must be a JSON object');
    END IF;
    RETURN c;
END
$$;

CREATE OR REPLACE FUNCTION advance_workflow(instance_id uuid, report jsonb, context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL,
                                 request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_arguments jsonb := jsonb_build_object('instance_id', instance_id, 'report', report,
                                            'context_updates', context_updates);
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    PERFORM _require(report IS NOT NULL, 'report: {step_id, status}');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- next_step is not compared: the server may have had the planner pick it.
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'advance_workflow', v_arguments),
                        _keep(request_id, 'advance_workflow', v_arguments, advance_workflow(
                            instance_id => instance_id, report => report, context_updates => context_updates,
                            next_step => next_step)));
    END IF;
    c := _lock_active_workflow(instance_id, report, context_updates);
    IF report IS NULL OR jsonb_typeof(report -> 'step_id') IS DISTINCT FROM 'string' THEN
        PERFORM _raise('invalid_argument', format('report.step_id is required: the name of the step reported on (now %L)', c.workflow_step));
    END IF;
    IF report ->> 'step_id' IS DISTINCT FROM c.workflow_step THEN
        PERFORM _raise('invalid_state', format('report.step_id %L is not the current step %L (get_workflow_status, or resume_workflow)',
                      report ->> 'step_id', c.workflow_step));
    END IF;
    RETURN _workflow_move(c, report, context_updates, next_step);
END
$$;

CREATE OR REPLACE FUNCTION resume_workflow(instance_id uuid, assumed_current_step_name text, report jsonb DEFAULT NULL,
                                context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_assumed text;
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    PERFORM _require(assumed_current_step_name IS NOT NULL, 'assumed_current_step_name');
    c := _lock_active_workflow(instance_id, report, context_updates);
    v_assumed := _workflow_step_named(_workflow_step_names(_workflow_definition(c)), assumed_current_step_name);
    IF v_assumed IS NULL OR v_assumed = _workflow_finish() THEN
        PERFORM _raise('invalid_argument', format('%L is not a step of workflow %s', assumed_current_step_name, c.workflow));
    END IF;
    IF v_assumed = c.workflow_step AND report ? 'status' THEN
        RETURN _workflow_move(c, report || jsonb_build_object('step_id', v_assumed), context_updates, next_step);
    END IF;
    UPDATE campaigns SET context = context || coalesce(context_updates, '{}'), updated_at = now()
     WHERE id = c.id RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, step_name, report, outcome_status, determined_next_step, decided_by, at)
    VALUES (c.id, v_assumed, report, 'resumed', c.workflow_step, 'resume', _clock());
    RETURN _workflow_view(c) || jsonb_build_object('decided_by', 'resume', 'assumed_step_name', v_assumed,
                                                  'reconciled', v_assumed IS DISTINCT FROM c.workflow_step);
END
$$;

-- sql/engine/idempotency.sql
CREATE TABLE IF NOT EXISTS idempotency_records (
    request_id      text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 200),
    call            text NOT NULL,
    arguments_hash  text NOT NULL,
    result          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS idempotency_records_created_at ON idempotency_records (created_at);

CREATE TABLE IF NOT EXISTS finished_claims (
    campaign_id  uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    claim_token  uuid PRIMARY KEY,
    step_id      bigint NOT NULL,
    call         text NOT NULL,
    arguments_hash text NOT NULL,
    result       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS finished_claims_campaign_created ON finished_claims (campaign_id, created_at);

CREATE OR REPLACE FUNCTION _idempotency_retention() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '48 hours' $$;

CREATE OR REPLACE FUNCTION _arguments_hash(p_arguments jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(p_arguments::text, 'UTF8')), 'hex') $$;

CREATE OR REPLACE FUNCTION _replay(p_request_id text, p_call text, p_arguments jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    r idempotency_records;
BEGIN
    IF length(p_request_id) NOT BETWEEN 1 AND 200 THEN
        PERFORM _raise('invalid_argument', format('request_id must be 1 to 200 characters, not %s',
                                                 length(p_request_id)));
    END IF;
    PERFORM pg_advisory_xact_lock(1397704788, hashtext(p_request_id));
    SELECT * INTO r FROM idempotency_records WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.call <> p_call OR r.arguments_hash <> _arguments_hash(p_arguments) THEN
        PERFORM _raise('invalid_argument', format(
            'request_id %L was already used by a %s call with other arguments; use a new request_id for a new request',
            p_request_id, r.call));
    END IF;
    RETURN r.result || '{"replayed": true}';
END
$$;

CREATE OR REPLACE FUNCTION _keep(p_request_id text, p_call text, p_arguments jsonb, p_result jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM idempotency_records
     WHERE request_id IN (SELECT request_id FROM idempotency_records
                           WHERE created_at < now() - _idempotency_retention()
                           ORDER BY created_at LIMIT 10);
    INSERT INTO idempotency_records (request_id, call, arguments_hash, result)
    VALUES (p_request_id, p_call, _arguments_hash(p_arguments), p_result);
    RETURN p_result;
END
$$;

CREATE OR REPLACE FUNCTION _finished_claim(p_campaign uuid, p_step bigint, p_token uuid, p_call text, p_arguments jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT f.result || '{"replayed": true}'
              FROM finished_claims f
             WHERE f.campaign_id = p_campaign AND f.claim_token = p_token AND f.step_id = p_step
               AND f.call = p_call AND f.arguments_hash = _arguments_hash(p_arguments));
END
$$;

CREATE OR REPLACE FUNCTION _keep_finished_claim(p_campaign uuid, p_step bigint, p_token uuid, p_call text, p_arguments jsonb,
                                     p_result jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_before timestamptz := now() - _idempotency_retention();
    v_hash text := _arguments_hash(p_arguments);
BEGIN
    IF p_token IS NULL THEN
        RETURN p_result;
    END IF;
    DELETE FROM finished_claims f
     WHERE f.campaign_id = p_campaign
       AND f.claim_token IN (SELECT o.claim_token FROM finished_claims o
                              WHERE o.campaign_id = p_campaign AND o.created_at < v_before
                              ORDER BY o.created_at LIMIT 10);
    -- No conflict target: on Citus the key is (campaign_id, claim_token).
    INSERT INTO finished_claims (campaign_id, claim_token, step_id, call, arguments_hash, result)
    VALUES (p_campaign, p_token, p_step, p_call, v_hash, p_result)
    ON CONFLICT DO NOTHING;
    RETURN p_result;
END
$$;

-- sql/engine/observe.sql
CREATE INDEX IF NOT EXISTS events_id_range ON events USING brin (id);

CREATE OR REPLACE FUNCTION _event_row(e events) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT jsonb_build_object('id', e.id, 'campaign_id', e.campaign_id, 'seq', e.seq, 'step_id', e.step_id,
                              'kind', e.kind, 'payload', e.payload, 'at', e.at);
$$;

CREATE INDEX IF NOT EXISTS events_at_range ON events USING brin (at);

CREATE OR REPLACE FUNCTION events(campaign_id uuid DEFAULT NULL, after_id bigint DEFAULT 0, "limit" integer DEFAULT 100,
                       after text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_limit integer := least(greatest(coalesce("limit", 100), 1), 1000);
    -- The order a position names: 's' one campaign's numbers, 'i' ids, 't' (at, campaign, seq).
    v_mode text := CASE WHEN campaign_id IS NOT NULL THEN 's' WHEN _on_citus() THEN 't' ELSE 'i' END;
    v_parts text[];
    v_id bigint := 0;
    v_seq bigint := 0;
    v_at timestamptz := '-infinity';
    v_campaign uuid := '00000000-0000-0000-0000-000000000000';
    v_start boolean := after IS NULL AND coalesce(after_id, 0) = 0;
    v_rows jsonb;
    v_last jsonb;
    v_next text;
BEGIN
    IF after_id IS NOT NULL AND after_id < 0 THEN
        PERFORM _raise('invalid_argument', 'after_id must be 0 or an event id');
    END IF;
    IF campaign_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    IF after IS NOT NULL THEN
        v_parts := regexp_match(after, '^(s|i)(\d{1,19})$');
        IF v_parts IS NULL THEN
            v_parts := regexp_match(after, '^(t)(\d{1,19})/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/(\d{1,19})$');
        END IF;
        -- An id position ('i', which after_id answers too) pages by id in any call.
        IF v_parts IS NOT NULL AND v_parts[1] = 'i' THEN
            v_mode := 'i';
        END IF;
        IF v_parts[1] IS DISTINCT FROM v_mode THEN
            v_parts := NULL;
        ELSE
            BEGIN
                IF v_mode = 't' THEN
                    v_at := timestamptz 'epoch' + v_parts[2]::bigint * interval '1 microsecond';
                    v_campaign := v_parts[3]::uuid;
                    v_seq := v_parts[4]::bigint;
                ELSIF v_mode = 's' THEN
                    v_seq := v_parts[2]::bigint;
                ELSE
                    v_id := v_parts[2]::bigint;
                END IF;
            EXCEPTION WHEN numeric_value_out_of_range OR datetime_field_overflow OR invalid_text_representation THEN
                v_parts := NULL;
            END;
        END IF;
        -- Another form than this call gives, a number beyond what it can name, or a campaign
        -- position past the campaign's last event.
        IF v_parts IS NULL
           OR (v_mode = 's' AND v_seq > (SELECT c.event_seq FROM campaigns c WHERE c.id = campaign_id)) THEN
            PERFORM _raise('invalid_argument', format(
                'after must be the next_after of an earlier events() call with the same campaign_id, not %L', left(after, 80)));
        END IF;
    ELSIF NOT v_start THEN
        -- after_id: the id order, as before positions (single node).
        v_mode := 'i';
        v_id := after_id;
    END IF;

    IF v_start THEN
        -- The newest, by the order of the position the answer gives.
        IF v_mode = 's' THEN
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.seq), '[]') INTO v_rows
              FROM (SELECT * FROM events e WHERE e.campaign_id = campaign_id ORDER BY e.seq DESC LIMIT v_limit) e;
        ELSIF v_mode = 't' THEN
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.at, e.campaign_id, e.seq), '[]') INTO v_rows
              FROM (SELECT * FROM events e ORDER BY e.at DESC, e.campaign_id DESC, e.seq DESC LIMIT v_limit) e;
        ELSE
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.id), '[]') INTO v_rows
              FROM (SELECT * FROM events e ORDER BY e.tx DESC, e.id DESC LIMIT v_limit) e;
        END IF;
    ELSIF v_mode = 's' THEN
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.seq), '[]') INTO v_rows
          FROM (SELECT * FROM events e WHERE e.campaign_id = campaign_id AND e.seq > v_seq
                 ORDER BY e.seq LIMIT v_limit) e;
    ELSIF v_mode = 't' THEN
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.at, e.campaign_id, e.seq), '[]') INTO v_rows
          FROM (SELECT * FROM events e
                 WHERE e.at >= v_at AND (e.at, e.campaign_id, e.seq) > (v_at, v_campaign, v_seq)
                 ORDER BY e.at, e.campaign_id, e.seq LIMIT v_limit) e;
    ELSE
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.id), '[]') INTO v_rows
          FROM (SELECT * FROM events e
                 WHERE e.id > v_id AND (campaign_id IS NULL OR e.campaign_id = campaign_id)
                 ORDER BY e.id LIMIT v_limit) e;
    END IF;

    v_last := v_rows -> -1;
    IF v_mode = 's' THEN
        v_next := 's' || coalesce((v_last ->> 'seq')::bigint, v_seq);
    ELSIF v_mode = 't' THEN
        IF v_last IS NULL THEN
            -- Nothing after the position (or no log yet: the position before every event).
            v_next := 't' || CASE WHEN v_at = '-infinity' THEN 0 ELSE (extract(epoch FROM v_at) * 1000000)::bigint END
                      || '/' || v_campaign || '/' || v_seq;
        ELSE
            v_next := 't' || (extract(epoch FROM (v_last ->> 'at')::timestamptz) * 1000000)::bigint
                      || '/' || (v_last ->> 'campaign_id') || '/' || (v_last ->> 'seq');
        END IF;
    ELSE
        v_next := 'i' || coalesce((v_last ->> 'id')::bigint, v_id);
    END IF;
    RETURN jsonb_build_object(
        'events', v_rows,
        'next_after_id', coalesce((v_last ->> 'id')::bigint, after_id, 0),
        'next_after', v_next,
        'has_more', NOT v_start AND jsonb_array_length(v_rows) = v_limit);
END
$$;

CREATE OR REPLACE FUNCTION health(grace interval DEFAULT '30 seconds') RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_grace double precision := extract(epoch FROM coalesce(grace, interval '30 seconds'));
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
    v_oldest jsonb;
    v_leases jsonb;
    v_tables jsonb;
    v_notifications jsonb;
    v_stalled jsonb;
    v_problems jsonb := '[]';
BEGIN
    IF v_grace < 0 THEN
        PERFORM _raise('invalid_argument', 'grace must not be negative');
    END IF;
    PERFORM pg_stat_clear_snapshot();

    SELECT jsonb_build_object(
               'pid', a.pid, 'state', a.state, 'application_name', a.application_name,
               'age_seconds', round(extract(epoch FROM clock_timestamp() - a.xact_start)::numeric, 1),
               'query', left(a.query, 200),
               -- A transaction id: it wrote or locked rows, which rules may wait for. An old
               -- snapshot (backend_xmin) holds back the clean-up of dead rows. Neither holds
               -- get_updates back (events are numbered per campaign, updates.sql).
               'has_transaction_id', a.backend_xid IS NOT NULL,
               'holds_back_cleanup', a.backend_xmin IS NOT NULL)
      INTO v_oldest
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
       AND a.backend_type = 'client backend'
     ORDER BY a.xact_start
     LIMIT 1;
    -- Idle in a transaction for `grace`: nobody is working in it, and whatever it locked waits
    -- for it (a campaign's rules, if it locked the campaign). Any transaction open for a minute
    -- or more holds back vacuum's clean-up of dead rows.
    IF v_oldest IS NOT NULL AND (v_oldest ->> 'state') LIKE 'idle in transaction%'
       AND (v_oldest ->> 'age_seconds')::double precision >= v_grace THEN
        v_problems := v_problems || jsonb_build_object('code', 'open_transaction',
            'message', format('pid %s has been idle in a transaction for %s s: what it locked waits for it, and vacuum cannot clean up behind it',
                              v_oldest ->> 'pid', v_oldest ->> 'age_seconds'));
    ELSIF v_oldest IS NOT NULL AND (v_oldest ->> 'age_seconds')::double precision >= greatest(v_grace, 60) THEN
        v_problems := v_problems || jsonb_build_object('code', 'open_transaction',
            'message', format('pid %s has held a transaction open for %s s (%s): vacuum cannot clean up dead rows behind it',
                              v_oldest ->> 'pid', v_oldest ->> 'age_seconds', v_oldest ->> 'state'));
    END IF;

    SELECT jsonb_build_object('count', count(*),
                              'oldest_expired_seconds', round(max(extract(epoch FROM v_now - s.lease_expires_at))::numeric, 1),
                              'step_ids', coalesce((array_agg(s.id ORDER BY s.lease_expires_at))[1:20], '{}'))
      INTO v_leases
      FROM steps s
     WHERE s.status = 'running' AND s.step_type = 'atomic' AND s.lease_expires_at < v_now;
    IF (v_leases ->> 'count')::bigint > 0 AND (v_leases ->> 'oldest_expired_seconds')::double precision >= v_grace THEN
        v_problems := v_problems || jsonb_build_object('code', 'expired_leases',
            'message', format('%s running steps have an expired lease that nothing reset (is sortie-runner running? reset_zombies() resets them)',
                              v_leases ->> 'count'));
    END IF;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'table', t.relname, 'live_rows', t.n_live_tup, 'dead_rows', t.n_dead_tup,
               'dead_ratio', round((t.n_dead_tup::numeric / greatest(t.n_live_tup + t.n_dead_tup, 1)), 3),
               'last_autovacuum', t.last_autovacuum) ORDER BY t.relname), '[]')
      INTO v_tables
      FROM pg_stat_user_tables t
     WHERE t.relid IN ('steps'::regclass, 'campaigns'::regclass, 'events'::regclass, 'notes'::regclass);
    SELECT v_problems || coalesce(jsonb_agg(jsonb_build_object('code', 'table_bloat',
               'message', format('%s is %s%% dead rows (%s): vacuum cannot keep up, often because of an old open transaction',
                                 x ->> 'table', round((x ->> 'dead_ratio')::numeric * 100), x ->> 'dead_rows'))), '[]')
      INTO v_problems
      FROM jsonb_array_elements(v_tables) x
     WHERE (x ->> 'dead_rows')::bigint >= 10000 AND (x ->> 'dead_ratio')::numeric >= 0.5;

    SELECT jsonb_build_object('count', count(*) FILTER (WHERE NOT n.delivered AND n.given_up_at IS NULL),
                              'given_up', count(*) FILTER (WHERE n.given_up_at IS NOT NULL),
                              'oldest_seconds', round(max(extract(epoch FROM now() - n.created_at))
                                                      FILTER (WHERE NOT n.delivered AND n.given_up_at IS NULL)::numeric, 1))
      INTO v_notifications
      FROM notifications n
     WHERE NOT n.delivered;
    IF (v_notifications ->> 'count')::bigint > 0
       AND (v_notifications ->> 'oldest_seconds')::double precision >= greatest(v_grace, 300) THEN
        v_problems := v_problems || jsonb_build_object('code', 'undelivered_notifications',
            'message', format('%s notifications are undelivered, the oldest for %s s (is sortie-runner running with SORTIE_WEBHOOK_URL?)',
                              v_notifications ->> 'count', v_notifications ->> 'oldest_seconds'));
    END IF;

    -- Active, nothing ready, nothing running, nobody asked a question: only the planner or a
    -- coordinator's add_steps can move it, or a dependency it waits for never resolves.
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'open_steps', c.open_steps,
                                                 'planner', c.planner,
                                                 'idle_seconds', round(extract(epoch FROM v_now - c.updated_at)::numeric, 1))
                              ORDER BY c.updated_at), '[]')
      INTO v_stalled
      FROM campaigns c
     WHERE c.status = 'active' AND c.ready_steps = 0 AND c.running_steps = 0
       AND NOT EXISTS (SELECT 1 FROM steps w WHERE w.campaign_id = c.id AND w.status = 'waiting_input');
    SELECT v_problems || coalesce(jsonb_agg(jsonb_build_object('code', 'stalled_campaign',
               'message', format('campaign %s (%s) is active with nothing ready and nothing running for %s s; %s',
                                 x ->> 'id', x ->> 'name', x ->> 'idle_seconds',
                                 CASE WHEN (x ->> 'open_steps')::int = 0
                                      THEN CASE x ->> 'planner' WHEN 'llm' THEN 'it waits for the planner (LITELLM_URL) or add_steps'
                                                ELSE 'it waits for add_steps or finish_campaign' END
                                      ELSE 'its open steps wait for something that is not moving' END))), '[]')
      INTO v_problems
      FROM jsonb_array_elements(v_stalled) x
     WHERE (x ->> 'idle_seconds')::double precision >= greatest(v_grace, 60);

    RETURN jsonb_build_object(
        'ok', jsonb_array_length(v_problems) = 0,
        'problems', v_problems,
        'oldest_transaction', v_oldest,
        'expired_leases', v_leases,
        'tables', v_tables,
        'undelivered_notifications', v_notifications,
        'stalled_campaigns', v_stalled,
        'checked_at', clock_timestamp());
END
$$;

CREATE OR REPLACE FUNCTION _graph_node(s steps, p_parent_type text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'parent_id', s.parent_id, 'position', s.position, 'depth', s.depth,
        'action', s.action, 'agent', s.agent, 'step_type', s.step_type, 'status', s.status,
        'skip_cause', s.skip_cause, 'attempts', s.attempts, 'max_attempts', s.max_attempts,
        -- `attempts` counts failed attempts; `tries` adds the one running or that succeeded.
        'tries', s.attempts + CASE WHEN s.step_type = 'atomic' AND s.status IN ('running', 'waiting_input', 'done')
                                   THEN 1 ELSE 0 END,
        'continuation_of', s.continuation_of, 'continued_by', s.continued_by,
        'spawned_by', CASE WHEN p_parent_type = 'atomic' THEN s.parent_id END,
        'claim_owner', CASE WHEN s.status = 'running' THEN s.claim_owner END,
        'started_at', s.started_at, 'completed_at', s.completed_at,
        'duration_ms', coalesce(s.duration_ms,
                                CASE WHEN s.status = 'running' AND s.claimed_at IS NOT NULL
                                     THEN (extract(epoch FROM p_now - s.claimed_at) * 1000)::bigint END),
        'lease_expires_at', CASE WHEN s.status = 'running' THEN s.lease_expires_at END,
        'output_line', left(split_part(btrim(s.output, E' \n\r\t'), E'\n', 1), 200),
        'output_chars', length(s.output),
        'error', left(s.error, 300), 'question', s.question));
$$;

CREATE OR REPLACE FUNCTION campaign_graph(id uuid, max_steps integer DEFAULT 5000) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_limit integer := least(greatest(coalesce(max_steps, 5000), 1), 20000);
    v_total bigint;
    v_now timestamptz := _clock();
BEGIN
    IF id IS NULL THEN
        PERFORM _raise('invalid_argument', 'id is required: the campaign to draw');
    END IF;
    SELECT * INTO c FROM campaigns WHERE campaigns.id = id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', id));
    END IF;
    SELECT count(*) INTO v_total FROM steps WHERE steps.campaign_id = c.id;
    RETURN jsonb_build_object(
        'campaign', _campaign_summary(c) || jsonb_build_object('ready_steps', c.ready_steps),
        'step_counts', (SELECT coalesce(jsonb_object_agg(t.status, t.n), '{}')
                          FROM (SELECT s.status, count(*) AS n FROM steps s WHERE s.campaign_id = c.id GROUP BY s.status) t),
        'nodes', (SELECT coalesce(jsonb_agg(_graph_node(s, p.step_type, v_now) ORDER BY s.id), '[]')
                    FROM (SELECT * FROM steps WHERE steps.campaign_id = c.id ORDER BY steps.id LIMIT v_limit) s
                    LEFT JOIN steps p ON p.campaign_id = c.id AND p.id = s.parent_id),
        'edges', (SELECT coalesce(jsonb_agg(e ORDER BY e ->> 'kind', (e ->> 'to')::bigint, (e ->> 'from')::bigint), '[]') FROM (
                    SELECT jsonb_build_object('from', d.depends_on, 'to', d.step_id, 'kind', 'dependency') AS e
                      FROM step_dependencies d
                     WHERE d.campaign_id = c.id AND d.step_id <= (SELECT max(x.id) FROM (SELECT steps.id FROM steps WHERE steps.campaign_id = c.id ORDER BY steps.id LIMIT v_limit) x)
                    UNION ALL
                    SELECT jsonb_build_object('from', s.parent_id, 'to', s.id, 'kind', 'spawned')
                      FROM steps s JOIN steps p ON p.campaign_id = s.campaign_id AND p.id = s.parent_id AND p.step_type = 'atomic'
                     WHERE s.campaign_id = c.id
                    UNION ALL
                    SELECT jsonb_build_object('from', s.continuation_of, 'to', s.id, 'kind', 'continues')
                      FROM steps s
                     WHERE s.campaign_id = c.id AND s.continuation_of IS NOT NULL) edges),
        'total_steps', v_total,
        'truncated', v_total > v_limit);
END
$$;

CREATE OR REPLACE FUNCTION activity("limit" integer DEFAULT 50) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_limit integer := least(greatest(coalesce("limit", 50), 1), 1000);
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    RETURN jsonb_build_object(
        'running', (SELECT coalesce(jsonb_agg(r ORDER BY r ->> 'started_at'), '[]') FROM (
            SELECT jsonb_strip_nulls(jsonb_build_object(
                       'step_id', s.id, 'campaign_id', s.campaign_id, 'campaign_name', c.name,
                       'action', s.action, 'agent', s.agent, 'claim_owner', s.claim_owner,
                       'attempts', s.attempts, 'started_at', s.claimed_at,
                       'running_seconds', round(extract(epoch FROM v_now - s.claimed_at)::numeric, 1),
                       'lease_seconds_left', round(extract(epoch FROM s.lease_expires_at - v_now)::numeric, 1))) AS r
              FROM steps s JOIN campaigns c ON c.id = s.campaign_id
             WHERE s.status = 'running' AND s.step_type = 'atomic'
             ORDER BY s.claimed_at
             LIMIT v_limit) running),
        'campaigns', (SELECT coalesce(jsonb_agg(x ORDER BY x ->> 'created_at' DESC), '[]') FROM (
            SELECT jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status, 'priority', c.priority,
                                      'progress', c.progress, 'open_steps', c.open_steps,
                                      'running_steps', c.running_steps, 'ready_steps', c.ready_steps,
                                      'step_counts', (SELECT coalesce(jsonb_object_agg(t.status, t.n), '{}')
                                                        FROM (SELECT s.status, count(*) AS n FROM steps s
                                                               WHERE s.campaign_id = c.id AND s.step_type = 'atomic'
                                                               GROUP BY s.status) t),
                                      'created_at', c.created_at) AS x
              FROM campaigns c
             WHERE c.status IN ('active', 'paused')
             ORDER BY c.created_at DESC
             LIMIT v_limit) active),
        'at', v_now);
END
$$;

-- sql/engine/retention.sql
CREATE OR REPLACE FUNCTION prune(older_than interval DEFAULT interval '30 days', "limit" integer DEFAULT 1000)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_id uuid;
    v_ids uuid[] := '{}';
    v_steps bigint;
    v_events bigint;
    v_notes bigint;
    v_more boolean;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_before timestamptz;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        PERFORM _raise('invalid_argument', 'older_than must be an interval of zero or more');
    END IF;
    IF "limit" IS NULL OR "limit" NOT BETWEEN 1 AND 10000 THEN
        PERFORM _raise('invalid_argument', 'limit must be from 1 to 10000');
    END IF;
    v_before := _clock() - older_than;
    FOR v_id IN SELECT c.id FROM campaigns c
                 WHERE c.status IN ('done', 'failed', 'cancelled') AND c.completed_at < v_before
                 ORDER BY c.completed_at LOOP
        PERFORM 1 FROM campaigns c
         WHERE c.id = v_id AND c.status IN ('done', 'failed', 'cancelled') AND c.completed_at < v_before
           FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_ids := v_ids || v_id;
        EXIT WHEN cardinality(v_ids) >= "limit";
    END LOOP;
    SELECT count(*) INTO v_steps FROM steps s WHERE s.campaign_id = ANY (v_ids);
    SELECT count(*) INTO v_events FROM events e WHERE e.campaign_id = ANY (v_ids);
    SELECT count(*) INTO v_notes FROM notes n WHERE n.campaign_id = ANY (v_ids);
    -- Dependencies, notes and steps first, in bulk: left to the cascade, each step's removal
    -- would look up its dependents and notes one by one.
    DELETE FROM step_dependencies d WHERE d.campaign_id = ANY (v_ids);
    DELETE FROM notes n WHERE n.campaign_id = ANY (v_ids);
    DELETE FROM events e WHERE e.campaign_id = ANY (v_ids);
    DELETE FROM finished_claims f WHERE f.campaign_id = ANY (v_ids);
    -- Lock keys are global (under Citus a reference table, without a foreign key to campaigns).
    DELETE FROM resource_leases l WHERE l.campaign_id = ANY (v_ids);
    DELETE FROM steps s WHERE s.campaign_id = ANY (v_ids);
    DELETE FROM campaigns c WHERE c.id = ANY (v_ids);
    v_more := cardinality(v_ids) = "limit" AND EXISTS (
        SELECT 1 FROM campaigns c
         WHERE c.status IN ('done', 'failed', 'cancelled') AND c.completed_at < v_before);
    RETURN jsonb_build_object('campaigns', cardinality(v_ids), 'steps', v_steps, 'events', v_events,
                              'notes', v_notes, 'more', v_more);
END
$$;

-- sql/engine/backup.sql
DO $backup$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel
          FROM pg_class c
          JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
         WHERE c.relkind IN ('r', 'S')
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(r.rel, '');
    END LOOP;
END
$backup$;

-- sql/engine/invariants.sql
CREATE OR REPLACE FUNCTION _campaign_wait_cycle(p_campaign uuid) RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_ids bigint[];
    v_parents bigint[];
    v_dep_steps bigint[];
    v_dep_on bigint[];
BEGIN
    SELECT coalesce(array_agg(s.id ORDER BY s.id), '{}'), coalesce(array_agg(s.parent_id ORDER BY s.id), '{}')
      INTO v_ids, v_parents
      FROM steps s
     WHERE s.campaign_id = p_campaign AND s.status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_ids) = 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(array_agg(d.step_id), '{}'), coalesce(array_agg(d.depends_on), '{}')
      INTO v_dep_steps, v_dep_on
      FROM step_dependencies d
     WHERE d.campaign_id = p_campaign AND d.step_id = ANY (v_ids);
    RETURN _wait_cycle_step(v_ids, v_parents, v_dep_steps, v_dep_on);
END
$$;

CREATE OR REPLACE FUNCTION check_invariants(campaign_id uuid DEFAULT NULL) RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    v_campaign uuid;
    v_step bigint;
BEGIN
    -- $1: the argument campaign_id (named like the columns).
    RETURN QUERY
    WITH scope AS (SELECT * FROM campaigns c WHERE $1 IS NULL OR c.id = $1),
    counts AS (
        SELECT c.id,
               c.open_steps, c.running_steps, c.ready_steps,
               count(s.id) FILTER (WHERE s.status IN ('pending', 'running', 'waiting_input')) AS open_actual,
               count(s.id) FILTER (WHERE s.status = 'running' AND s.step_type = 'atomic') AS running_actual,
               count(s.id) FILTER (WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0) AS ready_actual
          FROM scope c LEFT JOIN steps s ON s.campaign_id = c.id
         GROUP BY c.id, c.open_steps, c.running_steps, c.ready_steps)
    SELECT format('campaign %s: open_steps is %s, actual %s', id, open_steps, open_actual) FROM counts WHERE open_steps <> open_actual
    UNION ALL
    SELECT format('campaign %s: running_steps is %s, actual %s', id, running_steps, running_actual) FROM counts WHERE running_steps <> running_actual
    UNION ALL
    SELECT format('campaign %s: ready_steps is %s, actual %s', id, ready_steps, ready_actual) FROM counts WHERE ready_steps <> ready_actual
    UNION ALL
    SELECT format('campaign %s: ready step %s lies below ready_floor %s', c.id, s.id, c.ready_floor)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0 AND s.id < c.ready_floor
    UNION ALL
    -- Unmet dependencies counted per step in a join rather than by a subquery per step: Citus
    -- plans no correlated subquery beside a subquery without FROM.
    SELECT format('step %s: remaining_deps is %s, expected %s', e.id, e.remaining_deps, e.expected)
      FROM (SELECT s.id, s.remaining_deps,
                   coalesce(u.n, 0)
                   + CASE WHEN p.step_type <> 'atomic' AND p.status = 'pending' AND p.remaining_deps > 0 THEN 1 ELSE 0 END
                     AS expected
              FROM scope c JOIN steps s ON s.campaign_id = c.id
              LEFT JOIN steps p ON p.campaign_id = s.campaign_id AND p.id = s.parent_id
              LEFT JOIN (SELECT d.campaign_id, d.step_id, count(*) AS n
                           FROM step_dependencies d
                           JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
                          WHERE x.status <> 'done' AND d.campaign_id IN (SELECT id FROM scope)
                          GROUP BY d.campaign_id, d.step_id) u ON u.campaign_id = s.campaign_id AND u.step_id = s.id
             WHERE s.status = 'pending') e
     WHERE e.remaining_deps <> e.expected
    UNION ALL
    SELECT format('step %s: is running without a claim token', s.id)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status = 'running' AND s.step_type = 'atomic' AND (s.claim_token IS NULL OR s.lease_expires_at IS NULL)
    UNION ALL
    SELECT format('step %s: is %s but holds a claim token', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.claim_token IS NOT NULL AND s.status NOT IN ('running', 'skipped')
    UNION ALL
    SELECT format('step %s: is %s without completed_at', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status IN ('done', 'failed', 'skipped') AND s.completed_at IS NULL
    UNION ALL
    SELECT format('step %s: compound step is %s', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.step_type <> 'atomic' AND s.status = 'waiting_input'
    UNION ALL
    SELECT format('step %s: members %s/%s/%s, actual %s/%s/%s', p.id, p.members, p.members_resolved, p.members_failed,
                  m.total, m.resolved, m.failed)
      FROM scope c JOIN steps p ON p.campaign_id = c.id
     CROSS JOIN LATERAL (
         SELECT count(*) AS total,
                count(*) FILTER (WHERE k.status = 'done' OR (k.status = 'skipped' AND k.skip_cause IN ('abort', 'threshold'))) AS resolved,
                count(*) FILTER (WHERE k.status = 'failed' OR (k.status = 'skipped' AND k.skip_cause NOT IN ('abort', 'threshold'))) AS failed
           FROM steps k WHERE k.campaign_id = p.campaign_id AND k.parent_id = p.id AND k.continued_by IS NULL) m
     WHERE p.step_type <> 'atomic'
       AND (p.members <> m.total OR p.members_resolved <> m.resolved OR p.members_failed <> m.failed)
    UNION ALL
    SELECT format('step %s: done compound step has open member %s', p.id, k.id)
      FROM scope c JOIN steps p ON p.campaign_id = c.id JOIN steps k ON k.campaign_id = p.campaign_id AND k.parent_id = p.id
     WHERE p.step_type <> 'atomic' AND p.status IN ('done', 'failed', 'skipped')
       AND k.status IN ('pending', 'running', 'waiting_input')
    UNION ALL
    SELECT format('step %s: open in %s campaign %s', s.id, c.status, c.id)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE c.status IN ('done', 'failed', 'cancelled') AND s.status IN ('pending', 'running', 'waiting_input')
    UNION ALL
    -- Both ends must be steps of the dependency's own campaign (each looked up within it, so
    -- that no query joins two campaigns).
    SELECT format('dependency %s -> %s crosses campaigns', d.step_id, d.depends_on)
      FROM step_dependencies d
     WHERE NOT EXISTS (SELECT 1 FROM steps a WHERE a.campaign_id = d.campaign_id AND a.id = d.step_id)
        OR NOT EXISTS (SELECT 1 FROM steps b WHERE b.campaign_id = d.campaign_id AND b.id = d.depends_on)
    UNION ALL
    SELECT format('step %s: ran although dependency %s is %s', s.id, x.id, x.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
      JOIN step_dependencies d ON d.campaign_id = s.campaign_id AND d.step_id = s.id
      JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
     WHERE s.status IN ('running', 'waiting_input') AND s.step_type = 'atomic' AND x.status <> 'done'
    UNION ALL
    SELECT format('lease on %s held by step %s which is %s', l.key, l.step_id, s.status)
      FROM resource_leases l JOIN steps s ON s.campaign_id = l.campaign_id AND s.id = l.step_id
     WHERE s.status <> 'running'
    UNION ALL
    -- SPEC §10: a campaign's events are numbered 1, 2, … up to its event_seq, each number once
    -- (prune() removes only whole campaigns, so none is missing either).
    SELECT format('campaign %s: %s events numbered 1 to %s (%s distinct), its event_seq is %s',
                  c.id, count(e.seq), max(e.seq), count(DISTINCT e.seq), c.event_seq)
      FROM scope c JOIN events e ON e.campaign_id = c.id
     GROUP BY c.id, c.event_seq
    HAVING max(e.seq) <> c.event_seq OR min(e.seq) <> 1 OR count(DISTINCT e.seq) <> count(*) OR count(*) <> c.event_seq;
    -- SPEC §13: a cycle of waits among open steps (dependencies, and compound parents waiting
    -- for their members) can never finish. One campaign at a time, outside the query: a rule
    -- called inside a query on a shard may not run queries of its own (Citus).
    FOR v_campaign IN SELECT c.id FROM campaigns c WHERE $1 IS NULL OR c.id = $1 ORDER BY c.id LOOP
        v_step := _campaign_wait_cycle(v_campaign);
        IF v_step IS NOT NULL THEN
            RETURN NEXT format('campaign %s: steps wait for each other in a cycle through step %s', v_campaign, v_step);
        END IF;
    END LOOP;
END
$$;

-- sql/engine/distribute.sql
CREATE OR REPLACE FUNCTION _distributed_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ARRAY['campaigns', 'steps', 'step_dependencies', 'events', 'event_positions', 'notes', 'notifications', 'workflow_history',
                    'finished_claims'] $$;

CREATE OR REPLACE FUNCTION _reference_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ARRAY['resource_leases', 'workflows', 'cursors', 'idempotency_records'] $$;

CREATE OR REPLACE FUNCTION _get_campaign_delegated(id uuid, steps_limit integer DEFAULT 500, steps_cursor text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_campaign(id, steps_limit, steps_cursor);
END
$$;

CREATE OR REPLACE FUNCTION _campaign_graph_delegated(id uuid, max_steps integer DEFAULT 5000)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN campaign_graph(id, max_steps);
END
$$;

CREATE OR REPLACE FUNCTION _planner_context_delegated(campaign_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN planner_context(campaign_id);
END
$$;

CREATE OR REPLACE FUNCTION _add_steps_delegated(campaign_id uuid, steps jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN add_steps(campaign_id, steps);
END
$$;

CREATE OR REPLACE FUNCTION _steer_campaign_delegated(id uuid, guidance text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN steer_campaign(id, guidance);
END
$$;

CREATE OR REPLACE FUNCTION _pause_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN pause_campaign(id);
END
$$;

CREATE OR REPLACE FUNCTION _resume_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN resume_campaign(id);
END
$$;

CREATE OR REPLACE FUNCTION _cancel_campaign_delegated(id uuid, reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN cancel_campaign(id, reason);
END
$$;

CREATE OR REPLACE FUNCTION _provide_input_delegated(id uuid, step_id bigint, answer text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN provide_input(id, step_id, answer);
END
$$;

CREATE OR REPLACE FUNCTION _check_success_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN check_success(id);
END
$$;

CREATE OR REPLACE FUNCTION _get_notes_delegated(campaign_id uuid, tags text[] DEFAULT NULL, step_id bigint DEFAULT NULL,
                                      "limit" integer DEFAULT 50, cursor text DEFAULT NULL,
                                      preview_chars integer DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_notes(campaign_id, tags, step_id, "limit", cursor, preview_chars, claim_token);
END
$$;

CREATE OR REPLACE FUNCTION _begin_planning_delegated(id uuid, lease_seconds integer DEFAULT 300)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN begin_planning(id, lease_seconds);
END
$$;

CREATE OR REPLACE FUNCTION _apply_plan_delegated(campaign_id uuid, plan jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN apply_plan(campaign_id, plan);
END
$$;

CREATE OR REPLACE FUNCTION _finish_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN finish_campaign(id);
END
$$;

CREATE OR REPLACE FUNCTION _record_benchmark_delegated(campaign_id uuid, exit_code integer, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN record_benchmark(campaign_id, exit_code, output);
END
$$;

CREATE OR REPLACE FUNCTION _get_workflow_status_delegated(instance_id uuid, with_definition boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_workflow_status(instance_id, with_definition);
END
$$;

CREATE OR REPLACE FUNCTION _advance_workflow_delegated(instance_id uuid, report jsonb, context_updates jsonb DEFAULT '{}',
                                            next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN advance_workflow(instance_id, report, context_updates, next_step);
END
$$;

CREATE OR REPLACE FUNCTION _resume_workflow_delegated(instance_id uuid, assumed_current_step_name text, report jsonb DEFAULT NULL,
                                           context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN resume_workflow(instance_id, assumed_current_step_name, report, context_updates, next_step);
END
$$;

CREATE OR REPLACE FUNCTION _delegated_functions() RETURNS TABLE (signature text, campaign_arg text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT * FROM (VALUES
        ('_get_campaign_delegated(uuid,integer,text)', 'id'),
        ('_campaign_graph_delegated(uuid,integer)', 'id'),
        ('_planner_context_delegated(uuid)', 'campaign_id'),
        ('_heartbeat_delegated(uuid,bigint,uuid,integer)', 'campaign_id'),
        ('_get_my_context_delegated(uuid,bigint,integer,integer,uuid)', 'campaign_id'),
        ('_complete_step_delegated(uuid,bigint,uuid,text,bigint)', 'campaign_id'),
        ('_fail_step_delegated(uuid,bigint,uuid,text)', 'campaign_id'),
        ('_claim_next_delegated(uuid,text,text,integer,uuid)', 'campaign_id'),
        ('_add_note_delegated(uuid,text,text[],bigint,text,vector,text,uuid)', 'campaign_id'),
        ('_spawn_and_continue_delegated(uuid,bigint,uuid,jsonb,jsonb,text)', 'campaign_id'),
        ('_request_input_delegated(uuid,bigint,uuid,text,text)', 'campaign_id'),
        ('_release_step_delegated(uuid,bigint,uuid)', 'campaign_id'),
        ('_record_verification_delegated(uuid,bigint,uuid,boolean,text)', 'campaign_id'),
        ('_abort_branch_delegated(uuid,bigint,uuid,bigint,text,text)', 'campaign_id'),
        ('_add_steps_delegated(uuid,jsonb)', 'campaign_id'),
        ('_steer_campaign_delegated(uuid,text)', 'id'),
        ('_pause_campaign_delegated(uuid)', 'id'),
        ('_resume_campaign_delegated(uuid)', 'id'),
        ('_cancel_campaign_delegated(uuid,text)', 'id'),
        ('_provide_input_delegated(uuid,bigint,text)', 'id'),
        ('_check_success_delegated(uuid)', 'id'),
        ('_get_notes_delegated(uuid,text[],bigint,integer,text,integer,uuid)', 'campaign_id'),
        ('_begin_planning_delegated(uuid,integer)', 'id'),
        ('_apply_plan_delegated(uuid,jsonb)', 'campaign_id'),
        ('_finish_campaign_delegated(uuid)', 'id'),
        ('_record_benchmark_delegated(uuid,integer,text)', 'campaign_id'),
        ('_get_workflow_status_delegated(uuid,boolean)', 'instance_id'),
        ('_advance_workflow_delegated(uuid,jsonb,jsonb,text)', 'instance_id'),
        ('_resume_workflow_delegated(uuid,text,jsonb,jsonb,text)', 'instance_id')
    ) AS f(signature, campaign_arg);
$$;

CREATE OR REPLACE FUNCTION _distribution_keys(p_schema text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT array_agg(replace(s, '@s', quote_ident(p_schema)) ORDER BY o) FROM unnest(ARRAY[
        'ALTER TABLE @s.steps DROP CONSTRAINT IF EXISTS steps_parent_id_fkey, DROP CONSTRAINT IF EXISTS steps_continuation_of_fkey, DROP CONSTRAINT IF EXISTS steps_continued_by_fkey',
        'ALTER TABLE @s.step_dependencies DROP CONSTRAINT IF EXISTS step_dependencies_step_id_fkey, DROP CONSTRAINT IF EXISTS step_dependencies_depends_on_fkey',
        'ALTER TABLE @s.notes DROP CONSTRAINT IF EXISTS notes_step_id_fkey',
        'ALTER TABLE @s.resource_leases DROP CONSTRAINT IF EXISTS resource_leases_step_id_fkey, DROP CONSTRAINT IF EXISTS resource_leases_campaign_id_fkey',
        'ALTER TABLE @s.steps DROP CONSTRAINT steps_pkey, ADD CONSTRAINT steps_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.steps ADD CONSTRAINT steps_parent_id_fkey FOREIGN KEY (campaign_id, parent_id) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT steps_continuation_of_fkey FOREIGN KEY (campaign_id, continuation_of) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT steps_continued_by_fkey FOREIGN KEY (campaign_id, continued_by) REFERENCES @s.steps (campaign_id, id)',
        'ALTER TABLE @s.step_dependencies DROP CONSTRAINT step_dependencies_pkey, ADD CONSTRAINT step_dependencies_pkey PRIMARY KEY (campaign_id, step_id, depends_on), '
            || 'ADD CONSTRAINT step_dependencies_step_id_fkey FOREIGN KEY (campaign_id, step_id) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT step_dependencies_depends_on_fkey FOREIGN KEY (campaign_id, depends_on) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE',
        'ALTER TABLE @s.events ALTER COLUMN campaign_id SET NOT NULL, DROP CONSTRAINT events_pkey, ADD CONSTRAINT events_pkey PRIMARY KEY (campaign_id, tx, id)',
        'ALTER TABLE @s.notes DROP CONSTRAINT notes_pkey, ADD CONSTRAINT notes_pkey PRIMARY KEY (campaign_id, id), '
            || 'ADD CONSTRAINT notes_step_id_fkey FOREIGN KEY (campaign_id, step_id) REFERENCES @s.steps (campaign_id, id)',
        'ALTER TABLE @s.notifications ALTER COLUMN campaign_id SET NOT NULL, DROP CONSTRAINT notifications_pkey, ADD CONSTRAINT notifications_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.workflow_history DROP CONSTRAINT workflow_history_pkey, ADD CONSTRAINT workflow_history_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.finished_claims DROP CONSTRAINT finished_claims_pkey, ADD CONSTRAINT finished_claims_pkey PRIMARY KEY (campaign_id, claim_token)'
    ]) WITH ORDINALITY AS k(s, o);
$$;

CREATE OR REPLACE FUNCTION distribute() RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_schema text := current_schema();
    v_first boolean;
    v_stmt text;
    v_table text;
    v_fn record;
    v_result record;
    v_workers integer;
    v_ranges text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM _raise('invalid_state', 'distribute() needs the citus extension in this database (docs/scale-out.md)');
    END IF;
    IF NOT (SELECT citus_is_coordinator()) THEN
        PERFORM _raise('invalid_state', 'distribute() runs on the Citus coordinator');
    END IF;
    EXECUTE 'SELECT count(*) FROM citus_get_active_worker_nodes()' INTO v_workers;
    v_first := NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = format('%I.campaigns', v_schema)::regclass);

    IF v_first THEN
        -- The keys, here and on each worker's copy (DDL on an extension's local tables is not
        -- propagated, so it is run on every node alike).
        PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
        FOREACH v_stmt IN ARRAY _distribution_keys(v_schema) LOOP
            EXECUTE v_stmt;
            FOR v_result IN SELECT * FROM run_command_on_workers(
                    'SET citus.enable_ddl_propagation = off; ' || v_stmt) LOOP
                IF NOT v_result.success THEN
                    PERFORM _raise('invalid_state', format('distribute(): worker %s:%s refused %s: %s',
                                   v_result.nodename, v_result.nodeport, left(v_stmt, 80), v_result.result));
                END IF;
            END LOOP;
        END LOOP;
        PERFORM set_config('citus.enable_ddl_propagation', 'on', true);

        PERFORM create_distributed_table(format('%I.campaigns', v_schema), 'id');
        FOREACH v_table IN ARRAY (_distributed_tables())[2:] LOOP
            PERFORM create_distributed_table(format('%I.%I', v_schema, v_table), 'campaign_id',
                                             colocate_with => format('%I.campaigns', v_schema));
        END LOOP;
        FOREACH v_table IN ARRAY _reference_tables() LOOP
            PERFORM create_reference_table(format('%I.%I', v_schema, v_table));
        END LOOP;
        -- A moved database's rows were copied into the shards and are still on disk in the
        -- coordinator's own tables, where nothing reads them any more: emptied, as Citus's
        -- notice asks (its TRUNCATE of the local copy only, CASCADE among them).
        FOREACH v_table IN ARRAY _distributed_tables() || _reference_tables() LOOP
            PERFORM truncate_local_data_after_distributing_table(format('%I.%I', v_schema, v_table)::regclass);
        END LOOP;
        FOR v_fn IN SELECT * FROM _delegated_functions() LOOP
            PERFORM create_distributed_function(format('%I.%s', v_schema, v_fn.signature)::regprocedure,
                                                v_fn.campaign_arg,
                                                colocate_with => format('%I.campaigns', v_schema));
        END LOOP;
    END IF;

    -- Every worker's sequences in their own range (again for nodes added since the last call:
    -- a range is only ever moved up, never back into ids already given).
    v_ranges := format($cmd$
        DO $d$
        DECLARE
            g bigint := (SELECT groupid FROM pg_dist_local_group);
            s regclass;
        BEGIN
            SET LOCAL citus.enable_ddl_propagation = off;
            IF g > 8191 THEN
                RAISE EXCEPTION 'its Citus group id %% is above 8191: its ids would pass 2^53, which JSON clients cannot read exactly', g;
            END IF;
            FOR s IN SELECT seqrelid::regclass FROM pg_sequence q
                       JOIN pg_class c ON c.oid = q.seqrelid
                      WHERE c.relnamespace = %L::regnamespace AND q.seqmin < (g << 40) + 1 LOOP
                EXECUTE format('ALTER SEQUENCE %%s MINVALUE %%s MAXVALUE %%s START %%s RESTART %%s',
                               s, (g << 40) + 1, ((g + 1) << 40) - 1, (g << 40) + 1, (g << 40) + 1);
            END LOOP;
        END
        $d$
    $cmd$, v_schema);
    FOR v_result IN SELECT * FROM run_command_on_workers(v_ranges) LOOP
        IF NOT v_result.success THEN
            PERFORM _raise('invalid_state', format('distribute(): worker %s:%s could not take its id range: %s',
                           v_result.nodename, v_result.nodeport, v_result.result));
        END IF;
    END LOOP;

    RETURN jsonb_build_object(
        'distributed', to_jsonb(_distributed_tables()),
        'reference', to_jsonb(_reference_tables()),
        'functions', (SELECT jsonb_agg(signature) FROM _delegated_functions()),
        'workers', v_workers,
        'first', v_first);
END
$$;

-- sql/engine/roles.sql
CREATE OR REPLACE FUNCTION _api_grants() RETURNS TABLE (name text, roles text[])
LANGUAGE sql IMMUTABLE
AS $$
    SELECT f.name, f.roles FROM (VALUES
            -- coordinator tools (SPEC §5) and the sortie command's commands
            ('create_campaign',        ARRAY['sortie_coordinator']),
            ('list_campaigns',         ARRAY['sortie_coordinator', 'sortie_reader']),
            ('get_campaign',           ARRAY['sortie_coordinator', 'sortie_reader']),
            ('get_updates',            ARRAY['sortie_coordinator']),
            ('steer_campaign',         ARRAY['sortie_coordinator']),
            ('pause_campaign',         ARRAY['sortie_coordinator']),
            ('resume_campaign',        ARRAY['sortie_coordinator']),
            ('cancel_campaign',        ARRAY['sortie_coordinator']),
            ('provide_input',          ARRAY['sortie_coordinator']),
            ('check_success',          ARRAY['sortie_coordinator']),
            ('add_steps',              ARRAY['sortie_coordinator']),
            -- workflows (SPEC §7)
            ('load_workflow',          ARRAY['sortie_coordinator']),
            ('start_workflow',         ARRAY['sortie_coordinator']),
            ('advance_workflow',       ARRAY['sortie_coordinator']),
            ('resume_workflow',        ARRAY['sortie_coordinator']),
            ('get_workflow_status',    ARRAY['sortie_coordinator', 'sortie_reader']),
            -- seeing a campaign (SPEC §16): the sortie command, the web view, MCP resources
            ('events',                 ARRAY['sortie_coordinator', 'sortie_reader']),
            ('campaign_graph',         ARRAY['sortie_coordinator', 'sortie_reader']),
            ('activity',               ARRAY['sortie_coordinator', 'sortie_reader']),
            ('health',                 ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('check_invariants',       ARRAY['sortie_coordinator', 'sortie_reader']),
            ('listen_poll_window',     ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('wake_interval',          ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            -- worker tools (SPEC §5); a confined worker is checked against its claim (scope.sql)
            ('get_my_context',         ARRAY['sortie_worker', 'sortie_runner']),
            ('read_step_output',       ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('get_notes',              ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('search_notes',           ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('add_note',               ARRAY['sortie_worker', 'sortie_coordinator']),
            ('heartbeat',              ARRAY['sortie_worker', 'sortie_runner']),
            ('complete_step',          ARRAY['sortie_worker', 'sortie_runner']),
            ('fail_step',              ARRAY['sortie_worker', 'sortie_runner']),
            ('request_input',          ARRAY['sortie_worker']),
            ('spawn_and_continue',     ARRAY['sortie_worker']),
            ('abort_branch',           ARRAY['sortie_worker']),
            ('record_verification',    ARRAY['sortie_worker', 'sortie_runner']),
            -- whether a step may split (sortie-mcp lists spawn_and_continue by it): a boolean
            ('can_spawn',              ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('claim_next',             ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('claim_step',             ARRAY['sortie_runner', 'sortie_coordinator']),
            -- the step of a claim token, for sortie-mcp --http's claim-token bearer sessions
            ('claim_session',          ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_runner']),
            ('ready_steps',            ARRAY['sortie_runner', 'sortie_coordinator', 'sortie_reader']),
            -- the runner's tick (SPEC §6), planner (§4), notifier, embeddings and benchmarks (§17)
            ('release_step',           ARRAY['sortie_runner']),
            ('reset_zombies',          ARRAY['sortie_runner']),
            ('reap_leases',            ARRAY['sortie_runner']),
            ('enforce_budgets',        ARRAY['sortie_runner']),
            ('dispatch_blockers',      ARRAY['sortie_runner']),
            ('campaigns_to_plan',      ARRAY['sortie_runner']),
            ('begin_planning',         ARRAY['sortie_runner']),
            ('planner_context',        ARRAY['sortie_runner']),
            ('apply_plan',             ARRAY['sortie_runner']),
            ('finish_campaign',        ARRAY['sortie_runner']),
            ('take_notifications',     ARRAY['sortie_runner']),
            ('notification_delivered', ARRAY['sortie_runner']),
            ('notes_to_embed',         ARRAY['sortie_runner']),
            -- sortie-mcp stores a note's embedding after add_note; a worker may not (it would
            -- write to any note), so its notes are embedded by the runner's backfill
            ('set_note_embedding',     ARRAY['sortie_runner', 'sortie_coordinator']),
            ('take_benchmark',         ARRAY['sortie_runner']),
            ('complete_steps',         ARRAY['sortie_runner']),
            ('prune',                  ARRAY['sortie_runner']),
            ('record_benchmark',       ARRAY['sortie_runner']),
            -- scale-out (docs/scale-out.md): an operator's, as superuser, on a Citus coordinator
            ('distribute',             ARRAY[]::text[]),
            -- the delegated twins (distribute.sql), for sortie's programs, which call them with
            -- the campaign they hold: the roles of the function each one stands for
            ('_get_campaign_delegated',    ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_campaign_graph_delegated',  ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_planner_context_delegated', ARRAY['sortie_runner']),
            ('_heartbeat_delegated',       ARRAY['sortie_worker', 'sortie_runner']),
            ('_get_my_context_delegated',  ARRAY['sortie_worker', 'sortie_runner']),
            ('_complete_step_delegated',   ARRAY['sortie_worker', 'sortie_runner']),
            ('_fail_step_delegated',       ARRAY['sortie_worker', 'sortie_runner']),
            ('_claim_next_delegated',      ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('_add_note_delegated',        ARRAY['sortie_worker', 'sortie_coordinator']),
            ('_spawn_and_continue_delegated', ARRAY['sortie_worker']),
            ('_request_input_delegated', ARRAY['sortie_worker']),
            ('_release_step_delegated', ARRAY['sortie_runner']),
            ('_record_verification_delegated', ARRAY['sortie_worker', 'sortie_runner']),
            ('_abort_branch_delegated', ARRAY['sortie_worker']),
            ('_add_steps_delegated',       ARRAY['sortie_coordinator']),
            ('_steer_campaign_delegated',  ARRAY['sortie_coordinator']),
            ('_pause_campaign_delegated',  ARRAY['sortie_coordinator']),
            ('_resume_campaign_delegated', ARRAY['sortie_coordinator']),
            ('_cancel_campaign_delegated', ARRAY['sortie_coordinator']),
            ('_provide_input_delegated',   ARRAY['sortie_coordinator']),
            ('_check_success_delegated',   ARRAY['sortie_coordinator']),
            ('_get_notes_delegated',       ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('_begin_planning_delegated',  ARRAY['sortie_runner']),
            ('_apply_plan_delegated',      ARRAY['sortie_runner']),
            ('_finish_campaign_delegated', ARRAY['sortie_runner']),
            ('_record_benchmark_delegated', ARRAY['sortie_runner']),
            ('_get_workflow_status_delegated', ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_advance_workflow_delegated', ARRAY['sortie_coordinator']),
            ('_resume_workflow_delegated', ARRAY['sortie_coordinator']),
            ('_claim_candidates',          ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            -- internal: called by the functions above (which run as the owner), by no role
            ('_skip_cascade',           ARRAY[]::text[]),
            ('_similar_notes',          ARRAY[]::text[]),
            ('_similar_notes_by_words', ARRAY[]::text[]),
            ('_running_count',          ARRAY[]::text[]),
            ('_lower_ready_floor',      ARRAY[]::text[]),
            ('_finished_claim',        ARRAY[]::text[]),
            ('_keep_finished_claim',   ARRAY[]::text[]),
            ('_keep',                  ARRAY[]::text[]),
            ('_replay',                ARRAY[]::text[])
    ) AS f(name, roles);
$$;

DO $roles$
DECLARE
    v_schema text := current_schema();
    v_vector_schema text;
    v_role text;
    v_entry record;
    v_proc record;
    v_found integer;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['sortie_coordinator', 'sortie_worker', 'sortie_runner', 'sortie_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            -- Roles belong to the cluster: another database creating the extension at the same
            -- moment (or a Citus node's copy of this script) may make the role first.
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_schema, v_role);
    END LOOP;
    SELECT n.nspname INTO v_vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    IF v_vector_schema IS NOT NULL AND v_vector_schema <> v_schema THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO sortie_coordinator, sortie_worker, sortie_runner, sortie_reader',
                       v_vector_schema);
    END IF;

    -- Every function of this extension (not pgvector's, which lives in its own extension):
    -- executable by no one but its owner until granted below.
    FOR v_proc IN
        SELECT p.oid::regprocedure AS signature
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_proc.signature);
    END LOOP;

    -- Grants per the table above.
    FOR v_entry IN SELECT g.name, g.roles FROM _api_grants() g
    LOOP
        v_found := 0;
        FOR v_proc IN
            SELECT p.oid::regprocedure AS signature,
                   EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%') AS fixed_path
              FROM pg_proc p
             WHERE p.pronamespace = v_schema::regnamespace AND p.proname = v_entry.name
        LOOP
            v_found := v_found + 1;
            IF cardinality(v_entry.roles) > 0 THEN
                -- The two constants (wake_interval, listen_poll_window) read no table and
                -- keep running as their caller.
                IF v_proc.fixed_path THEN
                    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_proc.signature);
                END IF;
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_proc.signature,
                               (SELECT string_agg(quote_ident(r), ', ') FROM unnest(v_entry.roles) r));
            END IF;
        END LOOP;
        -- A renamed function would lose its grants: tests/tests/roles.rs fails on it.
        IF v_found = 0 THEN
            RAISE NOTICE 'roles.sql: function %.% is in the grant table but does not exist', v_schema, v_entry.name;
        END IF;
    END LOOP;

    -- A SECURITY DEFINER function must not resolve names through its caller's search_path.
    IF EXISTS (SELECT 1 FROM pg_proc p
                WHERE p.pronamespace = v_schema::regnamespace AND p.prosecdef
                  AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')) THEN
        RAISE EXCEPTION 'roles.sql: a SECURITY DEFINER function of % has no fixed search_path', v_schema;
    END IF;
END
$roles$;

