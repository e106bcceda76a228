-- Retention (SPEC §18): campaigns that ended long ago are removed with everything they own,
-- so tables, indexes and the claim path stay the size of the recent work.

-- Removes up to `limit` campaigns that ended (done, failed or cancelled) before
-- _clock() - older_than, oldest end first, with their steps, dependencies, events, notes,
-- finished claims, notifications, lock keys and workflow history (foreign keys; events and lock keys by prune
-- itself). A campaign another transaction holds locked is left for the next call: the ended
-- campaigns are listed first, then locked one at a time, skipping those held (Citus locks
-- rows only in a query on one campaign). The runner calls it once a day with
-- SORTIE_RETENTION_DAYS; callers with more to remove call again while `more` is true. Returns {campaigns, steps, events, notes, more}: rows removed, and whether
-- ended campaigns past the limit remain. Errors: invalid_argument when older_than is NULL or
-- negative, or limit is not 1..10000.
CREATE FUNCTION prune(older_than interval DEFAULT interval '30 days', "limit" integer DEFAULT 1000)
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
