-- Campaigns (SPEC §3, §5): creation, reading, steering, pause, resume and cancel.

CREATE FUNCTION _campaign_summary(c campaigns) RETURNS jsonb
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
        PERFORM _raise('invalid_argument', 'goal is required: say what the campaign should accomplish');
    END IF;
    IF coalesce(priority, 'normal') NOT IN ('urgent', 'high', 'normal', 'low', 'background') THEN
        PERFORM _raise('invalid_argument', format('priority %L is not one of urgent, high, normal, low, background', priority));
    END IF;
    IF coalesce(success_direction, 'max') NOT IN ('max', 'min') THEN
        PERFORM _raise('invalid_argument', 'success_direction must be max or min');
    END IF;
    IF coalesce(planner, 'llm') NOT IN ('llm', 'none') THEN
        PERFORM _raise('invalid_argument', 'planner must be llm or none');
    END IF;
    IF coalesce(failure_policy, 'continue') NOT IN ('continue', 'fail_fast') THEN
        PERFORM _raise('invalid_argument', 'failure_policy must be continue or fail_fast');
    END IF;
    IF max_depth IS NOT NULL AND max_depth NOT BETWEEN 0 AND 64 THEN
        PERFORM _raise('invalid_argument', 'max_depth must be from 0 to 64');
    END IF;
    IF max_parallel IS NOT NULL AND max_parallel < 1 THEN
        PERFORM _raise('invalid_argument', 'max_parallel must be at least 1 (omit it for no cap)');
    END IF;
    IF token_budget IS NOT NULL AND token_budget < 1 THEN
        PERFORM _raise('invalid_argument', 'token_budget must be positive (omit it for no budget)');
    END IF;
    IF max_iterations IS NOT NULL AND max_iterations < 1 THEN
        PERFORM _raise('invalid_argument', 'max_iterations must be positive');
    END IF;
    IF name IS NOT NULL AND length(name) NOT BETWEEN 1 AND 200 THEN
        PERFORM _raise('invalid_argument', 'name must be 1 to 200 characters');
    END IF;
    IF context IS NOT NULL AND jsonb_typeof(context) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context must be a JSON object');
    END IF;
    IF plan_delay IS NOT NULL AND NOT (plan_delay BETWEEN 0 AND 86400) THEN
        PERFORM _raise('invalid_argument', 'plan_delay must be from 0 to 86400 seconds');
    END IF;
    IF steps IS NOT NULL THEN
        v_expansion := _unwrap(_expand_steps(steps));
    END IF;

    INSERT INTO campaigns (name, goal, channel, priority, max_depth, token_budget, status, status_reason,
                           success_metric, success_target, success_direction, benchmark_command, scope,
                           max_iterations, max_parallel, planner, failure_policy, context, next_action_at)
    VALUES (coalesce(name, _name_from_goal(goal)), goal, channel, coalesce(priority, 'normal'),
            coalesce(max_depth, 4), token_budget,
            CASE WHEN dry_run THEN 'paused' ELSE 'active' END,
            CASE WHEN dry_run THEN 'dry_run: review, then resume_campaign' END,
            success_metric, success_target, coalesce(success_direction, 'max'), benchmark_command, scope,
            max_iterations, max_parallel, coalesce(planner, 'llm'), coalesce(failure_policy, 'continue'),
            coalesce(context, '{}'),
            -- SPEC §13: a campaign created without steps gives its coordinator plan_delay
            -- seconds to add them before the planner may.
            CASE WHEN v_expansion IS NULL THEN _clock() + make_interval(secs => coalesce(plan_delay, 10))
                 ELSE _clock() END)
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.created', jsonb_build_object('name', c.name));
    IF v_expansion IS NOT NULL THEN
        v_steps := _insert_steps(c, v_expansion, NULL, 0);
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
        PERFORM _raise('invalid_argument', format('status %L is not one of active, paused, done, failed, cancelled', status));
    END IF;
    IF cursor IS NOT NULL THEN
        BEGIN
            v_after_at := split_part(cursor, '|', 1)::timestamptz;
            v_after_id := split_part(cursor, '|', 2)::uuid;
        EXCEPTION WHEN others THEN
            PERFORM _raise('invalid_argument', 'cursor is not one this function returned');
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

-- A step as get_campaign lists it; `p_depends_on` is its dependencies (a JSON array of ids,
-- or NULL), read by the caller in the same query: a function called per row of a query over
-- a per-campaign table reads no table itself (Citus refuses a query nested in a query on a
-- shard). Inlined into that query, so it calls only built-in functions (Citus inlines it on
-- the shard with only pg_catalog on the search_path).
CREATE FUNCTION _step_row(s steps, p_depends_on jsonb) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'parent_id', s.parent_id, 'depth', s.depth, 'action', s.action, 'agent', s.agent,
        'step_type', s.step_type, 'status', s.status, 'attempts', s.attempts,
        'error', left(s.error, 300), 'question', s.question,
        'output_chars', length(s.output), 'continuation_of', s.continuation_of,
        'continued_by', s.continued_by, 'skip_cause', s.skip_cause,
        'depends_on', p_depends_on));
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
    IF get_campaign.id IS NULL THEN
        PERFORM _raise('invalid_argument', 'id is required: the campaign to read');
    END IF;
    IF steps_cursor IS NOT NULL THEN
        BEGIN
            v_after := steps_cursor::bigint;
        EXCEPTION WHEN others THEN
            PERFORM _raise('invalid_argument', 'steps_cursor is not one get_campaign returned');
        END;
    END IF;
    SELECT * INTO c FROM campaigns WHERE campaigns.id = get_campaign.id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', get_campaign.id));
    END IF;
    SELECT coalesce(jsonb_agg(_step_row(s, (SELECT jsonb_agg(d.depends_on ORDER BY d.depends_on)
                                              FROM step_dependencies d
                                             WHERE d.campaign_id = c.id AND d.step_id = s.id))
                              ORDER BY s.id), '[]') INTO v_steps
      FROM (SELECT * FROM steps
             WHERE campaign_id = c.id AND (v_after IS NULL OR steps.id > v_after)
             ORDER BY steps.id
             LIMIT v_limit + 1) s;
    RETURN _campaign_summary(c) || jsonb_build_object(
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
    c campaigns := _lock_campaign(id);
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance)),
                        _keep(request_id, 'steer_campaign', jsonb_build_object('id', id, 'guidance', guidance),
                              steer_campaign(id => id, guidance => guidance)));
    END IF;
    IF guidance IS NULL OR btrim(guidance) = '' THEN
        PERFORM _raise('invalid_argument', 'guidance is empty: say what should change');
    END IF;
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s and can no longer be steered', c.id, c.status));
    END IF;
    UPDATE campaigns
       SET guidance = campaigns.guidance || jsonb_build_array(jsonb_build_object('at', _clock(), 'text', steer_campaign.guidance)),
           updated_at = now(), next_action_at = _clock()
     WHERE campaigns.id = c.id
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.steered', jsonb_build_object('guidance', steer_campaign.guidance));
    RETURN jsonb_build_object('id', c.id, 'guidance', c.guidance, 'strategy', c.strategy);
END
$$;

CREATE FUNCTION pause_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; only an active campaign can be paused', c.id, c.status));
    END IF;
    UPDATE campaigns SET status = 'paused', status_reason = 'paused by request', updated_at = now()
     WHERE campaigns.id = c.id;
    PERFORM _emit(c.id, NULL, 'campaign.paused');
    RETURN jsonb_build_object('id', c.id, 'status', 'paused', 'running_steps', c.running_steps);
END
$$;

CREATE FUNCTION resume_campaign(id uuid) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
BEGIN
    IF c.status <> 'paused' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s; only a paused campaign can be resumed', c.id, c.status));
    END IF;
    IF c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN
        PERFORM _raise('budget_exhausted', format(
            'campaign %s has used %s of its %s tokens; raise token_budget before resuming', c.id, c.tokens_used, c.token_budget));
    END IF;
    UPDATE campaigns SET status = 'active', status_reason = NULL, updated_at = now(), next_action_at = _clock()
     WHERE campaigns.id = c.id;
    PERFORM _emit(c.id, NULL, 'campaign.resumed');
    PERFORM _check_drained(c.id);
    RETURN jsonb_build_object('id', c.id, 'status', (SELECT status FROM campaigns WHERE campaigns.id = c.id));
END
$$;

CREATE FUNCTION cancel_campaign(id uuid, reason text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns := _lock_campaign(id);
    v_open integer := c.open_steps;
BEGIN
    IF c.status NOT IN ('active', 'paused') THEN
        PERFORM _raise('invalid_state', format('campaign %s is already %s', c.id, c.status));
    END IF;
    PERFORM _end_campaign(c.id, 'cancelled', coalesce(reason, 'cancelled by request'));
    RETURN jsonb_build_object('id', c.id, 'status', 'cancelled', 'skipped_steps', v_open);
END
$$;
