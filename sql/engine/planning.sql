-- The planner's side (SPEC §4): which drained campaigns a runner's planner LLM is due to plan,
-- the planning lease, what the planner is shown, and applying its answer all or nothing.

-- The planner side (SPEC §4). A runner takes the planning lease of a drained campaign; only
-- one holder at a time, so a campaign is never planned twice at once.
CREATE FUNCTION begin_planning(id uuid, lease_seconds integer DEFAULT 300) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'active' OR c.open_steps > 0 OR c.planner <> 'llm'
       OR (c.planner_lease_until IS NOT NULL AND c.planner_lease_until > _clock())
       OR (c.next_action_at IS NOT NULL AND c.next_action_at > _clock()) THEN
        RETURN jsonb_build_object('granted', false);
    END IF;
    UPDATE campaigns SET planner_lease_until = _clock() + make_interval(secs => greatest(lease_seconds, 1))
     WHERE campaigns.id = c.id;
    RETURN jsonb_build_object('granted', true);
END
$$;

-- Drained, active, llm-planned campaigns whose planner is due, oldest first. A runner with a
-- planner LLM (`planner_configured`) plans a campaign that never had a step only once
-- `plan_delay` seconds have passed since its creation; a runner without one gets only the
-- campaigns that had steps, to end them (SPEC §13: never having had a step is not drained).
CREATE FUNCTION campaigns_to_plan("limit" integer DEFAULT 10, planner_configured boolean DEFAULT true,
                                  plan_delay double precision DEFAULT 10)
RETURNS SETOF uuid
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    -- Whether a campaign had steps is read in the query (as _has_had_steps() does), not by a
    -- call per campaign: Citus refuses a query nested in a query on a shard.
    RETURN QUERY
    SELECT c.id FROM campaigns c
     WHERE c.status = 'active' AND c.open_steps = 0 AND c.planner = 'llm'
       -- SPEC §17: its benchmark runs first; record_benchmark() hands it back.
       AND NOT c.benchmark_due
       AND CASE WHEN coalesce(planner_configured, true) THEN
                     (c.planner_lease_until IS NULL OR c.planner_lease_until <= v_now)
                 AND (c.next_action_at IS NULL OR c.next_action_at <= v_now)
                 AND (c.created_at + make_interval(secs => greatest(coalesce(plan_delay, 10), 0)) <= v_now
                      OR EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id))
                -- Nothing to plan with: only the planner's schedule would wait, so a drained
                -- campaign is handed over to be ended at once.
                ELSE EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id) END
     ORDER BY c.next_action_at NULLS FIRST, c.created_at
     LIMIT greatest("limit", 0);
END
$$;

-- What the planner is shown (SPEC §4, §13): the campaign's goal, strategy, progress, guidance,
-- scope and budget; its newest done, failed and open steps (15 of each); its newest notes; and
-- the duplicate warnings of its pending and 50 newest steps (an atomic step whose fingerprint
-- matches an earlier non-failed step's), so the planner does not add the same work again.
CREATE FUNCTION planner_context(campaign_id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_success jsonb;
BEGIN
    IF campaign_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id is required');
    END IF;
    SELECT * INTO c FROM campaigns x WHERE x.id = campaign_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    -- Apart from the query below: a rule called in a query over a per-campaign table may not
    -- run queries of its own (Citus runs the whole query on the campaign's shard).
    IF c.success_metric IS NOT NULL THEN
        v_success := check_success(c.id);
    END IF;
    RETURN jsonb_build_object(
        'goal', c.goal, 'strategy', c.strategy, 'progress', c.progress, 'guidance', c.guidance,
        'scope', c.scope, 'max_depth', c.max_depth, 'tokens_used', c.tokens_used, 'token_budget', c.token_budget,
        'success_metric', c.success_metric, 'success_target', c.success_target,
        'success', v_success,
        'done', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action) ORDER BY s.id DESC), '[]')
                   FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status = 'done' AND s.step_type = 'atomic'
                          ORDER BY s.id DESC LIMIT 15) s),
        'failed', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action, 'error', left(s.error, 300))
                                             ORDER BY s.id DESC), '[]')
                     FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status = 'failed'
                            ORDER BY s.id DESC LIMIT 15) s),
        'open', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', s.id, 'action', s.action, 'status', s.status)
                                           ORDER BY s.id DESC), '[]')
                   FROM (SELECT * FROM steps s WHERE s.campaign_id = c.id AND s.status IN ('pending', 'running', 'waiting_input')
                          AND s.step_type = 'atomic' ORDER BY s.id DESC LIMIT 15) s),
        'duplicates', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', n.id, 'action', n.action, 'status', n.status,
                                                                    'duplicate_of', d.id, 'duplicate_status', d.status)
                                                 ORDER BY n.id DESC), '[]')
                         FROM (SELECT * FROM steps s
                                WHERE s.campaign_id = c.id AND s.fingerprint IS NOT NULL
                                  AND (s.status = 'pending'
                                       OR s.id >= coalesce((SELECT min(r.id) FROM (SELECT x.id FROM steps x WHERE x.campaign_id = c.id
                                                                                    ORDER BY x.id DESC LIMIT 50) r), 0))) n
                        CROSS JOIN LATERAL (
                            SELECT o.id, o.status FROM steps o
                             WHERE o.campaign_id = c.id AND o.fingerprint = n.fingerprint AND o.id < n.id
                               AND o.status <> 'failed'
                             ORDER BY o.id LIMIT 1) d),
        'recent_notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'content', left(n.content, 500))
                                                   ORDER BY n.id DESC), '[]')
                           FROM (SELECT * FROM notes n WHERE n.campaign_id = c.id ORDER BY n.id DESC LIMIT 10) n));
END
$$;

-- Applies a planner answer all or nothing: it is validated completely before any change.
CREATE FUNCTION apply_plan(campaign_id uuid, plan jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_plan jsonb;
    c campaigns;
    v_steps jsonb;
    v_status text;
BEGIN
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _require(plan IS NOT NULL, 'plan');
    v_plan := _unwrap(_parse_plan(plan));
    c := _lock_campaign(campaign_id);
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; a plan cannot change it', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET strategy = coalesce(v_plan ->> 'strategy_update', strategy),
           progress = coalesce(v_plan ->> 'progress_update', progress),
           planner_iterations = planner_iterations + 1,
           planner_lease_until = NULL,
           -- A plan that neither adds steps nor ends the campaign would otherwise be asked again
           -- at once: it waits 5 minutes unless it names its own delay.
           next_action_at = _clock() + make_interval(secs => 60 * coalesce((v_plan ->> 'next_delay_minutes')::double precision,
                                                    CASE WHEN jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN 0 ELSE 5 END)),
           updated_at = now()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    IF v_plan -> 'notify' IS NOT NULL AND jsonb_typeof(v_plan -> 'notify') = 'object' THEN
        PERFORM _notify_campaign(c.id, v_plan #>> '{notify,level}', v_plan #>> '{notify,message}');
    END IF;
    IF jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN
        v_steps := _insert_steps(c, _unwrap(v_plan -> 'new_steps'), NULL, 0);
    END IF;
    PERFORM _emit(c.id, NULL, 'plan.applied', jsonb_build_object(
        'created', coalesce((v_steps ->> 'created')::integer, 0), 'done', (v_plan ->> 'done')::boolean));
    IF (v_plan ->> 'done')::boolean THEN
        IF c.open_steps > 0 THEN
            PERFORM _raise('invalid_state', format('the plan says done but campaign %s still has %s open steps', c.id, c.open_steps));
        END IF;
        v_status := _finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', coalesce(v_status, c.status),
                              'steps', v_steps, 'next_action_at', c.next_action_at);
END
$$;
