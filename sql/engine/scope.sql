-- What a worker may see and touch (SPEC §15): a caller whose login holds only `sortie_worker`
-- (not `sortie_coordinator`, `sortie_runner` or `sortie_reader`) is an agent working on one
-- step. Its claim token is its credential: every worker call checks the token against the
-- step's current claim and confines the call to that step's campaign. Callers of the other
-- roles are trusted with every campaign, and a claim token they pass is checked the same way.
--
-- `session_user` is the login: inside a SECURITY DEFINER function `current_user` is the owner.
-- A superuser is a member of every role, so it is never confined.

CREATE FUNCTION _worker_confined() RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT pg_has_role(session_user, 'sortie_worker', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_coordinator', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_runner', 'MEMBER')
       AND NOT pg_has_role(session_user, 'sortie_reader', 'MEMBER');
$$;

-- The campaign a worker call may read or write, given the claim it presents.
-- Without a token: a confined caller is refused (`forbidden`); anyone else gets p_campaign
-- back unchanged (NULL meaning every campaign). With a token: the claim must be the current
-- claim of a running step (p_step when given, else the step holding the token), else
-- `stale_claim`; a p_campaign other than that step's is `forbidden`; the step's campaign is
-- returned. The step is found by its running-lease index when p_step is not given.
CREATE FUNCTION _worker_campaign(p_campaign uuid, p_step bigint, p_token uuid, p_call text)
RETURNS uuid
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    v_campaign uuid;
BEGIN
    IF p_token IS NULL THEN
        IF _worker_confined() THEN
            PERFORM _raise('forbidden', format(
                '%s needs the claim token of your step (claim_token, or SORTIE_CLAIM_TOKEN): a worker sees only the campaign of the step it holds',
                p_call));
        END IF;
        RETURN p_campaign;
    END IF;
    IF p_step IS NOT NULL THEN
        SELECT s.campaign_id INTO v_campaign FROM steps s
         WHERE s.id = p_step AND s.claim_token = p_token AND s.status = 'running';
    ELSE
        SELECT s.campaign_id INTO v_campaign FROM steps s
         WHERE s.claim_token = p_token AND s.status = 'running' AND s.step_type = 'atomic';
    END IF;
    IF v_campaign IS NULL THEN
        PERFORM _raise('stale_claim', format(
            '%s: the claim token is not the current claim of %s (its lease expired, it was reset or it finished); stop working on it',
            p_call, CASE WHEN p_step IS NULL THEN 'a running step' ELSE 'step ' || p_step END));
    END IF;
    IF p_campaign IS NOT NULL AND p_campaign <> v_campaign THEN
        PERFORM _raise('forbidden', format(
            '%s: campaign %s is not the campaign of your step; a worker sees only its own campaign',
            p_call, p_campaign));
    END IF;
    RETURN v_campaign;
END
$$;

-- _worker_campaign for a campaign already named (the delegated twins): without a token, a
-- confined caller is refused (`forbidden`); with one, it must be the current claim of a running
-- step of that campaign — of step p_step when given — and every statement of that check names
-- the campaign. Only a refusal looks further: _worker_campaign answers it (`forbidden` when the
-- token holds a running step of another campaign, else `stale_claim`).
CREATE FUNCTION _worker_claim_in(p_campaign uuid, p_step bigint, p_token uuid, p_call text)
RETURNS void
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_token IS NULL THEN
        PERFORM _worker_campaign(p_campaign, NULL, NULL, p_call);
        RETURN;
    END IF;
    IF p_step IS NOT NULL THEN
        PERFORM 1 FROM steps s
         WHERE s.campaign_id = p_campaign AND s.id = p_step AND s.claim_token = p_token AND s.status = 'running';
    ELSE
        PERFORM 1 FROM steps s
         WHERE s.campaign_id = p_campaign AND s.claim_token = p_token AND s.status = 'running'
           AND s.step_type = 'atomic';
    END IF;
    IF FOUND THEN
        RETURN;
    END IF;
    -- Refused: _worker_campaign (which looks in every campaign) says why, `forbidden` or
    -- `stale_claim`, in its words.
    PERFORM _worker_campaign(p_campaign, p_step, p_token, p_call);
END
$$;

-- The step a claim token holds (SPEC §15): `sortie-mcp --http` binds a session opened with a
-- claim token as its bearer to it. Returns {step_id, campaign_id}.
-- Errors: stale_claim when the token is not the current claim of a running step.
CREATE FUNCTION claim_session(claim_token uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_step bigint;
    v_campaign uuid;
BEGIN
    SELECT s.id, s.campaign_id INTO v_step, v_campaign FROM steps s
     WHERE s.claim_token = claim_token AND s.status = 'running' AND s.step_type = 'atomic';
    IF v_step IS NULL THEN
        PERFORM _raise('stale_claim', 'this claim token is not the current claim of a running step');
    END IF;
    RETURN jsonb_build_object('step_id', v_step, 'campaign_id', v_campaign);
END
$$;
