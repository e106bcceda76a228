-- Seeing a campaign (SPEC §16): reading the event log, a campaign's graph, what runs now, and
-- the health of the installation. Every function here only reads; the `sortie` CLI, the MCP
-- resources and the web view call these and never read the tables themselves.

-- `events()` pages the log by id. The log's primary key is (tx, id), ordered for get_updates;
-- a block-range index on id costs nearly nothing to keep (ids grow with the table's pages)
-- and lets a follower ask for "the events after id N" without reading the whole log.
CREATE INDEX events_id_range ON events USING brin (id);

CREATE FUNCTION _event_row(e events) RETURNS jsonb
LANGUAGE sql IMMUTABLE
AS $$
    SELECT jsonb_build_object('id', e.id, 'campaign_id', e.campaign_id, 'seq', e.seq, 'step_id', e.step_id,
                              'kind', e.kind, 'payload', e.payload, 'at', e.at);
$$;

-- A block-range index on the time too: on Citus the followers of every campaign page by it
-- (events() below), since ids come from each node's own range.
CREATE INDEX events_at_range ON events USING brin (at);

-- The log, oldest first. A reader for people (`sortie events`, the web view's stream, the MCP
-- resources' change feed): an event whose transaction commits after a later-ordered one may
-- appear behind a follower's position; get_updates is the delivery guarantee
-- (docs/decisions.md).
--   * Without a position (`after` NULL and `after_id` 0), the newest `limit` events, still
--     oldest first, so a viewer starts from what happened last.
--   * `after_id` N > 0: the events after id N. Ids order the log of one node; on Citus each
--     node gives ids from its own range, so this form is for single-node databases.
--   * `after`: the `next_after` of an earlier answer, an opaque position that holds on every
--     node: one campaign's log pages by its event number (seq, the campaign's own order);
--     every campaign's by id on one node, and on Citus by (at, campaign_id, seq) — `at` is
--     taken when the event is numbered, under its campaign's lock (events.sql). A position an
--     `after_id` call gave pages by id, as after_id does.
-- Answers {events, next_after_id, next_after, has_more}. Errors: invalid_argument (a negative
-- after_id; an `after` of another form than this call gives, with a number out of range, or
-- past the campaign's last event), not_found (no such campaign).
CREATE FUNCTION events(campaign_id uuid DEFAULT NULL, after_id bigint DEFAULT 0, "limit" integer DEFAULT 100,
                       after text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_limit integer := least(greatest(coalesce("limit", 100), 1), 1000);
    -- The order a position names: 's' one campaign's numbers, 'i' ids, 't' (at, campaign, seq).
    v_mode text := CASE WHEN campaign_id IS NOT NULL THEN 's' WHEN _on_citus() THEN 't' ELSE 'i' END;
    v_parts text[];
    v_id bigint := 0;
    v_seq bigint := 0;
    v_at timestamptz := '-infinity';
    v_campaign uuid := '00000000-0000-0000-0000-000000000000';
    v_start boolean := after IS NULL AND coalesce(after_id, 0) = 0;
    v_rows jsonb;
    v_last jsonb;
    v_next text;
BEGIN
    IF after_id IS NOT NULL AND after_id < 0 THEN
        PERFORM _raise('invalid_argument', 'after_id must be 0 or an event id');
    END IF;
    IF campaign_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    IF after IS NOT NULL THEN
        v_parts := regexp_match(after, '^(s|i)(\d{1,19})$');
        IF v_parts IS NULL THEN
            v_parts := regexp_match(after, '^(t)(\d{1,19})/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/(\d{1,19})$');
        END IF;
        -- An id position ('i', which after_id answers too) pages by id in any call.
        IF v_parts IS NOT NULL AND v_parts[1] = 'i' THEN
            v_mode := 'i';
        END IF;
        IF v_parts[1] IS DISTINCT FROM v_mode THEN
            v_parts := NULL;
        ELSE
            BEGIN
                IF v_mode = 't' THEN
                    v_at := timestamptz 'epoch' + v_parts[2]::bigint * interval '1 microsecond';
                    v_campaign := v_parts[3]::uuid;
                    v_seq := v_parts[4]::bigint;
                ELSIF v_mode = 's' THEN
                    v_seq := v_parts[2]::bigint;
                ELSE
                    v_id := v_parts[2]::bigint;
                END IF;
            EXCEPTION WHEN numeric_value_out_of_range OR datetime_field_overflow OR invalid_text_representation THEN
                v_parts := NULL;
            END;
        END IF;
        -- Another form than this call gives, a number beyond what it can name, or a campaign
        -- position past the campaign's last event.
        IF v_parts IS NULL
           OR (v_mode = 's' AND v_seq > (SELECT c.event_seq FROM campaigns c WHERE c.id = campaign_id)) THEN
            PERFORM _raise('invalid_argument', format(
                'after must be the next_after of an earlier events() call with the same campaign_id, not %L', left(after, 80)));
        END IF;
    ELSIF NOT v_start THEN
        -- after_id: the id order, as before positions (single node).
        v_mode := 'i';
        v_id := after_id;
    END IF;

    IF v_start THEN
        -- The newest, by the order of the position the answer gives.
        IF v_mode = 's' THEN
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.seq), '[]') INTO v_rows
              FROM (SELECT * FROM events e WHERE e.campaign_id = campaign_id ORDER BY e.seq DESC LIMIT v_limit) e;
        ELSIF v_mode = 't' THEN
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.at, e.campaign_id, e.seq), '[]') INTO v_rows
              FROM (SELECT * FROM events e ORDER BY e.at DESC, e.campaign_id DESC, e.seq DESC LIMIT v_limit) e;
        ELSE
            SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.id), '[]') INTO v_rows
              FROM (SELECT * FROM events e ORDER BY e.tx DESC, e.id DESC LIMIT v_limit) e;
        END IF;
    ELSIF v_mode = 's' THEN
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.seq), '[]') INTO v_rows
          FROM (SELECT * FROM events e WHERE e.campaign_id = campaign_id AND e.seq > v_seq
                 ORDER BY e.seq LIMIT v_limit) e;
    ELSIF v_mode = 't' THEN
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.at, e.campaign_id, e.seq), '[]') INTO v_rows
          FROM (SELECT * FROM events e
                 WHERE e.at >= v_at AND (e.at, e.campaign_id, e.seq) > (v_at, v_campaign, v_seq)
                 ORDER BY e.at, e.campaign_id, e.seq LIMIT v_limit) e;
    ELSE
        SELECT coalesce(jsonb_agg(_event_row(e) ORDER BY e.id), '[]') INTO v_rows
          FROM (SELECT * FROM events e
                 WHERE e.id > v_id AND (campaign_id IS NULL OR e.campaign_id = campaign_id)
                 ORDER BY e.id LIMIT v_limit) e;
    END IF;

    v_last := v_rows -> -1;
    IF v_mode = 's' THEN
        v_next := 's' || coalesce((v_last ->> 'seq')::bigint, v_seq);
    ELSIF v_mode = 't' THEN
        IF v_last IS NULL THEN
            -- Nothing after the position (or no log yet: the position before every event).
            v_next := 't' || CASE WHEN v_at = '-infinity' THEN 0 ELSE (extract(epoch FROM v_at) * 1000000)::bigint END
                      || '/' || v_campaign || '/' || v_seq;
        ELSE
            v_next := 't' || (extract(epoch FROM (v_last ->> 'at')::timestamptz) * 1000000)::bigint
                      || '/' || (v_last ->> 'campaign_id') || '/' || (v_last ->> 'seq');
        END IF;
    ELSE
        v_next := 'i' || coalesce((v_last ->> 'id')::bigint, v_id);
    END IF;
    RETURN jsonb_build_object(
        'events', v_rows,
        'next_after_id', coalesce((v_last ->> 'id')::bigint, after_id, 0),
        'next_after', v_next,
        'has_more', NOT v_start AND jsonb_array_length(v_rows) = v_limit);
END
$$;

-- The installation's health (SPEC §16). Facts are always reported; each becomes a problem
-- only once it has lasted `grace` (a claim in flight is an open transaction too, for a few
-- milliseconds). SECURITY DEFINER: other sessions' transactions in pg_stat_activity.
CREATE FUNCTION health(grace interval DEFAULT '30 seconds') RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_grace double precision := extract(epoch FROM coalesce(grace, interval '30 seconds'));
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
    v_oldest jsonb;
    v_leases jsonb;
    v_tables jsonb;
    v_notifications jsonb;
    v_stalled jsonb;
    v_problems jsonb := '[]';
BEGIN
    IF v_grace < 0 THEN
        PERFORM _raise('invalid_argument', 'grace must not be negative');
    END IF;
    PERFORM pg_stat_clear_snapshot();

    SELECT jsonb_build_object(
               'pid', a.pid, 'state', a.state, 'application_name', a.application_name,
               'age_seconds', round(extract(epoch FROM clock_timestamp() - a.xact_start)::numeric, 1),
               'query', left(a.query, 200),
               -- A transaction id: it wrote or locked rows, which rules may wait for. An old
               -- snapshot (backend_xmin) holds back the clean-up of dead rows. Neither holds
               -- get_updates back (events are numbered per campaign, updates.sql).
               'has_transaction_id', a.backend_xid IS NOT NULL,
               'holds_back_cleanup', a.backend_xmin IS NOT NULL)
      INTO v_oldest
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.xact_start IS NOT NULL
       AND a.backend_type = 'client backend'
     ORDER BY a.xact_start
     LIMIT 1;
    -- Idle in a transaction for `grace`: nobody is working in it, and whatever it locked waits
    -- for it (a campaign's rules, if it locked the campaign). Any transaction open for a minute
    -- or more holds back vacuum's clean-up of dead rows.
    IF v_oldest IS NOT NULL AND (v_oldest ->> 'state') LIKE 'idle in transaction%'
       AND (v_oldest ->> 'age_seconds')::double precision >= v_grace THEN
        v_problems := v_problems || jsonb_build_object('code', 'open_transaction',
            'message', format('pid %s has been idle in a transaction for %s s: what it locked waits for it, and vacuum cannot clean up behind it',
                              v_oldest ->> 'pid', v_oldest ->> 'age_seconds'));
    ELSIF v_oldest IS NOT NULL AND (v_oldest ->> 'age_seconds')::double precision >= greatest(v_grace, 60) THEN
        v_problems := v_problems || jsonb_build_object('code', 'open_transaction',
            'message', format('pid %s has held a transaction open for %s s (%s): vacuum cannot clean up dead rows behind it',
                              v_oldest ->> 'pid', v_oldest ->> 'age_seconds', v_oldest ->> 'state'));
    END IF;

    SELECT jsonb_build_object('count', count(*),
                              'oldest_expired_seconds', round(max(extract(epoch FROM v_now - s.lease_expires_at))::numeric, 1),
                              'step_ids', coalesce((array_agg(s.id ORDER BY s.lease_expires_at))[1:20], '{}'))
      INTO v_leases
      FROM steps s
     WHERE s.status = 'running' AND s.step_type = 'atomic' AND s.lease_expires_at < v_now;
    IF (v_leases ->> 'count')::bigint > 0 AND (v_leases ->> 'oldest_expired_seconds')::double precision >= v_grace THEN
        v_problems := v_problems || jsonb_build_object('code', 'expired_leases',
            'message', format('%s running steps have an expired lease that nothing reset (is sortie-runner running? reset_zombies() resets them)',
                              v_leases ->> 'count'));
    END IF;

    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'table', t.relname, 'live_rows', t.n_live_tup, 'dead_rows', t.n_dead_tup,
               'dead_ratio', round((t.n_dead_tup::numeric / greatest(t.n_live_tup + t.n_dead_tup, 1)), 3),
               'last_autovacuum', t.last_autovacuum) ORDER BY t.relname), '[]')
      INTO v_tables
      FROM pg_stat_user_tables t
     WHERE t.relid IN ('steps'::regclass, 'campaigns'::regclass, 'events'::regclass, 'notes'::regclass);
    SELECT v_problems || coalesce(jsonb_agg(jsonb_build_object('code', 'table_bloat',
               'message', format('%s is %s%% dead rows (%s): vacuum cannot keep up, often because of an old open transaction',
                                 x ->> 'table', round((x ->> 'dead_ratio')::numeric * 100), x ->> 'dead_rows'))), '[]')
      INTO v_problems
      FROM jsonb_array_elements(v_tables) x
     WHERE (x ->> 'dead_rows')::bigint >= 10000 AND (x ->> 'dead_ratio')::numeric >= 0.5;

    SELECT jsonb_build_object('count', count(*) FILTER (WHERE NOT n.delivered AND n.given_up_at IS NULL),
                              'given_up', count(*) FILTER (WHERE n.given_up_at IS NOT NULL),
                              'oldest_seconds', round(max(extract(epoch FROM now() - n.created_at))
                                                      FILTER (WHERE NOT n.delivered AND n.given_up_at IS NULL)::numeric, 1))
      INTO v_notifications
      FROM notifications n
     WHERE NOT n.delivered;
    IF (v_notifications ->> 'count')::bigint > 0
       AND (v_notifications ->> 'oldest_seconds')::double precision >= greatest(v_grace, 300) THEN
        v_problems := v_problems || jsonb_build_object('code', 'undelivered_notifications',
            'message', format('%s notifications are undelivered, the oldest for %s s (is sortie-runner running with SORTIE_WEBHOOK_URL?)',
                              v_notifications ->> 'count', v_notifications ->> 'oldest_seconds'));
    END IF;

    -- Active, nothing ready, nothing running, nobody asked a question: only the planner or a
    -- coordinator's add_steps can move it, or a dependency it waits for never resolves.
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', c.id, 'name', c.name, 'open_steps', c.open_steps,
                                                 'planner', c.planner,
                                                 'idle_seconds', round(extract(epoch FROM v_now - c.updated_at)::numeric, 1))
                              ORDER BY c.updated_at), '[]')
      INTO v_stalled
      FROM campaigns c
     WHERE c.status = 'active' AND c.ready_steps = 0 AND c.running_steps = 0
       AND NOT EXISTS (SELECT 1 FROM steps w WHERE w.campaign_id = c.id AND w.status = 'waiting_input');
    SELECT v_problems || coalesce(jsonb_agg(jsonb_build_object('code', 'stalled_campaign',
               'message', format('campaign %s (%s) is active with nothing ready and nothing running for %s s; %s',
                                 x ->> 'id', x ->> 'name', x ->> 'idle_seconds',
                                 CASE WHEN (x ->> 'open_steps')::int = 0
                                      THEN CASE x ->> 'planner' WHEN 'llm' THEN 'it waits for the planner (LITELLM_URL) or add_steps'
                                                ELSE 'it waits for add_steps or finish_campaign' END
                                      ELSE 'its open steps wait for something that is not moving' END))), '[]')
      INTO v_problems
      FROM jsonb_array_elements(v_stalled) x
     WHERE (x ->> 'idle_seconds')::double precision >= greatest(v_grace, 60);

    RETURN jsonb_build_object(
        'ok', jsonb_array_length(v_problems) = 0,
        'problems', v_problems,
        'oldest_transaction', v_oldest,
        'expired_leases', v_leases,
        'tables', v_tables,
        'undelivered_notifications', v_notifications,
        'stalled_campaigns', v_stalled,
        'checked_at', clock_timestamp());
END
$$;

-- A step as a graph node: what the CLI's tree, the Mermaid/DOT pictures and the web view show.
-- `spawned_by` is set on a subtask of spawn_and_continue (its parent is an atomic step); a
-- running step's duration is counted to `p_now`. Inlined into campaign_graph's query, so it
-- calls only built-in functions: Citus inlines it on the shard with only pg_catalog on the
-- search_path.
CREATE FUNCTION _graph_node(s steps, p_parent_type text, p_now timestamptz) RETURNS jsonb
LANGUAGE sql STABLE
AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'id', s.id, 'parent_id', s.parent_id, 'position', s.position, 'depth', s.depth,
        'action', s.action, 'agent', s.agent, 'step_type', s.step_type, 'status', s.status,
        'skip_cause', s.skip_cause, 'attempts', s.attempts, 'max_attempts', s.max_attempts,
        -- `attempts` counts failed attempts; `tries` adds the one running or that succeeded.
        'tries', s.attempts + CASE WHEN s.step_type = 'atomic' AND s.status IN ('running', 'waiting_input', 'done')
                                   THEN 1 ELSE 0 END,
        'continuation_of', s.continuation_of, 'continued_by', s.continued_by,
        'spawned_by', CASE WHEN p_parent_type = 'atomic' THEN s.parent_id END,
        'claim_owner', CASE WHEN s.status = 'running' THEN s.claim_owner END,
        'started_at', s.started_at, 'completed_at', s.completed_at,
        'duration_ms', coalesce(s.duration_ms,
                                CASE WHEN s.status = 'running' AND s.claimed_at IS NOT NULL
                                     THEN (extract(epoch FROM p_now - s.claimed_at) * 1000)::bigint END),
        'lease_expires_at', CASE WHEN s.status = 'running' THEN s.lease_expires_at END,
        'output_line', left(split_part(btrim(s.output, E' \n\r\t'), E'\n', 1), 200),
        'output_chars', length(s.output),
        'error', left(s.error, 300), 'question', s.question));
$$;

-- One campaign as nodes and edges (SPEC §16: the DAG after its splices). Edges: `dependency`
-- (from the step waited for to the waiting step), `spawned` (spawner to subtask) and
-- `continues` (spawner to its continuation). Containment in compound steps is each node's
-- parent_id.
CREATE FUNCTION campaign_graph(id uuid, max_steps integer DEFAULT 5000) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    c campaigns;
    v_limit integer := least(greatest(coalesce(max_steps, 5000), 1), 20000);
    v_total bigint;
    v_now timestamptz := _clock();
BEGIN
    IF id IS NULL THEN
        PERFORM _raise('invalid_argument', 'id is required: the campaign to draw');
    END IF;
    SELECT * INTO c FROM campaigns WHERE campaigns.id = id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', id));
    END IF;
    SELECT count(*) INTO v_total FROM steps WHERE steps.campaign_id = c.id;
    RETURN jsonb_build_object(
        'campaign', _campaign_summary(c) || jsonb_build_object('ready_steps', c.ready_steps),
        'step_counts', (SELECT coalesce(jsonb_object_agg(t.status, t.n), '{}')
                          FROM (SELECT s.status, count(*) AS n FROM steps s WHERE s.campaign_id = c.id GROUP BY s.status) t),
        'nodes', (SELECT coalesce(jsonb_agg(_graph_node(s, p.step_type, v_now) ORDER BY s.id), '[]')
                    FROM (SELECT * FROM steps WHERE steps.campaign_id = c.id ORDER BY steps.id LIMIT v_limit) s
                    LEFT JOIN steps p ON p.campaign_id = c.id AND p.id = s.parent_id),
        'edges', (SELECT coalesce(jsonb_agg(e ORDER BY e ->> 'kind', (e ->> 'to')::bigint, (e ->> 'from')::bigint), '[]') FROM (
                    SELECT jsonb_build_object('from', d.depends_on, 'to', d.step_id, 'kind', 'dependency') AS e
                      FROM step_dependencies d
                     WHERE d.campaign_id = c.id AND d.step_id <= (SELECT max(x.id) FROM (SELECT steps.id FROM steps WHERE steps.campaign_id = c.id ORDER BY steps.id LIMIT v_limit) x)
                    UNION ALL
                    SELECT jsonb_build_object('from', s.parent_id, 'to', s.id, 'kind', 'spawned')
                      FROM steps s JOIN steps p ON p.campaign_id = s.campaign_id AND p.id = s.parent_id AND p.step_type = 'atomic'
                     WHERE s.campaign_id = c.id
                    UNION ALL
                    SELECT jsonb_build_object('from', s.continuation_of, 'to', s.id, 'kind', 'continues')
                      FROM steps s
                     WHERE s.campaign_id = c.id AND s.continuation_of IS NOT NULL) edges),
        'total_steps', v_total,
        'truncated', v_total > v_limit);
END
$$;

-- What runs now (`sortie top`): running atomic steps with their lease left, and the progress
-- of every active or paused campaign.
CREATE FUNCTION activity("limit" integer DEFAULT 50) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_limit integer := least(greatest(coalesce("limit", 50), 1), 1000);
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    RETURN jsonb_build_object(
        'running', (SELECT coalesce(jsonb_agg(r ORDER BY r ->> 'started_at'), '[]') FROM (
            SELECT jsonb_strip_nulls(jsonb_build_object(
                       'step_id', s.id, 'campaign_id', s.campaign_id, 'campaign_name', c.name,
                       'action', s.action, 'agent', s.agent, 'claim_owner', s.claim_owner,
                       'attempts', s.attempts, 'started_at', s.claimed_at,
                       'running_seconds', round(extract(epoch FROM v_now - s.claimed_at)::numeric, 1),
                       'lease_seconds_left', round(extract(epoch FROM s.lease_expires_at - v_now)::numeric, 1))) AS r
              FROM steps s JOIN campaigns c ON c.id = s.campaign_id
             WHERE s.status = 'running' AND s.step_type = 'atomic'
             ORDER BY s.claimed_at
             LIMIT v_limit) running),
        'campaigns', (SELECT coalesce(jsonb_agg(x ORDER BY x ->> 'created_at' DESC), '[]') FROM (
            SELECT jsonb_build_object('id', c.id, 'name', c.name, 'status', c.status, 'priority', c.priority,
                                      'progress', c.progress, 'open_steps', c.open_steps,
                                      'running_steps', c.running_steps, 'ready_steps', c.ready_steps,
                                      'step_counts', (SELECT coalesce(jsonb_object_agg(t.status, t.n), '{}')
                                                        FROM (SELECT s.status, count(*) AS n FROM steps s
                                                               WHERE s.campaign_id = c.id AND s.step_type = 'atomic'
                                                               GROUP BY s.status) t),
                                      'created_at', c.created_at) AS x
              FROM campaigns c
             WHERE c.status IN ('active', 'paused')
             ORDER BY c.created_at DESC
             LIMIT v_limit) active),
        'at', v_now);
END
$$;
