-- Leases (SPEC §3): a running step's claim lasts until its lease expires; heartbeat() extends
-- it, reset_zombies() ends expired ones as failed attempts, release_step() hands a step back
-- unfinished (a runner shutting down).

CREATE FUNCTION heartbeat(step_id bigint, claim_token uuid, extend_leases_sec integer DEFAULT 900) RETURNS jsonb
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

-- A heartbeat in a campaign already known (every statement names it, so that under Citus a
-- delegated call runs them all on the worker holding the campaign). The lock keys' leases, in a
-- table shared by every campaign, are touched only for a step that holds some.
-- Errors: not_found (the step is not in the campaign), as _check_claim.
CREATE FUNCTION _heartbeat_in(p_campaign uuid, p_step bigint, p_token uuid, p_lease integer) RETURNS jsonb
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

-- heartbeat() naming its campaign first (SPEC §2 scale-out rule): under Citus it is delegated to
-- the worker holding the campaign and runs there as one local transaction (distribute.sql).
-- The runner's heartbeats and sortie-mcp's, when the session knows its campaign, come here.
-- Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242).
-- Errors: those of heartbeat; not_found when the step is not in that campaign.
CREATE FUNCTION _heartbeat_delegated(campaign_id uuid, step_id bigint, claim_token uuid,
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

-- Zombies (SPEC §3): running steps whose lease expired. Each reset counts as a failed attempt,
-- so a step that always hangs ends failed. waiting_input steps hold no lease and are never
-- reset. Campaigns are locked in id order, so concurrent resetters cannot deadlock.
CREATE FUNCTION reset_zombies("limit" integer DEFAULT 1000) RETURNS jsonb
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

-- A runner shutting down hands back a step it claimed but did not get to finish: pending
-- again, no attempt counted.
CREATE FUNCTION release_step(step_id bigint, claim_token uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _release_step_in(_lock_claimed_step(step_id, claim_token, 'release_step'), step_id, claim_token);
END
$$;

-- release_step() naming its campaign first (SPEC §2 scale-out rule): under Citus it is delegated to
-- the worker holding the campaign and runs there as one local transaction (distribute.sql). The
-- runner hands its dispatch back with it. Never with a NULL campaign_id: a stock Citus 13.2 coordinator
-- crashes on one (citusdata/citus#7242). Errors: those of release_step; not_found when the step is
-- not in that campaign.
CREATE FUNCTION _release_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _release_step_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'release_step'), step_id, claim_token);
END
$$;

-- release_step itself, for `s`, the claimed step its caller locked with its campaign.
-- Every statement names the campaign.
CREATE FUNCTION _release_step_in(s steps, step_id bigint, claim_token uuid)
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
