-- Lock keys (SPEC §3, §12): named resources a step holds while it runs, across campaigns.
-- `a/b` conflicts with `a` and `a/b/c`; `shared:key` holders do not conflict with each other.
-- A key is a row of resource_leases with an expiry; reap_leases() removes the stale ones.

-- Lock keys: `a/b` conflicts with `a` and `a/b/c`, matched by exact prefix on `/`
-- boundaries (SPEC §12: never LIKE, whose `_` and `%` would match other keys).
-- `shared:key` takes the key in shared mode; shared holders do not conflict.
CREATE FUNCTION _lock_key(p_entry text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN starts_with(p_entry, 'shared:') THEN substr(p_entry, 8) ELSE p_entry END $$;

CREATE FUNCTION _lock_mode(p_entry text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT CASE WHEN starts_with(p_entry, 'shared:') THEN 'shared' ELSE 'exclusive' END $$;

-- Whether any of `p_locks` (entries as in requires_locks) conflicts with a live lease held by
-- a step other than `p_step` (NULL: any step): the one conflict test of take_locks,
-- ready_steps and dispatch_blockers.
CREATE FUNCTION _locks_busy(p_locks text[], p_step bigint) RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT cardinality(p_locks) > 0 AND EXISTS (
        SELECT 1
          FROM unnest(p_locks) e
          JOIN resource_leases l
            ON (l.key = _lock_key(e) OR starts_with(l.key, _lock_key(e) || '/') OR starts_with(_lock_key(e), l.key || '/'))
         WHERE (p_step IS NULL OR l.step_id <> p_step) AND l.expires_at > _clock()
           AND NOT (l.mode = 'shared' AND _lock_mode(e) = 'shared'));
$$;

-- Takes a step's lock keys if all are free; false (and nothing taken) otherwise. Keys are
-- shared across campaigns, so their roots are serialised with advisory locks, in sorted order.
CREATE FUNCTION _take_locks(p_step bigint, p_campaign uuid, p_locks text[], p_expires timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_root text;
BEGIN
    IF cardinality(p_locks) = 0 THEN
        RETURN true;
    END IF;
    FOR v_root IN SELECT DISTINCT split_part(_lock_key(e), '/', 1) AS r FROM unnest(p_locks) e ORDER BY r LOOP
        PERFORM pg_advisory_xact_lock(hashtextextended('sortie.lock:' || v_root, 0));
    END LOOP;
    IF _locks_busy(p_locks, p_step) THEN
        RETURN false;
    END IF;
    INSERT INTO resource_leases (key, mode, campaign_id, step_id, expires_at)
    SELECT DISTINCT ON (_lock_key(e)) _lock_key(e), _lock_mode(e), p_campaign, p_step, p_expires
      FROM unnest(p_locks) e
     ORDER BY _lock_key(e), _lock_mode(e) = 'shared'
    ON CONFLICT (key, step_id) DO UPDATE SET expires_at = EXCLUDED.expires_at;
    RETURN true;
END
$$;

-- Lock keys whose lease ran out or whose step is no longer running.
CREATE FUNCTION reap_leases() RETURNS integer
LANGUAGE sql VOLATILE
SET search_path FROM CURRENT
AS $$
    WITH reaped AS (
        DELETE FROM resource_leases l
         WHERE l.expires_at < _clock()
            OR NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = l.step_id AND s.status = 'running')
        RETURNING 1)
    SELECT count(*)::integer FROM reaped;
$$;
