-- Notifications (SPEC §6): written by the rules, delivered by a runner to the campaign's
-- channel. A runner takes a batch with a short lease, so two runners do not send one twice,
-- and marks each delivered only on success.

-- The due notifications are listed first, oldest first, then taken one at a time (skipping
-- those another runner holds, checked again under the lock): Citus locks rows only in a query
-- on one campaign.
CREATE FUNCTION take_notifications("limit" integer DEFAULT 20, lease_seconds integer DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_due record;
    v_until timestamptz := _clock() + make_interval(secs => greatest(lease_seconds, 1));
    v_taken jsonb := '[]';
    v_count integer := 0;
    n notifications;
    -- The time once, in a variable: Citus runs a read's functions on the workers, where this
    -- session's clock (sortie.fake_now) is not set.
    v_now timestamptz := _clock();
BEGIN
    IF greatest("limit", 0) = 0 THEN
        RETURN v_taken;
    END IF;
    FOR v_due IN SELECT x.campaign_id, x.id FROM notifications x
                  WHERE NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
                  ORDER BY x.id LOOP
        IF v_due.campaign_id IS NULL THEN
            -- Not a campaign's (written by hand): found by its id alone.
            SELECT * INTO n FROM notifications x
             WHERE x.campaign_id IS NULL AND x.id = v_due.id
               AND NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
               FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            UPDATE notifications x SET next_attempt_at = v_until WHERE x.campaign_id IS NULL AND x.id = n.id
            RETURNING * INTO n;
        ELSE
            SELECT * INTO n FROM notifications x
             WHERE x.campaign_id = v_due.campaign_id AND x.id = v_due.id
               AND NOT x.delivered AND x.given_up_at IS NULL AND x.next_attempt_at <= v_now
               FOR UPDATE SKIP LOCKED;
            CONTINUE WHEN NOT FOUND;
            UPDATE notifications x SET next_attempt_at = v_until WHERE x.campaign_id = n.campaign_id AND x.id = n.id
            RETURNING * INTO n;
        END IF;
        v_taken := v_taken || jsonb_build_array(jsonb_build_object(
            'id', n.id, 'campaign_id', n.campaign_id, 'level', n.level, 'message', n.message,
            'channel', n.channel, 'delivery_attempts', n.delivery_attempts));
        v_count := v_count + 1;
        EXIT WHEN v_count >= "limit";
    END LOOP;
    RETURN v_taken;
END
$$;

-- How many delivery attempts a notification gets before it is given up (SPEC §13).
CREATE FUNCTION _notification_max_attempts() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT 10 $$;

-- Outcome of one delivery. Failures back off exponentially (30 s doubling, at most an hour);
-- `retry => false` (the webhook refused it: a 4xx other than 408 and 429) gives it up at once,
-- and so does the last of _notification_max_attempts() attempts (SPEC §13).
CREATE FUNCTION notification_delivered(id bigint, ok boolean, error text DEFAULT NULL, retry boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    n notifications;
    -- The time in a variable, not a call inside the CASEs, and the back-off added in UTC (the
    -- same instant; timestamptz + interval is STABLE): Citus refuses STABLE functions inside
    -- CASE, and on a column, in a distributed change.
    v_now timestamptz := _clock();
BEGIN
    PERFORM _require(id IS NOT NULL, 'id');
    PERFORM _require(ok IS NOT NULL, 'ok');
    UPDATE notifications
       SET delivered = ok,
           delivered_at = CASE WHEN ok THEN v_now END,
           delivery_attempts = delivery_attempts + 1,
           last_error = CASE WHEN ok THEN NULL ELSE left(error, 1000) END,
           next_attempt_at = CASE WHEN ok THEN next_attempt_at
                                  ELSE ((v_now AT TIME ZONE 'UTC')
                                        + make_interval(secs => least(30 * power(2, delivery_attempts), 3600)))
                                       AT TIME ZONE 'UTC' END,
           given_up_at = CASE WHEN NOT ok AND (NOT coalesce(retry, true)
                                               OR delivery_attempts + 1 >= _notification_max_attempts())
                              THEN v_now END
     WHERE notifications.id = id AND NOT delivered AND given_up_at IS NULL
    RETURNING * INTO n;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('notification %s does not exist, was delivered or was given up', id));
    END IF;
    RETURN jsonb_build_object('id', n.id, 'delivered', n.delivered, 'delivery_attempts', n.delivery_attempts,
                              'next_attempt_at', n.next_attempt_at, 'given_up', n.given_up_at IS NOT NULL);
END
$$;
