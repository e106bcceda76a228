-- check_invariants() (SPEC §11): what must hold after every rule, whatever happened before.
-- Returns one row per problem; no rows means the state is consistent. The test suite runs it
-- after every test.

-- A step of campaign `p_campaign` on a cycle of waits among its open steps, or NULL (SPEC §13).
-- Finished steps wait for nothing, so only open steps and their dependencies are read.
CREATE FUNCTION _campaign_wait_cycle(p_campaign uuid) RETURNS bigint
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_ids bigint[];
    v_parents bigint[];
    v_dep_steps bigint[];
    v_dep_on bigint[];
BEGIN
    SELECT coalesce(array_agg(s.id ORDER BY s.id), '{}'), coalesce(array_agg(s.parent_id ORDER BY s.id), '{}')
      INTO v_ids, v_parents
      FROM steps s
     WHERE s.campaign_id = p_campaign AND s.status IN ('pending', 'running', 'waiting_input');
    IF cardinality(v_ids) = 0 THEN
        RETURN NULL;
    END IF;
    SELECT coalesce(array_agg(d.step_id), '{}'), coalesce(array_agg(d.depends_on), '{}')
      INTO v_dep_steps, v_dep_on
      FROM step_dependencies d
     WHERE d.campaign_id = p_campaign AND d.step_id = ANY (v_ids);
    RETURN _wait_cycle_step(v_ids, v_parents, v_dep_steps, v_dep_on);
END
$$;

CREATE FUNCTION check_invariants(campaign_id uuid DEFAULT NULL) RETURNS SETOF text
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    v_campaign uuid;
    v_step bigint;
BEGIN
    -- $1: the argument campaign_id (named like the columns).
    RETURN QUERY
    WITH scope AS (SELECT * FROM campaigns c WHERE $1 IS NULL OR c.id = $1),
    counts AS (
        SELECT c.id,
               c.open_steps, c.running_steps, c.ready_steps,
               count(s.id) FILTER (WHERE s.status IN ('pending', 'running', 'waiting_input')) AS open_actual,
               count(s.id) FILTER (WHERE s.status = 'running' AND s.step_type = 'atomic') AS running_actual,
               count(s.id) FILTER (WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0) AS ready_actual
          FROM scope c LEFT JOIN steps s ON s.campaign_id = c.id
         GROUP BY c.id, c.open_steps, c.running_steps, c.ready_steps)
    SELECT format('campaign %s: open_steps is %s, actual %s', id, open_steps, open_actual) FROM counts WHERE open_steps <> open_actual
    UNION ALL
    SELECT format('campaign %s: running_steps is %s, actual %s', id, running_steps, running_actual) FROM counts WHERE running_steps <> running_actual
    UNION ALL
    SELECT format('campaign %s: ready_steps is %s, actual %s', id, ready_steps, ready_actual) FROM counts WHERE ready_steps <> ready_actual
    UNION ALL
    SELECT format('campaign %s: ready step %s lies below ready_floor %s', c.id, s.id, c.ready_floor)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0 AND s.id < c.ready_floor
    UNION ALL
    -- Unmet dependencies counted per step in a join rather than by a subquery per step: Citus
    -- plans no correlated subquery beside a subquery without FROM.
    SELECT format('step %s: remaining_deps is %s, expected %s', e.id, e.remaining_deps, e.expected)
      FROM (SELECT s.id, s.remaining_deps,
                   coalesce(u.n, 0)
                   + CASE WHEN p.step_type <> 'atomic' AND p.status = 'pending' AND p.remaining_deps > 0 THEN 1 ELSE 0 END
                     AS expected
              FROM scope c JOIN steps s ON s.campaign_id = c.id
              LEFT JOIN steps p ON p.campaign_id = s.campaign_id AND p.id = s.parent_id
              LEFT JOIN (SELECT d.campaign_id, d.step_id, count(*) AS n
                           FROM step_dependencies d
                           JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
                          WHERE x.status <> 'done' AND d.campaign_id IN (SELECT id FROM scope)
                          GROUP BY d.campaign_id, d.step_id) u ON u.campaign_id = s.campaign_id AND u.step_id = s.id
             WHERE s.status = 'pending') e
     WHERE e.remaining_deps <> e.expected
    UNION ALL
    SELECT format('step %s: is running without a claim token', s.id)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status = 'running' AND s.step_type = 'atomic' AND (s.claim_token IS NULL OR s.lease_expires_at IS NULL)
    UNION ALL
    SELECT format('step %s: is %s but holds a claim token', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.claim_token IS NOT NULL AND s.status NOT IN ('running', 'skipped')
    UNION ALL
    SELECT format('step %s: is %s without completed_at', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.status IN ('done', 'failed', 'skipped') AND s.completed_at IS NULL
    UNION ALL
    SELECT format('step %s: compound step is %s', s.id, s.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE s.step_type <> 'atomic' AND s.status = 'waiting_input'
    UNION ALL
    SELECT format('step %s: members %s/%s/%s, actual %s/%s/%s', p.id, p.members, p.members_resolved, p.members_failed,
                  m.total, m.resolved, m.failed)
      FROM scope c JOIN steps p ON p.campaign_id = c.id
     CROSS JOIN LATERAL (
         SELECT count(*) AS total,
                count(*) FILTER (WHERE k.status = 'done' OR (k.status = 'skipped' AND k.skip_cause IN ('abort', 'threshold'))) AS resolved,
                count(*) FILTER (WHERE k.status = 'failed' OR (k.status = 'skipped' AND k.skip_cause NOT IN ('abort', 'threshold'))) AS failed
           FROM steps k WHERE k.campaign_id = p.campaign_id AND k.parent_id = p.id AND k.continued_by IS NULL) m
     WHERE p.step_type <> 'atomic'
       AND (p.members <> m.total OR p.members_resolved <> m.resolved OR p.members_failed <> m.failed)
    UNION ALL
    SELECT format('step %s: done compound step has open member %s', p.id, k.id)
      FROM scope c JOIN steps p ON p.campaign_id = c.id JOIN steps k ON k.campaign_id = p.campaign_id AND k.parent_id = p.id
     WHERE p.step_type <> 'atomic' AND p.status IN ('done', 'failed', 'skipped')
       AND k.status IN ('pending', 'running', 'waiting_input')
    UNION ALL
    SELECT format('step %s: open in %s campaign %s', s.id, c.status, c.id)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
     WHERE c.status IN ('done', 'failed', 'cancelled') AND s.status IN ('pending', 'running', 'waiting_input')
    UNION ALL
    -- Both ends must be steps of the dependency's own campaign (each looked up within it, so
    -- that no query joins two campaigns).
    SELECT format('dependency %s -> %s crosses campaigns', d.step_id, d.depends_on)
      FROM step_dependencies d
     WHERE NOT EXISTS (SELECT 1 FROM steps a WHERE a.campaign_id = d.campaign_id AND a.id = d.step_id)
        OR NOT EXISTS (SELECT 1 FROM steps b WHERE b.campaign_id = d.campaign_id AND b.id = d.depends_on)
    UNION ALL
    SELECT format('step %s: ran although dependency %s is %s', s.id, x.id, x.status)
      FROM scope c JOIN steps s ON s.campaign_id = c.id
      JOIN step_dependencies d ON d.campaign_id = s.campaign_id AND d.step_id = s.id
      JOIN steps x ON x.campaign_id = d.campaign_id AND x.id = d.depends_on
     WHERE s.status IN ('running', 'waiting_input') AND s.step_type = 'atomic' AND x.status <> 'done'
    UNION ALL
    SELECT format('lease on %s held by step %s which is %s', l.key, l.step_id, s.status)
      FROM resource_leases l JOIN steps s ON s.campaign_id = l.campaign_id AND s.id = l.step_id
     WHERE s.status <> 'running'
    UNION ALL
    -- SPEC §10: a campaign's events are numbered 1, 2, … up to its event_seq, each number once
    -- (prune() removes only whole campaigns, so none is missing either).
    SELECT format('campaign %s: %s events numbered 1 to %s (%s distinct), its event_seq is %s',
                  c.id, count(e.seq), max(e.seq), count(DISTINCT e.seq), c.event_seq)
      FROM scope c JOIN events e ON e.campaign_id = c.id
     GROUP BY c.id, c.event_seq
    HAVING max(e.seq) <> c.event_seq OR min(e.seq) <> 1 OR count(DISTINCT e.seq) <> count(*) OR count(*) <> c.event_seq;
    -- SPEC §13: a cycle of waits among open steps (dependencies, and compound parents waiting
    -- for their members) can never finish. One campaign at a time, outside the query: a rule
    -- called inside a query on a shard may not run queries of its own (Citus).
    FOR v_campaign IN SELECT c.id FROM campaigns c WHERE $1 IS NULL OR c.id = $1 ORDER BY c.id LOOP
        v_step := _campaign_wait_cycle(v_campaign);
        IF v_step IS NOT NULL THEN
            RETURN NEXT format('campaign %s: steps wait for each other in a cycle through step %s', v_campaign, v_step);
        END IF;
    END LOOP;
END
$$;
