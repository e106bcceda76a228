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
CREATE FUNCTION raise(code text, message text) RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
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
            ELSE 'SR000'
        END;
END
$$;

-- The one clock every rule compares against (SPEC §11). Tests move time with
-- `SET sortie.fake_now = '…'` instead of sleeping.
CREATE FUNCTION clock() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(nullif(current_setting('sortie.fake_now', true), '')::timestamptz, now()) $$;

CREATE FUNCTION priority_weight(priority text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE priority WHEN 'urgent' THEN 8 WHEN 'high' THEN 4 WHEN 'normal' THEN 2
                           WHEN 'low' THEN 1 WHEN 'background' THEN 0.5 END::double precision $$;

CREATE TABLE campaigns (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name                text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    goal                text NOT NULL CHECK (length(btrim(goal)) > 0),
    status              text NOT NULL DEFAULT 'active'
                        CHECK (status IN ('active', 'paused', 'done', 'failed', 'cancelled')),
    status_reason       text,
    strategy            text,
    -- User guidance from steer_campaign, newest last; the planner reads it and never writes it.
    guidance            jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(guidance) = 'array'),
    progress            text,
    channel             text,
    priority            text NOT NULL DEFAULT 'normal'
                        CHECK (priority IN ('urgent', 'high', 'normal', 'low', 'background')),
    weight              double precision GENERATED ALWAYS AS (priority_weight(priority)) STORED,
    slot_seconds_used   double precision NOT NULL DEFAULT 0,
    max_depth           integer NOT NULL DEFAULT 4 CHECK (max_depth BETWEEN 0 AND 64),
    max_parallel        integer CHECK (max_parallel > 0),
    token_budget        bigint CHECK (token_budget > 0),
    tokens_used         bigint NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    failure_policy      text NOT NULL DEFAULT 'continue' CHECK (failure_policy IN ('continue', 'fail_fast')),
    success_metric      text,
    success_target      double precision,
    success_direction   text NOT NULL DEFAULT 'max' CHECK (success_direction IN ('max', 'min')),
    benchmark_command   text,
    scope               text,
    max_iterations      integer CHECK (max_iterations > 0),
    planner             text NOT NULL DEFAULT 'llm' CHECK (planner IN ('llm', 'none')),
    -- A runner consulting the planner holds this lease, so one campaign is planned once at a time.
    planner_lease_until timestamptz,
    planner_iterations  integer NOT NULL DEFAULT 0,
    workflow            text,
    workflow_hash       text,
    context             jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(context) = 'object'),
    -- Counters kept by the rules, checked by check_invariants(): steps not yet terminal,
    -- atomic steps running now, atomic steps pending with every dependency met.
    open_steps          integer NOT NULL DEFAULT 0 CHECK (open_steps >= 0),
    running_steps       integer NOT NULL DEFAULT 0 CHECK (running_steps >= 0),
    ready_steps         integer NOT NULL DEFAULT 0 CHECK (ready_steps >= 0),
    next_action_at      timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    CHECK ((status IN ('done', 'failed', 'cancelled')) = (completed_at IS NOT NULL))
);

-- No index covers the counters or slot usage: they change on every claim and completion, and
-- leaving them unindexed keeps those updates HOT. The fair-share pick reads the (small) set of
-- campaigns directly.
ALTER TABLE campaigns SET (fillfactor = 50);
CREATE INDEX campaigns_status ON campaigns (status, created_at DESC);

CREATE TABLE steps (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    campaign_id          uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    parent_id            bigint REFERENCES steps (id) ON DELETE CASCADE,
    depth                integer NOT NULL DEFAULT 0 CHECK (depth >= 0),
    position             integer NOT NULL DEFAULT 0,
    action               text NOT NULL CHECK (length(btrim(action)) > 0),
    agent                text,
    step_type            text NOT NULL DEFAULT 'atomic'
                         CHECK (step_type IN ('atomic', 'parallel_group', 'sequence', 'for_each')),
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'running', 'waiting_input', 'done', 'failed', 'skipped')),
    -- Why a step was skipped: an abort and an early-met threshold resolve it; the rest do not.
    skip_cause           text CHECK (skip_cause IN ('abort', 'threshold', 'dependency', 'fail_fast',
                                                    'parent', 'campaign')),
    failure_policy       text NOT NULL DEFAULT 'continue' CHECK (failure_policy IN ('continue', 'fail_fast')),
    completion_threshold integer CHECK (completion_threshold > 0),
    -- Compound steps: children that count toward the threshold (a spliced step hands its
    -- place to its continuation), and how many of them resolved or failed.
    members              integer NOT NULL DEFAULT 0 CHECK (members >= 0),
    members_resolved     integer NOT NULL DEFAULT 0 CHECK (members_resolved >= 0),
    members_failed       integer NOT NULL DEFAULT 0 CHECK (members_failed >= 0),
    -- Dependencies not yet done, plus one while a compound parent is itself still waiting:
    -- a step is ready exactly when this is 0 (SPEC §10: count, never re-scan predecessors).
    remaining_deps       integer NOT NULL DEFAULT 0 CHECK (remaining_deps >= 0),
    input                jsonb,
    question             text,
    answer               text,
    output               text,
    error                text,
    fingerprint          text,
    continuation_of      bigint REFERENCES steps (id) ON DELETE CASCADE,
    -- Set on a spliced step: its continuation, which takes its place for later dependents.
    continued_by         bigint REFERENCES steps (id) ON DELETE SET NULL,
    attempts             integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts         integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 100),
    not_before           timestamptz NOT NULL DEFAULT '-infinity',
    claim_owner          text,
    claim_token          uuid,
    claimed_at           timestamptz,
    heartbeat_at         timestamptz,
    lease_expires_at     timestamptz,
    requires_locks       text[] NOT NULL DEFAULT '{}',
    tokens_used          bigint NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    duration_ms          bigint,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    completed_at         timestamptz,
    CHECK ((status IN ('done', 'failed', 'skipped')) = (completed_at IS NOT NULL)),
    -- A live claim is a running atomic step's; a skipped step keeps its revoked token so a late
    -- worker is told `skipped` rather than `stale_claim`.
    CHECK (status <> 'running' OR step_type <> 'atomic' OR claim_token IS NOT NULL),
    CHECK (claim_token IS NULL OR status IN ('running', 'skipped')),
    CHECK (step_type <> 'atomic' OR members = 0),
    CHECK (status <> 'skipped' OR skip_cause IS NOT NULL)
);

-- The ready set (SPEC §10): small, partial, ordered the way claims take it.
CREATE INDEX steps_ready ON steps (campaign_id, id)
    WHERE status = 'pending' AND step_type = 'atomic' AND remaining_deps = 0;
CREATE INDEX steps_running_lease ON steps (lease_expires_at) WHERE status = 'running' AND step_type = 'atomic';
CREATE INDEX steps_campaign ON steps (campaign_id, id);
CREATE INDEX steps_parent ON steps (parent_id, position) WHERE parent_id IS NOT NULL;
CREATE INDEX steps_fingerprint ON steps (campaign_id, fingerprint) WHERE fingerprint IS NOT NULL;
CREATE INDEX steps_waiting ON steps (campaign_id) WHERE status = 'waiting_input';
CREATE INDEX steps_continuation_of ON steps (continuation_of) WHERE continuation_of IS NOT NULL;

CREATE TABLE step_dependencies (
    campaign_id uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step_id     bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    depends_on  bigint NOT NULL REFERENCES steps (id) ON DELETE CASCADE,
    PRIMARY KEY (step_id, depends_on),
    CHECK (step_id <> depends_on)
);
CREATE INDEX step_dependencies_depends_on ON step_dependencies (depends_on);

-- Append-only log of every state change. `tx` orders delta reads (get_updates) safely: a
-- reader only passes events of transactions older than every one still running, so an event
-- committed late can never fall behind a consumer's cursor.
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx          xid8 NOT NULL DEFAULT pg_current_xact_id(),
    campaign_id uuid REFERENCES campaigns (id) ON DELETE CASCADE,
    step_id     bigint,
    kind        text NOT NULL CHECK (kind ~ '^[a-z_]+\.[a-z_]+$'),
    payload     jsonb NOT NULL DEFAULT '{}',
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_order ON events (tx, id);
CREATE INDEX events_campaign_order ON events (campaign_id, tx, id);

CREATE TABLE cursors (
    consumer      text PRIMARY KEY CHECK (length(consumer) BETWEEN 1 AND 300),
    last_tx       xid8 NOT NULL DEFAULT '0',
    last_event_id bigint NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT now()
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
    delivered_at      timestamptz
);
CREATE INDEX notifications_undelivered ON notifications (next_attempt_at) WHERE NOT delivered;

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

-- Notes carry an embedding whose dimension is fixed when the extension is created:
-- `SET sortie.embedding_dim = 768` before CREATE EXTENSION to change the default 384.
DO $notes$
DECLARE
    dim integer := coalesce(nullif(current_setting('sortie.embedding_dim', true), '')::integer, 384);
BEGIN
    IF dim NOT BETWEEN 1 AND 16000 THEN
        PERFORM raise('invalid_argument', format('sortie.embedding_dim must be 1..16000, not %s', dim));
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
