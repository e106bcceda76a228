-- Token budget (SPEC §3): an exhausted campaign is paused and nothing new is dispatched.

-- Pauses `p_campaign` when its tokens_used reached its token_budget; true when it did.
CREATE FUNCTION _enforce_budget(p_campaign uuid) RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    c campaigns;
BEGIN
    UPDATE campaigns SET status = 'paused', status_reason = 'budget_exhausted', updated_at = now()
     WHERE id = p_campaign AND status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
    RETURNING * INTO c;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM _emit(c.id, NULL, 'campaign.paused', jsonb_build_object('reason', 'budget_exhausted',
                 'tokens_used', c.tokens_used, 'token_budget', c.token_budget));
    PERFORM _notify_campaign(c.id, 'milestone', format('Campaign %s paused: token budget exhausted (%s of %s tokens)',
                                                      c.name, c.tokens_used, c.token_budget));
    RETURN true;
END
$$;

-- Budgets over every active campaign, for the runner's tick.
CREATE FUNCTION enforce_budgets() RETURNS integer
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
DECLARE
    v_id uuid;
    v_paused integer := 0;
BEGIN
    FOR v_id IN SELECT id FROM campaigns
                 WHERE status = 'active' AND token_budget IS NOT NULL AND tokens_used >= token_budget
                 ORDER BY id LOOP
        PERFORM _lock_campaign(v_id);
        IF _enforce_budget(v_id) THEN
            v_paused := v_paused + 1;
        END IF;
    END LOOP;
    RETURN v_paused;
END
$$;

CREATE FUNCTION _check_tokens(p_tokens bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE
AS $$
BEGIN
    IF p_tokens IS NOT NULL AND p_tokens < 0 THEN
        PERFORM _raise('invalid_argument', 'tokens_used cannot be negative');
    END IF;
    RETURN coalesce(p_tokens, 0);
END
$$;
