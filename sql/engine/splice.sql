-- DAG splice (SPEC §3): the running step becomes done with its partial output, its subtasks
-- become its children, and a continuation at its own place waits for them and takes over
-- everything that waited for it. The depth rule decides who may splice.

-- The depth rule (SPEC §3): a step at `p_depth` may split itself into subtasks one level
-- deeper only while that stays within the campaign's max_depth.
CREATE FUNCTION _spawn_allowed(p_depth integer, p_max_depth integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT p_depth + 1 <= p_max_depth $$;

-- Whether step `step_id` may call spawn_and_continue (the depth rule); NULL for no such step.
-- The MCP server asks it to decide whether a worker session lists spawn_and_continue.
CREATE FUNCTION can_spawn(step_id bigint) RETURNS boolean
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT _spawn_allowed(s.depth, c.max_depth)
              FROM steps s JOIN campaigns c ON c.id = s.campaign_id
             WHERE s.id = $1);
END
$$;

-- Every step that cannot finish before `p_step` (a step of campaign `p_campaign`) does,
-- `p_step` included: its dependents, its compound ancestors (they wait for their members), and
-- — for a step that waits through a dependency — its descendants (their gate is its start),
-- transitively. A subtask spliced in place of `p_step` that depended on one of these would
-- close a cycle (SPEC §13).
CREATE FUNCTION _steps_waiting_for(p_campaign uuid, p_step bigint) RETURNS SETOF bigint
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE down(id, started_after) AS (
        SELECT p_step, false
        UNION
        SELECT next.id, next.started_after
          FROM down
         CROSS JOIN LATERAL (
             SELECT d.step_id AS id, true AS started_after FROM step_dependencies d
              WHERE d.campaign_id = p_campaign AND d.depends_on = down.id
             UNION ALL
             SELECT s.parent_id, false FROM steps s
              WHERE s.campaign_id = p_campaign AND s.id = down.id AND s.parent_id IS NOT NULL
             UNION ALL
             SELECT s.id, true FROM steps s
              WHERE s.campaign_id = p_campaign AND s.parent_id = down.id AND down.started_after
         ) next
    )
    SELECT DISTINCT down.id FROM down;
END
$$;

CREATE FUNCTION spawn_and_continue(step_id bigint, claim_token uuid, subtasks jsonb, continuation jsonb,
                                   partial_output text DEFAULT '', request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_arguments jsonb;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('step_id', step_id, 'claim_token', claim_token, 'subtasks', subtasks,
                                          'continuation', continuation, 'partial_output', partial_output);
        RETURN coalesce(_replay(request_id, 'spawn_and_continue', v_arguments),
                        _keep(request_id, 'spawn_and_continue', v_arguments, spawn_and_continue(
                            step_id => step_id, claim_token => claim_token, subtasks => subtasks,
                            continuation => continuation, partial_output => partial_output)));
    END IF;
    RETURN _spawn_and_continue_in(_lock_claimed_step(step_id, claim_token, 'spawn_and_continue'), subtasks,
                                  continuation, partial_output);
END
$$;

-- spawn_and_continue() naming its campaign first (SPEC §2 scale-out rule), without a
-- request_id: under Citus it is delegated to the worker holding the campaign and runs there as
-- one local transaction (distribute.sql). sortie-mcp calls it for its session's own step. A
-- request_id goes to spawn_and_continue: request ids are serialised on the coordinator
-- (idempotency.sql). Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one
-- (citusdata/citus#7242). Errors: those of spawn_and_continue; not_found when the step is not
-- in that campaign.
CREATE FUNCTION _spawn_and_continue_delegated(campaign_id uuid, step_id bigint, claim_token uuid, subtasks jsonb,
                                              continuation jsonb, partial_output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _spawn_and_continue_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'spawn_and_continue'),
                                  subtasks, continuation, partial_output);
END
$$;

-- The splice itself, for `s`, the claimed step its caller locked with its campaign. Every
-- statement names the campaign.
CREATE FUNCTION _spawn_and_continue_in(s steps, subtasks jsonb, continuation jsonb, partial_output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_expansion jsonb;
    v_spawned jsonb;
    v_subtask_ids bigint[];
    v_cont_action text;
    v_cont_agent text;
    v_cont_input jsonb;
    v_cont bigint;
    v_cont_deps integer;
    v_deps bigint[];
    v_waiting bigint[];
    v_dep bigint;
    v_cycle_dep bigint;
BEGIN
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    IF subtasks IS NULL OR jsonb_typeof(subtasks) <> 'array' OR jsonb_array_length(subtasks) = 0 THEN
        PERFORM _raise('invalid_argument', 'subtasks must list at least one step; to finish alone, call complete_step');
    END IF;
    IF NOT _spawn_allowed(s.depth, c.max_depth) THEN
        PERFORM _raise('depth_limit', format('step %s is at depth %s and the campaign''s max_depth is %s; complete it yourself',
                                            s.id, s.depth, c.max_depth));
    END IF;
    CASE jsonb_typeof(continuation)
        WHEN 'string' THEN
            v_cont_action := continuation #>> '{}';
        WHEN 'object' THEN
            IF EXISTS (SELECT 1 FROM jsonb_object_keys(continuation) k WHERE k NOT IN ('action', 'agent', 'input')) THEN
                PERFORM _raise('invalid_argument', 'continuation takes action, agent and input only');
            END IF;
            v_cont_action := continuation ->> 'action';
            v_cont_agent := continuation ->> 'agent';
            v_cont_input := continuation -> 'input';
        ELSE
            NULL;
    END CASE;
    IF v_cont_action IS NULL OR btrim(v_cont_action) = '' THEN
        PERFORM _raise('invalid_argument', 'continuation is required: the action that resumes your work once the subtasks are done');
    END IF;
    v_expansion := _unwrap(_expand_steps(subtasks));
    -- SPEC §13: once rewired, whatever waited for this step waits for the continuation, which
    -- waits for the subtasks; a subtask depending on any of those would wait for itself.
    -- The subtasks' dependencies on steps of this campaign, lowest first; the first whose newest
    -- continuation waits for this step is reported. One statement each, no rule called inside
    -- a query on a shard (Citus).
    v_deps := ARRAY(SELECT DISTINCT e::bigint
                      FROM jsonb_array_elements(v_expansion -> 'nodes') n,
                           jsonb_array_elements_text(n -> 'existing_deps') e);
    v_deps := ARRAY(SELECT o.id FROM steps o WHERE o.campaign_id = s.campaign_id AND o.id = ANY (v_deps) ORDER BY o.id);
    IF cardinality(v_deps) > 0 THEN
        v_waiting := ARRAY(SELECT _steps_waiting_for(s.campaign_id, s.id));
        FOREACH v_dep IN ARRAY v_deps LOOP
            IF _newest_continuation(s.campaign_id, v_dep) = ANY (v_waiting) THEN
                v_cycle_dep := v_dep;
                EXIT;
            END IF;
        END LOOP;
    END IF;
    IF v_cycle_dep IS NOT NULL THEN
        PERFORM _raise('cycle', format(
            'a subtask depends on step %s, which waits for step %s; once the continuation takes step %s''s place they would wait for each other forever. A subtask cannot depend on work that waits for its spawner: drop that dependency',
            v_cycle_dep, s.id, s.id));
    END IF;

    -- New work first, so the campaign never looks drained in between.
    v_spawned := _insert_steps(c, v_expansion, s.id, s.depth + 1, c.max_depth);
    SELECT array_agg(x::bigint) INTO v_subtask_ids FROM jsonb_array_elements_text(v_spawned -> 'step_ids') x;
    -- Counted before the insert: Citus takes no subquery in an INSERT's VALUES.
    SELECT count(*) INTO v_cont_deps
      FROM steps x WHERE x.campaign_id = s.campaign_id AND x.id = ANY (v_subtask_ids) AND x.status <> 'done';

    INSERT INTO steps (campaign_id, parent_id, depth, position, action, agent, step_type, failure_policy,
                       remaining_deps, input, fingerprint, continuation_of, max_attempts, requires_locks, verify,
                       created_at)
    -- The continuation finishes the spawner's work, so the spawner's check (SPEC §17) is its.
    VALUES (s.campaign_id, s.parent_id, s.depth, s.position, v_cont_action, coalesce(v_cont_agent, s.agent), 'atomic',
            s.failure_policy, v_cont_deps,
            coalesce(v_cont_input, s.input),
            _step_fingerprint(v_cont_action, coalesce(v_cont_agent, s.agent), coalesce(v_cont_input, s.input)),
            s.id, s.max_attempts, s.requires_locks, s.verify, _clock())
    RETURNING id INTO v_cont;
    INSERT INTO step_dependencies (campaign_id, step_id, depends_on)
    SELECT s.campaign_id, v_cont, x FROM unnest(v_subtask_ids) x;
    -- Everything that waited for the spawner now waits for the continuation.
    UPDATE step_dependencies SET depends_on = v_cont
     WHERE step_dependencies.campaign_id = s.campaign_id AND step_dependencies.depends_on = s.id;
    PERFORM _bump_counters(s.campaign_id, 1, 0, 0);
    PERFORM _unblocked(s.campaign_id, ARRAY[v_cont]);

    -- The spawner is done but hands its place among its parent's members to the continuation,
    -- so it is neither counted by the parent nor releases anyone.
    UPDATE steps
       SET status = 'done', output = coalesce(partial_output, ''), continued_by = v_cont,
           duration_ms = (extract(epoch FROM _clock() - s.claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1);
    PERFORM _emit(s.campaign_id, s.id, 'step.spliced', jsonb_build_object(
        'subtask_ids', to_jsonb(v_subtask_ids), 'continuation_id', v_cont));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'subtask_ids', to_jsonb(v_subtask_ids),
                              'continuation_id', v_cont, 'keys', v_spawned -> 'keys',
                              'duplicates', v_spawned -> 'duplicates');
END
$$;
