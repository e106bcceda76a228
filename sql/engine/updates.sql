-- Delta reads for coordinators (SPEC §2 events, §5 get_updates).
--
-- Each campaign numbers its own events (events.seq, taken under the campaign's row lock, which
-- every writing rule holds to its commit: events.sql), so a campaign's events become visible
-- in number order. A consumer keeps, per campaign, the last number handed to it
-- (event_positions); a read hands out what follows, so no event can commit behind a position
-- and be missed, and no transaction — open, idle or prepared, of this campaign or another —
-- holds a read back. The order is the campaign's own on whichever node holds it (Citus,
-- docs/scale-out.md), where transaction ids and sequences are a node's own.

-- get_updates(id, consumer, limit): the events of campaign `id` (every campaign when NULL)
-- that `consumer` has not been handed yet, at most `limit` (1 to 1000, default 200), summed up
-- by kind; each campaign's events in its own order, a page holding for each campaign the next
-- of its events (the first of every campaign with news before the second of any). Answers
-- {completed, failed, retrying, skipped, notes, campaigns, workflow_moves, waiting_inputs,
-- events_read, has_more, held_back_by}; held_back_by is always null since events are numbered
-- per campaign (SPEC §16: nothing waits behind an open transaction). Errors: invalid_argument
-- (consumer), not_found (campaign).
CREATE FUNCTION get_updates(id uuid DEFAULT NULL, consumer text DEFAULT 'default', "limit" integer DEFAULT 200)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_key text;
    v_position bigint;
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
    -- The consumer's row serialises its reads: two at once would hand out the same events.
    INSERT INTO cursors (consumer) VALUES (v_key) ON CONFLICT ON CONSTRAINT cursors_pkey DO NOTHING;
    UPDATE cursors SET updated_at = now() WHERE cursors.consumer = v_key;

    -- The page is an array, not a temporary table: creating and dropping a table per call
    -- bloats the catalog and makes every commit wait for its WAL flush. Its rows are built from
    -- their columns: Citus hands a whole row of a subquery back as a record it cannot read.
    IF id IS NOT NULL THEN
        SELECT coalesce(max(p.seq), 0) INTO v_position
          FROM event_positions p WHERE p.campaign_id = id AND p.consumer = v_key;
        SELECT coalesce(array_agg(ROW(e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq)::events
                                  ORDER BY e.seq), '{}') INTO v_page
          FROM (SELECT e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq FROM events e
                 WHERE e.campaign_id = id AND e.seq > v_position
                 ORDER BY e.seq
                 LIMIT v_limit) e;
    ELSE
        -- Every campaign with news (its event_seq past the consumer's position), the next
        -- `limit` of its events at most: the page takes them by their rank in their campaign,
        -- so each campaign's part of it is a run of its order with nothing skipped. A join on
        -- the campaign alone: under Citus each shard answers its own campaigns.
        SELECT coalesce(array_agg(ROW(e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq)::events
                                  ORDER BY e.rank, e.at, e.campaign_id), '{}') INTO v_page
          FROM (SELECT e.id, e.tx, e.campaign_id, e.step_id, e.kind, e.payload, e.at, e.seq,
                       e.seq - coalesce(p.seq, 0) AS rank
                  FROM campaigns c
                  LEFT JOIN event_positions p ON p.campaign_id = c.id AND p.consumer = v_key
                  JOIN events e ON e.campaign_id = c.id
                             AND e.seq > coalesce(p.seq, 0) AND e.seq <= coalesce(p.seq, 0) + v_limit
                 WHERE c.event_seq > coalesce(p.seq, 0)
                 ORDER BY rank, e.at, e.campaign_id
                 LIMIT v_limit) e;
    END IF;

    IF cardinality(v_page) > 0 THEN
        INSERT INTO event_positions (campaign_id, consumer, seq)
        SELECT e.campaign_id, v_key, max(e.seq) FROM unnest(v_page) e GROUP BY e.campaign_id
        ON CONFLICT ON CONSTRAINT event_positions_pkey DO UPDATE SET seq = excluded.seq;
    END IF;

    -- The steps and notes the page names, read by their ids rather than joined with the page:
    -- under Citus the page cannot travel to the workers (a distributed query takes no array of
    -- rows).
    SELECT coalesce(array_agg(e.campaign_id ORDER BY e.ordinality), '{}'), coalesce(array_agg(e.step_id ORDER BY e.ordinality), '{}')
      INTO v_done_campaigns, v_done_steps
      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.done';
    -- Only when the page has any: under Citus an empty list reaches every shard.
    v_completed := '[]';
    IF cardinality(v_done_steps) > 0 THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                  'action', s.action, 'output_preview', left(s.output, 300),
                                  'output_chars', length(s.output)) ORDER BY array_position(v_done_steps, s.id)), '[]')
          INTO v_completed
          FROM steps s
         WHERE s.campaign_id = ANY (v_done_campaigns) AND s.id = ANY (v_done_steps);
    END IF;
    SELECT coalesce(array_agg(e.campaign_id), '{}'), coalesce(array_agg((e.payload ->> 'note_id')::bigint), '{}')
      INTO v_note_campaigns, v_note_ids
      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'note.added';
    v_notes := '[]';
    IF cardinality(v_note_ids) > 0 THEN
        SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', n.id, 'campaign_id', n.campaign_id,
                                  'step_id', n.step_id, 'agent', n.agent, 'tags', n.tags,
                                  'content', left(n.content, 500)) ORDER BY n.id DESC), '[]')
          INTO v_notes
          FROM notes n
         WHERE n.campaign_id = ANY (v_note_campaigns) AND n.id = ANY (v_note_ids);
    END IF;

    RETURN jsonb_build_object(
        'completed', v_completed,
        'failed', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                    'error', e.payload ->> 'error') ORDER BY e.ordinality), '[]')
                     FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.failed'),
        'retrying', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', e.step_id, 'campaign_id', e.campaign_id,
                                      'error', e.payload ->> 'error', 'attempts', e.payload -> 'attempts') ORDER BY e.ordinality), '[]')
                       FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.retry'),
        'skipped', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id) || e.payload ORDER BY e.ordinality), '[]')
                      FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'step.skipped'),
        'notes', v_notes,
        'campaigns', (SELECT coalesce(jsonb_agg(jsonb_build_object('campaign_id', e.campaign_id, 'event', e.kind,
                                      'reason', e.payload ->> 'reason', 'at', e.at) ORDER BY e.ordinality), '[]')
                        FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind LIKE 'campaign.%' OR e.kind = 'plan.applied'),
        -- Workflow instances move without steps: each move is listed with where it went.
        'workflow_moves', (SELECT coalesce(jsonb_agg(jsonb_build_object('instance_id', e.campaign_id,
                                           'from', e.payload ->> 'from', 'to', e.payload ->> 'to',
                                           'decided_by', e.payload ->> 'decided_by', 'at', e.at) ORDER BY e.ordinality), '[]')
                             FROM unnest(v_page) WITH ORDINALITY e WHERE e.kind = 'workflow.advanced'),
        -- Waiting steps are listed for as long as they wait, not only when they start waiting.
        'waiting_inputs', (SELECT coalesce(jsonb_agg(jsonb_build_object('step_id', s.id, 'campaign_id', s.campaign_id,
                                          'action', s.action, 'question', s.question) ORDER BY s.id), '[]')
                             FROM steps s
                            WHERE s.status = 'waiting_input' AND (id IS NULL OR s.campaign_id = id)
                              AND (id IS NOT NULL OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = s.campaign_id
                                                                AND c.status IN ('active', 'paused')))),
        'events_read', cardinality(v_page),
        'has_more', cardinality(v_page) = v_limit,
        -- SPEC §16 names the transaction holding events back; with events numbered per
        -- campaign none can: kept in the answer's shape for the clients that read it.
        'held_back_by', NULL::jsonb);
END
$$;
