-- Skip cascade (SPEC §3): what a failed, aborted or cancelled step takes with it.
--
-- The settling functions call each other: skip_cascade → member_settled (compound.sql) of each
-- parent that lost members → settle_compound_done → skip_cascade of the members still open, or
-- after_done (completion.sql) → member_settled of the grandparent; settle_failed
-- (failure_retry.sql) → skip_cascade and member_settled. It terminates because every call moves
-- at least one step to a terminal state and a terminal step is never settled again; the walk
-- up the tree is at most max_depth long.

-- Skip cascade (SPEC §3): every non-terminal step reachable from the seeds through dependents
-- and children is skipped in one statement; running ones lose their claim and leases. Then
-- each compound parent that lost members outside the skipped set is re-evaluated.
-- Returns the ids it skipped.
CREATE FUNCTION _skip_cascade(p_campaign uuid, p_seeds bigint[], p_cause text, p_reason text)
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
