-- Events (SPEC §10): the append-only log every rule writes, and waking its listeners.
--
-- Concurrency model (docs/decisions.md): every writing rule locks its campaign's row first
-- (locking.sql). That makes each campaign's DAG a serial history — no two completions can both
-- miss that they were the last, a claim cannot race a cancel, a splice cannot race an abort —
-- and rules of different campaigns never wait on each other (SPEC §2 scale-out rule).

-- How often one connection may wake LISTENers. NOTIFY serialises every notifying commit in
-- the cluster — PostgreSQL holds one lock from pre-commit to the end of the commit, WAL flush
-- included — so a NOTIFY per claim and completion caps the whole cluster at one commit at a
-- time. A woken listener polls for listen_poll_window() instead, which covers the events the
-- interval held back, whichever campaign they belong to (docs/decisions.md, "Waking
-- listeners").
-- Refuses a call missing a required argument: invalid_argument "<name> is required" unless
-- `p_given`. Called first, before anything is looked up, so that a NULL id never reads as a
-- missing row (not_found of an empty id) or as "nothing" (an empty answer). VOLATILE, as
-- _raise: a call with constant arguments must not be folded while its statement is planned.
CREATE FUNCTION _require(p_given boolean, p_name text) RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL SAFE
AS $$
BEGIN
    IF NOT coalesce(p_given, false) THEN
        PERFORM _raise('invalid_argument', p_name || ' is required');
    END IF;
END
$$;

CREATE FUNCTION wake_interval() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '100 milliseconds' $$;

CREATE FUNCTION listen_poll_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '1 second' $$;

-- The campaign's next `p_count` event numbers (events.seq, SPEC §10 delta reads): moves the
-- campaign's event_seq and returns the last number taken. The update takes the campaign's row
-- lock, which every writing rule holds (or takes here) to its commit, so a campaign's events
-- become visible in number order and a reader's position can never pass one still uncommitted.
-- On Citus the row is on the worker holding the campaign: the order is the campaign's own,
-- whichever node runs the rule. Errors: not_found (no such campaign).
CREATE FUNCTION _take_event_seq(p_campaign uuid, p_count integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_last bigint;
BEGIN
    UPDATE campaigns SET event_seq = event_seq + p_count WHERE id = p_campaign RETURNING event_seq INTO v_last;
    IF v_last IS NULL THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', p_campaign));
    END IF;
    RETURN v_last;
END
$$;

-- Appends to the event log and, unless this connection woke listeners within
-- wake_interval(), wakes them (`sortie_events`). NOTIFY is a hint; readers page the table
-- (SPEC §10). The connection's last wake-up is a session setting: reading it touches no
-- shared page, and an aborted transaction takes it back together with its NOTIFY.
-- The event's time (`at`) is the clock when it is numbered, under the campaign's lock, not the
-- transaction's start: a rule that waited for the lock would otherwise log a time earlier than
-- events committed while it waited, and a follower paging the log by time (events() on Citus)
-- would pass it for good. So a campaign's events are in the same order by time as by number.
CREATE FUNCTION _emit(p_campaign uuid, p_step bigint, p_kind text, p_payload jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
    v_seq bigint;
    v_at timestamptz;
    v_woke text := current_setting('sortie.woke_at', true);
BEGIN
    v_seq := _take_event_seq(p_campaign, 1);
    -- Read into a variable first: Citus takes no volatile function in a change's values.
    v_at := clock_timestamp();
    INSERT INTO events (campaign_id, step_id, kind, payload, seq, at)
    VALUES (p_campaign, p_step, p_kind, coalesce(p_payload, '{}'), v_seq, v_at)
    RETURNING id INTO v_id;
    -- Seconds since the epoch: independent of the session's DateStyle.
    IF coalesce(v_woke, '') = ''
       OR v_woke::double precision <= extract(epoch FROM clock_timestamp() - wake_interval()) THEN
        PERFORM set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false);
        PERFORM pg_notify('sortie_events', json_build_object(
            'id', v_id, 'campaign_id', p_campaign, 'seq', v_seq, 'step_id', p_step, 'kind', p_kind)::text);
    END IF;
END
$$;

-- _emit for several steps of one campaign at once (SPEC §18 batches): one event of `p_kind`
-- per step, in the array's order, in one insert, and at most one wake-up, as _emit decides it.
CREATE FUNCTION _emit_many(p_campaign uuid, p_steps bigint[], p_kind text, p_payload jsonb DEFAULT '{}')
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_id bigint;
    v_step bigint;
    v_last bigint;
    v_at timestamptz;
    v_woke text := current_setting('sortie.woke_at', true);
BEGIN
    IF cardinality(p_steps) IS NULL OR cardinality(p_steps) = 0 THEN
        RETURN;
    END IF;
    v_last := _take_event_seq(p_campaign, cardinality(p_steps));
    v_at := clock_timestamp();
    WITH added AS (
        INSERT INTO events (campaign_id, step_id, kind, payload, seq, at)
        SELECT p_campaign, s.id, p_kind, coalesce(p_payload, '{}'), v_last - cardinality(p_steps) + s.n, v_at
          FROM unnest(p_steps) WITH ORDINALITY AS s(id, n)
         ORDER BY s.n
        RETURNING id, step_id)
    SELECT a.id, a.step_id INTO v_id, v_step FROM added a ORDER BY a.id DESC LIMIT 1;
    IF coalesce(v_woke, '') = ''
       OR v_woke::double precision <= extract(epoch FROM clock_timestamp() - wake_interval()) THEN
        PERFORM set_config('sortie.woke_at', extract(epoch FROM clock_timestamp())::text, false);
        PERFORM pg_notify('sortie_events', json_build_object(
            'id', v_id, 'campaign_id', p_campaign, 'seq', v_last, 'step_id', v_step, 'kind', p_kind)::text);
    END IF;
END
$$;

-- A notification for the campaign's channel (notifications.sql delivers it). PL/pgSQL, as
-- every function that reads or writes a table (locking.sql, distribution). The channel is read
-- first and the row inserted by its campaign: under Citus an INSERT … SELECT with a parameter
-- read every shard of campaigns. Nothing is inserted for a campaign that does not exist.
CREATE FUNCTION _notify_campaign(p_campaign uuid, p_level text, p_message text)
RETURNS void
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_channel text;
BEGIN
    SELECT c.channel INTO v_channel FROM campaigns c WHERE c.id = p_campaign;
    IF FOUND THEN
        INSERT INTO notifications (campaign_id, level, message, channel)
        VALUES (p_campaign, p_level, p_message, v_channel);
    END IF;
END
$$;
