-- Notifications (SPEC §6): written by the rules, delivered by a runner to the campaign's
-- channel. A runner takes a batch with a short lease, so two runners do not send one twice,
-- and marks each delivered only on success.

CREATE FUNCTION take_notifications("limit" integer DEFAULT 20, lease_seconds integer DEFAULT 60) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_taken jsonb;
BEGIN
    WITH due AS (
        SELECT id FROM notifications
         WHERE NOT delivered AND given_up_at IS NULL AND next_attempt_at <= _clock()
         ORDER BY id
         LIMIT greatest("limit", 0)
           FOR UPDATE SKIP LOCKED
    ),
    taken AS (
        UPDATE notifications n SET next_attempt_at = _clock() + make_interval(secs => greatest(lease_seconds, 1))
          FROM due WHERE n.id = due.id
        RETURNING n.*
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('id', t.id, 'campaign_id', t.campaign_id, 'level', t.level,
                                                 'message', t.message, 'channel', t.channel,
                                                 'delivery_attempts', t.delivery_attempts) ORDER BY t.id), '[]')
      INTO v_taken FROM taken t;
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
BEGIN
    UPDATE notifications
       SET delivered = ok,
           delivered_at = CASE WHEN ok THEN _clock() END,
           delivery_attempts = delivery_attempts + 1,
           last_error = CASE WHEN ok THEN NULL ELSE left(error, 1000) END,
           next_attempt_at = CASE WHEN ok THEN next_attempt_at
                                  ELSE _clock() + make_interval(secs => least(30 * power(2, delivery_attempts), 3600)) END,
           given_up_at = CASE WHEN NOT ok AND (NOT coalesce(retry, true)
                                               OR delivery_attempts + 1 >= _notification_max_attempts())
                              THEN _clock() END
     WHERE notifications.id = id AND NOT delivered AND given_up_at IS NULL
    RETURNING * INTO n;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('notification %s does not exist, was delivered or was given up', id));
    END IF;
    RETURN jsonb_build_object('id', n.id, 'delivered', n.delivered, 'delivery_attempts', n.delivery_attempts,
                              'next_attempt_at', n.next_attempt_at, 'given_up', n.given_up_at IS NOT NULL);
END
$$;
