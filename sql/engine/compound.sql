-- Compound steps (SPEC §3): a sequence, parallel group or for-each settles when its members
-- do — done when its threshold is met (the rest skipped), failed when it is out of reach.
-- Part of the settling recursion described in skip_cascade.sql.

-- A compound step's members changed: `resolved` more are done (or skipped by an abort or a met
-- threshold), `failed` more failed or were skipped otherwise. Decides the parent (SPEC §3
-- compound steps): threshold met → done, the rest skipped; threshold out of reach → failed.
-- `p_parent` is a step of campaign `p_campaign`; `p_failed_step` names the member whose own
-- failure this is, for fail_fast.
CREATE FUNCTION _member_settled(p_campaign uuid, p_parent bigint, p_resolved integer, p_failed integer,
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

-- A compound step is done: its output is its members' outputs in order; members still open
-- are skipped (threshold met early).
CREATE FUNCTION _settle_compound_done(p steps) RETURNS void
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
