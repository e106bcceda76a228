-- Branch abort (SPEC §3): an early return from an ancestor, skipping what is still open
-- beneath it.

-- The target is done with the
-- caller's output; everything still open beneath it is skipped; the caller is done with the
-- reason, which is also kept as a note tagged `abort`.
CREATE FUNCTION abort_branch(target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _abort_branch_in(_lock_claimed_step(step_id, claim_token, 'abort_branch'), target_id, claim_token, step_id, output, reason);
END
$$;

-- abort_branch() naming its campaign first (SPEC §2 scale-out rule): under Citus it is delegated to
-- the worker holding the campaign and runs there as one local transaction (distribute.sql). sortie-
-- mcp calls it for its session's own step. Never with a NULL campaign_id: a stock Citus 13.2 coordinator
-- crashes on one (citusdata/citus#7242). Errors: those of abort_branch; not_found when the step is
-- not in that campaign.
CREATE FUNCTION _abort_branch_delegated(campaign_id uuid, target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _abort_branch_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'abort_branch'), target_id, claim_token, step_id, output, reason);
END
$$;

-- abort_branch itself, for `caller`, the claimed step its caller locked with its campaign.
-- Every statement names the campaign.
CREATE FUNCTION _abort_branch_in(caller steps, target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
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
