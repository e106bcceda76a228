-- Claim (SPEC §3): pull-mode claim_next (fair share across campaigns, batches of SPEC §18,
-- the runners' shared dispatch cap of SPEC §13), claim_step for a named step, and why nothing
-- can be dispatched. A claim gives a claim token (the fencing token every later call presents)
-- and a lease; readiness.sql says what is ready, counters.sql what a claim charges.

-- Claims a ready step of an already locked campaign and returns the claim as the tools
-- answer it; NULL when its lock keys are busy. The campaign's counters are the caller's
-- (count_claim). Scalars rather than a `steps` row: this is the hot path, and whole-row
-- values cost a tuple descriptor per call. The time and the token are taken before the update
-- and the answer built after it: Citus refuses a volatile function (gen_random_uuid), a
-- STABLE one inside COALESCE, and any non-immutable one in RETURNING of a distributed change.
CREATE FUNCTION _take_step(p_step bigint, p_campaign uuid, p_parent bigint, p_locks text[],
                          p_owner text, p_lease_seconds integer, p_dispatched boolean DEFAULT false)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_expires timestamptz := v_now + make_interval(secs => p_lease_seconds);
    v_token uuid := gen_random_uuid();
    v_parent bigint := p_parent;
    v_started bigint;
    v_action text;
    v_agent text;
    v_depth integer;
    v_attempts integer;
    v_claimed boolean;
BEGIN
    IF cardinality(p_locks) > 0 AND NOT _take_locks(p_step, p_campaign, p_locks, v_expires) THEN
        RETURN NULL;
    END IF;
    UPDATE steps
       SET status = 'running', claim_token = v_token, claim_owner = p_owner,
           claimed_at = v_now, heartbeat_at = v_now, lease_expires_at = v_expires,
           started_at = coalesce(started_at, v_now), dispatched = p_dispatched
     WHERE campaign_id = p_campaign AND id = p_step
    RETURNING action, agent, depth, attempts INTO v_action, v_agent, v_depth, v_attempts;
    v_claimed := FOUND;
    -- A compound step becomes running when its first child starts (its parents with it), and
    -- says so in the log like any other step (SPEC §13).
    WHILE v_parent IS NOT NULL LOOP
        UPDATE steps SET status = 'running', started_at = v_now
         WHERE campaign_id = p_campaign AND id = v_parent AND status = 'pending'
        RETURNING id, parent_id INTO v_started, v_parent;
        EXIT WHEN NOT FOUND;
        PERFORM _emit(p_campaign, v_started, 'step.started', jsonb_build_object('step_type', 'compound'));
    END LOOP;
    PERFORM _emit(p_campaign, p_step, 'step.claimed', jsonb_build_object('owner', p_owner));
    RETURN CASE WHEN v_claimed THEN jsonb_build_object(
        'step_id', p_step, 'campaign_id', p_campaign, 'action', v_action, 'agent', v_agent, 'depth', v_depth,
        'claim_token', v_token, 'lease_expires_at', v_expires, 'attempts', v_attempts) END;
END
$$;

CREATE FUNCTION _check_lease_seconds(p_lease_seconds integer) RETURNS integer
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_lease_seconds IS NULL OR p_lease_seconds NOT BETWEEN 1 AND 604800 THEN
        PERFORM _raise('invalid_argument', 'lease_seconds must be from 1 to 604800 (one week)');
    END IF;
    RETURN p_lease_seconds;
END
$$;

-- Within a campaign its caller has locked and counted the claim in (count_claim): the first
-- ready step for `p_agent` whose lock keys are free, claimed; NULL when there is none.
--
-- The scan starts at the campaign's ready_floor (SPEC §18: a claim's cost must not grow with
-- its campaign's history). Every claimed step leaves a dead entry in `steps_ready` until
-- VACUUM, and while any snapshot older than the claim is open (a long transaction anywhere)
-- the scan cannot even mark them dead, so a scan from the campaign's first id fetched every
-- claimed step's heap tuple: a claim + complete cycle went 0.86 → 2.1 ms over 5,000 cycles
-- (docs/architecture.md, Readiness).
-- Whichever index a plan picks (stale statistics can make steps_campaign look as good as the
-- partial index), the scan is positioned at (p_campaign, floor), past the finished history.
--
-- Where Citus is loaded (_on_citus(), locking.sql) the two reads name the campaign by
-- equality instead: Citus routes a query to one campaign's shard only by `campaign_id = …`,
-- and locks rows (FOR UPDATE) only in such a query. Beside the equality a plain `id > …`
-- positions the scan; the cached-plan risk above is the price there.
CREATE FUNCTION _claim_in_campaign(p_campaign uuid, p_owner text, p_agent text, p_lease_seconds integer,
                                  p_dispatched boolean DEFAULT false, p_lock_keys_here boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_step bigint;
    v_parent bigint;
    v_locks text[];
    v_claim jsonb;
    v_floor bigint;
    v_first bigint;
    v_after bigint;
    v_now timestamptz := _clock();
    v_citus boolean := _on_citus();
BEGIN
    SELECT ready_floor INTO v_floor FROM campaigns WHERE id = p_campaign;
    -- The first ready step whatever its agent, back-off or lock keys: no ready step lies below
    -- it, so the floor may rise to it.
    IF v_citus THEN
        SELECT id INTO v_first
          FROM steps
         WHERE campaign_id = p_campaign AND id >= v_floor
           AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
         ORDER BY campaign_id, id
         LIMIT 1;
    ELSE
        SELECT id INTO v_first
          FROM steps
         WHERE (campaign_id, id) >= (p_campaign, v_floor) AND campaign_id <= p_campaign
           AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
         ORDER BY campaign_id, id
         LIMIT 1;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_first - v_floor > _ready_floor_slack() THEN
        UPDATE campaigns SET ready_floor = v_first WHERE id = p_campaign;
    END IF;
    v_after := v_first - 1;
    LOOP
        IF v_citus THEN
            SELECT id, parent_id, requires_locks INTO v_step, v_parent, v_locks
              FROM steps
             WHERE campaign_id = p_campaign AND id > v_after
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
        ELSE
            SELECT id, parent_id, requires_locks INTO v_step, v_parent, v_locks
              FROM steps
             -- The row comparison is an index condition only an index led by (campaign_id, id)
             -- can take: with a plain `id > v_after` a cached generic plan walked the primary
             -- key through other campaigns' history (13 ms at 10^5 steps, docs/benchmarks.md).
             -- And it is the only lower bound on campaign_id: beside `campaign_id = p_campaign`
             -- the B-tree starts the scan at the equality, the campaign's first entry, and walks
             -- every entry before (p_campaign, v_after); `campaign_id <= p_campaign` ends it.
             WHERE (campaign_id, id) > (p_campaign, v_after) AND campaign_id <= p_campaign
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT 1
               FOR UPDATE SKIP LOCKED;
        END IF;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        -- A claim delegated to a Citus worker (_claim_next_delegated) does not take lock keys,
        -- which are serialised on the coordinator: it says so, and its caller claims there.
        IF NOT p_lock_keys_here AND cardinality(v_locks) > 0 THEN
            RETURN jsonb_build_object('step_id', NULL, 'reason', 'lock_keys');
        END IF;
        v_claim := _take_step(v_step, p_campaign, v_parent, v_locks, p_owner, p_lease_seconds, p_dispatched);
        IF v_claim IS NOT NULL THEN
            RETURN v_claim;
        END IF;
        v_after := v_step;
    END LOOP;
END
$$;

-- Claims plain steps (atomic, no parent, no lock keys) of a locked campaign, already locked
-- themselves, as _take_step claims one: one update and one event per step in the array's
-- order. Returns their claims, a JSON array in id order. The counters are the caller's.
CREATE FUNCTION _take_plain_steps(p_campaign uuid, p_steps bigint[], p_owner text, p_now timestamptz,
                                 p_expires timestamptz, p_dispatched boolean)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_tokens uuid[] := ARRAY(SELECT gen_random_uuid() FROM generate_series(1, cardinality(p_steps)));
    v_claims jsonb;
BEGIN
    WITH taken AS (
        UPDATE steps s
           SET status = 'running', claim_token = t.token, claim_owner = p_owner,
               claimed_at = p_now, heartbeat_at = p_now, lease_expires_at = p_expires,
               started_at = coalesce(s.started_at, p_now), dispatched = p_dispatched
          FROM unnest(p_steps, v_tokens) AS t(id, token)
         WHERE s.campaign_id = p_campaign AND s.id = t.id
        RETURNING s.id, s.action, s.agent, s.depth, s.attempts, t.token)
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'step_id', t.id, 'campaign_id', p_campaign, 'action', t.action, 'agent', t.agent,
               'depth', t.depth, 'claim_token', t.token, 'lease_expires_at', p_expires,
               'attempts', t.attempts) ORDER BY t.id), '[]')
      INTO v_claims
      FROM taken t;
    PERFORM _emit_many(p_campaign, p_steps, 'step.claimed', jsonb_build_object('owner', p_owner));
    RETURN v_claims;
END
$$;

-- A batch of claims in one campaign (SPEC §18: claim_next with campaign_id and max_steps), the
-- same claims the single-claim loop would take — the first ready steps for `p_agent` in id
-- order whose lock keys are free, at most `p_limit`, as many as the campaign may dispatch
-- (max_parallel) — taken set-wise: the campaign locked and counted once, the plain steps (no
-- parent, no lock keys) claimed by one update with one event insert; a step with a parent or
-- lock keys is taken by _take_step as a single claim takes it. Returns the claims as a JSON
-- array in id order ([] when none). Errors: not_found (campaign).
CREATE FUNCTION _claim_many(p_campaign uuid, p_owner text, p_agent text, p_lease_seconds integer,
                           p_dispatched boolean, p_limit integer)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_now timestamptz := _clock();
    v_expires timestamptz := _clock() + make_interval(secs => p_lease_seconds);
    v_ready integer;
    v_room integer;
    v_floor bigint;
    v_first bigint;
    v_after bigint;
    v_got integer := 0;
    v_asked integer;
    v_seen integer;
    v_plain bigint[];
    v_claim jsonb;
    v_claims jsonb := '[]';
    r record;
BEGIN
    SELECT c.ready_steps, c.ready_floor,
           CASE WHEN NOT _can_dispatch(c.status, c.max_parallel, c.running_steps, c.token_budget, c.tokens_used) THEN 0
                WHEN c.max_parallel IS NULL THEN p_limit
                ELSE c.max_parallel - c.running_steps END
      INTO v_ready, v_floor, v_room
      FROM campaigns c WHERE c.id = p_campaign FOR UPDATE;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    v_room := least(p_limit, v_ready, v_room);
    IF v_room <= 0 THEN
        RETURN '[]';
    END IF;
    -- The floor as _claim_in_campaign keeps it.
    SELECT id INTO v_first
      FROM steps
     WHERE (campaign_id, id) >= (p_campaign, v_floor) AND campaign_id <= p_campaign
       AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
     ORDER BY campaign_id, id
     LIMIT 1;
    IF NOT FOUND THEN
        RETURN '[]';
    END IF;
    IF v_first - v_floor > _ready_floor_slack() THEN
        UPDATE campaigns SET ready_floor = v_first WHERE id = p_campaign;
    END IF;
    v_after := v_first - 1;
    -- Rounds: a step whose lock keys are busy is passed over, and the next round looks further.
    LOOP
        v_plain := '{}';
        v_asked := v_room - v_got;
        v_seen := 0;
        FOR r IN
            SELECT id, parent_id, requires_locks
              FROM steps
             WHERE (campaign_id, id) > (p_campaign, v_after) AND campaign_id <= p_campaign
               AND status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0
               AND not_before <= v_now
               AND (p_agent IS NULL OR agent IS NULL OR agent = p_agent)
             ORDER BY campaign_id, id
             LIMIT v_asked
               FOR UPDATE SKIP LOCKED
        LOOP
            v_after := r.id;
            v_seen := v_seen + 1;
            IF r.parent_id IS NULL AND coalesce(cardinality(r.requires_locks), 0) = 0 THEN
                v_plain := v_plain || r.id;
            ELSE
                -- The plain steps before it first, so that the events keep the claims' order.
                IF cardinality(v_plain) > 0 THEN
                    v_claims := v_claims || _take_plain_steps(p_campaign, v_plain, p_owner, v_now, v_expires, p_dispatched);
                    v_got := v_got + cardinality(v_plain);
                    v_plain := '{}';
                END IF;
                v_claim := _take_step(r.id, p_campaign, r.parent_id, r.requires_locks, p_owner, p_lease_seconds, p_dispatched);
                IF v_claim IS NOT NULL THEN
                    v_claims := v_claims || jsonb_build_array(v_claim);
                    v_got := v_got + 1;
                END IF;
            END IF;
        END LOOP;
        IF cardinality(v_plain) > 0 THEN
            v_claims := v_claims || _take_plain_steps(p_campaign, v_plain, p_owner, v_now, v_expires, p_dispatched);
            v_got := v_got + cardinality(v_plain);
        END IF;
        -- Done when the batch is full or the read found fewer steps than it asked for.
        EXIT WHEN v_got >= v_room OR v_seen < v_asked;
    END LOOP;
    IF v_got = 0 THEN
        RETURN '[]';
    END IF;
    UPDATE campaigns
       SET running_steps = running_steps + v_got, ready_steps = ready_steps - v_got,
           slot_seconds_used = slot_seconds_used + v_got * _provisional_slot_seconds(), updated_at = now()
     WHERE id = p_campaign;
    RETURN (SELECT jsonb_agg(c ORDER BY (c ->> 'step_id')::bigint) FROM jsonb_array_elements(v_claims) c);
END
$$;

-- One claim for claim_next, after its checks: the best ready step for `p_agent` in
-- `p_campaign`, or in any campaign when it is NULL; NULL when there is none.
-- Campaigns are tried in fair-share order — lowest slot_seconds_used / weight first — and
-- capped, paused or over-budget campaigns are never tried, so they cannot block the others.
CREATE FUNCTION _claim_one(p_owner text, p_agent text, p_campaign uuid, p_lease integer, p_dispatched boolean,
                           p_lock_keys_here boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_campaign uuid;
    v_claim jsonb;
    v_busy uuid[] := '{}';
    v_round integer;
BEGIN
    IF p_campaign IS NOT NULL THEN
        -- One update locks the campaign and counts the claim; it is taken back when no ready
        -- step fits after all (agent, back-off, lock keys).
        IF NOT _count_claim(p_campaign) THEN
            PERFORM 1 FROM campaigns x WHERE x.id = p_campaign;
            IF NOT FOUND THEN
                PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
            END IF;
            RETURN NULL;
        END IF;
        v_claim := _claim_in_campaign(p_campaign, p_owner, p_agent, p_lease, p_dispatched, p_lock_keys_here);
        IF v_claim IS NULL OR v_claim ->> 'step_id' IS NULL THEN
            PERFORM _uncount_claim(p_campaign);
        END IF;
        RETURN v_claim;
    END IF;
    -- Round 1 skips campaigns another transaction holds; round 2 waits for them, but only if
    -- round 1 found nothing. Each try runs in a subtransaction that is undone when it claims
    -- nothing, so a claimer never keeps a campaign it did not use and never waits while
    -- holding one: two claimers cannot deadlock.
    FOR v_round IN 1..2 LOOP
        FOR v_campaign IN
            SELECT x.id FROM campaigns x
             WHERE x.ready_steps > 0
               AND _can_dispatch(x.status, x.max_parallel, x.running_steps, x.token_budget, x.tokens_used)
               AND (v_round = 1 OR x.id = ANY (v_busy))
             ORDER BY x.slot_seconds_used / x.weight, x.created_at
        LOOP
            BEGIN
                IF v_round = 1 THEN
                    PERFORM 1 FROM campaigns x WHERE x.id = v_campaign FOR UPDATE SKIP LOCKED;
                ELSE
                    PERFORM 1 FROM campaigns x WHERE x.id = v_campaign FOR UPDATE;
                END IF;
                IF NOT FOUND THEN
                    v_busy := v_busy || v_campaign;
                ELSE
                    -- Undone with the subtransaction when nothing is claimed.
                    v_claim := CASE WHEN _count_claim(v_campaign)
                                    THEN _claim_in_campaign(v_campaign, p_owner, p_agent, p_lease, p_dispatched) END;
                    IF v_claim IS NULL THEN
                        RAISE EXCEPTION 'nothing to claim here' USING ERRCODE = 'SR099';
                    END IF;
                    RETURN v_claim;
                END IF;
            EXCEPTION WHEN SQLSTATE 'SR099' THEN
                NULL;
            END;
        END LOOP;
        EXIT WHEN cardinality(v_busy) = 0;
    END LOOP;
    RETURN NULL;
END
$$;

-- Pull-mode claim (SPEC §3): the best ready step for `agent` (steps with no agent fit anyone),
-- in `campaign_id` or, without one, in fair-share order across campaigns (_claim_one).
--
-- Without `max_steps`: one claim object {step_id, campaign_id, action, agent, depth,
-- claim_token, lease_expires_at, attempts}, or {step_id: null} when nothing is ready
-- ({step_id: null, reason: 'capacity'} when every runner slot is in use).
-- With `max_steps` n (1..1000, SPEC §18 batches): a JSON array of up to n such claims, taken
-- one after another in this one transaction (each as the single-step call would take it, so
-- fair share applies per claim); [] when nothing is ready or no runner slot is free.
-- `max_dispatched` (a runner's dispatch, SPEC §13): all runners sharing the database share one
-- cap of that many running dispatches; a batch claims at most the free slots.
-- Errors: invalid_argument (owner, lease_seconds 1..604800, max_dispatched ≥ 1, max_steps
-- 1..1000), not_found (campaign_id).
CREATE FUNCTION claim_next(owner text, agent text DEFAULT NULL, campaign_id uuid DEFAULT NULL,
                           lease_seconds integer DEFAULT 900, max_dispatched integer DEFAULT NULL,
                           max_steps integer DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
    v_dispatched boolean := max_dispatched IS NOT NULL;
    v_limit integer := coalesce(max_steps, 1);
    v_claim jsonb;
    v_claims jsonb := '[]';
BEGIN
    PERFORM _check_owner(owner);
    -- SPEC §15: a worker claims only within the campaign of the claim it holds (scope.sql).
    campaign_id := _worker_campaign(campaign_id, NULL, claim_token, 'claim_next');
    IF max_steps IS NOT NULL AND max_steps NOT BETWEEN 1 AND 1000 THEN
        PERFORM _raise('invalid_argument', 'max_steps must be from 1 to 1000');
    END IF;
    -- A runner's dispatch (SPEC §13): claims of all runners take turns on one advisory lock, so
    -- two runners cannot both see the last free slot; pull-mode claims neither wait nor count.
    IF v_dispatched THEN
        IF max_dispatched < 1 THEN
            PERFORM _raise('invalid_argument', 'max_dispatched must be at least 1');
        END IF;
        PERFORM pg_advisory_xact_lock(hashtextextended('sortie.runner_slots', 0));
        v_limit := least(v_limit, max_dispatched - (SELECT count(*) FROM steps x WHERE x.status = 'running' AND x.dispatched)::integer);
        IF v_limit <= 0 THEN
            RETURN CASE WHEN max_steps IS NULL THEN jsonb_build_object('step_id', NULL, 'reason', 'capacity') ELSE '[]' END;
        END IF;
    END IF;
    -- A batch in one campaign is taken set-wise (_claim_many); across campaigns each claim is
    -- placed by fair share in turn. Under Citus the loop: its statements are the routed ones.
    IF max_steps IS NOT NULL AND campaign_id IS NOT NULL AND NOT _on_citus() THEN
        RETURN _claim_many(campaign_id, owner, agent, v_lease, v_dispatched, v_limit);
    END IF;
    FOR i IN 1..v_limit LOOP
        v_claim := _claim_one(owner, agent, campaign_id, v_lease, v_dispatched);
        EXIT WHEN v_claim IS NULL;
        v_claims := v_claims || jsonb_build_array(v_claim);
    END LOOP;
    IF max_steps IS NOT NULL THEN
        RETURN v_claims;
    END IF;
    RETURN coalesce(v_claims -> 0, jsonb_build_object('step_id', NULL));
END
$$;

-- claim_next() in one campaign named first (SPEC §2 scale-out rule), for one step in pull mode:
-- under Citus it is delegated to the worker holding the campaign and runs there as one local
-- transaction (distribute.sql). A step that needs lock keys is not claimed here — lock keys are
-- serialised on the coordinator (advisory locks, lock_keys.sql) — and the answer is
-- {step_id: null, reason: 'lock_keys'}: the caller claims with claim_next. sortie-mcp calls it
-- when it holds the campaign. Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes
-- on one (citusdata/citus#7242). With a claim token (a worker confined to its campaign, SPEC
-- §15) the token must be the current claim of a running step of this campaign (_worker_claim_in).
-- Answers as claim_next without max_steps. Errors: those of claim_next.
CREATE FUNCTION _claim_next_delegated(campaign_id uuid, owner text, agent text DEFAULT NULL,
                                      lease_seconds integer DEFAULT 900, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
BEGIN
    PERFORM _check_owner(owner);
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _worker_claim_in(campaign_id, NULL, claim_token, 'claim_next');
    RETURN coalesce(_claim_one(owner, agent, campaign_id, v_lease, false, false), jsonb_build_object('step_id', NULL));
END
$$;

-- The first step of claim_next without a campaign, for a caller that claims inside the
-- campaign next with _claim_next_delegated (sortie-mcp on Citus, SPEC §2 scale-out rule): up to
-- `limit` campaigns (1..20) with a ready step that may dispatch now, in claim_next's fair-share
-- order (lowest slot_seconds_used / weight first). A JSON array of campaign ids; JSON null
-- where Citus is not loaded, since claim_next there decides and claims in one call. Reads
-- only. Errors: forbidden for a confined worker (it claims in its own campaign).
CREATE FUNCTION _claim_candidates("limit" integer DEFAULT 5)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    PERFORM _worker_campaign(NULL, NULL, NULL, 'claim_next');
    IF NOT _on_citus() THEN
        RETURN NULL;
    END IF;
    RETURN (SELECT coalesce(jsonb_agg(x.id ORDER BY x.share, x.created_at), '[]')
              FROM (SELECT c.id, c.slot_seconds_used / c.weight AS share, c.created_at
                      FROM campaigns c
                     WHERE c.ready_steps > 0
                       AND _can_dispatch(c.status, c.max_parallel, c.running_steps, c.token_budget, c.tokens_used)
                     ORDER BY share, c.created_at
                     LIMIT least(greatest(coalesce("limit", 5), 1), 20)) x);
END
$$;

-- Claims one named step, or says why it is not ready.
CREATE FUNCTION claim_step(step_id bigint, owner text, lease_seconds integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_lease integer := _check_lease_seconds(lease_seconds);
    s steps := _lock_step(step_id);
    c campaigns;
    v_claim jsonb;
BEGIN
    PERFORM _check_owner(owner);
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    IF s.step_type <> 'atomic' THEN
        PERFORM _raise('invalid_state', format('step %s is a %s step; only its atomic children are dispatched', s.id, s.step_type));
    ELSIF s.status <> 'pending' THEN
        PERFORM _raise('invalid_state', format('step %s is %s, not pending', s.id, s.status));
    ELSIF s.remaining_deps > 0 THEN
        PERFORM _raise('invalid_state', format('step %s still waits for %s dependencies', s.id, s.remaining_deps));
    ELSIF s.not_before > _clock() THEN
        PERFORM _raise('invalid_state', format('step %s is backing off until %s', s.id, s.not_before));
    ELSIF c.status <> 'active' THEN
        PERFORM _raise('invalid_state', format('campaign %s is %s', c.id, c.status));
    ELSIF c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN
        PERFORM _raise('budget_exhausted', format('campaign %s has used its token budget', c.id));
    ELSIF c.max_parallel IS NOT NULL AND c.running_steps >= c.max_parallel THEN
        PERFORM _raise('invalid_state', format('campaign %s already runs max_parallel = %s steps', c.id, c.max_parallel));
    END IF;
    v_claim := _take_step(s.id, s.campaign_id, s.parent_id, s.requires_locks, owner, v_lease);
    IF v_claim IS NULL THEN
        PERFORM _raise('invalid_state', format('step %s needs lock keys another running step holds', s.id));
    END IF;
    IF NOT _count_claim(s.campaign_id) THEN
        RAISE EXCEPTION 'internal: campaign % counts no ready step while step % is ready', s.campaign_id, s.id
              USING ERRCODE = 'internal_error';
    END IF;
    RETURN v_claim;
END
$$;

CREATE FUNCTION _check_owner(p_owner text) RETURNS text
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_owner IS NULL OR btrim(p_owner) = '' THEN
        PERFORM _raise('invalid_argument', 'owner is required: name the worker or runner that claims');
    END IF;
    RETURN p_owner;
END
$$;

-- Why a runner claims nothing although steps are ready (SPEC §13: it logs why). Counts the
-- pending atomic steps whose dependencies are done, and what holds each back, first reason
-- first: its campaign is not active, has spent its token budget, or runs max_parallel steps;
-- the step is backing off after a failed attempt, or its lock keys are held; and, when
-- `max_dispatched` is given, whether every runner slot is in use.
CREATE FUNCTION dispatch_blockers(max_dispatched integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
DECLARE
    l record;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    -- Lock keys are tested against the leases read once (_locks_conflict, lock_keys.sql).
    SELECT * INTO l FROM _live_leases();
    RETURN (
    WITH ready AS (
        SELECT CASE
                   WHEN c.status <> 'active' THEN 'campaign_' || c.status
                   WHEN c.token_budget IS NOT NULL AND c.tokens_used >= c.token_budget THEN 'budget'
                   WHEN c.max_parallel IS NOT NULL AND c.running_steps >= c.max_parallel THEN 'max_parallel'
                   WHEN s.not_before > v_now THEN 'backoff'
                   WHEN _locks_conflict(s.requires_locks, NULL, l.keys, l.modes, l.steps) THEN 'locks'
                   ELSE 'claimable' END AS held_by
          FROM steps s JOIN campaigns c ON c.id = s.campaign_id
         WHERE s.status = 'pending' AND s.step_type = 'atomic' AND s.remaining_deps = 0
           AND c.status IN ('active', 'paused')
    ),
    slots AS (SELECT count(*) AS in_use FROM steps WHERE status = 'running' AND dispatched)
    SELECT jsonb_build_object(
        'ready_steps', (SELECT count(*) FROM ready),
        'held_back', coalesce((SELECT jsonb_object_agg(held_by, n)
                                 FROM (SELECT held_by, count(*) AS n FROM ready GROUP BY held_by) g), '{}'),
        'runner_slots', jsonb_build_object('in_use', (SELECT in_use FROM slots), 'cap', max_dispatched),
        'capacity_reached', max_dispatched IS NOT NULL AND (SELECT in_use FROM slots) >= max_dispatched));
END
$$;
