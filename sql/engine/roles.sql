-- The trust boundary in the database (SPEC §15). Runs last, over every function the other files
-- created, so that no file needs to know about roles:
--   * the NOLOGIN roles sortie_coordinator, sortie_worker, sortie_runner and sortie_reader are
--     created when absent (roles belong to the cluster, so DROP EXTENSION leaves them);
--   * EXECUTE is revoked from PUBLIC on every function of the extension;
--   * each API function in the table below runs as its owner (SECURITY DEFINER; its search_path
--     is already fixed by `SET search_path FROM CURRENT`) and is granted to the roles whose
--     tools use it; a function with no roles is internal and executable by no role;
--   * the roles get USAGE on the schema (and on pgvector's, for its type) and no table
--     privileges, so a login holding them reads and writes only through the rules.
-- A call without the privilege fails with SQLSTATE 42501, which clients report as `forbidden`.
-- Who calls what: coordinator = the coordinator tools, workflow tools and the `sortie` command's
-- pause/resume/cancel; worker = the worker tools of sortie-mcp (agents); runner = sortie-runner;
-- reader = the read-only API (the `sortie` command's views, the web view).

-- The one table of who may call what, as a function so that tests and operators can read it
-- (`SELECT * FROM sortie._api_grants()`). Every function with a fixed search_path is listed,
-- the internal ones with no roles; tests/tests/roles.rs checks that nothing is missing.
CREATE FUNCTION _api_grants() RETURNS TABLE (name text, roles text[])
LANGUAGE sql IMMUTABLE
AS $$
    SELECT f.name, f.roles FROM (VALUES
            -- coordinator tools (SPEC §5) and the sortie command's commands
            ('create_campaign',        ARRAY['sortie_coordinator']),
            ('list_campaigns',         ARRAY['sortie_coordinator', 'sortie_reader']),
            ('get_campaign',           ARRAY['sortie_coordinator', 'sortie_reader']),
            ('get_updates',            ARRAY['sortie_coordinator']),
            ('steer_campaign',         ARRAY['sortie_coordinator']),
            ('pause_campaign',         ARRAY['sortie_coordinator']),
            ('resume_campaign',        ARRAY['sortie_coordinator']),
            ('cancel_campaign',        ARRAY['sortie_coordinator']),
            ('provide_input',          ARRAY['sortie_coordinator']),
            ('check_success',          ARRAY['sortie_coordinator']),
            ('add_steps',              ARRAY['sortie_coordinator']),
            -- workflows (SPEC §7)
            ('load_workflow',          ARRAY['sortie_coordinator']),
            ('start_workflow',         ARRAY['sortie_coordinator']),
            ('advance_workflow',       ARRAY['sortie_coordinator']),
            ('resume_workflow',        ARRAY['sortie_coordinator']),
            ('get_workflow_status',    ARRAY['sortie_coordinator', 'sortie_reader']),
            -- seeing a campaign (SPEC §16): the sortie command, the web view, MCP resources
            ('events',                 ARRAY['sortie_coordinator', 'sortie_reader']),
            ('campaign_graph',         ARRAY['sortie_coordinator', 'sortie_reader']),
            ('activity',               ARRAY['sortie_coordinator', 'sortie_reader']),
            ('health',                 ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('check_invariants',       ARRAY['sortie_coordinator', 'sortie_reader']),
            ('listen_poll_window',     ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('wake_interval',          ARRAY['sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            -- worker tools (SPEC §5); a confined worker is checked against its claim (scope.sql)
            ('get_my_context',         ARRAY['sortie_worker', 'sortie_runner']),
            ('read_step_output',       ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_runner', 'sortie_reader']),
            ('get_notes',              ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('search_notes',           ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('add_note',               ARRAY['sortie_worker', 'sortie_coordinator']),
            ('heartbeat',              ARRAY['sortie_worker', 'sortie_runner']),
            ('complete_step',          ARRAY['sortie_worker', 'sortie_runner']),
            ('fail_step',              ARRAY['sortie_worker', 'sortie_runner']),
            ('request_input',          ARRAY['sortie_worker']),
            ('spawn_and_continue',     ARRAY['sortie_worker']),
            ('abort_branch',           ARRAY['sortie_worker']),
            ('record_verification',    ARRAY['sortie_worker', 'sortie_runner']),
            -- whether a step may split (sortie-mcp lists spawn_and_continue by it): a boolean
            ('can_spawn',              ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('claim_next',             ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('claim_step',             ARRAY['sortie_runner', 'sortie_coordinator']),
            -- the step of a claim token, for sortie-mcp --http's claim-token bearer sessions
            ('claim_session',          ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_runner']),
            ('ready_steps',            ARRAY['sortie_runner', 'sortie_coordinator', 'sortie_reader']),
            -- the runner's tick (SPEC §6), planner (§4), notifier, embeddings and benchmarks (§17)
            ('release_step',           ARRAY['sortie_runner']),
            ('reset_zombies',          ARRAY['sortie_runner']),
            ('reap_leases',            ARRAY['sortie_runner']),
            ('enforce_budgets',        ARRAY['sortie_runner']),
            ('dispatch_blockers',      ARRAY['sortie_runner']),
            ('campaigns_to_plan',      ARRAY['sortie_runner']),
            ('begin_planning',         ARRAY['sortie_runner']),
            ('planner_context',        ARRAY['sortie_runner']),
            ('apply_plan',             ARRAY['sortie_runner']),
            ('finish_campaign',        ARRAY['sortie_runner']),
            ('take_notifications',     ARRAY['sortie_runner']),
            ('notification_delivered', ARRAY['sortie_runner']),
            ('notes_to_embed',         ARRAY['sortie_runner']),
            -- sortie-mcp stores a note's embedding after add_note; a worker may not (it would
            -- write to any note), so its notes are embedded by the runner's backfill
            ('set_note_embedding',     ARRAY['sortie_runner', 'sortie_coordinator']),
            ('take_benchmark',         ARRAY['sortie_runner']),
            ('complete_steps',         ARRAY['sortie_runner']),
            ('prune',                  ARRAY['sortie_runner']),
            ('record_benchmark',       ARRAY['sortie_runner']),
            -- scale-out (docs/scale-out.md): an operator's, as superuser, on a Citus coordinator
            ('distribute',             ARRAY[]::text[]),
            -- the delegated twins (distribute.sql), for sortie's programs, which call them with
            -- the campaign they hold: the roles of the function each one stands for
            ('_get_campaign_delegated',    ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_campaign_graph_delegated',  ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_planner_context_delegated', ARRAY['sortie_runner']),
            ('_heartbeat_delegated',       ARRAY['sortie_worker', 'sortie_runner']),
            ('_get_my_context_delegated',  ARRAY['sortie_worker', 'sortie_runner']),
            ('_complete_step_delegated',   ARRAY['sortie_worker', 'sortie_runner']),
            ('_fail_step_delegated',       ARRAY['sortie_worker', 'sortie_runner']),
            ('_claim_next_delegated',      ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            ('_add_note_delegated',        ARRAY['sortie_worker', 'sortie_coordinator']),
            ('_spawn_and_continue_delegated', ARRAY['sortie_worker']),
            ('_request_input_delegated', ARRAY['sortie_worker']),
            ('_release_step_delegated', ARRAY['sortie_runner']),
            ('_record_verification_delegated', ARRAY['sortie_worker', 'sortie_runner']),
            ('_abort_branch_delegated', ARRAY['sortie_worker']),
            ('_add_steps_delegated',       ARRAY['sortie_coordinator']),
            ('_steer_campaign_delegated',  ARRAY['sortie_coordinator']),
            ('_pause_campaign_delegated',  ARRAY['sortie_coordinator']),
            ('_resume_campaign_delegated', ARRAY['sortie_coordinator']),
            ('_cancel_campaign_delegated', ARRAY['sortie_coordinator']),
            ('_provide_input_delegated',   ARRAY['sortie_coordinator']),
            ('_check_success_delegated',   ARRAY['sortie_coordinator']),
            ('_get_notes_delegated',       ARRAY['sortie_worker', 'sortie_coordinator', 'sortie_reader']),
            ('_begin_planning_delegated',  ARRAY['sortie_runner']),
            ('_apply_plan_delegated',      ARRAY['sortie_runner']),
            ('_finish_campaign_delegated', ARRAY['sortie_runner']),
            ('_record_benchmark_delegated', ARRAY['sortie_runner']),
            ('_get_workflow_status_delegated', ARRAY['sortie_coordinator', 'sortie_reader']),
            ('_advance_workflow_delegated', ARRAY['sortie_coordinator']),
            ('_resume_workflow_delegated', ARRAY['sortie_coordinator']),
            ('_claim_candidates',          ARRAY['sortie_worker', 'sortie_runner', 'sortie_coordinator']),
            -- internal: called by the functions above (which run as the owner), by no role
            ('_skip_cascade',           ARRAY[]::text[]),
            ('_similar_notes',          ARRAY[]::text[]),
            ('_similar_notes_by_words', ARRAY[]::text[]),
            ('_running_count',          ARRAY[]::text[]),
            ('_lower_ready_floor',      ARRAY[]::text[]),
            ('_finished_claim',        ARRAY[]::text[]),
            ('_keep_finished_claim',   ARRAY[]::text[]),
            ('_keep',                  ARRAY[]::text[]),
            ('_replay',                ARRAY[]::text[])
    ) AS f(name, roles);
$$;

DO $roles$
DECLARE
    v_schema text := current_schema();
    v_vector_schema text;
    v_role text;
    v_entry record;
    v_proc record;
    v_found integer;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['sortie_coordinator', 'sortie_worker', 'sortie_runner', 'sortie_reader'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            -- Roles belong to the cluster: another database creating the extension at the same
            -- moment (or a Citus node's copy of this script) may make the role first.
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;
            END;
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', v_schema, v_role);
    END LOOP;
    SELECT n.nspname INTO v_vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    IF v_vector_schema IS NOT NULL AND v_vector_schema <> v_schema THEN
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO sortie_coordinator, sortie_worker, sortie_runner, sortie_reader',
                       v_vector_schema);
    END IF;

    -- Every function of this extension (not pgvector's, which lives in its own extension):
    -- executable by no one but its owner until granted below.
    FOR v_proc IN
        SELECT p.oid::regprocedure AS signature
          FROM pg_proc p
          JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', v_proc.signature);
    END LOOP;

    -- Grants per the table above.
    FOR v_entry IN SELECT g.name, g.roles FROM _api_grants() g
    LOOP
        v_found := 0;
        FOR v_proc IN
            SELECT p.oid::regprocedure AS signature,
                   EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%') AS fixed_path
              FROM pg_proc p
             WHERE p.pronamespace = v_schema::regnamespace AND p.proname = v_entry.name
        LOOP
            v_found := v_found + 1;
            IF cardinality(v_entry.roles) > 0 THEN
                -- The two constants (wake_interval, listen_poll_window) read no table and
                -- keep running as their caller.
                IF v_proc.fixed_path THEN
                    EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', v_proc.signature);
                END IF;
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', v_proc.signature,
                               (SELECT string_agg(quote_ident(r), ', ') FROM unnest(v_entry.roles) r));
            END IF;
        END LOOP;
        -- A renamed function would lose its grants: tests/tests/roles.rs fails on it.
        IF v_found = 0 THEN
            RAISE NOTICE 'roles.sql: function %.% is in the grant table but does not exist', v_schema, v_entry.name;
        END IF;
    END LOOP;

    -- A SECURITY DEFINER function must not resolve names through its caller's search_path.
    IF EXISTS (SELECT 1 FROM pg_proc p
                WHERE p.pronamespace = v_schema::regnamespace AND p.prosecdef
                  AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%')) THEN
        RAISE EXCEPTION 'roles.sql: a SECURITY DEFINER function of % has no fixed search_path', v_schema;
    END IF;
END
$roles$;
