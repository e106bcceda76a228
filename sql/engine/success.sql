-- Success contract and benchmarks (SPEC §3, §17): a campaign with success_metric and
-- success_target is done only when its newest metric note meets the target; a benchmark
-- command, run by a runner, records that metric.

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
    PERFORM _require(check_success.id IS NOT NULL, 'id');
    SELECT * INTO c FROM campaigns WHERE campaigns.id = check_success.id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', check_success.id));
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
       AND _parse_metric(c.success_metric, n.content) IS NOT NULL;
    SELECT _parse_metric(c.success_metric, n.content), n.id INTO v_value, v_note
      FROM notes n
     WHERE n.campaign_id = c.id AND ('metric:' || c.success_metric) = ANY (n.tags)
       AND _parse_metric(c.success_metric, n.content) IS NOT NULL
     ORDER BY n.id DESC LIMIT 1;
    RETURN jsonb_build_object(
        'met', CASE WHEN v_value IS NULL THEN false
                    WHEN c.success_target IS NULL THEN NULL
                    ELSE _metric_met(v_value, c.success_target, c.success_direction) END,
        'reason', CASE
            WHEN v_value IS NULL THEN format('no note tagged metric:%s with a value yet', c.success_metric)
            WHEN c.success_target IS NULL THEN format('%s = %s; no target set, so nothing to compare', c.success_metric, v_value)
            WHEN _metric_met(v_value, c.success_target, c.success_direction)
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

-- SPEC §17: a runner takes one campaign whose benchmark is due, with a lease (seconds) so that
-- one runner runs it at a time; NULL when none is due. Answers {campaign_id, benchmark_command,
-- success_metric}. The due campaigns are listed first, then locked one at a time (skipping
-- those another transaction holds, checked again under the lock): Citus locks rows only in a
-- query on one campaign.
CREATE FUNCTION take_benchmark(lease_seconds integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_id uuid;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    FOR v_id IN SELECT x.id FROM campaigns x
                 WHERE x.benchmark_due AND x.status = 'active'
                   AND (x.benchmark_lease_until IS NULL OR x.benchmark_lease_until <= v_now)
                 ORDER BY x.updated_at LOOP
        SELECT * INTO c FROM campaigns x
         WHERE x.id = v_id AND x.benchmark_due AND x.status = 'active'
           AND (x.benchmark_lease_until IS NULL OR x.benchmark_lease_until <= v_now)
           FOR UPDATE SKIP LOCKED;
        EXIT WHEN FOUND;
    END LOOP;
    IF c.id IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE campaigns SET benchmark_lease_until = _clock() + make_interval(secs => greatest(coalesce(lease_seconds, 900), 1)),
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
    c campaigns := _lock_campaign(campaign_id);
    v_line text;
    v_value double precision;
    v_success jsonb;
    v_status text;
BEGIN
    PERFORM _require(exit_code IS NOT NULL, 'exit_code');
    IF NOT c.benchmark_due OR c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s has no benchmark due', c.id));
    END IF;
    -- Steps added after the run started: it measured the work before them. It is kept as the
    -- last run but judges nothing and counts no iteration; the benchmark runs again once the
    -- campaign drains (at once if it already has).
    IF c.benchmark_seen_step IS NOT NULL
       AND EXISTS (SELECT 1 FROM steps s WHERE s.campaign_id = c.id AND s.id > c.benchmark_seen_step) THEN
        UPDATE campaigns
           SET benchmark_due = (open_steps = 0), benchmark_lease_until = NULL, benchmark_seen_step = NULL,
               last_benchmark = jsonb_build_object('exit_code', exit_code, 'stale', true,
                                                   'output_tail', right(coalesce(output, ''), 2000), 'at', _clock()),
               updated_at = now()
         WHERE id = c.id;
        RETURN jsonb_build_object('campaign_id', c.id, 'status', c.status, 'stale', true,
                                  'message', 'steps were added while the benchmark ran: it runs again when they are done');
    END IF;
    IF c.success_metric IS NOT NULL THEN
        SELECT l.line, _parse_metric(c.success_metric, l.line) INTO v_line, v_value
          FROM regexp_split_to_table(coalesce(output, ''), E'\n') WITH ORDINALITY AS l(line, n)
         WHERE strpos(l.line, '=') > 0 AND _parse_metric(c.success_metric, l.line) IS NOT NULL
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
                                               'output_tail', right(coalesce(output, ''), 2000), 'at', _clock()),
           updated_at = now()
     WHERE id = c.id
    RETURNING * INTO c;
    PERFORM _emit(c.id, NULL, 'campaign.benchmark_run', jsonb_build_object('exit_code', exit_code, 'metric_value', v_value));
    v_success := CASE WHEN c.success_metric IS NOT NULL THEN check_success(c.id) END;
    IF c.open_steps > 0 THEN
        v_status := c.status;
    ELSIF c.planner = 'llm' AND (v_success ->> 'met')::boolean IS NOT TRUE
          AND (v_success IS NULL OR (v_success ->> 'iterations_exhausted')::boolean IS NOT TRUE) THEN
        -- Not there yet: the planner is asked for more at once.
        UPDATE campaigns SET next_action_at = _clock() WHERE id = c.id;
        PERFORM _emit(c.id, NULL, 'campaign.drained');
        v_status := 'active';
    ELSE
        v_status := _finish_drained(c);
    END IF;
    RETURN jsonb_build_object('campaign_id', c.id, 'status', v_status, 'metric_value', v_value,
                              'metric_line', v_line, 'exit_code', exit_code,
                              'iterations_used', v_success -> 'iterations_used', 'met', v_success -> 'met');
END
$$;
