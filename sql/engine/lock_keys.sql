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

-- The one conflict test of take_locks, ready_steps and dispatch_blockers: whether any of
-- `p_locks` (entries as in requires_locks) conflicts with a live lease, given as the parallel
-- arrays `p_keys`, `p_modes` and `p_steps`, held by a step other than `p_step` (NULL: any
-- step). Pure, so that a query over many steps reads the leases once (_live_leases) and tests
-- each step without reading a table per row: under Citus, resource_leases is a reference table
-- and a query on a shard may not run another query. Its body calls no function of this
-- extension (the `shared:` prefix is spelled out as in _lock_key and _lock_mode): Citus inlines
-- it on a shard with only pg_catalog on the search_path.
CREATE FUNCTION _locks_conflict(p_locks text[], p_step bigint, p_keys text[], p_modes text[], p_steps bigint[])
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT cardinality(p_locks) > 0 AND EXISTS (
        SELECT 1
          FROM (SELECT CASE WHEN starts_with(e, 'shared:') THEN substr(e, 8) ELSE e END AS key,
                       starts_with(e, 'shared:') AS shared
                  FROM unnest(p_locks) e) w
          JOIN unnest(p_keys, p_modes, p_steps) AS l(key, mode, step_id)
            ON (l.key = w.key OR starts_with(l.key, w.key || '/') OR starts_with(w.key, l.key || '/'))
         WHERE (p_step IS NULL OR l.step_id <> p_step)
           AND NOT (l.mode = 'shared' AND w.shared));
$$;

-- The leases live now, as the arrays _locks_conflict() takes.
CREATE FUNCTION _live_leases(OUT keys text[], OUT modes text[], OUT steps bigint[])
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    SELECT coalesce(array_agg(l.key), '{}'), coalesce(array_agg(l.mode), '{}'), coalesce(array_agg(l.step_id), '{}')
      INTO keys, modes, steps
      FROM resource_leases l
     WHERE l.expires_at > _clock();
END
$$;

-- Whether any of `p_locks` conflicts with a live lease held by a step other than `p_step`
-- (NULL: any step): _locks_conflict() against the leases as they are now.
CREATE FUNCTION _locks_busy(p_locks text[], p_step bigint) RETURNS boolean
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    l record;
BEGIN
    IF cardinality(p_locks) = 0 THEN
        RETURN false;
    END IF;
    SELECT * INTO l FROM _live_leases();
    RETURN _locks_conflict(p_locks, p_step, l.keys, l.modes, l.steps);
END
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

-- Lock keys whose lease ran out or whose step is no longer running. Three statements rather
-- than one DELETE with a subquery on steps: under Citus, resource_leases is a reference table,
-- and a change of a reference table cannot read a distributed one. Only leases seen by the
-- first read can go as not running, so a lease taken meanwhile stays.
CREATE FUNCTION reap_leases() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_campaigns uuid[];
    v_steps bigint[];
    v_running bigint[];
    v_reaped integer;
BEGIN
    SELECT coalesce(array_agg(DISTINCT l.campaign_id), '{}'), coalesce(array_agg(DISTINCT l.step_id), '{}')
      INTO v_campaigns, v_steps
      FROM resource_leases l;
    SELECT coalesce(array_agg(s.id), '{}') INTO v_running
      FROM steps s
     WHERE s.campaign_id = ANY (v_campaigns) AND s.id = ANY (v_steps) AND s.status = 'running';
    WITH reaped AS (
        DELETE FROM resource_leases l
         WHERE l.expires_at < _clock()
            OR (l.step_id = ANY (v_steps) AND NOT l.step_id = ANY (v_running))
        RETURNING 1)
    SELECT count(*)::integer INTO v_reaped FROM reaped;
    RETURN v_reaped;
END
$$;
