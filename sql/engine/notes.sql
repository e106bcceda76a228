-- Notes storage (SPEC §8). Search and embeddings come with the notes issue; the embedding
-- column is stored now so that notes written today are searchable later.

CREATE FUNCTION add_note(campaign_id uuid, content text, tags text[] DEFAULT '{}', step_id bigint DEFAULT NULL,
                         agent text DEFAULT NULL, embedding vector DEFAULT NULL, embedding_model text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_id bigint;
BEGIN
    IF content IS NULL OR btrim(content) = '' THEN
        PERFORM raise('invalid_argument', 'content is empty: write what you found');
    END IF;
    IF length(content) > 1000000 THEN
        PERFORM raise('invalid_argument', 'content is longer than 1,000,000 characters; store large results as step output');
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(tags) t WHERE t IS NULL OR btrim(t) = '' OR length(t) > 200) THEN
        PERFORM raise('invalid_argument', 'tags must be non-empty strings of at most 200 characters');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM campaigns WHERE id = campaign_id) THEN
        PERFORM raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    IF step_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = step_id AND s.campaign_id = campaign_id) THEN
        PERFORM raise('not_found', format('campaign %s has no step %s', campaign_id, step_id));
    END IF;
    INSERT INTO notes (campaign_id, step_id, agent, content, tags, embedding, embedding_model)
    VALUES (campaign_id, step_id, agent, content, coalesce(tags, '{}'), embedding, embedding_model)
    RETURNING id INTO v_id;
    PERFORM emit(campaign_id, step_id, 'note.added', jsonb_build_object('note_id', v_id, 'tags', coalesce(tags, '{}')));
    RETURN jsonb_build_object('note_id', v_id, 'campaign_id', campaign_id, 'step_id', step_id);
END
$$;

-- Newest first (SPEC §12: never oldest-first). `tags` matches any of them.
CREATE FUNCTION get_notes(campaign_id uuid, tags text[] DEFAULT NULL, step_id bigint DEFAULT NULL,
                          "limit" integer DEFAULT 50)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    SELECT jsonb_build_object('notes', coalesce(jsonb_agg(jsonb_build_object(
               'id', n.id, 'step_id', n.step_id, 'agent', n.agent, 'content', n.content, 'tags', n.tags,
               'created_at', n.created_at) ORDER BY n.id DESC), '[]'))
      FROM (SELECT * FROM notes n
             WHERE n.campaign_id = $1
               AND ($2 IS NULL OR n.tags && $2)
               AND ($3 IS NULL OR n.step_id = $3)
             ORDER BY n.id DESC
             LIMIT least(greatest(coalesce($4, 50), 1), 500)) n;
$$;
