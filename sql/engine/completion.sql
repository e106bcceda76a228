-- Completion (SPEC §3): a worker's claimed step becomes done, one at a time or in a batch
-- (SPEC §18), possibly after its verify command (SPEC §17); what a done step releases.

-- Bookkeeping after any step (atomic or compound) became done. The caller has already taken
-- it off the campaign's open_steps, in the same update as its other counters.
CREATE FUNCTION _after_done(p_campaign uuid, p_step bigint, p_parent bigint) RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    PERFORM _emit(p_campaign, p_step, 'step.done');
    PERFORM _bump_counters(p_campaign, 0, 0, _release_dependents(p_campaign, ARRAY[p_step]));
    IF p_parent IS NOT NULL THEN
        PERFORM _member_settled(p_campaign, p_parent, 1, 0, NULL);
    END IF;
    PERFORM _check_drained(p_campaign);
END
$$;

-- SPEC §3 completion: the step's campaign is locked here, the rest is _complete_step_in's.
CREATE FUNCTION complete_step(step_id bigint, claim_token uuid, summary text DEFAULT '', tokens_used bigint DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tokens bigint := _check_tokens(tokens_used);
BEGIN
    RETURN _complete_step_in(_lock_step_campaign(step_id), step_id, claim_token, summary, v_tokens);
END
$$;

-- complete_step() naming its campaign first (SPEC §2 scale-out rule): under Citus it is
-- delegated to the worker holding the campaign and runs there as one local transaction
-- (distribute.sql). sortie-mcp calls it for its session's own step, whose campaign it holds.
-- Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242).
-- Errors: those of complete_step; not_found when the step is not in that campaign.
CREATE FUNCTION _complete_step_delegated(campaign_id uuid, step_id bigint, claim_token uuid, summary text DEFAULT '',
                                         tokens_used bigint DEFAULT 0)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tokens bigint := _check_tokens(tokens_used);
BEGIN
    RETURN _complete_step_in(_lock_named_step_campaign(campaign_id, step_id), step_id, claim_token, summary, v_tokens);
END
$$;

-- The completion itself, for a step of campaign `p_campaign`, which the caller has locked;
-- `p_tokens` is checked. The hot path: one guarded update of the step; the reasons a
-- completion is refused are worked out only when that update finds nothing. Every statement
-- names the campaign.
CREATE FUNCTION _complete_step_in(p_campaign uuid, step_id bigint, claim_token uuid, summary text, p_tokens bigint)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_parent bigint;
    v_claimed_at timestamptz;
    v_locks text[];
    v_ready integer;
    v_open integer;
    v_status text;
    v_budget bigint;
    s steps;
BEGIN
    UPDATE steps
       SET status = 'done', output = coalesce(summary, ''), tokens_used = steps.tokens_used + p_tokens,
           duration_ms = (extract(epoch FROM _clock() - claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = p_campaign AND id = step_id
       AND steps.claim_token = _complete_step_in.claim_token AND status = 'running' AND steps.verify IS NULL
    RETURNING parent_id, claimed_at, requires_locks INTO v_parent, v_claimed_at, v_locks;
    IF NOT FOUND THEN
        SELECT * INTO s FROM steps WHERE steps.campaign_id = p_campaign AND id = step_id;
        -- SPEC §17: a step with a check stays running, the summary stored, until its command
        -- passed (record_verification); the caller runs the command.
        IF s.verify IS NOT NULL AND s.status = 'running' AND s.claim_token = claim_token THEN
            UPDATE steps
               SET output = coalesce(summary, ''), tokens_used = steps.tokens_used + p_tokens,
                   verification_requested_at = _clock()
             WHERE steps.campaign_id = p_campaign AND id = s.id;
            -- Tokens were spent whatever the check says.
            IF p_tokens > 0 THEN
                UPDATE campaigns SET tokens_used = campaigns.tokens_used + p_tokens WHERE id = p_campaign;
                PERFORM _enforce_budget(p_campaign);
            END IF;
            PERFORM _emit(p_campaign, s.id, 'step.verifying', jsonb_build_object('verify', s.verify));
            RETURN jsonb_build_object('step_id', s.id, 'status', 'running', 'accepted', true,
                                      'verification', 'pending', 'verify', s.verify,
                                      'message', 'the step is done once its verify command passes');
        END IF;
        -- A worker whose step was skipped under it (abort, cancel) is told so; what it
        -- produced is kept on the step for audit, and nothing else changes.
        IF s.status = 'skipped' AND s.claim_token = claim_token THEN
            UPDATE steps SET output = coalesce(steps.output, summary) WHERE steps.campaign_id = p_campaign AND id = s.id;
            RETURN jsonb_build_object('step_id', s.id, 'status', 'skipped', 'accepted', false,
                'message', format('step %s was skipped (%s) while you worked; your output was kept for the record',
                                  s.id, coalesce(s.error, s.skip_cause)));
        END IF;
        -- SPEC §14: the claim that completed the step, repeating itself, gets its first answer.
        IF _finished_claim(p_campaign, s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', p_tokens)) IS NOT NULL THEN
            RETURN _finished_claim(p_campaign, s.id, claim_token, 'complete_step', jsonb_build_object('summary', summary, 'tokens_used', p_tokens));
        END IF;
        PERFORM _check_claim(s, claim_token, 'complete_step');
        PERFORM _raise('invalid_state', format('step %s cannot be completed', s.id));
    END IF;
    PERFORM _emit(p_campaign, step_id, 'step.done');
    v_ready := _release_dependents(p_campaign, ARRAY[step_id]);
    -- One campaign update for every counter this completion moves: it stops running, is no
    -- longer open, made v_ready steps ready and spent p_tokens.
    SELECT r.open_steps, r.status, r.token_budget INTO v_open, v_status, v_budget
      FROM _leave_running(p_campaign, step_id, v_claimed_at, v_locks,
                         p_open => -1, p_ready => v_ready, p_tokens => p_tokens) r;
    IF v_parent IS NOT NULL THEN
        PERFORM _member_settled(p_campaign, v_parent, 1, 0, NULL);
    END IF;
    IF v_parent IS NOT NULL OR v_open = 0 OR v_budget IS NOT NULL THEN
        PERFORM _check_drained(p_campaign);
        IF v_budget IS NOT NULL THEN
            PERFORM _enforce_budget(p_campaign);
        END IF;
        SELECT status INTO v_status FROM campaigns WHERE id = p_campaign;
    END IF;
    RETURN _keep_finished_claim(p_campaign, step_id, claim_token, 'complete_step',
                                jsonb_build_object('summary', summary, 'tokens_used', p_tokens),
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
BEGIN
    RETURN _record_verification_in(_lock_claimed_step(step_id, claim_token, 'record_verification'), step_id, claim_token, passed, output);
END
$$;

-- record_verification() naming its campaign first (SPEC §2 scale-out rule): under Citus it is
-- delegated to the worker holding the campaign and runs there as one local transaction
-- (distribute.sql). The runner and sortie-mcp record the check of their own step with it. Never
-- with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242). Errors:
-- those of record_verification; not_found when the step is not in that campaign.
CREATE FUNCTION _record_verification_delegated(campaign_id uuid, step_id bigint, claim_token uuid, passed boolean, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN _record_verification_in(_lock_claimed_step_in(campaign_id, step_id, claim_token, 'record_verification'), step_id, claim_token, passed, output);
END
$$;

-- record_verification itself, for `s`, the claimed step its caller locked with its campaign.
-- Every statement names the campaign.
CREATE FUNCTION _record_verification_in(s steps, step_id bigint, claim_token uuid, passed boolean, output text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_ready integer;
    v_status text;
    v_open integer;
    v_output text := right(coalesce(output, ''), 4000);
BEGIN
    PERFORM _require(passed IS NOT NULL, 'passed');
    IF s.verify IS NULL OR s.verification_requested_at IS NULL OR s.verification_requested_at < s.claimed_at THEN
        PERFORM _raise('invalid_state', format('step %s has no verification pending: complete_step asks for it', s.id));
    END IF;
    IF NOT coalesce(passed, false) THEN
        v_status := _attempt_failed(s, format('verification failed: `%s` did not pass:%s%s', s.verify, E'\n', v_output));
        SELECT status INTO v_status FROM steps WHERE steps.campaign_id = s.campaign_id AND id = s.id;
        RETURN jsonb_build_object('step_id', s.id, 'status', v_status, 'accepted', false, 'verification', 'failed',
                                  'will_retry', v_status = 'pending');
    END IF;
    UPDATE steps
       SET status = 'done', verification = v_output,
           duration_ms = (extract(epoch FROM _clock() - s.claimed_at) * 1000)::bigint,
           completed_at = _clock(), claim_token = NULL, lease_expires_at = NULL
     WHERE steps.campaign_id = s.campaign_id AND id = s.id;
    PERFORM _emit(s.campaign_id, s.id, 'step.done', jsonb_build_object('verified', true));
    v_ready := _release_dependents(s.campaign_id, ARRAY[s.id]);
    SELECT r.open_steps INTO v_open
      FROM _leave_running(s.campaign_id, s.id, s.claimed_at, s.requires_locks, p_open => -1, p_ready => v_ready) r;
    IF s.parent_id IS NOT NULL THEN
        PERFORM _member_settled(s.campaign_id, s.parent_id, 1, 0, NULL);
    END IF;
    PERFORM _check_drained(s.campaign_id);
    SELECT status INTO v_status FROM campaigns WHERE id = s.campaign_id;
    RETURN jsonb_build_object('step_id', s.id, 'status', 'done', 'accepted', true, 'verification', 'passed',
                              'campaign_status', v_status);
END
$$;

-- complete_steps' set-wise path (SPEC §18): a run of consecutive items of one locked campaign
-- that _complete_run_items chose, completed as complete_step would complete them one after
-- another — one guarded update of the steps, one event insert, one release of their dependents
-- (each losing one dependency per completed step it waits on), one update of the campaign's
-- counters (slot time folded step by step), their lock keys, and their finished claims kept
-- (SPEC §14). Each answer's campaign_status is the status after that item, as one at a time:
-- the campaign can only end at the last one. The arrays are the run's items in step order:
-- step id, claim token, summary, tokens_used. Returns the answers, a JSON array in that order.
CREATE FUNCTION _complete_many(p_campaign uuid, p_ids bigint[], p_tokens uuid[], p_summaries text[], p_used bigint[])
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_count integer := cardinality(p_ids);
    v_done integer;
    v_claimed timestamptz[];
    v_leased bigint[];
    v_slot double precision;
    v_claimed_at timestamptz;
    v_ready integer;
    v_open integer;
    v_before text;
    v_after text;
    v_answers jsonb;
BEGIN
    SELECT c.slot_seconds_used INTO v_slot FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    WITH done AS (
        UPDATE steps s
           SET status = 'done', output = i.summary, tokens_used = s.tokens_used + i.used,
               duration_ms = (extract(epoch FROM v_now - s.claimed_at) * 1000)::bigint,
               completed_at = v_now, claim_token = NULL, lease_expires_at = NULL
          FROM unnest(p_ids, p_tokens, p_summaries, p_used) AS i(id, token, summary, used)
         WHERE s.campaign_id = p_campaign AND s.id = i.id AND s.claim_token = i.token
           AND s.status = 'running' AND s.verify IS NULL AND s.parent_id IS NULL
        RETURNING s.id, s.claimed_at, cardinality(s.requires_locks) > 0 AS leased)
    SELECT count(*), array_agg(d.claimed_at ORDER BY d.id),
           coalesce(array_agg(d.id ORDER BY d.id) FILTER (WHERE d.leased), '{}')
      INTO v_done, v_claimed, v_leased
      FROM done d;
    -- The items were chosen under the campaign lock (_complete_run_items): each one completes.
    IF v_done <> v_count THEN
        RAISE EXCEPTION 'complete_steps: % of % items chosen for the set-wise path completed', v_done, v_count;
    END IF;
    PERFORM _emit_many(p_campaign, p_ids, 'step.done');
    v_ready := _release_dependents(p_campaign, p_ids);
    FOREACH v_claimed_at IN ARRAY v_claimed LOOP
        v_slot := greatest(v_slot + _slot_correction(v_claimed_at), 0);
    END LOOP;
    UPDATE campaigns c
       SET slot_seconds_used = v_slot,
           tokens_used = c.tokens_used + (SELECT sum(u) FROM unnest(p_used) u),
           running_steps = c.running_steps - v_count, open_steps = c.open_steps - v_count,
           ready_steps = c.ready_steps + v_ready, updated_at = now()
     WHERE c.id = p_campaign
    RETURNING c.open_steps, c.status INTO v_open, v_before;
    v_after := v_before;
    IF cardinality(v_leased) > 0 THEN
        DELETE FROM resource_leases WHERE campaign_id = p_campaign AND step_id = ANY (v_leased);
    END IF;
    IF v_open = 0 THEN
        PERFORM _check_drained(p_campaign);
        SELECT c.status INTO v_after FROM campaigns c WHERE c.id = p_campaign;
    END IF;
    -- SPEC §14, as _keep_finished_claim keeps each.
    DELETE FROM finished_claims f
     WHERE f.campaign_id = p_campaign
       AND f.claim_token IN (SELECT o.claim_token FROM finished_claims o
                              WHERE o.campaign_id = p_campaign AND o.created_at < now() - _idempotency_retention()
                              ORDER BY o.created_at LIMIT 10 * v_count);
    WITH answers AS (
        SELECT k.id, k.token, k.summary, k.used,
               jsonb_build_object('step_id', k.id, 'status', 'done', 'accepted', true,
                                  'campaign_status', CASE WHEN k.n = v_count THEN v_after ELSE v_before END) AS answer,
               k.n
          FROM unnest(p_ids, p_tokens, p_summaries, p_used) WITH ORDINALITY AS k(id, token, summary, used, n)),
    kept AS (
        INSERT INTO finished_claims (campaign_id, claim_token, step_id, call, arguments_hash, result)
        SELECT p_campaign, a.token, a.id, 'complete_step',
               _arguments_hash(jsonb_build_object('summary', a.summary, 'tokens_used', a.used)), a.answer
          FROM answers a
        ON CONFLICT DO NOTHING)
    SELECT jsonb_agg(a.answer ORDER BY a.n) INTO v_answers FROM answers a;
    RETURN v_answers;
END
$$;

-- Which items of one campaign complete_steps may take set-wise (_complete_many), under the
-- campaign's lock: an item that complete_step would complete with nothing beyond its step and
-- its atomic dependents. Its step is a top-level atomic step, running, with that claim token and
-- no verify command, whose dependents are all atomic (a compound dependent opening writes
-- events of its own); it is the batch's first item for that step (a later one is a repeat,
-- replayed or refused one at a time); it is well formed as complete_step reads it (step_id an
-- integer, claim_token a canonical uuid, tokens_used absent, null or an integer below 10^15);
-- and the campaign has no token budget (enforced after each step) and room for the tokens.
-- `p_steps`/`p_campaigns`: the batch's steps and their campaigns. Returns the item ordinals.
CREATE FUNCTION _complete_run_items(p_campaign uuid, p_items jsonb, p_steps bigint[], p_campaigns uuid[])
RETURNS bigint[]
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_budget bigint;
    v_tokens bigint;
    v_ords bigint[];
    v_ids bigint[];
    v_claims uuid[];
    v_fit bigint[];
BEGIN
    SELECT c.token_budget, c.tokens_used INTO v_budget, v_tokens
      FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    IF NOT FOUND OR v_budget IS NOT NULL OR v_tokens > 8000000000000000000 THEN
        RETURN '{}';
    END IF;
    -- The well-formed first items of their steps, from the items alone. Arrays, not a join with
    -- steps: a cached generic plan cannot know there are few items and would read the campaign.
    SELECT coalesce(array_agg(f.ordinality ORDER BY f.id), '{}'), coalesce(array_agg(f.id ORDER BY f.id), '{}'),
           coalesce(array_agg(f.token ORDER BY f.id), '{}')
      INTO v_ords, v_ids, v_claims
      FROM (SELECT i.ordinality, i.id,
                   CASE WHEN jsonb_typeof(i.v -> 'claim_token') = 'string'
                             AND i.v ->> 'claim_token' ~ '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'
                        THEN (i.v ->> 'claim_token')::uuid END AS token
              FROM (SELECT e.ordinality, m.id, e.value AS v,
                           min(e.ordinality) OVER (PARTITION BY m.id) AS first_for_step
                      FROM jsonb_array_elements(p_items) WITH ORDINALITY e
                      JOIN unnest(p_steps, p_campaigns) AS m(id, campaign_id)
                        ON m.campaign_id = p_campaign
                       AND m.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                            AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                       THEN (e.value ->> 'step_id')::numeric::bigint END) i
             WHERE i.ordinality = i.first_for_step
               AND i.v ->> 'step_id' ~ '^[0-9]{1,19}$'
               AND (coalesce(jsonb_typeof(i.v -> 'tokens_used'), 'null') = 'null'
                    OR (jsonb_typeof(i.v -> 'tokens_used') = 'number' AND i.v ->> 'tokens_used' ~ '^[0-9]{1,15}$'))) f
     WHERE f.token IS NOT NULL;
    IF cardinality(v_ids) = 0 THEN
        RETURN '{}';
    END IF;
    -- Their steps as complete_step would find them.
    SELECT coalesce(array_agg(s.id), '{}') INTO v_fit
      FROM steps s
      JOIN unnest(v_ids, v_claims) AS c(id, token) ON c.id = s.id
     WHERE s.campaign_id = p_campaign AND s.id = ANY (v_ids)
       AND s.claim_token = c.token AND s.status = 'running'
       AND s.step_type = 'atomic' AND s.parent_id IS NULL AND s.verify IS NULL
       AND s.tokens_used < 8000000000000000000;
    -- Less those with a compound dependent (opening one writes events of its own).
    SELECT coalesce(array_agg(x), '{}') INTO v_fit
      FROM unnest(v_fit) x
     WHERE x <> ALL (coalesce((SELECT array_agg(d.depends_on)
                                 FROM step_dependencies d
                                 JOIN steps t ON t.campaign_id = d.campaign_id AND t.id = d.step_id
                                WHERE d.campaign_id = p_campaign AND d.depends_on = ANY (v_fit)
                                  AND t.step_type <> 'atomic'), '{}'));
    RETURN ARRAY(SELECT o FROM unnest(v_ords, v_ids) AS a(o, id) WHERE a.id = ANY (v_fit));
END
$$;

-- Completes several claims in one transaction: `items` is a JSON array of up to 1,000 objects
-- {step_id, claim_token, summary?, tokens_used?}, each done exactly as complete_step does it,
-- one after another. Runs of items that need nothing beyond their own top-level step and its
-- atomic dependents go set-wise (_complete_run_items chooses them, _complete_many completes a run
-- in one statement per effect, SPEC §18); every other item runs as complete_step in its own
-- subtransaction: an item complete_step refuses (stale_claim, invalid_state, not_found,
-- invalid_argument for a bad item) changes nothing and is reported, and the others are applied;
-- a step skipped under its worker is answered in `completed` with accepted false, as
-- complete_step answers it. Items are taken in (campaign, step) order, whatever the array's order,
-- so two batches touching the same campaigns lock them in the same order and cannot
-- deadlock. Returns {completed: [complete_step's answer per applied item],
-- refused: [{step_id, code, message}]}, both in that order.
-- Errors (the whole call): invalid_argument when `items` is not an array of 1..1000 objects.
CREATE FUNCTION complete_steps(items jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_item record;
    v_step_ids bigint[];
    v_campaigns uuid[];
    v_campaign uuid;
    v_fast boolean := NOT _on_citus();
    v_run_items bigint[] := '{}';
    -- The pending run of set-wise items (in step order) and its campaign.
    v_run_campaign uuid;
    v_ids bigint[] := '{}';
    v_tokens uuid[] := '{}';
    v_summaries text[] := '{}';
    v_used bigint[] := '{}';
    v_completed jsonb := '[]';
    v_refused jsonb := '[]';
    v_code text;
    v_message text;
BEGIN
    IF items IS NULL OR jsonb_typeof(items) <> 'array' OR jsonb_array_length(items) NOT BETWEEN 1 AND 1000 THEN
        PERFORM _raise('invalid_argument', 'items must be a JSON array of 1 to 1000 {step_id, claim_token, summary, tokens_used} objects');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(items) e WHERE jsonb_typeof(e) <> 'object') THEN
        PERFORM _raise('invalid_argument', 'each item must be an object {step_id, claim_token, summary, tokens_used}');
    END IF;
    -- The items' steps and their campaigns, for the order only; each item is checked below.
    -- bigint, not numeric: `id = numeric` cannot use the primary key (a scan of steps per batch).
    -- Read apart from the items: under Citus, steps is distributed by campaign, and the steps
    -- of a batch are looked up by id across campaigns.
    v_step_ids := ARRAY(SELECT CASE WHEN jsonb_typeof(e -> 'step_id') = 'number'
                                         AND (e ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                    THEN (e ->> 'step_id')::numeric::bigint END
                          FROM jsonb_array_elements(items) e);
    SELECT coalesce(array_agg(s.id), '{}'), coalesce(array_agg(s.campaign_id), '{}') INTO v_step_ids, v_campaigns
      FROM steps s
     WHERE s.id = ANY (v_step_ids);
    FOR v_item IN
        SELECT e.value AS item, e.ordinality, s.campaign_id
          FROM jsonb_array_elements(items) WITH ORDINALITY e
          LEFT JOIN unnest(v_step_ids, v_campaigns) AS s(id, campaign_id)
            ON s.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                           THEN (e.value ->> 'step_id')::numeric::bigint END
         ORDER BY s.campaign_id, s.id, e.ordinality
    LOOP
        -- Consecutive set-wise items gather into a run; any other item first completes the run
        -- before it, so that answers and events keep the one-at-a-time order.
        IF cardinality(v_ids) > 0
           AND (v_item.campaign_id IS DISTINCT FROM v_run_campaign OR NOT v_item.ordinality = ANY (v_run_items)) THEN
            v_completed := v_completed || _complete_many(v_run_campaign, v_ids, v_tokens, v_summaries, v_used);
            v_ids := '{}'; v_tokens := '{}'; v_summaries := '{}'; v_used := '{}';
        END IF;
        -- Entering a campaign (in id order, so the lock order stays campaign, then steps): the
        -- items that may go set-wise, chosen under its lock.
        IF v_fast AND v_item.campaign_id IS NOT NULL AND v_item.campaign_id IS DISTINCT FROM v_campaign THEN
            v_campaign := v_item.campaign_id;
            v_run_items := _complete_run_items(v_campaign, items, v_step_ids, v_campaigns);
        END IF;
        IF v_fast AND v_item.ordinality = ANY (v_run_items) AND v_item.campaign_id = v_campaign THEN
            v_run_campaign := v_campaign;
            v_ids := v_ids || (v_item.item ->> 'step_id')::bigint;
            v_tokens := v_tokens || (v_item.item ->> 'claim_token')::uuid;
            v_summaries := v_summaries || coalesce(v_item.item ->> 'summary', '');
            v_used := v_used || coalesce((v_item.item ->> 'tokens_used')::bigint, 0);
            CONTINUE;
        END IF;
        BEGIN
            IF jsonb_typeof(v_item.item -> 'step_id') IS DISTINCT FROM 'number'
               OR jsonb_typeof(v_item.item -> 'claim_token') IS DISTINCT FROM 'string' THEN
                PERFORM _raise('invalid_argument', 'step_id (a number) and claim_token (a string) are required');
            END IF;
            v_completed := v_completed || jsonb_build_array(complete_step(
                (v_item.item ->> 'step_id')::bigint,
                (v_item.item ->> 'claim_token')::uuid,
                coalesce(v_item.item ->> 'summary', ''),
                coalesce((v_item.item ->> 'tokens_used')::bigint, 0)));
        EXCEPTION
            WHEN SQLSTATE 'SR001' OR SQLSTATE 'SR002' OR SQLSTATE 'SR003' OR SQLSTATE 'SR005'
                 OR SQLSTATE 'SR006' OR SQLSTATE 'SR008' OR SQLSTATE 'SR009'
                 OR invalid_text_representation OR numeric_value_out_of_range THEN
                GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT;
                v_code := CASE WHEN v_message ~ '^[a-z_]+: ' THEN split_part(v_message, ': ', 1) ELSE 'invalid_argument' END;
                v_refused := v_refused || jsonb_build_array(jsonb_build_object(
                    'step_id', v_item.item -> 'step_id', 'code', v_code,
                    'message', CASE WHEN v_message ~ '^[a-z_]+: ' THEN substr(v_message, length(v_code) + 3) ELSE v_message END));
        END;
    END LOOP;
    IF cardinality(v_ids) > 0 THEN
        v_completed := v_completed || _complete_many(v_run_campaign, v_ids, v_tokens, v_summaries, v_used);
    END IF;
    RETURN jsonb_build_object('completed', v_completed, 'refused', v_refused);
END
$$;
