-- Input requests (SPEC §3): a running step asks its coordinator a question and waits
-- (waiting_input, no lease); the answer is stored beside the original input, never over it.

-- The question has its own column; the step waits without a lease.
CREATE FUNCTION request_input(step_id bigint, claim_token uuid, question text, partial_output text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _request_input_in(_lock_claimed_step(step_id, claim_token, 'request_input'), step_id, claim_token, question, partial_output);
END
$$;

-- request_input() naming its campaign first (SPEC §2 scale-out rule): under Citus it is delegated
-- to the worker holding the campaign and runs there as one local transaction (distribute.sql).
-- sortie-mcp calls it for its session's own step. Never with a NULL campaign_id: a stock Citus 13.2
-- coordinator crashes on one (citusdata/citus#7242). Errors: those of request_input; not_found when
-- the step is not in that campaign.
CREATE FUNCTION _request_input_delegated(campaign_id uuid, step_id bigint, claim_token uuid, question text, partial_output text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _request_input_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'request_input'), step_id, claim_token, question, partial_output);
END
$$;

-- request_input itself, for `s`, the claimed step its caller locked with its campaign.
-- Every statement names the campaign.
CREATE FUNCTION _request_input_in(s steps, step_id bigint, claim_token uuid, question text, partial_output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
BEGIN
    IF question IS NULL OR btrim(question) = '' THEN
        PERFORM _raise('invalid_argument', 'question is empty: ask what you need decided');
    END IF;
    PERFORM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks);
    UPDATE steps
       SET status = 'waiting_input', question = _request_input_in.question, answer = NULL,
           output = coalesce(partial_output, steps.output),
           claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _emit(s.campaign_id, s.id, 'input.requested', jsonb_build_object('question', question));
    PERFORM _notify_campaign(s.campaign_id, 'milestone', format('Step %s asks: %s', s.id, question));
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
    c campaigns := _lock_campaign(id);
    s steps;
BEGIN
    PERFORM _require(step_id IS NOT NULL, 'step_id');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer)),
                        _keep(request_id, 'provide_input', jsonb_build_object('id', id, 'step_id', step_id, 'answer', answer),
                              provide_input(id => id, step_id => step_id, answer => answer)));
    END IF;
    IF answer IS NULL OR btrim(answer) = '' THEN
        PERFORM _raise('invalid_argument', 'answer is empty');
    END IF;
    SELECT * INTO s FROM steps WHERE steps.campaign_id = c.id AND steps.id = step_id FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s has no step %s', c.id, step_id));
    END IF;
    IF s.status <> 'waiting_input' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not waiting for input', s.id, s.status));
    END IF;
    UPDATE steps SET status = 'pending', answer = provide_input.answer, not_before = '-infinity'
     WHERE steps.campaign_id = c.id AND steps.id = s.id;
    PERFORM _bump_counters(c.id, 0, 0, 1);
    PERFORM _lower_ready_floor(c.id, s.id);
    PERFORM _emit(c.id, s.id, 'input.provided', jsonb_build_object('answer', answer));
    RETURN jsonb_build_object('step_id', s.id, 'status', 'pending', 'question', s.question, 'answer', answer);
END
$$;
