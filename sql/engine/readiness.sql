-- Readiness (SPEC §3): ready = atomic, pending, remaining_deps = 0 (own dependencies and every
-- compound ancestor's met), not_before passed, campaign active and within budget, lock keys
-- free. The first three are the partial index `steps_ready`; the rest are checked on the few
-- rows it returns. A step's remaining_deps falls here when a dependency is done.

-- Lowers a campaign's ready_floor (SPEC §18) to `p_step`, a step that just became ready through
-- an update: a dependency met, a gate lifted, a retry, an answer, a release. Every rule that
-- makes a step ready calls it (a trigger did before: Citus distributes no table with triggers,
-- docs/scale-out.md); an inserted step needs nothing, as its id is above every existing one.
-- check_invariants() reports a ready step below its campaign's floor.
CREATE FUNCTION _lower_ready_floor(p_campaign uuid, p_step bigint) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    UPDATE campaigns SET ready_floor = p_step
     WHERE id = p_campaign AND p_step IS NOT NULL AND ready_floor > p_step;
END
$$;

-- Steps whose remaining_deps just reached 0: an atomic one joins the ready set; a compound one
-- opens, lifting the gate it holds on each of its pending children (SPEC §3: every dependency
-- of every compound ancestor must be done), recursively.
CREATE FUNCTION _unblocked(p_campaign uuid, p_steps bigint[]) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer := 0;
    v_compound bigint[];
    v_children bigint[];
    v_first bigint;
    v_empty steps;
BEGIN
    WHILE cardinality(p_steps) > 0 LOOP
        SELECT count(*) FILTER (WHERE step_type = 'atomic'),
               min(id) FILTER (WHERE step_type = 'atomic'),
               coalesce(array_agg(id) FILTER (WHERE step_type <> 'atomic'), '{}')
          INTO v_ready, v_first, v_compound
          FROM steps WHERE campaign_id = p_campaign AND id = ANY (p_steps) AND status = 'pending' AND remaining_deps = 0;
        PERFORM _bump_counters(p_campaign, 0, 0, v_ready);
        PERFORM _lower_ready_floor(p_campaign, v_first);
        EXIT WHEN cardinality(v_compound) = 0;
        -- A compound step with no members (a for_each over no items) has nothing to wait for.
        -- A loop, not a call per row of the query: a rule called inside a query on a shard may
        -- not run queries of its own (Citus).
        FOR v_empty IN SELECT * FROM steps p
                        WHERE p.campaign_id = p_campaign AND p.id = ANY (v_compound) AND p.members = 0
                        ORDER BY p.id LOOP
            PERFORM _settle_compound_done(v_empty);
        END LOOP;
        WITH opened AS (
            UPDATE steps SET remaining_deps = remaining_deps - 1
             WHERE campaign_id = p_campaign AND parent_id = ANY (v_compound) AND status = 'pending'
            RETURNING id, remaining_deps)
        SELECT coalesce(array_agg(id) FILTER (WHERE remaining_deps = 0), '{}') INTO v_children FROM opened;
        p_steps := v_children;
    END LOOP;
END
$$;

-- Steps became done (one, or a batch's run, SPEC §18): each dependent has one dependency fewer
-- per done step it waits on. Compound ones that reached 0 open here; the atomic ones that became
-- ready are counted, not added to the campaign's ready_steps: the caller folds that into its own
-- counter update.
CREATE FUNCTION _release_dependents(p_campaign uuid, p_steps bigint[]) RETURNS integer
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_ready integer;
    v_first bigint;
    v_compound bigint[];
BEGIN
    WITH needs AS (
        SELECT d.step_id, count(*)::integer AS n
          FROM step_dependencies d
         WHERE d.campaign_id = p_campaign AND d.depends_on = ANY (p_steps)
         GROUP BY d.step_id),
    released AS (
        UPDATE steps s SET remaining_deps = s.remaining_deps - n.n
          FROM needs n
         WHERE s.campaign_id = p_campaign AND s.id = n.step_id AND s.status = 'pending'
        RETURNING s.id, s.step_type, s.remaining_deps)
    SELECT count(*) FILTER (WHERE remaining_deps = 0 AND step_type = 'atomic'),
           min(id) FILTER (WHERE remaining_deps = 0 AND step_type = 'atomic'),
           array_agg(id) FILTER (WHERE remaining_deps = 0 AND step_type <> 'atomic')
      INTO v_ready, v_first, v_compound
      FROM released;
    IF v_first IS NOT NULL THEN
        PERFORM _lower_ready_floor(p_campaign, v_first);
    END IF;
    IF v_compound IS NOT NULL THEN
        PERFORM _unblocked(p_campaign, v_compound);
    END IF;
    RETURN v_ready;
END
$$;

-- How far ahead of a campaign's ready_floor its first ready step may lie before a claim
-- raises the floor: raising it is one more update of the campaign row, so it is done once the
-- scan would pass this many ids rather than at every claim (at most this many index entries
-- of claimed steps lie between the floor and the first ready step).
CREATE FUNCTION _ready_floor_slack() RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 32::bigint $$;

-- Ready steps, for dashboards and runners that choose for themselves. Lock keys are tested
-- against the leases read once, before the query (_locks_conflict, lock_keys.sql). The query is
-- PL/pgSQL (_ready_steps), which Citus can plan; this SQL wrapper keeps the argument names
-- beside the result columns of the same names, which PL/pgSQL does not allow.
CREATE FUNCTION _ready_steps(p_campaign uuid, p_agent text, p_limit integer)
RETURNS TABLE (step_id bigint, campaign_id uuid, action text, agent text, depth integer, created_at timestamptz)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    l record;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    SELECT * INTO l FROM _live_leases();
    RETURN QUERY
    SELECT s.id, s.campaign_id, s.action::text, s.agent, s.depth::integer, s.created_at
      FROM steps s JOIN campaigns c ON c.id = s.campaign_id
     WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0
       AND s.not_before <= v_now
       AND (p_campaign IS NULL OR s.campaign_id = p_campaign)
       AND (p_agent IS NULL OR s.agent IS NULL OR s.agent = p_agent)
       AND c.status = 'active' AND (c.token_budget IS NULL OR c.tokens_used < c.token_budget)
       AND NOT _locks_conflict(s.requires_locks, NULL, l.keys, l.modes, l.steps)
     ORDER BY c.slot_seconds_used / c.weight, s.id
     LIMIT greatest(p_limit, 0);
END
$$;

CREATE FUNCTION ready_steps(campaign_id uuid DEFAULT NULL, agent text DEFAULT NULL, "limit" integer DEFAULT 100)
RETURNS TABLE (step_id bigint, campaign_id uuid, action text, agent text, depth integer, created_at timestamptz)
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$ SELECT * FROM _ready_steps($1, $2, $3) $$;
