-- What a worker does with its claimed step: complete, fail, ask for input, splice, abort
-- (SPEC §3). Every call presents the claim token (lock_claimed_step).

-- Token budget (SPEC §3): an exhausted campaign is paused and nothing new is dispatched.
CREATE FUNCTION enforce_budget(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    UPDATE campaigns SET status = 'paused', status_reason = 'budget_exhausted', updated_at = now()
     WHERE id = p_campaign AND status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
    RETURNING * INTO c;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM emit(c.id, NULL, 'campaign.paused', jsonb_build_object('reason', 'budget_exhausted',
                 'tokens_used', c.tokens_used, 'token_budget', c.token_budget));
    PERFORM notify_campaign(c.id, 'milestone', format('Campaign %s paused: token budget exhausted (%s of %s tokens)',
                                                      c.name, c.tokens_used, c.token_budget));
    RETURN true;
END
$$;

-- Budgets over every active campaign, for the runner's tick.
CREATE FUNCTION enforce_budgets() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_id uuid;
    v_paused integer := 0;
BEGIN
    FOR v_id IN SELECT id FROM campaigns
                 WHERE status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
                 ORDER BY id LOOP
        PERFORM lock_campaign(v_id);
        IF enforce_budget(v_id) THEN
            v_paused := v_paused + 1;
        END IF;
    END LOOP;
    RETURN v_paused;
END
$$;

CREATE FUNCTION check_tokens(p_tokens bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_tokens IS NOT NULL AND p_tokens < 0 THEN
        PERFORM raise('invalid_argument', 'tokens_used cannot be negative');
    END IF;
    RETURN coalesce(p_tokens, 0);
END
$$;

-- The hot path: one guarded update of the step; the reasons a completion is refused are
-- worked out only when that update finds nothing.
CREATE FUNCTION complete_step(step_id bigint, claim_token uuid, summary text DEFAULT '', tokens_used bigint DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tokens bigint := check_tokens(tokens_used);
    v_campaign uuid;
    v_parent bigint;
    v_claimed_at timestamptz;
    v_locks text[];
    v_ready integer;
    v_open integer;
    v_status text;
    v_budget bigint;
    s steps;
BEGIN
    v_campaign := lock_step_campaign(step_id);
    UPDATE steps
       SET status = 'done', output = coalesce(summary, ''), tokens_used = steps.tokens_used + v_tokens,
           duration_ms = (extract(epoch FROM clock() - claimed_at) * 1000)::bigint,
           completed_at = clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE id = step_id AND steps.claim_token = complete_step.claim_token AND status = 'running'
       AND steps.verify IS NULL
    RETURNING parent_id, claimed_at, requires_locks INTO v_parent, v_claimed_at, v_locks;
    IF NOT FOUND THEN
        SELECT * INTO s FROM steps WHERE id = step_id;
        -- SPEC §17: a step with a check stays running, the summary stored, until its command
        -- passed (record_verification); the caller runs the command.
        IF s.verify IS NOT NULL AND s.status = 'running' AND s.claim_token = claim_token THEN
            UPDATE steps
               SET output = coalesce(summary, ''), tokens_used = steps.tokens_used + v_tokens,
                   verification_requested_at = clock()
             WHERE id = s.id;
            -- Tokens were spent whatever the check says.
            IF v_tokens > 0 THEN
                UPDATE campaigns SET tokens_used = campaigns.tokens_used + v_tokens WHERE id = v_campaign;
                PERFORM enforce_budget(v_campaign);
            END IF;
            PERFORM emit(v_campaign, s.id, 'step.verifying', jsonb_build_object('verify', s.verify));
            RETURN jsonb_build_object('step_id', s.id, 'status', 'running', 'accepted', true,
                                      'verification', 'pending', 'verify', s.verify,
                                      'message', 'the step is done once its verify command passes');
        END IF;
        -- A worker whose step was skipped under it (abort, cancel) is told so; what it
        -- produced is kept on the step for audit, and nothing else changes.
        IF s.status = 'skipped' AND s.claim_token = claim_token THEN
            UPDATE steps SET output = coalesce(steps.output, summary) WHERE id = s.id;
            RETURN jsonb_build_object('step_id', s.id, 'status', 'skipped', 'accepted', false,
                'message', format('step %s was skipped (%s) while you worked; your output was kept for the record',
                                  s.id, coalesce(s.error, s.skip_cause)));
        END IF;
        -- SPEC §14: the claim that completed the step, repeating itself, gets its first answer.
        IF _finished_claim(s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', v_tokens)) IS NOT NULL THEN
            RETURN _finished_claim(s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', v_tokens));
        END IF;
        PERFORM check_claim(s, claim_token, 'complete_step');
        PERFORM raise('invalid_state', format('step %s cannot be completed', s.id));
    END IF;
    PERFORM emit(v_campaign, step_id, 'step.done');
    v_ready := release_dependents(v_campaign, step_id);
    -- One campaign update for every counter this completion moves: it stops running, is no
    -- longer open, made v_ready steps ready and spent v_tokens.
    SELECT r.open_steps, r.status, r.token_budget INTO v_open, v_status, v_budget
      FROM leave_running(v_campaign, step_id, v_claimed_at, v_locks,
                         p_open => -1, p_ready => v_ready, p_tokens => v_tokens) r;
    IF v_parent IS NOT NULL THEN
        PERFORM member_settled(v_parent, 1, 0, NULL);
    END IF;
    IF v_parent IS NOT NULL OR v_open = 0 OR v_budget IS NOT NULL THEN
        PERFORM check_drained(v_campaign);
        IF v_budget IS NOT NULL THEN
            PERFORM enforce_budget(v_campaign);
        END IF;
        SELECT status INTO v_status FROM campaigns WHERE id = v_campaign;
    END IF;
    RETURN _keep_finished_claim(step_id, claim_token, 'complete_step',
                                jsonb_build_object('summary', summary, 'tokens_used', v_tokens),
                                jsonb_build_object('step_id', step_id, 'status', 'done', 'accepted', true,
                                                   'campaign_status', v_status));
END
$$;

-- SPEC §17: the outcome of a step's verify command, recorded by whoever ran it (the runner for
-- its dispatches, sortie-mcp for complete_step over MCP, or a SQL caller) with the step's claim.
-- `passed` makes the step done with the stored summary as its output and `output` kept as
-- `verification`; otherwise the attempt fails with the command's output (its last 4,000
-- characters) as the error, retried as usual. Errors: stale_claim, skipped (as complete_step);
-- invalid_state when no verification is pending.
CREATE FUNCTION record_verification(step_id bigint, claim_token uuid, passed boolean, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps := lock_claimed_step(step_id, claim_token, 'record_verification');
    v_ready integer;
    v_status text;
    v_open integer;
    v_output text := right(coalesce(output, ''), 4000);
BEGIN
    IF s.verify IS NULL OR s.verification_requested_at IS NULL OR s.verification_requested_at < s.claimed_at THEN
        PERFORM raise('invalid_state', format('step %s has no verification pending: complete_step asks for it', s.id));
    END IF;
    IF NOT coalesce(passed, false) THEN
        v_status := attempt_failed(s, format('verification failed: `%s` did not pass:%s%s', s.verify, E'\n', v_output));
        SELECT status INTO v_status FROM steps WHERE id = s.id;
        RETURN jsonb_build_object('step_id', s.id, 'status', v_status, 'accepted', false, 'verification', 'failed',
                                  'will_retry', v_status = 'pending');
    END IF;
    UPDATE steps
       SET status = 'done', verification = v_output,
           duration_ms = (extract(epoch FROM clock() - s.claimed_at) * 1000)::bigint,
           completed_at = clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE id = s.id;
    PERFORM emit(s.campaign_id, s.id, 'step.done', jsonb_build_object('verified', true));
    v_ready := release_dependents(s.campaign_id, s.id);
    SELECT r.open_steps INTO v_open
      FROM leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1, p_ready => v_ready) r;
    IF s.parent_id IS NOT NULL THEN
        PERFORM member_settled(s.parent_id, 1, 0, NULL);
    END IF;
    PERFORM check_drained(s.campaign_id);
    SELECT status INTO v_status FROM campaigns WHERE id = s.campaign_id;
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'accepted', true, 'verification', 'passed',
                              'campaign_status', v_status);
END
$$;

CREATE FUNCTION fail_step(step_id bigint, claim_token uuid, error text DEFAULT '') RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    -- SPEC §14: the claim that failed the step, repeating itself, gets its first answer.
    v_replay jsonb := _finished_claim(step_id, claim_token, 'fail_step', jsonb_build_object('error', error));
    s steps;
    v_now text;
BEGIN
    IF v_replay IS NOT NULL THEN
        RETURN v_replay;
    END IF;
    s := lock_claimed_step(step_id, claim_token, 'fail_step');
    v_now := attempt_failed(s, coalesce(nullif(error, ''), 'failed without a reason'));
    RETURN _keep_finished_claim(s.id, claim_token, 'fail_step', jsonb_build_object('error', error),
        jsonb_build_object('step_id', s.id, 'status', v_now,
        'attempts', s.attempts + 1, 'max_attempts', s.max_attempts, 'will_retry', v_now = 'pending',
        'not_before', (SELECT not_before FROM steps WHERE id = s.id AND status = 'pending')));
END
$$;

-- Input requests (SPEC §3): the question has its own column and the answer is stored beside
-- the original input, never over it.
CREATE FUNCTION request_input(step_id bigint, claim_token uuid, question text, partial_output text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps := lock_claimed_step(step_id, claim_token, 'request_input');
BEGIN
    IF question IS NULL OR btrim(question) = '' THEN
        PERFORM raise('invalid_argument', 'question is empty: ask what you need decided');
    END IF;
    PERFORM leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks);
    UPDATE steps
       SET status = 'waiting_input', question = request_input.question, answer = NULL,
           output = coalesce(partial_output, steps.output),
           claim_token = NULL, lease_expires_at = NULL
     WHERE id = s.id;
    PERFORM emit(s.campaign_id, s.id, 'input.requested', jsonb_build_object('question', question));
    PERFORM notify_campaign(s.campaign_id, 'milestone', format('Step %s asks: %s', s.id, question));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'waiting_input',
        'message', 'your step is paused; it will be dispatched again with the answer');
END
$$;

CREATE FUNCTION provide_input(id uuid, step_id bigint, answer text, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns := lock_campaign(id);
    s steps;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer)),
                        _keep(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer),
                              provide_input(id => id, step_id => step_id, answer => answer)));
    END IF;
    IF answer IS NULL OR btrim(answer) = '' THEN
        PERFORM raise('invalid_argument', 'answer is empty');
    END IF;
    SELECT * INTO s FROM steps WHERE steps.id = step_id AND steps.campaign_id = c.id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('campaign %s has no step %s', c.id, step_id));
    END IF;
    IF s.status <> 'waiting_input' THEN
        PERFORM raise('invalid_state', format('step %s is %s, not waiting for input', s.id, s.status));
    END IF;
    UPDATE steps SET status = 'pending', answer = provide_input.answer, not_before = '-infinity'
     WHERE steps.id = s.id;
    PERFORM bump_counters(c.id, 0, 0, 1);
    PERFORM emit(c.id, s.id, 'input.provided', jsonb_build_object('answer', answer));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'pending', 'question', s.question, 'answer', answer);
END
$$;

-- DAG splice (SPEC §3): the running step becomes done with its partial output, its subtasks
-- become its children, and a continuation at its own place waits for them and takes over
-- everything that waited for it.
-- The depth rule (SPEC §3): a step at `p_depth` may split itself into subtasks one level
-- deeper only while that stays within the campaign's max_depth.
CREATE FUNCTION spawn_allowed(p_depth integer, p_max_depth integer) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT p_depth + 1 <= p_max_depth $$;

-- Whether step `step_id` may call spawn_and_continue (the depth rule); NULL for no such step.
-- The MCP server asks it to decide whether a worker session lists spawn_and_continue.
CREATE FUNCTION can_spawn(step_id bigint) RETURNS boolean
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT spawn_allowed(s.depth, c.max_depth)
      FROM steps s JOIN campaigns c ON c.id = s.campaign_id
     WHERE s.id = $1
$$;

-- Every step that cannot finish before `p_step` does, `p_step` included: its dependents, its
-- compound ancestors (they wait for their members), and — for a step that waits through a
-- dependency — its descendants (their gate is its start), transitively. A subtask spliced in
-- place of `p_step` that depended on one of these would close a cycle (SPEC §13).
CREATE FUNCTION steps_waiting_for(p_step bigint) RETURNS SETOF bigint
LANGUAGE sql STABLE
AS $$
    WITH RECURSIVE down(id, started_after) AS (
        SELECT p_step, false
        UNION
        SELECT next.id, next.started_after
          FROM down
         CROSS JOIN LATERAL (
             SELECT d.step_id AS id, true AS started_after FROM step_dependencies d WHERE d.depends_on = down.id
             UNION ALL
             SELECT s.parent_id, false FROM steps s WHERE s.id = down.id AND s.parent_id IS NOT NULL
             UNION ALL
             SELECT s.id, true FROM steps s WHERE s.parent_id = down.id AND down.started_after
         ) next
    )
    SELECT DISTINCT id FROM down;
$$;

CREATE FUNCTION spawn_and_continue(step_id bigint, claim_token uuid, subtasks jsonb, continuation jsonb,
                                   partial_output text DEFAULT '', request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
    v_arguments jsonb;
    c campaigns;
    v_expansion jsonb;
    v_spawned jsonb;
    v_subtask_ids bigint[];
    v_cont_action text;
    v_cont_agent text;
    v_cont_input jsonb;
    v_cont bigint;
    v_cycle_dep bigint;
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
    s := lock_claimed_step(step_id, claim_token, 'spawn_and_continue');
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    IF subtasks IS NULL OR jsonb_typeof(subtasks) <> 'array' OR jsonb_array_length(subtasks) = 0 THEN
        PERFORM raise('invalid_argument', 'subtasks must list at least one step; to finish alone, call complete_step');
    END IF;
    IF NOT spawn_allowed(s.depth, c.max_depth) THEN
        PERFORM raise('depth_limit', format('step %s is at depth %s and the campaign''s max_depth is %s; complete it yourself',
                                            s.id, s.depth, c.max_depth));
    END IF;
    CASE jsonb_typeof(continuation)
        WHEN 'string' THEN
            v_cont_action := continuation #>> '{}';
        WHEN 'object' THEN
            IF EXISTS (SELECT 1 FROM jsonb_object_keys(continuation) k WHERE k NOT IN ('action', 'agent', 'input')) THEN
                PERFORM raise('invalid_argument', 'continuation takes action, agent and input only');
            END IF;
            v_cont_action := continuation ->> 'action';
            v_cont_agent := continuation ->> 'agent';
            v_cont_input := continuation -> 'input';
        ELSE
            NULL;
    END CASE;
    IF v_cont_action IS NULL OR btrim(v_cont_action) = '' THEN
        PERFORM raise('invalid_argument', 'continuation is required: the action that resumes your work once the subtasks are done');
    END IF;
    v_expansion := unwrap(expand_steps(subtasks));
    -- SPEC §13: once rewired, whatever waited for this step waits for the continuation, which
    -- waits for the subtasks; a subtask depending on any of those would wait for itself.
    SELECT x.dep INTO v_cycle_dep
      FROM (SELECT DISTINCT e::bigint AS dep
              FROM jsonb_array_elements(v_expansion -> 'nodes') n,
                   jsonb_array_elements_text(n -> 'existing_deps') e) x
     WHERE EXISTS (SELECT 1 FROM steps o WHERE o.id = x.dep AND o.campaign_id = s.campaign_id)
       AND newest_continuation(x.dep) IN (SELECT steps_waiting_for(s.id))
     ORDER BY x.dep
     LIMIT 1;
    IF v_cycle_dep IS NOT NULL THEN
        PERFORM raise('cycle', format(
            'a subtask depends on step %s, which waits for step %s; once the continuation takes step %s''s place they would wait for each other forever. A subtask cannot depend on work that waits for its spawner: drop that dependency',
            v_cycle_dep, s.id, s.id));
    END IF;

    -- New work first, so the campaign never looks drained in between.
    v_spawned := insert_steps(c, v_expansion, s.id, s.depth + 1, c.max_depth);
    SELECT array_agg(x::bigint) INTO v_subtask_ids FROM jsonb_array_elements_text(v_spawned -> 'step_ids') x;

    INSERT INTO steps (campaign_id, parent_id, depth, position, action, agent, step_type, failure_policy,
                       remaining_deps, input, fingerprint, continuation_of, max_attempts, requires_locks, verify,
                       created_at)
    -- The continuation finishes the spawner's work, so the spawner's check (SPEC §17) is its.
    VALUES (s.campaign_id, s.parent_id, s.depth, s.position, v_cont_action, coalesce(v_cont_agent, s.agent), 'atomic',
            s.failure_policy,
            (SELECT count(*) FROM steps WHERE id = ANY (v_subtask_ids) AND status <> 'done'),
            coalesce(v_cont_input, s.input),
            step_fingerprint(v_cont_action, coalesce(v_cont_agent, s.agent), coalesce(v_cont_input, s.input)),
            s.id, s.max_attempts, s.requires_locks, s.verify, clock())
    RETURNING id INTO v_cont;
    INSERT INTO step_dependencies (campaign_id, step_id, depends_on)
    SELECT s.campaign_id, v_cont, x FROM unnest(v_subtask_ids) x;
    -- Everything that waited for the spawner now waits for the continuation.
    UPDATE step_dependencies SET depends_on = v_cont WHERE depends_on = s.id;
    PERFORM bump_counters(s.campaign_id, 1, 0, 0);
    PERFORM unblocked(s.campaign_id, ARRAY[v_cont]);

    -- The spawner is done but hands its place among its parent's members to the continuation,
    -- so it is neither counted by the parent nor releases anyone.
    UPDATE steps
       SET status = 'done', output = coalesce(partial_output, ''), continued_by = v_cont,
           duration_ms = (extract(epoch FROM clock() - s.claimed_at) * 1000)::bigint,
           completed_at = clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE id = s.id;
    PERFORM leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1);
    PERFORM emit(s.campaign_id, s.id, 'step.spliced', jsonb_build_object(
        'subtask_ids', to_jsonb(v_subtask_ids), 'continuation_id', v_cont));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'subtask_ids', to_jsonb(v_subtask_ids),
                              'continuation_id', v_cont, 'keys', v_spawned -> 'keys',
                              'duplicates', v_spawned -> 'duplicates');
END
$$;

-- Branch abort (SPEC §3): an early return from an ancestor. The target is done with the
-- caller's output; everything still open beneath it is skipped; the caller is done with the
-- reason, which is also kept as a note tagged `abort`.
CREATE FUNCTION abort_branch(target_id bigint, claim_token uuid, step_id bigint, output text, reason text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    caller steps := lock_claimed_step(step_id, claim_token, 'abort_branch');
    t steps;
    v_is_ancestor boolean;
    v_children bigint[];
    v_skipped bigint[];
    v_note bigint;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        PERFORM raise('invalid_argument', 'reason is required: say why this branch is pointless');
    END IF;
    SELECT * INTO t FROM steps WHERE id = target_id AND campaign_id = caller.campaign_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM raise('not_found', format('step %s is not a step of your campaign', target_id));
    END IF;
    WITH RECURSIVE up(id, parent_id) AS (
        SELECT id, parent_id FROM steps WHERE id = caller.parent_id
        UNION ALL
        SELECT s.id, s.parent_id FROM steps s JOIN up ON s.id = up.parent_id
    )
    SELECT EXISTS (SELECT 1 FROM up WHERE up.id = t.id) INTO v_is_ancestor;
    IF NOT v_is_ancestor THEN
        PERFORM raise('invalid_argument', format('step %s is not an ancestor of your step %s; you can only abort a branch you are inside',
                                                 t.id, caller.id));
    END IF;
    IF t.status IN ('done', 'failed', 'skipped') THEN
        PERFORM raise('invalid_state', format('step %s is already %s and cannot be aborted', t.id, t.status));
    END IF;

    -- Settle target and caller first, so that the skips below find both closed.
    UPDATE steps SET status = 'done', output = abort_branch.output, completed_at = clock(),
                     started_at = coalesce(started_at, clock())
     WHERE id = t.id;
    UPDATE steps SET status = 'done', output = reason, completed_at = clock(), claim_token = NULL,
                     lease_expires_at = NULL,
                     duration_ms = (extract(epoch FROM clock() - caller.claimed_at) * 1000)::bigint
     WHERE id = caller.id;
    PERFORM emit(caller.campaign_id, caller.id, 'step.done', jsonb_build_object('aborted_branch', t.id));
    -- As in complete_step: the caller's counters and the steps it made ready in one update.
    PERFORM leave_running(caller.campaign_id, caller.id, caller.claimed_at, caller.requires_locks,
                          p_open => -1, p_ready => release_dependents(caller.campaign_id, caller.id));

    SELECT coalesce(array_agg(id), '{}') INTO v_children FROM steps WHERE parent_id = t.id;
    v_skipped := skip_cascade(caller.campaign_id, v_children, 'abort',
                              format('branch %s aborted by step %s: %s', t.id, caller.id, reason));
    -- The caller counts as a resolved member of its parent, which is closed by now.
    IF caller.continued_by IS NULL THEN
        PERFORM member_settled(caller.parent_id, 1, 0, NULL);
    END IF;

    INSERT INTO notes (campaign_id, step_id, agent, content, tags)
    VALUES (caller.campaign_id, caller.id, caller.agent,
            format('Aborted branch at step %s (%s): %s', t.id, t.action, reason), ARRAY['abort'])
    RETURNING id INTO v_note;
    PERFORM emit(caller.campaign_id, caller.id, 'note.added', jsonb_build_object('note_id', v_note, 'tags', ARRAY['abort']));

    PERFORM bump_counters(t.campaign_id, -1, 0, 0);
    PERFORM after_done(t.campaign_id, t.id, t.parent_id);
    RETURN jsonb_build_object('target_id', t.id, 'status', 'done', 'skipped', to_jsonb(v_skipped), 'note_id', v_note);
END
$$;
