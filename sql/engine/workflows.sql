-- Markdown workflows (SPEC §7). The service parses a workflow folder into a definition (JSON)
-- and loads it here; every rule about it lives below: what a valid definition is, how an
-- instance moves from step to step, and which next steps are allowed. An instance is a
-- campaign pinned to the definition's hash, so editing the files never changes a running one.

-- The reserved next-step name that ends an instance.
CREATE FUNCTION _workflow_finish() RETURNS text LANGUAGE sql IMMUTABLE AS $$ SELECT 'FINISH' $$;

-- Stores a definition (idempotently) and returns its name and hash. A definition is
-- {"name", "goal", "steps": [{"name", "instructions", "guidance"?, "text"?, "transitions"?: {status: step name}}]}.
CREATE FUNCTION load_workflow(name text, definition jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_names text[];
    v_step jsonb;
    v_status text;
    v_target text;
    v_hash text;
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$' THEN
        PERFORM _raise('invalid_argument', format('workflow name %L must be 1 to 200 letters, digits, _ . or -', name));
    END IF;
    IF definition IS NULL OR jsonb_typeof(definition) <> 'object'
       OR jsonb_typeof(definition -> 'steps') IS DISTINCT FROM 'array' OR jsonb_array_length(definition -> 'steps') = 0 THEN
        PERFORM _raise('invalid_argument', format('workflow %s lists no steps', name));
    END IF;
    FOR v_step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        IF jsonb_typeof(v_step -> 'name') IS DISTINCT FROM 'string' OR btrim(v_step ->> 'name') = '' THEN
            PERFORM _raise('invalid_argument', format('workflow %s has a step without a name', name));
        END IF;
        IF upper(v_step ->> 'name') = _workflow_finish() THEN
            PERFORM _raise('invalid_argument', format('workflow %s: %s is reserved for the end of a workflow', name, _workflow_finish()));
        END IF;
        IF lower(v_step ->> 'name') = ANY (SELECT lower(n) FROM unnest(v_names) n) THEN
            PERFORM _raise('invalid_argument', format('workflow %s lists step %L twice', name, v_step ->> 'name'));
        END IF;
        IF jsonb_typeof(v_step -> 'instructions') IS DISTINCT FROM 'string' THEN
            PERFORM _raise('invalid_argument', format('workflow %s: step %L has no client instructions', name, v_step ->> 'name'));
        END IF;
        IF v_step ? 'transitions' AND jsonb_typeof(v_step -> 'transitions') <> 'object' THEN
            PERFORM _raise('invalid_argument', format('workflow %s: transitions of step %L must be an object', name, v_step ->> 'name'));
        END IF;
        v_names := v_names || (v_step ->> 'name');
    END LOOP;
    -- Every declared transition leads to a step of this workflow, or to FINISH.
    FOR v_step IN SELECT * FROM jsonb_array_elements(definition -> 'steps') LOOP
        FOR v_status, v_target IN SELECT key, value #>> '{}' FROM jsonb_each(coalesce(v_step -> 'transitions', '{}')) LOOP
            IF _workflow_step_named(v_names, v_target) IS NULL THEN
                PERFORM _raise('invalid_argument', format('workflow %s: step %L goes to %L on %s, which is not a step of the workflow (nor %s)',
                                                         name, v_step ->> 'name', v_target, v_status, _workflow_finish()));
            END IF;
        END LOOP;
    END LOOP;
    v_hash := encode(sha256(convert_to(definition::text, 'UTF8')), 'hex');
    INSERT INTO workflows (name, hash, definition) VALUES (load_workflow.name, v_hash, definition)
    ON CONFLICT DO NOTHING;
    RETURN jsonb_build_object('name', name, 'hash', v_hash, 'steps', to_jsonb(v_names));
END
$$;

-- The canonical name of a step (case-insensitive match), FINISH, or NULL: never an invented name.
CREATE FUNCTION _workflow_step_named(p_names text[], p_name text) RETURNS text
LANGUAGE sql IMMUTABLE
AS $$
    SELECT CASE WHEN upper(btrim(p_name)) = _workflow_finish() THEN _workflow_finish()
                ELSE (SELECT n FROM unnest(p_names) n WHERE lower(n) = lower(btrim(p_name)) LIMIT 1) END
$$;

CREATE FUNCTION _workflow_definition(c campaigns) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN (SELECT w.definition FROM workflows w WHERE w.name = c.workflow AND w.hash = c.workflow_hash);
END
$$;

CREATE FUNCTION _workflow_step_names(p_definition jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE
AS $$ SELECT array_agg(s ->> 'name' ORDER BY o) FROM jsonb_array_elements(p_definition -> 'steps') WITH ORDINALITY AS t(s, o) $$;

CREATE FUNCTION _workflow_step(p_definition jsonb, p_name text) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$ SELECT s FROM jsonb_array_elements(p_definition -> 'steps') s WHERE s ->> 'name' = p_name $$;

-- What a client sees of an instance; with_definition adds what a planner needs to choose.
CREATE FUNCTION _workflow_view(c campaigns, with_definition boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_def jsonb := _workflow_definition(c);
    v_step jsonb := _workflow_step(v_def, c.workflow_step);
BEGIN
    RETURN jsonb_build_object(
        'instance_id', c.id, 'workflow_name', c.workflow, 'workflow_hash', c.workflow_hash,
        'status', c.status, 'status_reason', c.status_reason, 'context', c.context,
        'current_step', CASE WHEN v_step IS NOT NULL THEN jsonb_build_object(
            'step_name', c.workflow_step, 'instructions', v_step ->> 'instructions',
            'transitions', coalesce(v_step -> 'transitions', '{}')) END,
        'valid_next_steps', to_jsonb(_workflow_step_names(v_def) || _workflow_finish()),
        'history', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_name', h.step_name, 'report', h.report,
                                   'outcome_status', h.outcome_status, 'determined_next_step', h.determined_next_step,
                                   'decided_by', h.decided_by, 'at', h.at) ORDER BY h.id), '[]')
                      FROM (SELECT * FROM workflow_history WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) h))
        || CASE WHEN with_definition THEN jsonb_build_object('definition', v_def) ELSE '{}' END;
END
$$;


-- Starts an instance of a loaded definition (by hash), or loads the given definition and starts
-- it in the same transaction.
CREATE FUNCTION start_workflow(workflow_name text, workflow_hash text DEFAULT NULL, context jsonb DEFAULT '{}',
                               definition jsonb DEFAULT NULL, request_id text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_hash text := workflow_hash;
    v_def jsonb;
    v_first text;
    c campaigns;
BEGIN
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- The definition is not compared: the folder may have been edited between the two calls.
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'start_workflow', jsonb_build_object('workflow_name', workflow_name, 'context', context)),
                        _keep(request_id, 'start_workflow', jsonb_build_object('workflow_name', workflow_name, 'context', context),
                              start_workflow(workflow_name => workflow_name, workflow_hash => workflow_hash,
                                             context => context, definition => definition)));
    END IF;
    IF definition IS NOT NULL THEN
        v_hash := load_workflow(workflow_name, definition) ->> 'hash';
        IF workflow_hash IS NOT NULL AND workflow_hash <> v_hash THEN
            PERFORM _raise('invalid_argument', format('workflow_hash %s is not the hash of the definition given (%s)', workflow_hash, v_hash));
        END IF;
    ELSIF v_hash IS NULL THEN
        PERFORM _raise('invalid_argument', 'pass the workflow_hash of a loaded definition, or the definition itself');
    END IF;
    SELECT w.definition INTO v_def FROM workflows w WHERE w.name = workflow_name AND w.hash = v_hash;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('workflow %s with hash %s is not loaded', workflow_name, v_hash));
    END IF;
    IF context IS NOT NULL AND jsonb_typeof(context) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context must be a JSON object');
    END IF;
    v_first := (_workflow_step_names(v_def))[1];
    INSERT INTO campaigns (name, goal, planner, context, workflow, workflow_hash, workflow_step)
    VALUES (left(workflow_name, 200), coalesce(nullif(btrim(v_def ->> 'goal'), ''), 'workflow ' || workflow_name),
            'none', coalesce(context, '{}'), workflow_name, v_hash, v_first)
    RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, determined_next_step, decided_by, at)
    VALUES (c.id, v_first, 'start', _clock());
    PERFORM _emit(c.id, NULL, 'campaign.created', jsonb_build_object('name', c.name, 'workflow', workflow_name));
    RETURN _workflow_view(c);
END
$$;

CREATE FUNCTION get_workflow_status(instance_id uuid, with_definition boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    SELECT * INTO c FROM campaigns WHERE id = instance_id AND workflow IS NOT NULL;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('workflow instance %s does not exist', instance_id));
    END IF;
    RETURN _workflow_view(c, with_definition);
END
$$;

-- Moves a locked, active instance from its current step: a transition declared for the
-- reported status decides; otherwise p_next_step must name a step of the definition (or
-- FINISH). Without either, nothing changes and the error (choice_required) lists the choices.
CREATE FUNCTION _workflow_move(c campaigns, p_report jsonb, p_updates jsonb, p_next_step text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_def jsonb := _workflow_definition(c);
    v_names text[] := _workflow_step_names(v_def);
    v_transitions jsonb := coalesce(_workflow_step(v_def, c.workflow_step) -> 'transitions', '{}');
    v_status text := p_report ->> 'status';
    v_next text;
    v_how text := 'choice';
BEGIN
    IF v_transitions <> '{}' THEN
        IF v_status IS NULL OR NOT v_transitions ? v_status THEN
            PERFORM _raise('invalid_argument', format('step %L declares transitions on %s: report.status must be one of them, not %s',
                          c.workflow_step, (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(v_transitions) k),
                          coalesce(quote_literal(v_status), 'missing')));
        END IF;
        v_next := _workflow_step_named(v_names, v_transitions ->> v_status);
        v_how := 'transition';
    ELSIF p_next_step IS NULL THEN
        PERFORM _raise('choice_required', format('step %L declares no transitions: choose the next step, one of %s',
                      c.workflow_step, array_to_string(v_names || _workflow_finish(), ', ')));
    ELSE
        v_next := _workflow_step_named(v_names, p_next_step);
        IF v_next IS NULL THEN
            PERFORM _raise('invalid_argument', format('%L is not a step of workflow %s; choose one of %s',
                          p_next_step, c.workflow, array_to_string(v_names || _workflow_finish(), ', ')));
        END IF;
    END IF;
    UPDATE campaigns
       SET context = context || coalesce(p_updates, '{}'),
           workflow_step = CASE WHEN v_next = _workflow_finish() THEN NULL ELSE v_next END,
           updated_at = now()
     WHERE id = c.id
    RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, step_name, report, outcome_status, determined_next_step, decided_by, at)
    VALUES (c.id, p_report ->> 'step_id', p_report, v_status, v_next, v_how, _clock());
    PERFORM _emit(c.id, NULL, 'workflow.advanced',
                 jsonb_build_object('from', p_report ->> 'step_id', 'to', v_next, 'decided_by', v_how));
    IF v_next = _workflow_finish() THEN
        PERFORM _end_campaign(c.id, 'done', 'workflow finished');
        SELECT * INTO c FROM campaigns WHERE id = c.id;
    END IF;
    RETURN _workflow_view(c) || jsonb_build_object('decided_by', v_how);
END
$$;

-- The instance, locked, once it is known to be an active workflow instance and the report and
-- context updates given for it are JSON objects.
CREATE FUNCTION _lock_active_workflow(p_instance uuid, p_report jsonb, p_updates jsonb) RETURNS campaigns
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns := _lock_campaign(p_instance);
BEGIN
    IF c.workflow IS NULL THEN
        PERFORM _raise('not_found', format('campaign %s is not a workflow instance', p_instance));
    END IF;
    IF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('workflow instance %s is %s', c.id, c.status));
    END IF;
    IF p_report IS NOT NULL AND jsonb_typeof(p_report) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'report must be a JSON object');
    END IF;
    IF p_updates IS NOT NULL AND jsonb_typeof(p_updates) <> 'object' THEN
        PERFORM _raise('invalid_argument', 'context_updates must be a JSON object');
    END IF;
    RETURN c;
END
$$;

-- One transaction under the instance's row lock: the report must be for the current step, so
-- two clients advancing from the same step move the instance once (the second is refused).
CREATE FUNCTION advance_workflow(instance_id uuid, report jsonb, context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL,
                                 request_id text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_arguments jsonb := jsonb_build_object('instance_id', instance_id, 'report', report,
                                            'context_updates', context_updates);
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    PERFORM _require(report IS NOT NULL, 'report: {step_id, status}');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- next_step is not compared: the server may have had the planner pick it.
    IF request_id IS NOT NULL THEN
        RETURN coalesce(_replay(request_id, 'advance_workflow', v_arguments),
                        _keep(request_id, 'advance_workflow', v_arguments, advance_workflow(
                            instance_id => instance_id, report => report, context_updates => context_updates,
                            next_step => next_step)));
    END IF;
    c := _lock_active_workflow(instance_id, report, context_updates);
    IF report IS NULL OR jsonb_typeof(report -> 'step_id') IS DISTINCT FROM 'string' THEN
        PERFORM _raise('invalid_argument', format('report.step_id is required: the name of the step reported on (now %L)', c.workflow_step));
    END IF;
    IF report ->> 'step_id' IS DISTINCT FROM c.workflow_step THEN
        PERFORM _raise('invalid_state', format('report.step_id %L is not the current step %L (get_workflow_status, or resume_workflow)',
                      report ->> 'step_id', c.workflow_step));
    END IF;
    RETURN _workflow_move(c, report, context_updates, next_step);
END
$$;

-- A client reconnecting with its own idea of the current step. The persisted state wins: when
-- the client's step is the current one, a report with a status advances as advance_workflow
-- would; otherwise the resume is recorded and the current step is handed back.
CREATE FUNCTION resume_workflow(instance_id uuid, assumed_current_step_name text, report jsonb DEFAULT NULL,
                                context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    c campaigns;
    v_assumed text;
BEGIN
    PERFORM _require(instance_id IS NOT NULL, 'instance_id');
    PERFORM _require(assumed_current_step_name IS NOT NULL, 'assumed_current_step_name');
    c := _lock_active_workflow(instance_id, report, context_updates);
    v_assumed := _workflow_step_named(_workflow_step_names(_workflow_definition(c)), assumed_current_step_name);
    IF v_assumed IS NULL OR v_assumed = _workflow_finish() THEN
        PERFORM _raise('invalid_argument', format('%L is not a step of workflow %s', assumed_current_step_name, c.workflow));
    END IF;
    IF v_assumed = c.workflow_step AND report ? 'status' THEN
        RETURN _workflow_move(c, report || jsonb_build_object('step_id', v_assumed), context_updates, next_step);
    END IF;
    UPDATE campaigns SET context = context || coalesce(context_updates, '{}'), updated_at = now()
     WHERE id = c.id RETURNING * INTO c;
    INSERT INTO workflow_history (campaign_id, step_name, report, outcome_status, determined_next_step, decided_by, at)
    VALUES (c.id, v_assumed, report, 'resumed', c.workflow_step, 'resume', _clock());
    RETURN _workflow_view(c) || jsonb_build_object('decided_by', 'resume', 'assumed_step_name', v_assumed,
                                                  'reconciled', v_assumed IS DISTINCT FROM c.workflow_step);
END
$$;
