-- Campaign end (SPEC §3, §13): drained = nothing pending, running or waiting; a drained
-- campaign is done when every top-level step resolved (and its success contract is met),
-- failed otherwise. Every end — done, failed, cancelled — goes through _end_campaign().

-- Whether a campaign has ever had a step (SPEC §13); steps are never deleted while their
-- campaign exists, so one row is enough.
CREATE FUNCTION _has_had_steps(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM steps WHERE campaign_id = p_campaign);
END
$$;

-- Campaign end (SPEC §3). Drained = nothing pending, running or waiting. With planner 'none'
-- the campaign ends at once; with 'llm' it waits for a runner's planner (campaign.drained).
CREATE FUNCTION _check_drained(p_campaign uuid) RETURNS void
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

-- The done/failed rule for a drained campaign: done when every top-level step resolved
-- (done, or skipped by an abort), failed otherwise. Spliced steps hand over to their
-- continuations, so they are not counted. A campaign with a success contract (SPEC §17:
-- success_metric and success_target) is done only when check_success() says it is met, and
-- failed with 'success contract not met' otherwise.
CREATE FUNCTION _finish_drained(c campaigns) RETURNS text
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

-- Every campaign end goes through here: status, completed_at, notification, and — for
-- failed and cancelled — every open step skipped with its claim revoked.
CREATE FUNCTION _end_campaign(p_campaign uuid, p_status text, p_reason text) RETURNS void
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

-- Ends a drained campaign by the done/failed rule; the runner calls it when no planner is
-- configured (SPEC §3 campaign end).
CREATE FUNCTION finish_campaign(id uuid) RETURNS jsonb
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
