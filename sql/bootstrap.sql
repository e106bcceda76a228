-- Sortie's schema: tables, constraints and the indexes the readiness and claim paths use.
--
-- Where the objects go. `CREATE EXTENSION sortie SCHEMA other` installs into `other`. Without
-- SCHEMA, PostgreSQL targets the first schema on search_path (normally `public`); a job engine's
-- tables do not belong there, so that case installs into a schema of its own, `sortie`, created
-- here and dropped with the extension. Every API function is created with the search_path set
-- below (`SET search_path FROM CURRENT`), so callers' search_path never changes what a rule
-- reads; internal helpers run under their caller's, which avoids a search_path switch per call.
DO $bootstrap$
DECLARE
    target text := CASE WHEN '@extschema@' = 'public' THEN 'sortie' ELSE '@extschema@' END;
    vector_schema text;
BEGIN
    IF target = 'sortie' AND '@extschema@' = 'public' THEN
        CREATE SCHEMA sortie;
    END IF;
    SELECT n.nspname INTO vector_schema
      FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'vector';
    PERFORM set_config('search_path',
        format('%I, %I, pg_catalog, pg_temp', target, coalesce(vector_schema, 'public')), true);
END
$bootstrap$;

-- Errors: one stable code per kind of refusal, each with its own SQLSTATE (class SR) so that
-- clients map errors without parsing text. The message starts with the code.
CREATE FUNCTION _raise(code text, message text) RETURNS void
-- VOLATILE: it never returns, and a call with constant arguments must not be folded (and so
-- raised) by the planner while it plans a statement that may never reach it.
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    RAISE EXCEPTION USING
        MESSAGE = code || ': ' || message,
        ERRCODE = CASE code
            WHEN 'not_found'        THEN 'SR001'
            WHEN 'invalid_state'    THEN 'SR002'
            WHEN 'stale_claim'      THEN 'SR003'
            WHEN 'depth_limit'      THEN 'SR004'
            WHEN 'invalid_argument' THEN 'SR005'
            WHEN 'budget_exhausted' THEN 'SR006'
            WHEN 'cycle'            THEN 'SR007'
            WHEN 'skipped'          THEN 'SR008'
            WHEN 'forbidden'        THEN 'SR009'
            WHEN 'choice_required'  THEN 'SR010'
            ELSE 'SR000'
        END;
END
$$;

-- The one clock every rule compares against (SPEC §11). Tests move time with
-- `SET sortie.fake_now = '…'` instead of sleeping. PL/pgSQL, so that it is never inlined: Citus
-- computes a call of a STABLE function once for a change of a distributed table, but refuses
-- the COALESCE an inlined body would leave in the statement (engine/locking.sql, distribution).
CREATE FUNCTION _clock() RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN coalesce(nullif(current_setting('sortie.fake_now', true), '')::timestamptz, now());
END
$$;

CREATE FUNCTION _priority_weight(priority text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE priority WHEN 'urgent' THEN 8 WHEN 'high' THEN 4 WHEN 'normal' THEN 2
                           WHEN 'low' THEN 1 WHEN 'background' THEN 0.5 END::double precision $$;

-- Column rules as domains rather than table CHECKs. PostgreSQL re-reads and re-plans every
-- CHECK of a table for each INSERT or UPDATE statement it starts, which on the claim and
-- completion path cost more than the statements themselves; a domain's check is planned once
-- per session (typcache) and runs only when its column is assigned. The rules that tie several
-- columns of a row together are one CHECK per table that calls a function (below).
CREATE DOMAIN nonneg_int AS integer CHECK (VALUE >= 0);
CREATE DOMAIN nonneg_bigint AS bigint CHECK (VALUE >= 0);
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE DOMAIN positive_bigint AS bigint CHECK (VALUE > 0);
CREATE DOMAIN nonblank_text AS text CHECK (length(btrim(VALUE)) > 0);
CREATE DOMAIN campaign_name AS text CHECK (length(VALUE) BETWEEN 1 AND 200);
CREATE DOMAIN campaign_status AS text CHECK (VALUE IN ('active', 'paused', 'done', 'failed', 'cancelled'));
CREATE DOMAIN campaign_priority AS text CHECK (VALUE IN ('urgent', 'high', 'normal', 'low', 'background'));
CREATE DOMAIN depth_limit AS integer CHECK (VALUE BETWEEN 0 AND 64);
CREATE DOMAIN failure_policy AS text CHECK (VALUE IN ('continue', 'fail_fast'));
CREATE DOMAIN metric_direction AS text CHECK (VALUE IN ('max', 'min'));
CREATE DOMAIN planner_kind AS text CHECK (VALUE IN ('llm', 'none'));
CREATE DOMAIN jsonb_array AS jsonb CHECK (jsonb_typeof(VALUE) = 'array');
CREATE DOMAIN jsonb_object AS jsonb CHECK (jsonb_typeof(VALUE) = 'object');
CREATE DOMAIN step_type AS text CHECK (VALUE IN ('atomic', 'parallel_group', 'sequence', 'for_each'));
CREATE DOMAIN step_status AS text
    CHECK (VALUE IN ('pending', 'running', 'waiting_input', 'done', 'failed', 'skipped'));
-- Why a step was skipped: an abort and an early-met threshold resolve it; the rest do not.
CREATE DOMAIN skip_cause AS text
    CHECK (VALUE IN ('abort', 'threshold', 'dependency', 'fail_fast', 'parent', 'campaign'));
CREATE DOMAIN attempt_limit AS integer CHECK (VALUE BETWEEN 1 AND 100);
CREATE DOMAIN event_kind AS text CHECK (VALUE ~ '^[a-z_]+\.[a-z_]+$');

-- The rules that tie several columns of a row together, one function per table, checked by
-- one CHECK each. A CHECK written out as an expression is parsed and planned again for every
-- statement that writes the table; a call of a PL/pgSQL function is one small node, and its
-- body is compiled once per session (sortie-bench, 4 workers: the claim and completion cycle
-- ran 17% faster than with the same rules written as five CHECKs on steps).
CREATE FUNCTION _campaign_row_consistent(p_status campaign_status, p_completed_at timestamptz)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    -- A campaign has ended exactly when it has an end time.
    RETURN (p_status IN ('done', 'failed', 'cancelled')) = (p_completed_at IS NOT NULL);
END
$$;

CREATE FUNCTION _step_row_consistent(p_status step_status, p_step_type step_type, p_completed_at timestamptz,
                                    p_claim_token uuid, p_members integer, p_skip_cause skip_cause)
RETURNS boolean
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
AS $$
BEGIN
    RETURN (p_status IN ('done', 'failed', 'skipped')) = (p_completed_at IS NOT NULL)
       -- A live claim is a running atomic step's; a skipped step keeps its revoked token so a
       -- late worker is told `skipped` rather than `stale_claim`.
       AND (p_status <> 'running' OR p_step_type <> 'atomic' OR p_claim_token IS NOT NULL)
       AND (p_claim_token IS NULL OR p_status IN ('running', 'skipped'))
       AND (p_step_type <> 'atomic' OR p_members = 0)
       AND (p_status <> 'skipped' OR p_skip_cause IS NOT NULL);
END
$$;

CREATE TABLE campaigns (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                campaign_name NOT NULL,
    goal                nonblank_text NOT NULL,
    status              campaign_status NOT NULL DEFAULT 'active',
    status_reason       text,
    strategy            text,
    -- User guidance from steer_campaign, newest last; the planner reads it and never writes it.
    guidance            jsonb_array NOT NULL DEFAULT '[]',
    progress            text,
    channel             text,
    priority            campaign_priority NOT NULL DEFAULT 'normal',
    weight              double precision GENERATED ALWAYS AS (_priority_weight(priority)) STORED,
    slot_seconds_used   double precision NOT NULL DEFAULT 0,
    max_depth           depth_limit NOT NULL DEFAULT 4,
    max_parallel        positive_int,
    token_budget        positive_bigint,
    tokens_used         nonneg_bigint NOT NULL DEFAULT 0,
    failure_policy      failure_policy NOT NULL DEFAULT 'continue',
    success_metric      text,
    success_target      double precision,
    success_direction   metric_direction NOT NULL DEFAULT 'max',
    benchmark_command   text,
    -- SPEC §17: set when a campaign with a benchmark_command drains; a runner takes it (with a
    -- lease), runs the command and records the outcome (record_benchmark), which clears it.
    benchmark_due       boolean NOT NULL DEFAULT false,
    benchmark_lease_until timestamptz,
    -- The newest step when the runner holding the lease took it: a run that started before
    -- newer steps were added measured old work and judges nothing.
    benchmark_seen_step bigint,
    -- The benchmark runs so far (each one an iteration) and the last one's outcome:
    -- {exit_code, metric_line, metric_value, output_tail, at}.
    benchmark_runs      nonneg_int NOT NULL DEFAULT 0,
    last_benchmark      jsonb,
    scope               text,
    max_iterations      positive_int,
    planner             planner_kind NOT NULL DEFAULT 'llm',
    -- A runner consulting the planner holds this lease, so one campaign is planned once at a time.
    planner_lease_until timestamptz,
    planner_iterations  integer NOT NULL DEFAULT 0,
    workflow            text,
    workflow_hash       text,
    -- A workflow instance's current step (a step name of its pinned definition).
    workflow_step       text,
    context             jsonb_object NOT NULL DEFAULT '{}',
    -- Counters kept by the rules, checked by check_invariants(): steps not yet terminal,
    -- atomic steps running now, atomic steps pending with every dependency met.
    open_steps          nonneg_int NOT NULL DEFAULT 0,
    running_steps       nonneg_int NOT NULL DEFAULT 0,
    ready_steps         nonneg_int NOT NULL DEFAULT 0,
    -- No ready step of the campaign has a lower id (SPEC §18): claims scan `steps_ready` from
    -- here, past the entries finished history left behind. Raised by claims, lowered by
    -- _lower_ready_floor() in every rule that makes a step ready again (readiness.sql).
    ready_floor         bigint NOT NULL DEFAULT 0,
    -- The last number of the campaign's event order (events.seq, SPEC §10 delta reads): moved
    -- by _emit() under the campaign's row lock, which the rule holds to its commit.
    event_seq           bigint NOT NULL DEFAULT 0 CHECK (event_seq >= 0),
    next_action_at      timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    CONSTRAINT campaigns_row_consistent CHECK (_campaign_row_consistent(status, completed_at))
);

-- No index covers the counters or slot usage: they change on every claim and completion, and
-- leaving them unindexed keeps those updates HOT. The fair-share pick reads the (small) set of
-- campaigns directly. Every rule of a campaign writes its row, so rows of busy campaigns
-- sharing a page contend for it: the lowest fill factor keeps two or so rows per page and
-- room for their new versions (sortie-bench, 16 workers on 16 campaigns: 4,215 cycles/s
-- against 3,100–3,500 in the runs before at fill factor 50; this machine's noise is large).
ALTER TABLE campaigns SET (fillfactor = 10);
CREATE INDEX campaigns_status ON campaigns (status, created_at DESC);

CREATE TABLE steps (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id          uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    parent_id            bigint REFERENCES steps (id) ON DELETE CASCADE,
    depth                nonneg_int NOT NULL DEFAULT 0,
    position             integer NOT NULL DEFAULT 0,
    action               nonblank_text NOT NULL,
    agent                text,
    step_type            step_type NOT NULL DEFAULT 'atomic',
    status               step_status NOT NULL DEFAULT 'pending',
    skip_cause           skip_cause,
    failure_policy       failure_policy NOT NULL DEFAULT 'continue',
    completion_threshold positive_int,
    -- Compound steps: children that count toward the threshold (a spliced step hands its
    -- place to its continuation), and how many of them resolved or failed.
    members              nonneg_int NOT NULL DEFAULT 0,
    members_resolved     nonneg_int NOT NULL DEFAULT 0,
    members_failed       nonneg_int NOT NULL DEFAULT 0,
    -- Dependencies not yet done, plus one while a compound parent is itself still waiting:
    -- a step is ready exactly when this is 0 (SPEC §10: count, never re-scan predecessors).
    remaining_deps       nonneg_int NOT NULL DEFAULT 0,
    input                jsonb,
    question             text,
    answer               text,
    output               text,
    error                text,
    fingerprint          text,
    continuation_of      bigint REFERENCES steps (id) ON DELETE CASCADE,
    -- Set on a spliced step: its continuation, which takes its place for later dependents.
    continued_by         bigint REFERENCES steps (id) ON DELETE SET NULL,
    attempts             nonneg_int NOT NULL DEFAULT 0,
    max_attempts         attempt_limit NOT NULL DEFAULT 3,
    not_before           timestamptz NOT NULL DEFAULT '-infinity',
    claim_owner          text,
    claim_token          uuid,
    claimed_at           timestamptz,
    heartbeat_at         timestamptz,
    lease_expires_at     timestamptz,
    requires_locks       text[] NOT NULL DEFAULT '{}',
    -- SPEC §17: a command that must pass before the step is done; while it runs the step stays
    -- running with the worker's summary stored (verification_requested_at ≥ claimed_at), and
    -- its output is kept as `verification`.
    verify               text,
    verification_requested_at timestamptz,
    verification         text,
    -- Whether the current claim is a runner's dispatch, which uses one of the runner slots
    -- (SPEC §13: SORTIE_MAX_CONCURRENT); a pull-mode worker's claim does not.
    dispatched           boolean NOT NULL DEFAULT false,
    tokens_used          nonneg_bigint NOT NULL DEFAULT 0,
    duration_ms          bigint,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    completed_at         timestamptz,
    CONSTRAINT steps_row_consistent
        CHECK (_step_row_consistent(status, step_type, completed_at, claim_token, members, skip_cause))
);

-- The ready set (SPEC §10): small, partial, ordered the way claims take it.
CREATE INDEX steps_ready ON steps (campaign_id, id)
    WHERE status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0;
CREATE INDEX steps_running_lease ON steps (lease_expires_at) WHERE status = 'running' AND step_type = 'atomic';
CREATE INDEX steps_dispatched ON steps (id) WHERE status = 'running' AND dispatched;
CREATE INDEX steps_campaign ON steps (campaign_id, id);
CREATE INDEX steps_parent ON steps (parent_id, position) WHERE parent_id IS NOT NULL;
CREATE INDEX steps_fingerprint ON steps (campaign_id, fingerprint) WHERE fingerprint IS NOT NULL;
CREATE INDEX steps_waiting ON steps (campaign_id) WHERE status = 'waiting_input';
CREATE INDEX steps_continuation_of ON steps (continuation_of) WHERE continuation_of IS NOT NULL;
-- For the foreign keys' ON DELETE actions when prune() removes steps (SPEC §18): without it
-- each removed step had the whole table scanned for steps it continued.
CREATE INDEX steps_continued_by ON steps (continued_by) WHERE continued_by IS NOT NULL;

CREATE TABLE step_dependencies (
    campaign_id uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step_id     bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    depends_on  bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    PRIMARY KEY (step_id, depends_on),
    CHECK (step_id <> depends_on)
);
CREATE INDEX step_dependencies_depends_on ON step_dependencies (depends_on);

-- Append-only log of every state change. `seq` numbers a campaign's events in the order their
-- transactions commit (the campaign's event_seq, taken under its row lock): get_updates keeps a
-- position per consumer and campaign, so an event committed late can never fall behind it, and
-- the order is the campaign's own, wherever its rows live (docs/scale-out.md).
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    tx          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- Not a foreign key: its check would lock the campaign's row once more for every event,
    -- on a page every rule of that campaign is already working on; every rule holds the
    -- campaign locked while it logs. prune() deletes a removed campaign's events.
    campaign_id uuid,
    step_id     bigint,
    kind        event_kind NOT NULL,
    payload     jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now(),
    seq         bigint NOT NULL,
    -- The log's newest-first order (events()). `id` alone is unique too, but a second
    -- always-rightmost index would be one more page every logging transaction writes.
    PRIMARY KEY (tx, id)
);
CREATE UNIQUE INDEX events_campaign_seq ON events (campaign_id, seq);


-- A get_updates consumer: its row serialises the consumer's reads; its positions are in
-- event_positions.
CREATE TABLE cursors (
    consumer      text PRIMARY KEY CHECK (length(consumer) BETWEEN 1 AND 300),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- How far a get_updates consumer has read each campaign's events (SPEC §10): the last
-- events.seq handed to it. No row: nothing read yet.
CREATE TABLE event_positions (
    campaign_id uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    consumer    text NOT NULL,
    seq         bigint NOT NULL,
    PRIMARY KEY (campaign_id, consumer)
);

CREATE TABLE notifications (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id       uuid REFERENCES campaigns (id) ON DELETE CASCADE,
    level             text NOT NULL CHECK (level IN ('milestone', 'done', 'error', 'info')),
    message           text NOT NULL,
    channel           text,
    delivered         boolean NOT NULL DEFAULT false,
    delivery_attempts integer NOT NULL DEFAULT 0 CHECK (delivery_attempts >= 0),
    last_error        text,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    -- Set when delivery stopped for good: refused by the webhook (a 4xx other than 408 and
    -- 429), or 10 attempts failed (SPEC §13).
    given_up_at       timestamptz
);
CREATE INDEX notifications_undelivered ON notifications (next_attempt_at) WHERE NOT delivered AND given_up_at IS NULL;

-- Hierarchical lock keys held by running steps: `a/b` conflicts with `a` and with `a/b/c`;
-- two `shared` holders of one key do not conflict.
CREATE TABLE resource_leases (
    key         text NOT NULL CHECK (length(key) > 0),
    mode        text NOT NULL CHECK (mode IN ('exclusive', 'shared')),
    campaign_id uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step_id     bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (key, step_id)
);
CREATE INDEX resource_leases_step ON resource_leases (step_id);

CREATE TABLE workflows (
    name        text NOT NULL,
    hash        text NOT NULL,
    definition  jsonb NOT NULL,
    loaded_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, hash)
);

-- One row per advance or resume of a workflow instance: what was reported on which step, and
-- the next step determined from it.
CREATE TABLE workflow_history (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id          uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step_name            text,
    report               jsonb,
    outcome_status       text,
    determined_next_step text,
    decided_by           text NOT NULL CHECK (decided_by IN ('start', 'transition', 'choice', 'resume')),
    at                   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workflow_history_campaign ON workflow_history (campaign_id, id);

-- Notes carry an embedding whose dimension is fixed when the extension is created:
-- `SET sortie.embedding_dim = 768` before CREATE EXTENSION to change the default 384.
DO $notes$
DECLARE
    dim integer := coalesce(nullif(current_setting('sortie.embedding_dim', true), '')::integer, 384);
BEGIN
    IF dim NOT BETWEEN 1 AND 16000 THEN
        PERFORM _raise('invalid_argument', format('sortie.embedding_dim must be 1..16000, not %s', dim));
    END IF;
    EXECUTE format($table$
        CREATE TABLE notes (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            campaign_id     uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
            step_id         bigint REFERENCES steps (id) ON DELETE SET NULL,
            agent           text,
            content         text NOT NULL CHECK (length(btrim(content)) > 0),
            tags            text[] NOT NULL DEFAULT '{}',
            embedding       vector(%s),
            embedding_model text,
            content_tsv     tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED,
            created_at      timestamptz NOT NULL DEFAULT now()
        )$table$, dim);
END
$notes$;
CREATE INDEX notes_embedding ON notes USING hnsw (embedding vector_cosine_ops);
CREATE INDEX notes_content_tsv ON notes USING gin (content_tsv);
CREATE INDEX notes_tags ON notes USING gin (tags);
CREATE INDEX notes_campaign ON notes (campaign_id, id DESC);
CREATE INDEX notes_unembedded ON notes (id) WHERE embedding IS NULL;
-- notes.step_id's ON DELETE SET NULL looks notes up by step when steps are removed (prune).
CREATE INDEX notes_step ON notes (step_id) WHERE step_id IS NOT NULL;
