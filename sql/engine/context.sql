-- What a worker reads (SPEC §5): its context with upstream outputs as previews, and ranged
-- reads of any step of its own campaign.

CREATE FUNCTION get_my_context(step_id bigint, head integer DEFAULT 600, tail integer DEFAULT 200,
                               claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    IF step_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'step_id is required (or run with SORTIE_STEP_ID set)');
    END IF;
    -- SPEC §15: a worker reads the context of the step it holds, by its claim (scope.sql).
    PERFORM _worker_campaign(NULL, step_id, claim_token, 'get_my_context');
    SELECT * INTO s FROM steps WHERE id = step_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist', step_id));
    END IF;
    RETURN _context_of(s, head, tail);
END
$$;

-- get_my_context() naming its campaign first (SPEC §2 scale-out rule): every statement names
-- the campaign, so under Citus the call is delegated to the worker holding it and runs there
-- as one local transaction (distribute.sql). sortie-mcp calls it for its session's own step.
-- Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242).
-- Errors: those of get_my_context; not_found when the step is not in that campaign.
CREATE FUNCTION _get_my_context_delegated(campaign_id uuid, step_id bigint, head integer DEFAULT 600,
                                         tail integer DEFAULT 200, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    IF campaign_id IS NULL OR step_id IS NULL THEN
        PERFORM _raise('invalid_argument', 'campaign_id and step_id are required');
    END IF;
    PERFORM _worker_claim_in(campaign_id, step_id, claim_token, 'get_my_context');
    SELECT * INTO s FROM steps x WHERE x.campaign_id = campaign_id AND x.id = step_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('step %s does not exist in campaign %s', step_id, campaign_id));
    END IF;
    RETURN _context_of(s, head, tail);
END
$$;

-- What get_my_context answers for step `s`: the campaign, the step, what it continues, its
-- upstream outputs as previews of `head` and `tail` characters, and the newest notes. Every
-- statement names s.campaign_id.
CREATE FUNCTION _context_of(s steps, head integer, tail integer)
RETURNS jsonb
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    c campaigns;
BEGIN
    SELECT * INTO c FROM campaigns WHERE id = s.campaign_id;
    RETURN jsonb_build_object(
        'campaign', jsonb_build_object('id', c.id, 'name', c.name, 'goal', c.goal, 'status', c.status,
                                       'strategy', c.strategy, 'progress', c.progress, 'guidance', c.guidance,
                                       'success_metric', c.success_metric, 'success_target', c.success_target),
        'step', jsonb_strip_nulls(jsonb_build_object(
            'id', s.id, 'action', s.action, 'agent', s.agent, 'input', s.input, 'status', s.status,
            'depth', s.depth, 'max_depth', c.max_depth, 'can_spawn', _spawn_allowed(s.depth, c.max_depth),
            'attempts', s.attempts, 'max_attempts', s.max_attempts, 'last_error', s.error,
            'question', s.question, 'answer', s.answer, 'parent_id', s.parent_id,
            'continuation_of', s.continuation_of,
            'lease_expires_at', s.lease_expires_at)),
        -- The spliced step this one continues: its partial output and what its subtasks said.
        'continues', (SELECT _preview(p.id, coalesce(p.output, ''), head, tail) || jsonb_build_object('action', p.action)
                        FROM steps p WHERE p.campaign_id = s.campaign_id AND p.id = s.continuation_of),
        'upstream', (SELECT coalesce(jsonb_agg(_preview(u.id, coalesce(u.output, ''), head, tail)
                                               || jsonb_build_object('action', u.action, 'status', u.status,
                                                                     'via', via)
                                               ORDER BY u.id), '[]')
                       FROM (SELECT d.depends_on AS id, 'dependency' AS via FROM step_dependencies d
                              WHERE d.campaign_id = s.campaign_id AND d.step_id = s.id
                             UNION ALL
                             SELECT d.depends_on, 'ancestor ' || a.id
                               FROM step_dependencies d
                               JOIN LATERAL (WITH RECURSIVE up(id, parent_id) AS (
                                                 SELECT x.id, x.parent_id FROM steps x
                                                  WHERE x.campaign_id = s.campaign_id AND x.id = s.parent_id
                                                 UNION ALL
                                                 SELECT x.id, x.parent_id FROM steps x JOIN up ON x.id = up.parent_id
                                                  WHERE x.campaign_id = s.campaign_id)
                                             SELECT id FROM up) a ON d.step_id = a.id
                              WHERE d.campaign_id = s.campaign_id) deps
                       JOIN steps u ON u.campaign_id = s.campaign_id AND u.id = deps.id),
        'notes', (SELECT coalesce(jsonb_agg(jsonb_build_object('id', n.id, 'step_id', n.step_id, 'agent', n.agent,
                                                               'content', left(n.content, 1000), 'tags', n.tags,
                                                               'created_at', n.created_at) ORDER BY n.id DESC), '[]')
                    FROM (SELECT * FROM notes WHERE campaign_id = c.id ORDER BY id DESC LIMIT 10) n),
        'hint', 'Previews show the head and tail of each output; read_step_output(step_id, offset, limit) reads the rest. '
                || 'When finished call complete_step; if stuck, fail_step or request_input.');
END
$$;

CREATE FUNCTION read_step_output(step_id bigint, "offset" integer DEFAULT 0, "limit" integer DEFAULT 8000,
                                 field text DEFAULT 'output', campaign_id uuid DEFAULT NULL,
                                 reader_step_id bigint DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    s steps;
BEGIN
    PERFORM _require(step_id IS NOT NULL, 'step_id');
    IF coalesce(field, 'output') NOT IN ('output', 'input') THEN
        PERFORM _raise('invalid_argument', 'field must be output or input');
    END IF;
    IF coalesce("offset", 0) < 0 OR coalesce("limit", 8000) < 1 THEN
        PERFORM _raise('invalid_argument', 'offset must be 0 or more and limit at least 1 (at most 32000)');
    END IF;
    -- SPEC §15: with a claim token, the reader's campaign is its claim's (scope.sql).
    campaign_id := _worker_campaign(campaign_id, reader_step_id, claim_token, 'read_step_output');
    -- Only steps of the reader's own campaign are readable; another campaign's step reads as
    -- missing rather than revealing that it exists.
    IF campaign_id IS NOT NULL THEN
        SELECT * INTO s FROM steps x WHERE x.campaign_id = campaign_id AND x.id = step_id;
    ELSE
        SELECT * INTO s FROM steps x WHERE x.id = step_id;
    END IF;
    IF NOT FOUND
       OR (reader_step_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM steps r WHERE r.campaign_id = s.campaign_id AND r.id = reader_step_id)) THEN
        PERFORM _raise('not_found', format('step %s does not exist in your campaign', step_id));
    END IF;
    RETURN jsonb_build_object('step_id', s.id, 'field', coalesce(field, 'output'), 'status', s.status)
        || _read_range(CASE WHEN coalesce(field, 'output') = 'input' THEN coalesce(s.input #>> '{}', '') ELSE coalesce(s.output, '') END,
                      coalesce("offset", 0), coalesce("limit", 8000));
END
$$;
