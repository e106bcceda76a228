-- Shared setup of the SQL-native tests (tests/tests/sql_native.rs runs it before each file, in
-- the same transaction): pgTAP, and small verbs over the rules so each test reads as the rule
-- it proves. Everything is rolled back at the end of each file.
CREATE EXTENSION IF NOT EXISTS pgtap;
CREATE SCHEMA t;

-- A campaign with no steps yet.
CREATE FUNCTION t.campaign(p_planner text DEFAULT 'none', p_extra jsonb DEFAULT '{}') RETURNS uuid
LANGUAGE sql AS $$
    SELECT (sortie.create_campaign(goal => 'sql-native test', planner => p_planner,
                                   success_metric => p_extra ->> 'success_metric',
                                   success_target => (p_extra ->> 'success_target')::double precision,
                                   benchmark_command => p_extra ->> 'benchmark_command',
                                   token_budget => (p_extra ->> 'token_budget')::bigint,
                                   failure_policy => coalesce(p_extra ->> 'failure_policy', 'continue'),
                                   plan_delay => coalesce((p_extra ->> 'plan_delay')::double precision, 10)) ->> 'id')::uuid
$$;

-- add_steps, answering the top-level step ids.
CREATE FUNCTION t.add(p_campaign uuid, p_steps jsonb) RETURNS bigint[]
LANGUAGE sql AS $$
    SELECT array_agg(x::bigint ORDER BY o)
      FROM jsonb_array_elements_text(sortie.add_steps(p_campaign, p_steps) -> 'step_ids') WITH ORDINALITY AS s(x, o)
$$;

-- A pull-mode claim in one campaign: {step_id, claim_token, action, …} or {step_id: null}.
CREATE FUNCTION t.claim(p_campaign uuid) RETURNS jsonb
LANGUAGE sql AS $$ SELECT sortie.claim_next(owner => 'sql-test', campaign_id => p_campaign) $$;

CREATE FUNCTION t.token(p_claim jsonb) RETURNS uuid
LANGUAGE sql AS $$ SELECT (p_claim ->> 'claim_token')::uuid $$;

CREATE FUNCTION t.id(p_claim jsonb) RETURNS bigint
LANGUAGE sql AS $$ SELECT (p_claim ->> 'step_id')::bigint $$;

-- Claims the next step and completes it with `p_output`; answers its action (NULL: none ready).
CREATE FUNCTION t.run_one(p_campaign uuid, p_output text DEFAULT 'ok') RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    c jsonb := t.claim(p_campaign);
BEGIN
    IF c ->> 'step_id' IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM sortie.complete_step(t.id(c), t.token(c), p_output);
    RETURN c ->> 'action';
END
$$;

-- Runs every ready step to completion; answers the actions in order.
CREATE FUNCTION t.run_all(p_campaign uuid) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_done text[] := '{}';
    v_action text;
BEGIN
    LOOP
        v_action := t.run_one(p_campaign);
        EXIT WHEN v_action IS NULL;
        v_done := v_done || v_action;
    END LOOP;
    RETURN v_done;
END
$$;

-- The readers are PL/pgSQL: Citus plans no LANGUAGE sql function with parameters over its
-- distributed tables, and this file also runs on a distributed database (SORTIE_TEST_CITUS).
CREATE FUNCTION t.status(p_step bigint) RETURNS text
LANGUAGE plpgsql AS $$ BEGIN RETURN (SELECT status FROM sortie.steps WHERE id = p_step); END $$;

CREATE FUNCTION t.campaign_status(p_campaign uuid) RETURNS text
LANGUAGE plpgsql AS $$ BEGIN RETURN (SELECT status FROM sortie.campaigns WHERE id = p_campaign); END $$;

CREATE FUNCTION t.step(p_campaign uuid, p_action text) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT max(id) FROM sortie.steps WHERE campaign_id = p_campaign AND action = p_action);
END
$$;

-- Moves the engine's clock (sortie.fake_now) `p_seconds` ahead of now, for this transaction.
CREATE FUNCTION t.clock_ahead(p_seconds double precision) RETURNS void
LANGUAGE sql AS $$ SELECT set_config('sortie.fake_now', (now() + make_interval(secs => p_seconds))::text, true) $$;

-- The first column of the first row of `p_sql`, as text. An assertion over a table reads it
-- through this: on a distributed database Citus would send a query naming one campaign's
-- shard to its worker whole, pgTAP's call included, away from this session's plan.
CREATE FUNCTION t.one(p_sql text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    EXECUTE p_sql INTO v;
    RETURN v;
END
$$;

-- The invariants every file ends with (SPEC §11).
CREATE FUNCTION t.invariants_hold() RETURNS text
LANGUAGE sql AS $$ SELECT is_empty($q$SELECT * FROM sortie.check_invariants()$q$, 'check_invariants() finds nothing') $$;
