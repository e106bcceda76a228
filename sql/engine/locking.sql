-- Locking: the campaign row lock every writing rule takes first, then the step, and fencing by
-- claim token (SPEC §3). Lock order is always campaign, then step(s); rules that touch several
-- campaigns (reset_zombies, enforce_budgets) take them in id order.
--
-- Distribution (SPEC §2 scale-out rule; Citus distributes the per-campaign tables by
-- campaign_id): every statement of a rule that works on one campaign names it on each
-- per-campaign table (`WHERE campaign_id = … AND id = …`), joins between per-campaign tables
-- equate campaign_id, and a function that reads or writes a table is PL/pgSQL, never
-- LANGUAGE sql (Citus cannot plan those with parameters) and never called per row inside a
-- query over a per-campaign table (Citus refuses a query nested in a query on a shard). A
-- change of a per-campaign table calls no volatile function, no STABLE one inside COALESCE or
-- CASE or on a column, nothing but immutable ones in RETURNING, and an INSERT's VALUES hold no
-- subquery: such values are worked out first. A read across campaigns compares against the
-- time taken once, in a variable (Citus runs a read's functions on the workers, where the
-- session's sortie.fake_now is not set). A SQL helper inlined into such queries calls only
-- built-in functions (Citus inlines it on a shard with only pg_catalog on the search_path).
-- Two statements on the hot paths cannot take that shape without costing a single node (the
-- campaign lock of a rule that names only a step, and the claim's ready-step read,
-- claim.sql): they take another shape where Citus is loaded, _on_citus().

-- Whether this server has Citus loaded (it sets `citus.version`). A plain PostgreSQL server
-- never has, so its rules never take the Citus shapes.
CREATE FUNCTION _on_citus() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT current_setting('citus.version', true) IS NOT NULL $$;

-- The campaign row lock every writing rule takes first.
CREATE FUNCTION _lock_campaign(p_campaign uuid) RETURNS campaigns
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    IF p_campaign IS NULL THEN
        PERFORM _raise('invalid_argument', 'a campaign id is required');
    END IF;
    SELECT * INTO c FROM campaigns WHERE id = p_campaign FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    RETURN c;
END
$$;

-- Locks a step's campaign (one statement: the hot paths call this) and returns its id. This is
-- where a rule that names only a step finds its campaign; every later statement of the rule
-- names that campaign beside the step (SPEC §2 scale-out rule: one campaign, one node).
-- Under Citus the step is looked up first and its campaign locked by id: Citus locks rows
-- only in a query it routes to one campaign.
CREATE FUNCTION _lock_step_campaign(p_step bigint) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid;
BEGIN
    IF p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'a step id is required (pass step_id, or run with SORTIE_STEP_ID set)');
    END IF;
    IF _on_citus() THEN
        SELECT s.campaign_id INTO v_campaign FROM steps s WHERE s.id = p_step;
        SELECT c.id INTO v_campaign FROM campaigns c WHERE c.id = v_campaign FOR UPDATE;
    ELSE
        SELECT c.id INTO v_campaign
          FROM campaigns c
         WHERE c.id = (SELECT s.campaign_id FROM steps s WHERE s.id = p_step)
           FOR UPDATE;
    END IF;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist', p_step));
    END IF;
    RETURN v_campaign;
END
$$;

-- The campaign lock of a rule called with its campaign named first (the delegated twins,
-- distribute.sql): locks campaign `p_campaign` and checks that step `p_step` is one of its
-- steps. Every statement names the campaign, so on Citus a call delegated to the worker holding
-- it stays there. Returns p_campaign. Errors: invalid_argument (a NULL), not_found (no such
-- campaign, or the step is not in it).
CREATE FUNCTION _lock_named_step_campaign(p_campaign uuid, p_step bigint) RETURNS uuid
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_campaign IS NULL OR p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _lock_campaign(p_campaign);
    PERFORM 1 FROM steps s WHERE s.campaign_id = p_campaign AND s.id = p_step;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', p_step, p_campaign));
    END IF;
    RETURN p_campaign;
END
$$;

-- Locks a step's campaign, then the step. Returns the step as it is under the lock.
CREATE FUNCTION _lock_step(p_step bigint) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid := _lock_step_campaign(p_step);
    s steps;
BEGIN
    SELECT * INTO s FROM steps WHERE campaign_id = v_campaign AND id = p_step FOR UPDATE;
    RETURN s;
END
$$;

-- Fencing (SPEC §3): a worker mutation must present the step's current claim token. The
-- order of checks decides which error a late worker sees: its step was skipped under it
-- (`skipped`), its claim was reset or taken over (`stale_claim`), or it calls out of turn
-- (`invalid_state`). `s` is the step as locked by lock_step.
CREATE FUNCTION _check_claim(s steps, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    IF p_token IS NULL THEN
        PERFORM _raise('invalid_argument', format(
            '%s needs the claim token of step %s (claim_token, or SORTIE_CLAIM_TOKEN)', p_call, s.id));
    END IF;
    IF s.status = 'skipped' AND s.claim_token = p_token THEN
        PERFORM _raise('skipped', format(
            'step %s was skipped (%s) while you worked on it; stop, nothing more is needed', s.id,
            coalesce(s.error, s.skip_cause)));
    END IF;
    IF s.claim_token IS DISTINCT FROM p_token THEN
        PERFORM _raise('stale_claim', format(
            'your claim on step %s is no longer valid (its lease expired or it was reset); stop working on it',
            s.id));
    END IF;
    IF s.status <> 'running' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not running; %s is not possible', s.id, s.status, p_call));
    END IF;
    RETURN s;
END
$$;

-- PL/pgSQL rather than SQL from here on: a non-inlined SQL function is parsed and planned
-- again at every call, a PL/pgSQL one once per session.
CREATE FUNCTION _lock_claimed_step(p_step bigint, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    RETURN _check_claim(_lock_step(p_step), p_token, p_call);
END
$$;

-- _lock_claimed_step for a step of a campaign named first (the delegated twins): the campaign
-- locked, then the step, which must be one of its steps (not_found), and its claim checked.
CREATE FUNCTION _lock_claimed_step_in(p_campaign uuid, p_step bigint, p_token uuid, p_call text) RETURNS steps
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    s steps;
BEGIN
    IF p_campaign IS NULL OR p_step IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _lock_campaign(p_campaign);
    SELECT * INTO s FROM steps WHERE campaign_id = p_campaign AND id = p_step FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', p_step, p_campaign));
    END IF;
    RETURN _check_claim(s, p_token, p_call);
END
$$;
