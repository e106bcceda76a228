-- Adding steps (SPEC §3a): the whole call is validated by _expand_steps() before anything is
-- written; ids named as dependencies must belong to the campaign and are resolved to their
-- newest continuation; duplicates by fingerprint are reported, not refused.

-- Follows a spliced step of campaign `p_campaign` to its newest continuation (SPEC §3 DAG
-- splice); NULL for no such step.
CREATE FUNCTION _newest_continuation(p_campaign uuid, p_step bigint) RETURNS bigint
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

-- Raises the refusal carried by a pure function's answer, or returns its payload.
CREATE FUNCTION _unwrap(p_answer jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_answer ? 'error' THEN
        PERFORM _raise(p_answer #>> '{error,code}', p_answer #>> '{error,message}');
    END IF;
    RETURN p_answer -> 'ok';
END
$$;

-- Inserts an expansion (expand_steps' "ok") into campaign `c`. Top-level nodes get
-- `p_parent` and `p_depth`; `p_max_depth` bounds the deepest node (spawned subtasks).
CREATE FUNCTION _insert_steps(c campaigns, p_expansion jsonb, p_parent bigint, p_depth integer,
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

CREATE FUNCTION add_steps(campaign_id uuid, steps jsonb, request_id text DEFAULT NULL) RETURNS jsonb
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
