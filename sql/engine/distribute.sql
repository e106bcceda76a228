-- Scale-out on Citus (SPEC §2, docs/scale-out.md): every per-campaign table distributed by its
-- campaign, co-located with campaigns, so that a campaign's rows live together on one worker;
-- the global tables as reference tables, a copy on every node. Nothing here runs on a
-- single-node database: distribute() is called once, by a superuser, on a Citus coordinator.
--
-- What each table becomes, and why:
--   campaigns (id), steps, step_dependencies, events, event_positions, notes, notifications,
--     workflow_history, finished_claims (campaign_id): distributed and co-located. Citus requires every primary and foreign key
--     of a distributed table to include its distribution column, so they are reshaped here
--     (steps (campaign_id, id), …); a single-node database keeps the narrower keys, which every
--     rule's statements satisfy alike because they name the campaign and join on it.
--   resource_leases: reference. Lock keys are shared across campaigns (SPEC §12): the conflict
--     test must see every campaign's leases.
--   workflows: reference. Definitions are global and read by start_workflow in any campaign.
--   cursors: reference. A get_updates consumer may follow every campaign; its row serialises
--     the consumer's reads, its positions are event_positions' rows, with their campaigns.
--   idempotency_records: reference. Keyed by request id, which does not name a campaign
--     (create_campaign's request id has none yet).
--
-- The rules that read one campaign are delegated by it (create_distributed_function), so a
-- call runs on the worker holding that campaign — through twins, not the public functions:
-- stock Citus 13.2 hashes a NULL distribution argument to find its shard and crashes the backend
-- (citusdata/citus#7242, open; scripts/citus/null-distribution-argument.patch, which Sortie's
-- build applies, runs such a call on the coordinator instead), which takes every session of
-- the coordinator with it. The
-- public get_campaign, campaign_graph and planner_context stay undistributed, so a NULL from
-- any caller is refused (invalid_argument) as on one node; their twins _get_campaign_delegated,
-- _campaign_graph_delegated and _planner_context_delegated are what sortie's programs call,
-- always with the campaign they hold (a Rust Uuid, never NULL), granted to the same roles.
-- So are the heartbeat and the step's context named by their campaign (_heartbeat_delegated,
-- _get_my_context_delegated), the claim in a campaign (_claim_next_delegated, which leaves a
-- step with lock keys to claim_next), the completion and the failure
-- (_complete_step_delegated, _fail_step_delegated), the note and the splice without a
-- request id (_add_note_delegated, _spawn_and_continue_delegated): their events are numbered per campaign
-- (events.sql), an order that holds on whichever node runs them; their finished claims are
-- kept with the campaign; their wake-ups are sent on the worker, where sortie's listener
-- listens too. The other writing rules run on the coordinator, which routes each of their
-- statements to the campaign's shards: lock keys and runner slots are serialised there with
-- advisory locks, which hold on one node. docs/scale-out.md says what that costs and what
-- delegating the rest would take.

-- The tables distributed by campaign, in the order Citus needs (a table after those its
-- foreign keys reference), and the global ones.
CREATE FUNCTION _distributed_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ARRAY['campaigns', 'steps', 'step_dependencies', 'events', 'event_positions', 'notes', 'notifications', 'workflow_history',
                    'finished_claims'] $$;

CREATE FUNCTION _reference_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT ARRAY['resource_leases', 'workflows', 'cursors', 'idempotency_records'] $$;

-- The delegated entry points of the read-only rules of one campaign: each answers exactly as
-- the public function it names (it calls it), and under Citus is delegated to the worker
-- holding the campaign. For programs that hold the campaign: a NULL campaign crashes a stock Citus
-- 13.2 coordinator (citusdata/citus#7242), so these are never to be called with one; the public
-- functions refuse it. Errors: those of the public function.
CREATE FUNCTION _get_campaign_delegated(id uuid, steps_limit integer DEFAULT 500, steps_cursor text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_campaign(id, steps_limit, steps_cursor);
END
$$;

CREATE FUNCTION _campaign_graph_delegated(id uuid, max_steps integer DEFAULT 5000)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN campaign_graph(id, max_steps);
END
$$;

CREATE FUNCTION _planner_context_delegated(campaign_id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN planner_context(campaign_id);
END
$$;

-- The calls of one campaign that the coordinator tools, the `sortie` command and the runner
-- make (session 10): each twin answers exactly as the public function it names, called without
-- a request id (a call with one goes to the public function on the coordinator, where request
-- ids are serialised), and under Citus is delegated to the worker holding the campaign, where
-- every statement of the rule names the campaign and runs locally. Never with a NULL campaign
-- (stock Citus 13.2 crashes on one, citusdata/citus#7242; Sortie's build of Citus is patched,
-- scripts/citus). Errors: those of the public function.
CREATE FUNCTION _add_steps_delegated(campaign_id uuid, steps jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN add_steps(campaign_id, steps);
END
$$;

CREATE FUNCTION _steer_campaign_delegated(id uuid, guidance text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN steer_campaign(id, guidance);
END
$$;

CREATE FUNCTION _pause_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN pause_campaign(id);
END
$$;

CREATE FUNCTION _resume_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN resume_campaign(id);
END
$$;

CREATE FUNCTION _cancel_campaign_delegated(id uuid, reason text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN cancel_campaign(id, reason);
END
$$;

CREATE FUNCTION _provide_input_delegated(id uuid, step_id bigint, answer text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN provide_input(id, step_id, answer);
END
$$;

CREATE FUNCTION _check_success_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN check_success(id);
END
$$;

CREATE FUNCTION _get_notes_delegated(campaign_id uuid, tags text[] DEFAULT NULL, step_id bigint DEFAULT NULL,
                                      "limit" integer DEFAULT 50, cursor text DEFAULT NULL,
                                      preview_chars integer DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_notes(campaign_id, tags, step_id, "limit", cursor, preview_chars, claim_token);
END
$$;

CREATE FUNCTION _begin_planning_delegated(id uuid, lease_seconds integer DEFAULT 300)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN begin_planning(id, lease_seconds);
END
$$;

CREATE FUNCTION _apply_plan_delegated(campaign_id uuid, plan jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN apply_plan(campaign_id, plan);
END
$$;

CREATE FUNCTION _finish_campaign_delegated(id uuid)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN finish_campaign(id);
END
$$;

CREATE FUNCTION _record_benchmark_delegated(campaign_id uuid, exit_code integer, output text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN record_benchmark(campaign_id, exit_code, output);
END
$$;

CREATE FUNCTION _get_workflow_status_delegated(instance_id uuid, with_definition boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN get_workflow_status(instance_id, with_definition);
END
$$;

CREATE FUNCTION _advance_workflow_delegated(instance_id uuid, report jsonb, context_updates jsonb DEFAULT '{}',
                                            next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN advance_workflow(instance_id, report, context_updates, next_step);
END
$$;

CREATE FUNCTION _resume_workflow_delegated(instance_id uuid, assumed_current_step_name text, report jsonb DEFAULT NULL,
                                           context_updates jsonb DEFAULT '{}', next_step text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN resume_workflow(instance_id, assumed_current_step_name, report, context_updates, next_step);
END
$$;

-- Those twins, and the writes that are delegated (docs/scale-out.md): signature and the
-- argument naming the campaign.
CREATE FUNCTION _delegated_functions() RETURNS TABLE (signature text, campaign_arg text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT * FROM (VALUES
        ('_get_campaign_delegated(uuid,integer,text)', 'id'),
        ('_campaign_graph_delegated(uuid,integer)', 'id'),
        ('_planner_context_delegated(uuid)', 'campaign_id'),
        ('_heartbeat_delegated(uuid,bigint,uuid,integer)', 'campaign_id'),
        ('_get_my_context_delegated(uuid,bigint,integer,integer,uuid)', 'campaign_id'),
        ('_complete_step_delegated(uuid,bigint,uuid,text,bigint)', 'campaign_id'),
        ('_fail_step_delegated(uuid,bigint,uuid,text)', 'campaign_id'),
        ('_claim_next_delegated(uuid,text,text,integer,uuid)', 'campaign_id'),
        ('_add_note_delegated(uuid,text,text[],bigint,text,vector,text,uuid)', 'campaign_id'),
        ('_spawn_and_continue_delegated(uuid,bigint,uuid,jsonb,jsonb,text)', 'campaign_id'),
        ('_request_input_delegated(uuid,bigint,uuid,text,text)', 'campaign_id'),
        ('_release_step_delegated(uuid,bigint,uuid)', 'campaign_id'),
        ('_record_verification_delegated(uuid,bigint,uuid,boolean,text)', 'campaign_id'),
        ('_abort_branch_delegated(uuid,bigint,uuid,bigint,text,text)', 'campaign_id'),
        ('_add_steps_delegated(uuid,jsonb)', 'campaign_id'),
        ('_steer_campaign_delegated(uuid,text)', 'id'),
        ('_pause_campaign_delegated(uuid)', 'id'),
        ('_resume_campaign_delegated(uuid)', 'id'),
        ('_cancel_campaign_delegated(uuid,text)', 'id'),
        ('_provide_input_delegated(uuid,bigint,text)', 'id'),
        ('_check_success_delegated(uuid)', 'id'),
        ('_get_notes_delegated(uuid,text[],bigint,integer,text,integer,uuid)', 'campaign_id'),
        ('_begin_planning_delegated(uuid,integer)', 'id'),
        ('_apply_plan_delegated(uuid,jsonb)', 'campaign_id'),
        ('_finish_campaign_delegated(uuid)', 'id'),
        ('_record_benchmark_delegated(uuid,integer,text)', 'campaign_id'),
        ('_get_workflow_status_delegated(uuid,boolean)', 'instance_id'),
        ('_advance_workflow_delegated(uuid,jsonb,jsonb,text)', 'instance_id'),
        ('_resume_workflow_delegated(uuid,text,jsonb,jsonb,text)', 'instance_id')
    ) AS f(signature, campaign_arg);
$$;

-- The keys Citus requires (every one includes the distribution column), as statements run on
-- every node before the tables are distributed: a worker keeps its own copy of each table of
-- the extension, which Citus uses as the shell of the distributed one. ON DELETE SET NULL is
-- refused with the distribution column in the key; steps are only ever deleted with their
-- whole campaign (prune), so those become NO ACTION.
CREATE FUNCTION _distribution_keys(p_schema text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT array_agg(replace(s, '@s', quote_ident(p_schema)) ORDER BY o) FROM unnest(ARRAY[
        'ALTER TABLE @s.steps DROP CONSTRAINT IF EXISTS steps_parent_id_fkey, DROP CONSTRAINT IF EXISTS steps_continuation_of_fkey, DROP CONSTRAINT IF EXISTS steps_continued_by_fkey',
        'ALTER TABLE @s.step_dependencies DROP CONSTRAINT IF EXISTS step_dependencies_step_id_fkey, DROP CONSTRAINT IF EXISTS step_dependencies_depends_on_fkey',
        'ALTER TABLE @s.notes DROP CONSTRAINT IF EXISTS notes_step_id_fkey',
        'ALTER TABLE @s.resource_leases DROP CONSTRAINT IF EXISTS resource_leases_step_id_fkey, DROP CONSTRAINT IF EXISTS resource_leases_campaign_id_fkey',
        'ALTER TABLE @s.steps DROP CONSTRAINT steps_pkey, ADD CONSTRAINT steps_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.steps ADD CONSTRAINT steps_parent_id_fkey FOREIGN KEY (campaign_id, parent_id) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT steps_continuation_of_fkey FOREIGN KEY (campaign_id, continuation_of) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT steps_continued_by_fkey FOREIGN KEY (campaign_id, continued_by) REFERENCES @s.steps (campaign_id, id)',
        'ALTER TABLE @s.step_dependencies DROP CONSTRAINT step_dependencies_pkey, ADD CONSTRAINT step_dependencies_pkey PRIMARY KEY (campaign_id, step_id, depends_on), '
            || 'ADD CONSTRAINT step_dependencies_step_id_fkey FOREIGN KEY (campaign_id, step_id) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE, '
            || 'ADD CONSTRAINT step_dependencies_depends_on_fkey FOREIGN KEY (campaign_id, depends_on) REFERENCES @s.steps (campaign_id, id) ON DELETE CASCADE',
        'ALTER TABLE @s.events ALTER COLUMN campaign_id SET NOT NULL, DROP CONSTRAINT events_pkey, ADD CONSTRAINT events_pkey PRIMARY KEY (campaign_id, tx, id)',
        'ALTER TABLE @s.notes DROP CONSTRAINT notes_pkey, ADD CONSTRAINT notes_pkey PRIMARY KEY (campaign_id, id), '
            || 'ADD CONSTRAINT notes_step_id_fkey FOREIGN KEY (campaign_id, step_id) REFERENCES @s.steps (campaign_id, id)',
        'ALTER TABLE @s.notifications ALTER COLUMN campaign_id SET NOT NULL, DROP CONSTRAINT notifications_pkey, ADD CONSTRAINT notifications_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.workflow_history DROP CONSTRAINT workflow_history_pkey, ADD CONSTRAINT workflow_history_pkey PRIMARY KEY (campaign_id, id)',
        'ALTER TABLE @s.finished_claims DROP CONSTRAINT finished_claims_pkey, ADD CONSTRAINT finished_claims_pkey PRIMARY KEY (campaign_id, claim_token)'
    ]) WITH ORDINALITY AS k(s, o);
$$;

-- sortie.distribute(): makes this Citus coordinator's sortie database distributed, as above.
-- Existing rows move to the workers (Citus copies them), so it also moves a database that
-- has run on one node (docs/scale-out.md). Idempotent: a second call distributes nothing
-- again and only gives nodes added since then their id ranges. Answers
-- {distributed: [tables], reference: [tables], functions: [signatures], workers: n}.
-- Errors: invalid_state (no citus extension here, or not the coordinator).
-- Identity columns: each worker's copy of a sequence gets its own range (group id << 40: 2^40
-- ids a node), so a row inserted on a worker never takes an id the coordinator or another
-- worker gives, and every id stays below 2^53, exact in JSON clients, for group ids up to 8191.
-- Citus's group ids are not dense (a failed citus_add_node, a crash, a removed node each use
-- one up), hence the room; a worker of a higher group is refused (invalid_state).
CREATE FUNCTION distribute() RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_schema text := current_schema();
    v_first boolean;
    v_stmt text;
    v_table text;
    v_fn record;
    v_result record;
    v_workers integer;
    v_ranges text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus') THEN
        PERFORM _raise('invalid_state', 'distribute() needs the citus extension in this database (docs/scale-out.md)');
    END IF;
    IF NOT (SELECT citus_is_coordinator()) THEN
        PERFORM _raise('invalid_state', 'distribute() runs on the Citus coordinator');
    END IF;
    EXECUTE 'SELECT count(*) FROM citus_get_active_worker_nodes()' INTO v_workers;
    v_first := NOT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = format('%I.campaigns', v_schema)::regclass);

    IF v_first THEN
        -- The keys, here and on each worker's copy (DDL on an extension's local tables is not
        -- propagated, so it is run on every node alike).
        PERFORM set_config('citus.enable_ddl_propagation', 'off', true);
        FOREACH v_stmt IN ARRAY _distribution_keys(v_schema) LOOP
            EXECUTE v_stmt;
            FOR v_result IN SELECT * FROM run_command_on_workers(
                    'SET citus.enable_ddl_propagation = off; ' || v_stmt) LOOP
                IF NOT v_result.success THEN
                    PERFORM _raise('invalid_state', format('distribute(): worker %s:%s refused %s: %s',
                                   v_result.nodename, v_result.nodeport, left(v_stmt, 80), v_result.result));
                END IF;
            END LOOP;
        END LOOP;
        PERFORM set_config('citus.enable_ddl_propagation', 'on', true);

        PERFORM create_distributed_table(format('%I.campaigns', v_schema), 'id');
        FOREACH v_table IN ARRAY (_distributed_tables())[2:] LOOP
            PERFORM create_distributed_table(format('%I.%I', v_schema, v_table), 'campaign_id',
                                             colocate_with => format('%I.campaigns', v_schema));
        END LOOP;
        FOREACH v_table IN ARRAY _reference_tables() LOOP
            PERFORM create_reference_table(format('%I.%I', v_schema, v_table));
        END LOOP;
        -- A moved database's rows were copied into the shards and are still on disk in the
        -- coordinator's own tables, where nothing reads them any more: emptied, as Citus's
        -- notice asks (its TRUNCATE of the local copy only, CASCADE among them).
        FOREACH v_table IN ARRAY _distributed_tables() || _reference_tables() LOOP
            PERFORM truncate_local_data_after_distributing_table(format('%I.%I', v_schema, v_table)::regclass);
        END LOOP;
        FOR v_fn IN SELECT * FROM _delegated_functions() LOOP
            PERFORM create_distributed_function(format('%I.%s', v_schema, v_fn.signature)::regprocedure,
                                                v_fn.campaign_arg,
                                                colocate_with => format('%I.campaigns', v_schema));
        END LOOP;
    END IF;

    -- Every worker's sequences in their own range (again for nodes added since the last call:
    -- a range is only ever moved up, never back into ids already given).
    v_ranges := format($cmd$
        DO $d$
        DECLARE
            g bigint := (SELECT groupid FROM pg_dist_local_group);
            s regclass;
        BEGIN
            SET LOCAL citus.enable_ddl_propagation = off;
            IF g > 8191 THEN
                RAISE EXCEPTION 'its Citus group id %% is above 8191: its ids would pass 2^53, which JSON clients cannot read exactly', g;
            END IF;
            FOR s IN SELECT seqrelid::regclass FROM pg_sequence q
                       JOIN pg_class c ON c.oid = q.seqrelid
                      WHERE c.relnamespace = %L::regnamespace AND q.seqmin < (g << 40) + 1 LOOP
                EXECUTE format('ALTER SEQUENCE %%s MINVALUE %%s MAXVALUE %%s START %%s RESTART %%s',
                               s, (g << 40) + 1, ((g + 1) << 40) - 1, (g << 40) + 1, (g << 40) + 1);
            END LOOP;
        END
        $d$
    $cmd$, v_schema);
    FOR v_result IN SELECT * FROM run_command_on_workers(v_ranges) LOOP
        IF NOT v_result.success THEN
            PERFORM _raise('invalid_state', format('distribute(): worker %s:%s could not take its id range: %s',
                           v_result.nodename, v_result.nodeport, v_result.result));
        END IF;
    END LOOP;

    RETURN jsonb_build_object(
        'distributed', to_jsonb(_distributed_tables()),
        'reference', to_jsonb(_reference_tables()),
        'functions', (SELECT jsonb_agg(signature) FROM _delegated_functions()),
        'workers', v_workers,
        'first', v_first);
END
$$;
