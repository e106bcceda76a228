-- Counters: the campaign's open, running and ready step counts, its slot time (SPEC §3 priority
-- and fair share) and the dispatch test built on them. Every rule moves the counters in the
-- same statement that locks or updates the campaign; check_invariants() recounts them.

CREATE FUNCTION _bump_counters(p_campaign uuid, p_open integer, p_running integer, p_ready integer)
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

-- Fair-share provisional charge at claim time, reconciled with the real duration when the
-- step leaves `running` (SPEC §3 priority and fair share).
CREATE FUNCTION _provisional_slot_seconds() RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 60::double precision $$;

-- Whether a campaign may start another step now: active, under max_parallel and within its
-- token budget (SPEC §3). Inlined into the statements that use it.
CREATE FUNCTION _can_dispatch(p_status text, p_max_parallel integer, p_running integer,
                             p_token_budget bigint, p_tokens_used bigint)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_status = 'active'
       AND (p_max_parallel IS NULL OR p_running < p_max_parallel)
       AND (p_token_budget IS NULL OR p_tokens_used < p_token_budget)
$$;

-- A claim's share of the campaign counters: one more running, one fewer ready, and the
-- provisional slot time. The update also locks the campaign, and does nothing (false) unless
-- the campaign can dispatch and has a ready step: claim_next uses it as its campaign lock.
CREATE FUNCTION _count_claim(p_campaign uuid) RETURNS boolean
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

-- Takes back _count_claim() when no step could be claimed after all.
CREATE FUNCTION _uncount_claim(p_campaign uuid) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE campaigns
       SET running_steps = running_steps - 1, ready_steps = ready_steps + 1,
           slot_seconds_used = slot_seconds_used - _provisional_slot_seconds()
     WHERE id = p_campaign;
END
$$;

-- What a step leaving `running` adds to its campaign's slot time: its real duration in place
-- of the provisional charge made at claim time.
CREATE FUNCTION _slot_correction(p_claimed_at timestamptz) RETURNS double precision
LANGUAGE sql STABLE
AS $$ SELECT extract(epoch FROM _clock() - p_claimed_at)::double precision - _provisional_slot_seconds() $$;

-- Everything a running atomic step gives up when it stops running, however it stops: its
-- running slot (with the real slot time charged) and its lock keys. A completion folds its
-- own counter changes (open, ready, tokens) into the same update. Returns the campaign's
-- counters and status as they now stand. The slot correction is worked out before the update
-- (its body calls other functions of this extension, which Citus cannot inline on a worker).
CREATE FUNCTION _leave_running(p_campaign uuid, p_step bigint, p_claimed_at timestamptz, p_locks text[],
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

-- Running atomic steps across all campaigns, for the runner's global capacity.
CREATE FUNCTION _running_count() RETURNS bigint
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT coalesce(sum(running_steps), 0)::bigint FROM campaigns WHERE status IN ('active', 'paused'));
END
$$;
