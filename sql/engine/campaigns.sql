-- Campaigns: creation, reading, steering, pause/resume/cancel, the end rule, success contract,
-- and the planner's side (SPEC §3, §4, §5).

CREATE FUNCTION campaign_summary(c campaigns) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_build_object(
        'id', c.id, 'name', c.name, 'goal', c.goal, 'status', c.status, 'status_reason', c.status_reason,
        'priority', c.priority, 'progress', c.progress, 'strategy', c.strategy, 'guidance', c.guidance,
        'channel', c.channel, 'max_depth', c.max_depth, 'max_parallel', c.max_parallel,
        'token_budget', c.token_budget, 'tokens_used', c.tokens_used, 'failure_policy', c.failure_policy,
        'planner', c.planner, 'open_steps', c.open_steps, 'running_steps', c.running_steps,
        'success_metric', c.success_metric, 'success_target', c.success_target,
        'success_direction', c.success_direction, 'max_iterations', c.max_iterations,
        'next_action_at', c.next_action_at, 'created_at', c.created_at, 'updated_at', c.updated_at,
        'completed_at', c.completed_at);
$$;

CREATE FUNCTION create_campaign(
    goal text,
    name text DEFAULT NULL,
    channel text DEFAULT NULL,
    priority text DEFAULT 'normal',
    max_depth integer DEFAULT 4,
    token_budget bigint DEFAULT NULL,
    dry_run boolean DEFAULT false,
    success_metric text DEFAULT NULL,
    success_target double precision DEFAULT NULL,
    success_direction text DEFAULT 'max',
    benchmark_command text DEFAULT NULL,
    scope text DEFAULT NULL,
    max_iterations integer DEFAULT NULL,
    max_parallel integer DEFAULT NULL,
    planner text DEFAULT 'llm',
    failure_policy text DEFAULT 'continue',
    context jsonb DEFAULT '{}',
    steps jsonb DEFAULT NULL,
    plan_delay double precision DEFAULT 10,
    request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_expansion jsonb;
    v_steps jsonb;
    v_arguments jsonb;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('goal', goal, 'name', name, 'channel', channel, 'priority', priority,
            'max_depth', max_depth, 'token_budget', token_budget, 'dry_run', dry_run, 'success_metric', success_metric,
            'success_target', success_target, 'success_direction', success_direction,
            'benchmark_command', benchmark_command, 'scope', scope, 'max_iterations', max_iterations,
            'max_parallel', max_parallel, 'planner', planner, 'failure_policy', failure_policy,
            'context', context, 'steps', steps, 'plan_delay', plan_delay);
        RETURN coalesce(_replay(request_id, 'create_campaign', v_arguments),
                        _keep(request_id, 'create_campaign', v_arguments, create_campaign(
                            goal => goal, name => name, channel => channel, priority => priority,
                            max_depth => max_depth, token_budget => token_budget, dry_run => dry_run,
                            success_metric => success_metric, success_target => success_target,
                            success_direction => success_direction, benchmark_command => benchmark_command,
                            scope => scope, max_iterations => max_iterations, max_parallel => max_parallel,
                            planner => planner, failure_policy => failure_policy, context => context,
                            steps => steps, plan_delay => plan_delay)));
    END IF;
    IF goal IS NULL OR btrim(goal) = '' THEN
        PERFORM raise('invalid_argument', 'goal is required: say what the campaign should accomplish');
    END IF;
    IF coalesce(priority, 'normal') NOT IN ('urgent', 'high', 'normal', 'low', 'background') THEN
        PERFORM raise('invalid_argument', format('priority %L is not one of urgent, high, normal, low, background', priority));
    END IF;
    IF coalesce(success_direction, 'max') NOT IN ('max', 'min') THEN
        PERFORM raise('invalid_argument', 'success_direction must be max or min');
    END IF;
    IF coalesce(planner, 'llm') NOT IN ('llm', 'none') THEN
        PERFORM raise('invalid_argument', 'planner must be llm or none');
    END IF;
    IF coalesce(failure_policy, 'continue') NOT IN ('continue', 'fail_fast') THEN
        PERFORM raise('invalid_argument', 'failure_policy must be continue or fail_fast');
    END IF;
    IF max_depth IS NOT NULL AND max_depth NOT BETWEEN 0 AND 64 THEN
        PERFORM raise('invalid_argument', 'max_depth must be from 0 to 64');
    END IF;
    IF max_parallel IS NOT NULL AND max_parallel < 1 THEN
        PERFORM raise('invalid_argument', 'max_parallel must be at least 1 (omit it for no cap)');
    END IF;
    IF token_budget IS NOT NULL AND token_budget < 1 THEN
        PERFORM raise('invalid_argument', 'token_budget must be positive (omit it for no budget)');
    END IF;
    IF max_iterations IS NOT NULL AND max_iterations < 1 THEN
        PERFORM raise('invalid_argument', 'max_iterations must be positive');
    END IF;
    IF name IS NOT NULL AND length(name) NOT BETWEEN 1 AND 200 THEN
        PERFORM raise('invalid_argument', 'name must be 1 to 200 characters');
    END IF;
    IF context IS NOT NULL AND jsonb_typeof(context) <> 'object' THEN
        PERFORM raise('invalid_argument', 'context must be a JSON object');
    END IF;
    IF plan_delay IS NOT NULL AND NOT (plan_delay BETWEEN 0 AND 86400) THEN
        PERFORM raise('invalid_argument', 'plan_delay must be from 0 to 86400 seconds');
    END IF;
    IF steps IS NOT NULL THEN
        v_expansion := unwrap(expand_steps(steps));
    END IF;

    INSERT INTO campaigns (name, goal, channel, priority, max_depth, token_budget, status, status_reason,
                           success_metric, success_target, success_direction, benchmark_command, scope,
                           max_iterations, max_parallel, planner, failure_policy, context, next_action_at)
    VALUES (coalesce(name, name_from_goal(goal)), goal, channel, coalesce(priority, 'normal'),
            coalesce(max_depth, 4), token_budget,
            CASE WHEN dry_run THEN 'paused' ELSE 'active' END,
            CASE WHEN dry_run THEN 'dry_run: review, then resume_campaign' END,
            success_metric, success_target, coalesce(success_direction, 'max'), benchmark_command, scope,
            max_iterations, max_parallel, coalesce(planner, 'llm'), coalesce(failure_policy, 'continue'),
            coalesce(context, '{}'),
            -- SPEC §13: a campaign created without steps gives its coordinator plan_delay
            -- seconds to add them before the planner may.
            CASE WHEN v_expansion IS NULL THEN clock() + make_interval(secs => coalesce(plan_delay, 10))
                 ELSE clock() END)
    RETURNING * INTO c;
    PERFORM emit(c.id, NULL, 'campaign.created', jsonb_build_object('name', c.name));
    IF v_expansion IS NOT NULL THEN
        v_steps := insert_steps(c, v_expansion, NULL, 0);
    END IF;
    RETURN jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status,
                              'next_action_at', c.next_action_at)
           || CASE WHEN v_steps IS NULL THEN '{}' ELSE jsonb_build_object('steps', v_steps) END;
END
$$;

-- Keyset-paged, newest first. The cursor is opaque to callers.
CREATE FUNCTION list_campaigns(status text DEFAULT NULL, "limit" integer DEFAULT 20, cursor text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_after_at timestamptz;
    v_after_id uuid;
    v_rows jsonb;
    v_limit integer := least(greatest(coalesce("limit", 20), 1), 200);
BEGIN
    IF status IS NOT NULL AND status NOT IN ('active', 'paused', 'done', 'failed', 'cancelled') THEN
        PERFORM raise('invalid_argument', format('status %L is not one of active, paused, done, failed, cancelled', status));
    END IF;
    IF cursor IS NOT NULL THEN
        BEGIN
            v_after_at := split_part(cursor, '|', 1)::timestamptz;
            v_after_id := split_part(cursor, '|', 2)::uuid;
        EXCEPTION WHEN others THEN
            PERFORM raise('invalid_argument', 'cursor is not one this function returned');
        END;
    END IF;
    SELECT coalesce(jsonb_agg(r ORDER BY r_at DESC, r_id DESC), '[]') INTO v_rows FROM (
        SELECT jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status, 'priority', c.priority,
                                  'progress', c.progress, 'open_steps', c.open_steps, 'created_at', c.created_at) AS r,
               c.created_at AS r_at, c.id AS r_id
          FROM campaigns c
         WHERE (list_campaigns.status IS NULL OR c.status = list_campaigns.status)
           AND (v_after_at IS NULL OR (c.created_at, c.id) < (v_after_at, v_after_id))
         ORDER BY c.created_at DESC, c.id DESC
         LIMIT v_limit + 1) page;
    RETURN jsonb_build_object(
        'campaigns', CASE WHEN jsonb_array_length(v_rows) > v_limit THEN v_rows - v_limit ELSE v_rows END,
        'next_cursor', CASE WHEN jsonb_array_length(v_rows) > v_limit
                            THEN (v_rows -> (v_limit - 1) ->> 'created_at') || '|' || (v_rows -> (v_limit - 1) ->> 'id') END);
END
$$;

-- STABLE, not IMMUTABLE: it reads the step's dependencies.
CREATE FUNCTION step_row(s steps) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'parent_id', s.parent_id, 'depth', s.depth, 'action', s.action, 'agent', s.agent,
        'step_type', s.step_type, 'status', s.status, 'attempts', s.attempts,
        'error', left(s.error, 300), 'question', s.question,
        'output_chars', length(s.output), 'continuation_of', s.continuation_of,
        'continued_by', s.continued_by, 'skip_cause', s.skip_cause,
        'depends_on', (SELECT jsonb_agg(d.depends_on ORDER BY d.depends_on) FROM step_dependencies d WHERE d.step_id = s.id)));
$$;

-- Steps come a page at a time in id order (SPEC §14): `steps_cursor` is the
-- `next_steps_cursor` of the page before, absent on the last page.
CREATE FUNCTION get_campaign(id uuid, steps_limit integer DEFAULT 500, steps_cursor text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_after bigint;
    v_limit integer := least(greatest(coalesce(steps_limit, 500), 1), 5000);
    v_steps jsonb;
BEGIN
    IF steps_cursor IS NOT NULL THEN
        BEGIN
            v_after := steps_cursor::bigint;
        EXCEPTION WHEN others THEN
            PERFORM raise('invalid_argument', 'steps_cursor is not one get_campaign returned');
        END;
    END IF;
    SELECT * INTO c FROM campaigns WHERE campaigns.id = get_campaign.id;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('campaign %s does not exist', get_campaign.id));
    END IF;
    SELECT coalesce(jsonb_agg(step_row(s) ORDER BY s.id), '[]') INTO v_steps
      FROM (SELECT * FROM steps
             WHERE campaign_id = c.id AND (v_after IS NULL OR steps.id > v_after)
             ORDER BY steps.id
             LIMIT v_limit + 1) s;
    RETURN campaign_summary(c) || jsonb_build_object(
        'step_counts', (SELECT coalesce(jsonb_object_agg(status, n), '{}')
                          FROM (SELECT status, count(*) AS n FROM steps WHERE campaign_id = c.id GROUP BY status) t),
        'steps', CASE WHEN jsonb_array_length(v_steps) > v_limit THEN v_steps - v_limit ELSE v_steps END,
        'next_steps_cursor', CASE WHEN jsonb_array_length(v_steps) > v_limit
                                  THEN (v_steps -> (v_limit - 1) ->> 'id') END,
        'recent_notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'step_id', n.step_id, 'agent', n.agent,
                                    'content', left(n.content, 500), 'tags', n.tags, 'created_at', n.created_at)
                                    ORDER BY n.id DESC), '[]')
                           FROM (SELECT * FROM notes WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) n));
END
$$;

-- User guidance is appended, never replaced by the planner (SPEC §12).
CREATE FUNCTION steer_campaign(id uuid, guidance text, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance)),
                        _keep(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance),
                              steer_campaign(id => id, guidance => guidance)));
    END IF;
    IF guidance IS NULL OR btrim(guidance) = '' THEN
        PERFORM raise('invalid_argument', 'guidance is empty: say what should change');
    END IF;
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM raise('invalid_state', format('campaign %s is %s and can no longer be steered', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET guidance = campaigns.guidance || jsonb_build_array(jsonb_build_object('at', clock(), 'text', steer_campaign.guidance)),
           updated_at = now(), next_action_at = clock()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    PERFORM emit(c.id, NULL, 'campaign.steered', jsonb_build_object('guidance', steer_campaign.guidance));
    RETURN jsonb_build_object('id', c.id, 'guidance', c.guidance, 'strategy', c.strategy);
END
$$;

CREATE FUNCTION pause_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
BEGIN
    IF c.status <> 'active' THEN
        PERFORM raise('invalid_state', format('campaign %s is %s; only an active campaign can be paused', c.id, c.status));
    END IF;
    UPDATE campaigns SET status = 'paused', status_reason = 'paused by request', updated_at = now()
     WHERE campaigns.id = c.id;
    PERFORM emit(c.id, NULL, 'campaign.paused');
    RETURN jsonb_build_object('id', c.id, 'status', 'paused', 'running_steps', c.running_steps);
END
$$;

CREATE FUNCTION resume_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
BEGIN
    IF c.status <> 'paused' THEN
        PERFORM raise('invalid_state', format('campaign %s is %s; only a paused campaign can be resumed', c.id, c.status));
    END IF;
    IF c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN
        PERFORM raise('budget_exhausted', format(
            'campaign %s has used %s of its %s tokens; raise token_budget before resuming', c.id, c.tokens_used, c.token_budget));
    END IF;
    UPDATE campaigns SET status = 'active', status_reason = NULL, updated_at = now(), next_action_at = clock()
     WHERE campaigns.id = c.id;
    PERFORM emit(c.id, NULL, 'campaign.resumed');
    PERFORM check_drained(c.id);
    RETURN jsonb_build_object('id', c.id, 'status', (SELECT status FROM campaigns WHERE campaigns.id = c.id));
END
$$;

CREATE FUNCTION cancel_campaign(id uuid, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
    v_open integer := c.open_steps;
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM raise('invalid_state', format('campaign %s is already %s', c.id, c.status));
    END IF;
    PERFORM end_campaign(c.id, 'cancelled', coalesce(reason, 'cancelled by request'));
    RETURN jsonb_build_object('id', c.id, 'status', 'cancelled', 'skipped_steps', v_open);
END
$$;

-- Ends a drained campaign by the done/failed rule; the runner calls it when no planner is
-- configured (SPEC §3 campaign end).
CREATE FUNCTION finish_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM raise('invalid_state', format('campaign %s is already %s', c.id, c.status));
    END IF;
    IF c.open_steps > 0 THEN
        PERFORM raise('invalid_state', format('campaign %s still has %s open steps', c.id, c.open_steps));
    END IF;
    -- SPEC §13: never having had a step is waiting, not being drained.
    IF NOT has_had_steps(c.id) THEN
        PERFORM raise('invalid_state', format('campaign %s has had no steps yet: add_steps to it, or cancel_campaign to end it',
                                              c.id));
    END IF;
    RETURN jsonb_build_object('id', c.id, 'status', finish_drained(c));
END
$$;

-- Success contract (SPEC §3): the newest metric note decides.
CREATE FUNCTION check_success(id uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_value double precision;
    v_note bigint;
    v_iterations integer;
BEGIN
    SELECT * INTO c FROM campaigns WHERE campaigns.id = check_success.id;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('campaign %s does not exist', check_success.id));
    END IF;
    IF c.success_metric IS NULL THEN
        RETURN jsonb_build_object('met', NULL, 'reason', 'this campaign has no success contract (success_metric is not set)',
                                  'status', c.status);
    END IF;
    -- An iteration is a benchmark run when the campaign has a benchmark (SPEC §17: each run
    -- counts one, with or without a value; workers' own metric notes do not), otherwise a
    -- metric note with a value.
    SELECT CASE WHEN c.benchmark_command IS NOT NULL THEN c.benchmark_runs ELSE count(*) END
      INTO v_iterations FROM notes n
     WHERE n.campaign_id = c.id AND ('metric:' || c.success_metric) = ANY (n.tags)
       AND parse_metric(c.success_metric, n.content) IS NOT NULL;
    SELECT parse_metric(c.success_metric, n.content), n.id INTO v_value, v_note
      FROM notes n
     WHERE n.campaign_id = c.id AND ('metric:' || c.success_metric) = ANY (n.tags)
       AND parse_metric(c.success_metric, n.content) IS NOT NULL
     ORDER BY n.id DESC LIMIT 1;
    RETURN jsonb_build_object(
        'met', CASE WHEN v_value IS NULL THEN false
                    WHEN c.success_target IS NULL THEN NULL
                    ELSE metric_met(v_value, c.success_target, c.success_direction) END,
        'reason', CASE
            WHEN v_value IS NULL THEN format('no note tagged metric:%s with a value yet', c.success_metric)
            WHEN c.success_target IS NULL THEN format('%s = %s; no target set, so nothing to compare', c.success_metric, v_value)
            WHEN metric_met(v_value, c.success_target, c.success_direction)
                THEN format('%s = %s meets the target %s (%s)', c.success_metric, v_value, c.success_target, c.success_direction)
            ELSE format('%s = %s does not meet the target %s (%s)', c.success_metric, v_value, c.success_target, c.success_direction) END,
        'metric', c.success_metric,
        'metric_value', v_value,
        'metric_note_id', v_note,
        'target', c.success_target,
        'direction', c.success_direction,
        'iterations_used', v_iterations,
        'max_iterations', c.max_iterations,
        'iterations_exhausted', c.max_iterations IS NOT NULL AND v_iterations >= c.max_iterations,
        'benchmark_command', c.benchmark_command,
        'last_run', c.last_benchmark,
        'status', c.status);
END
$$;

-- The planner side (SPEC §4). A runner takes the planning lease of a drained campaign; only
-- one holder at a time, so a campaign is never planned twice at once.
CREATE FUNCTION begin_planning(id uuid, lease_seconds integer DEFAULT 300) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := lock_campaign(id);
BEGIN
    IF c.status <> 'active' OR c.open_steps > 0 OR c.planner <> 'llm'
       OR (c.planner_lease_until IS NOT NULL AND c.planner_lease_until > clock())
       OR (c.next_action_at IS NOT NULL AND c.next_action_at > clock()) THEN
        RETURN jsonb_build_object('granted', false);
    END IF;
    UPDATE campaigns SET planner_lease_until = clock() + make_interval(secs => greatest(lease_seconds, 1))
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
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT c.id FROM campaigns c
     WHERE c.status = 'active' AND c.open_steps = 0 AND c.planner = 'llm'
       -- SPEC §17: its benchmark runs first; record_benchmark() hands it back.
       AND NOT c.benchmark_due
       AND CASE WHEN coalesce(planner_configured, true) THEN
                     (c.planner_lease_until IS NULL OR c.planner_lease_until <= clock())
                 AND (c.next_action_at IS NULL OR c.next_action_at <= clock())
                 AND (c.created_at + make_interval(secs => greatest(coalesce(plan_delay, 10), 0)) <= clock()
                      OR has_had_steps(c.id))
                -- Nothing to plan with: only the planner's schedule would wait, so a drained
                -- campaign is handed over to be ended at once.
                ELSE has_had_steps(c.id) END
     ORDER BY c.next_action_at NULLS FIRST, c.created_at
     LIMIT greatest("limit", 0);
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
BEGIN
    SELECT * INTO c FROM campaigns x WHERE x.id = campaign_id;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    RETURN jsonb_build_object(
        'goal', c.goal, 'strategy', c.strategy, 'progress', c.progress, 'guidance', c.guidance,
        'scope', c.scope, 'max_depth', c.max_depth, 'tokens_used', c.tokens_used, 'token_budget', c.token_budget,
        'success_metric', c.success_metric, 'success_target', c.success_target,
        'success', CASE WHEN c.success_metric IS NOT NULL THEN check_success(c.id) END,
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

-- SPEC §17: a runner takes one campaign whose benchmark is due, with a lease (seconds) so that
-- one runner runs it at a time; NULL when none is due. Answers {campaign_id, benchmark_command,
-- success_metric}.
CREATE FUNCTION take_benchmark(lease_seconds integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
BEGIN
    SELECT * INTO c FROM campaigns
     WHERE benchmark_due AND status = 'active'
       AND (benchmark_lease_until IS NULL OR benchmark_lease_until <= clock())
     ORDER BY updated_at
     LIMIT 1
       FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    UPDATE campaigns SET benchmark_lease_until = clock() + make_interval(secs => greatest(coalesce(lease_seconds, 900), 1)),
                         benchmark_seen_step = (SELECT max(s.id) FROM steps s WHERE s.campaign_id = c.id)
     WHERE id = c.id;
    RETURN jsonb_build_object('campaign_id', c.id, 'benchmark_command', c.benchmark_command,
                              'success_metric', c.success_metric);
END
$$;

-- SPEC §17: the outcome of a campaign's benchmark run. `output` is the command's stdout; the
-- last line `<success_metric>=<number>` is recorded as a `metric:<name>` note.
-- The run counts as one iteration and is kept as `last_benchmark`. Then the campaign is judged
-- (finish_drained: done only when the success contract is met), except that an llm-planned
-- campaign whose contract is not met and whose iterations are not spent goes back to its
-- planner. Answers {campaign_id, status, metric_value, iterations_used, met}. Errors:
-- not_found; invalid_state when no benchmark is due.
CREATE FUNCTION record_benchmark(campaign_id uuid, exit_code integer, output text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns := lock_campaign(campaign_id);
    v_line text;
    v_value double precision;
    v_success jsonb;
    v_status text;
BEGIN
    IF NOT c.benchmark_due OR c.status <> 'active' THEN
        PERFORM raise('invalid_state', format('campaign %s has no benchmark due', c.id));
    END IF;
    -- Steps added after the run started: it measured the work before them. It is kept as the
    -- last run but judges nothing and counts no iteration; the benchmark runs again once the
    -- campaign drains (at once if it already has).
    IF c.benchmark_seen_step IS NOT NULL
       AND EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id AND s.id > c.benchmark_seen_step) THEN
        UPDATE campaigns
           SET benchmark_due = (open_steps = 0), benchmark_lease_until = NULL, benchmark_seen_step = NULL,
               last_benchmark = jsonb_build_object('exit_code', exit_code, 'stale', true,
                                                   'output_tail', right(coalesce(output, ''), 2000), 'at', clock()),
               updated_at = now()
         WHERE id = c.id;
        RETURN jsonb_build_object('campaign_id', c.id, 'status', c.status, 'stale', true,
                                  'message', 'steps were added while the benchmark ran: it runs again when they are done');
    END IF;
    IF c.success_metric IS NOT NULL THEN
        SELECT l.line, parse_metric(c.success_metric, l.line) INTO v_line, v_value
          FROM regexp_split_to_table(coalesce(output, ''), E'\n') WITH ORDINALITY AS l(line, n)
         WHERE strpos(l.line, '=') > 0 AND parse_metric(c.success_metric, l.line) IS NOT NULL
         ORDER BY l.n DESC
         LIMIT 1;
        IF v_line IS NOT NULL THEN
            PERFORM add_note(campaign_id => c.id, content => left(btrim(v_line), 1000),
                             tags => ARRAY['metric:' || c.success_metric, 'benchmark'], agent => 'benchmark');
        END IF;
    END IF;
    UPDATE campaigns
       SET benchmark_due = false, benchmark_lease_until = NULL, benchmark_seen_step = NULL,
           benchmark_runs = benchmark_runs + 1,
           last_benchmark = jsonb_build_object('exit_code', exit_code, 'metric_line', v_line, 'metric_value', v_value,
                                               'output_tail', right(coalesce(output, ''), 2000), 'at', clock()),
           updated_at = now()
     WHERE id = c.id
    RETURNING * INTO c;
    PERFORM emit(c.id, NULL, 'campaign.benchmark_run', jsonb_build_object('exit_code', exit_code, 'metric_value', v_value));
    v_success := CASE WHEN c.success_metric IS NOT NULL THEN check_success(c.id) END;
    IF c.open_steps > 0 THEN
        v_status := c.status;
    ELSIF c.planner = 'llm' AND (v_success ->> 'met')::boolean IS NOT TRUE
          AND (v_success IS NULL OR (v_success ->> 'iterations_exhausted')::boolean IS NOT TRUE) THEN
        -- Not there yet: the planner is asked for more at once.
        UPDATE campaigns SET next_action_at = clock() WHERE id = c.id;
        PERFORM emit(c.id, NULL, 'campaign.drained');
        v_status := 'active';
    ELSE
        v_status := finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', v_status, 'metric_value', v_value,
                              'metric_line', v_line, 'exit_code', exit_code,
                              'iterations_used', v_success -> 'iterations_used', 'met', v_success -> 'met');
END
$$;

-- Applies a planner answer all or nothing: it is validated completely before any change.
CREATE FUNCTION apply_plan(campaign_id uuid, plan jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_plan jsonb := unwrap(parse_plan(plan));
    c campaigns := lock_campaign(campaign_id);
    v_steps jsonb;
    v_status text;
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM raise('invalid_state', format('campaign %s is %s; a plan cannot change it', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET strategy = coalesce(v_plan ->> 'strategy_update', strategy),
           progress = coalesce(v_plan ->> 'progress_update', progress),
           planner_iterations = planner_iterations + 1,
           planner_lease_until = NULL,
           -- A plan that neither adds steps nor ends the campaign would otherwise be asked again
           -- at once: it waits 5 minutes unless it names its own delay.
           next_action_at = clock() + make_interval(secs => 60 * coalesce((v_plan ->> 'next_delay_minutes')::double precision,
                                                    CASE WHEN jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN 0 ELSE 5 END)),
           updated_at = now()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    IF v_plan -> 'notify' IS NOT NULL AND jsonb_typeof(v_plan -> 'notify') = 'object' THEN
        PERFORM notify_campaign(c.id, v_plan #>> '{notify,level}', v_plan #>> '{notify,message}');
    END IF;
    IF jsonb_typeof(v_plan -> 'new_steps') = 'object' THEN
        v_steps := insert_steps(c, unwrap(v_plan -> 'new_steps'), NULL, 0);
    END IF;
    PERFORM emit(c.id, NULL, 'plan.applied', jsonb_build_object(
        'created', coalesce((v_steps ->> 'created')::integer, 0), 'done', (v_plan ->> 'done')::boolean));
    IF (v_plan ->> 'done')::boolean THEN
        IF c.open_steps > 0 THEN
            PERFORM raise('invalid_state', format('the plan says done but campaign %s still has %s open steps', c.id, c.open_steps));
        END IF;
        v_status := finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', coalesce(v_status, c.status),
                              'steps', v_steps, 'next_action_at', c.next_action_at);
END
$$;
