-- Failure and retry (SPEC §3): a failed attempt is retried with exponential back-off while
-- attempts remain, else the step fails for good and its dependents are skipped.

-- A step failed for good (SPEC §3 fail and retry): its dependents are skipped transitively,
-- and its parent — or with fail_fast at the top level, the campaign — hears of it.
CREATE FUNCTION _settle_failed(s steps, p_error text) RETURNS void
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

CREATE FUNCTION _retry_backoff(p_attempts integer) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT make_interval(secs => least(10 * power(2, greatest(p_attempts - 1, 0)), 600)) $$;

-- A running attempt ended without success (fail_step, or a zombie reset): retry with
-- exponential back-off while attempts remain, else fail for good (SPEC §3 fail and retry).
CREATE FUNCTION _attempt_failed(s steps, p_error text) RETURNS text
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

CREATE FUNCTION fail_step(step_id bigint, claim_token uuid, error text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _fail_step_in(_lock_step_campaign(step_id), step_id, claim_token, error);
END
$$;

-- fail_step() naming its campaign first (SPEC §2 scale-out rule): under Citus it is delegated
-- to the worker holding the campaign and runs there as one local transaction (distribute.sql).
-- sortie-mcp and the runner call it for a step whose campaign they hold. Never with a NULL
-- campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242).
-- Errors: those of fail_step; not_found when the step is not in that campaign.
CREATE FUNCTION _fail_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid, error text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _fail_step_in(_lock_named_step_campaign(campaign_id, step_id), step_id, claim_token, error);
END
$$;

-- The failed attempt itself, for a step of campaign `p_campaign`, which the caller has locked.
-- Every statement names the campaign.
CREATE FUNCTION _fail_step_in(p_campaign uuid, step_id bigint, claim_token uuid, error text) RETURNS jsonb
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
