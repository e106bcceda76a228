-- Delta reads for coordinators (SPEC §2 events, §5 get_updates).
--
-- Each consumer keeps a cursor (transaction, event id). A read only passes events of
-- transactions older than every transaction of this database still running, so an event whose
-- transaction commits late can never end up behind a cursor and be missed. Transactions of
-- other databases cannot write these events and do not hold reads back.

-- A 32-bit xid of a running transaction as the 64-bit xid8 the events carry.
CREATE FUNCTION _widen_xid(p_xid xid) RETURNS xid8
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    WITH cur AS (SELECT pg_snapshot_xmax(pg_current_snapshot())::text::numeric AS xmax),
    guess AS (SELECT floor(xmax / 4294967296) * 4294967296 + p_xid::text::numeric AS x, xmax FROM cur)
    SELECT (CASE WHEN x > xmax THEN x - 4294967296 ELSE x END)::text::xid8 FROM guess;
$$;

-- Events of transactions below this are all committed or aborted. SECURITY DEFINER: reading
-- other sessions' transaction ids needs the installing role's view of pg_stat_activity.
CREATE FUNCTION _event_horizon() RETURNS xid8
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path FROM CURRENT
AS $$
DECLARE
    v_next xid8 := pg_snapshot_xmax(pg_current_snapshot());
    v_running xid8;
    v_prepared xid8;
BEGIN
    -- The backend status view is cached per transaction; a second read must be fresh.
    PERFORM pg_stat_clear_snapshot();
    SELECT min(_widen_xid(a.backend_xid)) INTO v_running
      FROM pg_stat_activity a
     WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.backend_xid IS NOT NULL;
    SELECT min(_widen_xid(p.transaction)) INTO v_prepared FROM pg_prepared_xacts p WHERE p.database = current_database();
    RETURN least(v_next, v_running, v_prepared);
END
$$;

CREATE FUNCTION get_updates(id uuid DEFAULT NULL, consumer text DEFAULT 'default', "limit" integer DEFAULT 200)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_key text;
    v_cursor cursors;
    v_horizon xid8 := _event_horizon();
    v_limit integer := least(greatest(coalesce("limit", 200), 1), 1000);
    v_page events[];
    v_done_campaigns uuid[];
    v_done_steps bigint[];
    v_note_campaigns uuid[];
    v_note_ids bigint[];
    v_completed jsonb;
    v_notes jsonb;
BEGIN
    IF consumer IS NULL OR btrim(consumer) = '' OR length(consumer) > 200 THEN
        PERFORM _raise('invalid_argument', 'consumer must be a name of 1 to 200 characters');
    END IF;
    IF id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', id));
    END IF;
    v_key := consumer || '@' || coalesce(id::text, '*');
    INSERT INTO cursors (consumer) VALUES (v_key) ON CONFLICT ON CONSTRAINT cursors_pkey DO NOTHING;
    SELECT * INTO v_cursor FROM cursors WHERE cursors.consumer = v_key FOR UPDATE;

    -- The page is an array, not a temporary table: creating and dropping a table per call
    -- bloats the catalog and makes every commit wait for its WAL flush. Its rows are built from
    -- their columns: Citus hands a whole row of a subquery back as a record it cannot read.
    SELECT coalesce(array_agg(ROW(e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at)::events
                              ORDER BY e.tx, e.id), '{}') INTO v_page
      FROM (SELECT e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at FROM events e
             WHERE (e.tx, e.id) > (v_cursor.last_tx, v_cursor.last_event_id) AND e.tx < v_horizon
               AND (id IS NULL OR e.campaign_id = id)
             ORDER BY e.tx, e.id
             LIMIT v_limit) e;

    IF cardinality(v_page) > 0 THEN
        UPDATE cursors SET last_tx = (v_page[cardinality(v_page)]).tx,
                           last_event_id = (v_page[cardinality(v_page)]).id, updated_at = now()
         WHERE cursors.consumer = v_key;
    END IF;

    -- The steps and notes the page names, read by their ids rather than joined with the page:
    -- under Citus the page cannot travel to the workers (a distributed query takes no array of
    -- rows).
    SELECT coalesce(array_agg(e.campaign_id ORDER BY e.tx, e.id), '{}'), coalesce(array_agg(e.step_id ORDER BY e.tx, e.id), '{}')
      INTO v_done_campaigns, v_done_steps
      FROM unnest(v_page) e WHERE e.kind = 'step.done';
    SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                              'action', s.action, 'output_preview', left(s.output, 300),
                              'output_chars', length(s.output)) ORDER BY array_position(v_done_steps, s.id)), '[]')
      INTO v_completed
      FROM steps s
     WHERE s.campaign_id = ANY (v_done_campaigns) AND s.id = ANY (v_done_steps);
    SELECT coalesce(array_agg(e.campaign_id), '{}'), coalesce(array_agg((e.payload ->> 'note_id')::bigint), '{}')
      INTO v_note_campaigns, v_note_ids
      FROM unnest(v_page) e WHERE e.kind = 'note.added';
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', n.id, 'campaign_id', n.campaign_id,
                              'step_id', n.step_id, 'agent', n.agent, 'tags', n.tags,
                              'content', left(n.content, 500)) ORDER BY n.id DESC), '[]')
      INTO v_notes
      FROM notes n
     WHERE n.campaign_id = ANY (v_note_campaigns) AND n.id = ANY (v_note_ids);

    RETURN jsonb_build_object(
        'completed', v_completed,
        'failed', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                    'error', e.payload ->> 'error') ORDER BY e.tx, e.id), '[]')
                     FROM unnest(v_page) e WHERE e.kind = 'step.failed'),
        'retrying', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                      'error', e.payload ->> 'error', 'attempts', e.payload -> 'attempts') ORDER BY e.tx, e.id), '[]')
                       FROM unnest(v_page) e WHERE e.kind = 'step.retry'),
        'skipped', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id) || e.payload ORDER BY e.tx, e.id), '[]')
                      FROM unnest(v_page) e WHERE e.kind = 'step.skipped'),
        'notes', v_notes,
        'campaigns', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id, 'event', e.kind,
                                      'reason', e.payload ->> 'reason', 'at', e.at) ORDER BY e.tx, e.id), '[]')
                        FROM unnest(v_page) e WHERE e.kind LIKE 'campaign.%' OR e.kind = 'plan.applied'),
        -- Workflow instances move without steps: each move is listed with where it went.
        'workflow_moves', (SELECT coalesce(jsonb_agg(jsonb_build_object('instance_id', e.campaign_id,
                                           'from', e.payload ->> 'from', 'to', e.payload ->> 'to',
                                           'decided_by', e.payload ->> 'decided_by', 'at', e.at) ORDER BY e.tx, e.id), '[]')
                             FROM unnest(v_page) e WHERE e.kind = 'workflow.advanced'),
        -- Waiting steps are listed for as long as they wait, not only when they start waiting.
        'waiting_inputs', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                          'action', s.action, 'question', s.question) ORDER BY s.id), '[]')
                             FROM steps s
                            WHERE s.status = 'waiting_input' AND (id IS NULL OR s.campaign_id = id)
                              AND (id IS NOT NULL OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = s.campaign_id
                                                                AND c.status IN ('active', 'paused')))),
        'events_read', cardinality(v_page),
        'has_more', cardinality(v_page) = v_limit,
        -- SPEC §16: events committed behind a transaction still open wait for it to end; say
        -- whose (observe.sql), since nothing else would tell the caller why nothing comes.
        'held_back_by', CASE WHEN cardinality(v_page) < v_limit AND EXISTS (
                                  SELECT 1 FROM events e WHERE e.tx >= v_horizon AND (id IS NULL OR e.campaign_id = id))
                             THEN _horizon_holder(v_horizon) END);
END
$$;
