-- Shared machinery of the rules: events, the campaign lock, counters, and the transitions every
-- rule ends in (a step becomes ready, done, failed or skipped, and what that wakes up).
--
-- Concurrency model (docs/decisions.md): every writing rule locks its campaign's row first.
-- That makes each campaign's DAG a serial history — no two completions can both miss that they
-- were the last, a claim cannot race a cancel, a splice cannot race an abort — and rules of
-- different campaigns never wait on each other (SPEC §2 scale-out rule).

-- How often one connection may wake LISTENers. NOTIFY serialises every notifying commit in
-- the cluster — PostgreSQL holds one lock from pre-commit to the end of the commit, WAL flush
-- included — so a NOTIFY per claim and completion caps the whole cluster at one commit at a
-- time. A woken listener polls for listen_poll_window() instead, which covers the events the
-- interval held back, whichever campaign they belong to (docs/decisions.md, "Waking
-- listeners").
CREATE FUNCTION wake_interval() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '100 milliseconds' $$;

CREATE FUNCTION listen_poll_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '1 second' $$;

-- Appends to the event log and, unless this connection woke listeners within
-- wake_interval(), wakes them (`sortie_events`). NOTIFY is a hint; readers page the table
-- (SPEC §10). The connection's last wake-up is a session setting: reading it touches no
-- shared page, and an aborted transaction takes it back together with its NOTIFY.
CREATE FUNCTION emit(p_campaign uuid, p_step bigint, p_kind text, p_payload jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
    v_woke text := current_setting('sortie.woke_at', true);
BEGIN
    INSERT INTO events (campaign_id, step_id, kind, payload)
    VALUES (p_campaign, p_step, p_kind, coalesce(p_payload, '{}'))
    RETURNING id INTO v_id;
    -- Seconds since the epoch: independent of the session's DateStyle.
    IF coalesce(v_woke, '') = ''
       OR v_woke::double precision <= extract(epoch FROM clock_timestamp() - wake_interval()) THEN
        PERFORM set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false);
        PERFORM pg_notify('sortie_events', json_build_object(
            'id', v_id, 'campaign_id', p_campaign, 'step_id', p_step, 'kind', p_kind)::text);
    END IF;
END
$$;

CREATE FUNCTION notify_campaign(p_campaign uuid, p_level text, p_message text)
RETURNS void
LANGUAGE sql VOLATILE
AS $$
    INSERT INTO notifications (campaign_id, level, message, channel)
    SELECT p_campaign, p_level, p_message, c.channel FROM campaigns c WHERE c.id = p_campaign;
$$;

-- The campaign row lock every writing rule takes first.
CREATE FUNCTION lock_campaign(p_campaign uuid) RETURNS campaigns
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    IF p_campaign IS NULL THEN
        PERFORM raise('invalid_argument', 'a campaign id is required');
    END IF;
    SELECT * INTO c FROM campaigns WHERE id = p_campaign FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    RETURN c;
END
$$;

-- Locks a step's campaign (one statement: the hot paths call this) and returns its id.
CREATE FUNCTION lock_step_campaign(p_step bigint) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid;
BEGIN
    IF p_step IS NULL THEN
        PERFORM raise('invalid_argument', 'a step id is required (pass step_id, or run with SORTIE_STEP_ID set)');
    END IF;
    SELECT c.id INTO v_campaign
      FROM campaigns c
     WHERE c.id = (SELECT s.campaign_id FROM steps s WHERE s.id = p_step)
       FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('step %s does not exist', p_step));
    END IF;
    RETURN v_campaign;
END
$$;

-- Locks a step's campaign, then the step. Returns the step as it is under the lock.
CREATE FUNCTION lock_step(p_step bigint) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    s steps;
BEGIN
    PERFORM lock_step_campaign(p_step);
    SELECT * INTO s FROM steps WHERE id = p_step FOR UPDATE;
    RETURN s;
END
$$;

-- Fencing (SPEC §3): a worker mutation must present the step's current claim token. The
-- order of checks decides which error a late worker sees: its step was skipped under it
-- (`skipped`), its claim was reset or taken over (`stale_claim`), or it calls out of turn
-- (`invalid_state`). `s` is the step as locked by lock_step.
CREATE FUNCTION check_claim(s steps, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_token IS NULL THEN
        PERFORM raise('invalid_argument', format(
            '%s needs the claim token of step %s (claim_token, or SORTIE_CLAIM_TOKEN)', p_call, s.id));
    END IF;
    IF s.status = 'skipped' AND s.claim_token = p_token THEN
        PERFORM raise('skipped', format(
            'step %s was skipped (%s) while you worked on it; stop, nothing more is needed', s.id,
            coalesce(s.error, s.skip_cause)));
    END IF;
    IF s.claim_token IS DISTINCT FROM p_token THEN
        PERFORM raise('stale_claim', format(
            'your claim on step %s is no longer valid (its lease expired or it was reset); stop working on it',
            s.id));
    END IF;
    IF s.status <> 'running' THEN
        PERFORM raise('invalid_state', format('step %s is %s, not running; %s is not possible', s.id, s.status, p_call));
    END IF;
    RETURN s;
END
$$;

-- PL/pgSQL rather than SQL from here on: a non-inlined SQL function is parsed and planned
-- again at every call, a PL/pgSQL one once per session.
CREATE FUNCTION lock_claimed_step(p_step bigint, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN check_claim(lock_step(p_step), p_token, p_call);
END
$$;

CREATE FUNCTION bump_counters(p_campaign uuid, p_open integer, p_running integer, p_ready integer)
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

-- Steps whose remaining_deps just reached 0: an atomic one joins the ready set; a compound one
-- opens, lifting the gate it holds on each of its pending children (SPEC §3: every dependency
-- of every compound ancestor must be done), recursively.
CREATE FUNCTION unblocked(p_campaign uuid, p_steps bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer := 0;
    v_compound bigint[];
    v_children bigint[];
BEGIN
    WHILE cardinality(p_steps) > 0 LOOP
        SELECT count(*) FILTER (WHERE step_type = 'atomic'),
               coalesce(array_agg(id) FILTER (WHERE step_type <> 'atomic'), '{}')
          INTO v_ready, v_compound
          FROM steps WHERE id = ANY (p_steps) AND status = 'pending' AND remaining_deps = 0;
        PERFORM bump_counters(p_campaign, 0, 0, v_ready);
        EXIT WHEN cardinality(v_compound) = 0;
        -- A compound step with no members (a for_each over no items) has nothing to wait for.
        PERFORM settle_compound_done(p) FROM steps p WHERE p.id = ANY (v_compound) AND p.members = 0;
        WITH opened AS (
            UPDATE steps SET remaining_deps = remaining_deps - 1
             WHERE parent_id = ANY (v_compound) AND status = 'pending'
            RETURNING id, remaining_deps)
        SELECT coalesce(array_agg(id) FILTER (WHERE remaining_deps = 0), '{}') INTO v_children FROM opened;
        p_steps := v_children;
    END LOOP;
END
$$;

-- A step became done: its dependents each have one dependency fewer. Compound ones that
-- reached 0 open here; the atomic ones that became ready are counted, not added to the
-- campaign's ready_steps: the caller folds that into its own counter update.
CREATE FUNCTION release_dependents(p_campaign uuid, p_step bigint) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer;
    v_compound bigint[];
BEGIN
    WITH released AS (
        UPDATE steps s SET remaining_deps = s.remaining_deps - 1
          FROM step_dependencies d
         WHERE d.depends_on = p_step AND s.id = d.step_id AND s.status = 'pending'
        RETURNING s.id, s.step_type, s.remaining_deps)
    SELECT count(*) FILTER (WHERE remaining_deps = 0 AND step_type = 'atomic'),
           array_agg(id) FILTER (WHERE remaining_deps = 0 AND step_type <> 'atomic')
      INTO v_ready, v_compound
      FROM released;
    IF v_compound IS NOT NULL THEN
        PERFORM unblocked(p_campaign, v_compound);
    END IF;
    RETURN v_ready;
END
$$;

-- Skip cascade (SPEC §3): every non-terminal step reachable from the seeds through dependents
-- and children is skipped in one statement; running ones lose their claim and leases. Then
-- each compound parent that lost members outside the skipped set is re-evaluated.
-- Returns the ids it skipped.
CREATE FUNCTION skip_cascade(p_campaign uuid, p_seeds bigint[], p_cause text, p_reason text)
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
              SELECT d.step_id AS id FROM step_dependencies d WHERE d.depends_on = r.id
              UNION ALL
              SELECT c.id FROM steps c WHERE c.parent_id = r.id) next
    ),
    victims AS (
        SELECT s.id, s.status, s.step_type, s.remaining_deps
          FROM steps s JOIN reach USING (id)
         WHERE s.status IN ('pending', 'running', 'waiting_input')
    ),
    skipped AS (
        UPDATE steps s
           SET status = 'skipped', skip_cause = p_cause, error = p_reason,
               completed_at = clock(), lease_expires_at = NULL
          FROM victims v
         WHERE s.id = v.id
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
    DELETE FROM resource_leases WHERE step_id = ANY (v_skipped);
    PERFORM bump_counters(p_campaign, -v_open, -v_running, -v_ready);
    PERFORM emit(p_campaign, NULL, 'step.skipped',
                 jsonb_build_object('step_ids', to_jsonb(v_skipped), 'cause', p_cause, 'reason', p_reason));

    -- Parents lost members: their counters are updated, and those still open are decided,
    -- deepest first, so a child compound settles before its own parent looks at it.
    FOR v_parent IN
        SELECT s.parent_id AS id, count(*) AS lost,
               count(*) FILTER (WHERE s.skip_cause IN ('abort', 'threshold')) AS resolved
          FROM steps s
         WHERE s.id = ANY (v_skipped) AND s.parent_id IS NOT NULL AND s.continued_by IS NULL
         GROUP BY s.parent_id
         ORDER BY max(s.depth) DESC, s.parent_id
    LOOP
        PERFORM member_settled(v_parent.id, v_parent.resolved::integer,
                               (v_parent.lost - v_parent.resolved)::integer, NULL);
    END LOOP;
    RETURN v_skipped;
END
$$;

-- A compound step's members changed: `resolved` more are done (or skipped by an abort or a met
-- threshold), `failed` more failed or were skipped otherwise. Decides the parent (SPEC §3
-- compound steps): threshold met → done, the rest skipped; threshold out of reach → failed.
-- `p_failed_step` names the member whose own failure this is, for fail_fast.
CREATE FUNCTION member_settled(p_parent bigint, p_resolved integer, p_failed integer, p_failed_step bigint)
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
     WHERE id = p_parent AND step_type <> 'atomic'
    RETURNING * INTO p;
    IF NOT FOUND OR p.status NOT IN ('pending', 'running') THEN
        RETURN;
    END IF;
    v_threshold := coalesce(p.completion_threshold, p.members);
    IF p.members_resolved >= v_threshold THEN
        PERFORM settle_compound_done(p);
        RETURN;
    END IF;
    IF p_failed_step IS NOT NULL THEN
        SELECT failure_policy INTO v_policy FROM steps WHERE id = p_failed_step;
    END IF;
    IF v_policy = 'fail_fast' THEN
        PERFORM settle_failed(p, format('fail_fast: child step %s failed', p_failed_step));
    ELSIF p.members - p.members_failed < v_threshold THEN
        PERFORM settle_failed(p, format('%s of %s children failed; the completion threshold %s can no longer be met',
                                        p.members_failed, p.members, v_threshold));
    END IF;
END
$$;

-- A compound step is done: its output is its members' outputs in order; members still open
-- are skipped (threshold met early).
CREATE FUNCTION settle_compound_done(p steps) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_rest bigint[];
BEGIN
    -- Done first, so the skips below find their parent settled and do not re-enter.
    UPDATE steps SET status = 'done', completed_at = clock(), started_at = coalesce(started_at, clock())
     WHERE id = p.id;
    SELECT coalesce(array_agg(id), '{}') INTO v_rest
      FROM steps WHERE parent_id = p.id AND status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_rest) > 0 THEN
        PERFORM skip_cascade(p.campaign_id, v_rest, 'threshold',
                             format('step %s met its completion threshold without it', p.id));
    END IF;
    UPDATE steps
       -- A compound step with no members (a for_each over no items) outputs [] (SPEC §13).
       SET output = coalesce((SELECT jsonb_agg(jsonb_build_object('step_id', c.id, 'status', c.status, 'output', c.output)
                                               ORDER BY c.position, c.id)
                                FROM steps c WHERE c.parent_id = p.id AND c.continued_by IS NULL), '[]')::text
     WHERE id = p.id;
    PERFORM bump_counters(p.campaign_id, -1, 0, 0);
    PERFORM after_done(p.campaign_id, p.id, p.parent_id);
END
$$;

-- Bookkeeping after any step (atomic or compound) became done. The caller has already taken
-- it off the campaign's open_steps, in the same update as its other counters.
CREATE FUNCTION after_done(p_campaign uuid, p_step bigint, p_parent bigint) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM emit(p_campaign, p_step, 'step.done');
    PERFORM bump_counters(p_campaign, 0, 0, release_dependents(p_campaign, p_step));
    IF p_parent IS NOT NULL THEN
        PERFORM member_settled(p_parent, 1, 0, NULL);
    END IF;
    PERFORM check_drained(p_campaign);
END
$$;

-- A step failed for good (SPEC §3 fail and retry): its dependents are skipped transitively,
-- and its parent — or with fail_fast at the top level, the campaign — hears of it.
CREATE FUNCTION settle_failed(s steps, p_error text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_open_children bigint[];
    v_dependents bigint[];
BEGIN
    UPDATE steps SET status = 'failed', error = p_error, completed_at = clock(),
                     claim_token = NULL, claim_owner = NULL, lease_expires_at = NULL
     WHERE id = s.id;
    -- An atomic step only fails from running, and its caller has already taken it off the
    -- running count and released its lock keys (leave_running); a compound step is never
    -- counted as running or ready and holds no keys.
    PERFORM bump_counters(s.campaign_id, -1, 0, 0);
    PERFORM emit(s.campaign_id, s.id, 'step.failed', jsonb_build_object('error', p_error));

    -- A failed compound step's open children have nothing left to serve.
    SELECT coalesce(array_agg(id), '{}') INTO v_open_children
      FROM steps WHERE parent_id = s.id AND status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_open_children) > 0 THEN
        PERFORM skip_cascade(s.campaign_id, v_open_children, 'parent', format('parent step %s failed', s.id));
    END IF;

    -- The parent hears of this failure before of the skips it causes, so its verdict names it;
    -- with fail_fast the parent fails at once, which skips the open siblings.
    IF s.parent_id IS NOT NULL AND s.continued_by IS NULL THEN
        PERFORM member_settled(s.parent_id, 0, 1, s.id);
    END IF;

    SELECT coalesce(array_agg(step_id), '{}') INTO v_dependents FROM step_dependencies WHERE depends_on = s.id;
    IF cardinality(v_dependents) > 0 THEN
        PERFORM skip_cascade(s.campaign_id, v_dependents, 'dependency', format('dependency step %s failed', s.id));
    END IF;

    IF s.parent_id IS NULL AND s.failure_policy = 'fail_fast' THEN
        PERFORM end_campaign(s.campaign_id, 'failed', format('step %s failed under fail_fast', s.id));
        RETURN;
    END IF;
    PERFORM check_drained(s.campaign_id);
END
$$;

-- Whether a campaign has ever had a step (SPEC §13); steps are never deleted while their
-- campaign exists, so one row is enough.
CREATE FUNCTION has_had_steps(p_campaign uuid) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT EXISTS (SELECT 1 FROM steps WHERE campaign_id = p_campaign);
$$;

-- Campaign end (SPEC §3). Drained = nothing pending, running or waiting. With planner 'none'
-- the campaign ends at once; with 'llm' it waits for a runner's planner (campaign.drained).
CREATE FUNCTION check_drained(p_campaign uuid) RETURNS void
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
    IF NOT has_had_steps(p_campaign) THEN
        RETURN;
    END IF;
    -- SPEC §17: a campaign with a benchmark command is judged by it; a runner runs it and
    -- record_benchmark() decides what follows.
    IF c.benchmark_command IS NOT NULL THEN
        IF NOT c.benchmark_due THEN
            UPDATE campaigns SET benchmark_due = true, benchmark_lease_until = NULL WHERE id = p_campaign;
            PERFORM emit(p_campaign, NULL, 'campaign.benchmark_due');
        END IF;
        RETURN;
    END IF;
    IF c.planner = 'none' THEN
        PERFORM finish_drained(c);
    ELSE
        PERFORM emit(p_campaign, NULL, 'campaign.drained');
    END IF;
END
$$;

-- The done/failed rule for a drained campaign: done when every top-level step resolved
-- (done, or skipped by an abort), failed otherwise. Spliced steps hand over to their
-- continuations, so they are not counted. A campaign with a success contract (SPEC §17:
-- success_metric and success_target) is done only when check_success() says it is met, and
-- failed with 'success contract not met' otherwise.
CREATE FUNCTION finish_drained(c campaigns) RETURNS text
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
        PERFORM end_campaign(c.id, 'failed', format('top-level steps did not succeed: %s', array_to_string(v_unresolved, ', ')));
        RETURN 'failed';
    END IF;
    IF c.success_metric IS NOT NULL AND c.success_target IS NOT NULL THEN
        v_success := check_success(c.id);
        IF (v_success ->> 'met')::boolean IS NOT TRUE THEN
            PERFORM end_campaign(c.id, 'failed', format('success contract not met: %s', v_success ->> 'reason'));
            RETURN 'failed';
        END IF;
        PERFORM end_campaign(c.id, 'done', format('success contract met: %s', v_success ->> 'reason'));
        RETURN 'done';
    END IF;
    -- Only a planner's `done` ends a campaign that never had a step (SPEC §13: never having
    -- had one is not being drained); it says so rather than "all steps done".
    IF NOT has_had_steps(c.id) THEN
        PERFORM end_campaign(c.id, 'done', 'its planner found nothing to do: no step was ever added');
        RETURN 'done';
    END IF;
    PERFORM end_campaign(c.id, 'done', 'all steps done');
    RETURN 'done';
END
$$;

-- Every campaign end goes through here: status, completed_at, notification, and — for
-- failed and cancelled — every open step skipped with its claim revoked.
CREATE FUNCTION end_campaign(p_campaign uuid, p_status text, p_reason text) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_open bigint[];
BEGIN
    IF p_status <> 'done' THEN
        SELECT coalesce(array_agg(id), '{}') INTO v_open FROM steps
         WHERE campaign_id = p_campaign AND status IN ('pending', 'running', 'waiting_input');
        IF cardinality(v_open) > 0 THEN
            PERFORM skip_cascade(p_campaign, v_open, 'campaign', format('campaign %s', p_status));
        END IF;
    END IF;
    UPDATE campaigns
       SET status = p_status, status_reason = p_reason, completed_at = clock(), updated_at = now(),
           planner_lease_until = NULL
     WHERE id = p_campaign AND status IN ('active', 'paused');
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM emit(p_campaign, NULL, 'campaign.' || p_status, jsonb_build_object('reason', p_reason));
    PERFORM notify_campaign(p_campaign, CASE p_status WHEN 'done' THEN 'done' ELSE 'error' END,
        format('Campaign %s: %s', p_status, p_reason));
END
$$;
