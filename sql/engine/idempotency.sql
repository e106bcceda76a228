-- Idempotency (SPEC §14): a call made again after its reply was lost changes nothing.
--
-- Calls that create something take an optional `request_id`. The first call's result is kept
-- here (at least 24 hours); a repeat with the same request_id and the same arguments gets that
-- result back with "replayed": true, and the same request_id with other arguments is refused.
-- Each such function starts with
--     IF request_id IS NOT NULL THEN
--         RETURN coalesce(_replay(request_id, '<call>', <arguments>),
--                         _keep(request_id, '<call>', <arguments>, <the same call without request_id>));
--     END IF;
-- COALESCE evaluates its second argument only when the first is NULL, so the call runs once.
--
-- Worker calls that finish a step (complete_step, fail_step) need no request_id: the claim
-- token already names the attempt. The claim that finished a step is kept with its answer, and
-- the same claim repeating the same call (same arguments) is answered as the first time instead
-- of `stale_claim`; a different late call by that claim is still `stale_claim`.

CREATE TABLE idempotency_records (
    request_id      text PRIMARY KEY CHECK (length(request_id) BETWEEN 1 AND 200),
    call            text NOT NULL,
    arguments_hash  text NOT NULL,
    result          jsonb NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_records_created_at ON idempotency_records (created_at);

-- Kept with the step's campaign (SPEC §2 scale-out rule): a completion's record is written
-- where its campaign lives, so on Citus (distributed by campaign_id, distribute.sql) a
-- completion delegated to a worker writes it there, with no commit across nodes. Removed with
-- the campaign (prune) or, per campaign, by the calls that add new ones.
CREATE TABLE finished_claims (
    campaign_id  uuid NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    claim_token  uuid PRIMARY KEY,
    step_id      bigint NOT NULL,
    call         text NOT NULL,
    arguments_hash text NOT NULL,
    result       jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX finished_claims_campaign_created ON finished_claims (campaign_id, created_at);

-- How long a result is kept at least (SPEC §14 says 24 hours; records are pruned after twice
-- that, a few at a time, by the calls that add new ones).
CREATE FUNCTION _idempotency_retention() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT interval '48 hours' $$;

-- STABLE, as its body is (convert_to is STABLE): a SQL function declared more strictly than
-- its body is never inlined, and then runs as a call of its own per row (about 20 µs each in
-- complete_steps' insert of finished claims, session 7).
CREATE FUNCTION _arguments_hash(p_arguments jsonb) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT encode(sha256(convert_to(p_arguments::text, 'UTF8')), 'hex') $$;

-- The kept result of an earlier call with this request_id, marked replayed; NULL when there is
-- none. Concurrent calls with one request_id wait here for each other (the lock is held to the
-- end of the transaction), so the second sees the first's record.
CREATE FUNCTION _replay(p_request_id text, p_call text, p_arguments jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    r idempotency_records;
BEGIN
    IF length(p_request_id) NOT BETWEEN 1 AND 200 THEN
        PERFORM _raise('invalid_argument', format('request_id must be 1 to 200 characters, not %s',
                                                 length(p_request_id)));
    END IF;
    PERFORM pg_advisory_xact_lock(1397704788, hashtext(p_request_id));
    SELECT * INTO r FROM idempotency_records WHERE request_id = p_request_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF r.call <> p_call OR r.arguments_hash <> _arguments_hash(p_arguments) THEN
        PERFORM _raise('invalid_argument', format(
            'request_id %L was already used by a %s call with other arguments; use a new request_id for a new request',
            p_request_id, r.call));
    END IF;
    RETURN r.result || '{"replayed": true}';
END
$$;

-- Keeps the result of the first call with this request_id and returns it.
CREATE FUNCTION _keep(p_request_id text, p_call text, p_arguments jsonb, p_result jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
BEGIN
    DELETE FROM idempotency_records
     WHERE request_id IN (SELECT request_id FROM idempotency_records
                           WHERE created_at < now() - _idempotency_retention()
                           ORDER BY created_at LIMIT 10);
    INSERT INTO idempotency_records (request_id, call, arguments_hash, result)
    VALUES (p_request_id, p_call, _arguments_hash(p_arguments), p_result);
    RETURN p_result;
END
$$;

-- The answer the claim `p_token` got when it finished step `p_step` of campaign `p_campaign`
-- with `p_call` and these arguments, marked replayed; NULL when that claim did not finish it so.
CREATE FUNCTION _finished_claim(p_campaign uuid, p_step bigint, p_token uuid, p_call text, p_arguments jsonb)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (SELECT f.result || '{"replayed": true}'
              FROM finished_claims f
             WHERE f.campaign_id = p_campaign AND f.claim_token = p_token AND f.step_id = p_step
               AND f.call = p_call AND f.arguments_hash = _arguments_hash(p_arguments));
END
$$;

-- Keeps the answer of the call with which a claim finished its step, and returns it. Records
-- of the campaign older than _idempotency_retention() go, ten at a time.
CREATE FUNCTION _keep_finished_claim(p_campaign uuid, p_step bigint, p_token uuid, p_call text, p_arguments jsonb,
                                     p_result jsonb)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_before timestamptz := now() - _idempotency_retention();
    v_hash text := _arguments_hash(p_arguments);
BEGIN
    IF p_token IS NULL THEN
        RETURN p_result;
    END IF;
    DELETE FROM finished_claims f
     WHERE f.campaign_id = p_campaign
       AND f.claim_token IN (SELECT o.claim_token FROM finished_claims o
                              WHERE o.campaign_id = p_campaign AND o.created_at < v_before
                              ORDER BY o.created_at LIMIT 10);
    -- No conflict target: on Citus the key is (campaign_id, claim_token).
    INSERT INTO finished_claims (campaign_id, claim_token, step_id, call, arguments_hash, result)
    VALUES (p_campaign, p_token, p_step, p_call, v_hash, p_result)
    ON CONFLICT DO NOTHING;
    RETURN p_result;
END
$$;
