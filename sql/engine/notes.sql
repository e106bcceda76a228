-- Notes storage (SPEC §8). Search and embeddings come with the notes issue; the embedding
-- column is stored now so that notes written today are searchable later.

-- The cosine similarity below which a semantic hit says nothing (SPEC §13), per embedding
-- model. Measured on the 20 paraphrase pairs of tests/tests/notes.rs and the 400 unrelated
-- pairs among them: all-MiniLM-L6-v2 scores paraphrases 0.166 at the lowest (median 0.412) and
-- unrelated pairs 0.068 at the median, so 0.15 keeps every paraphrase and drops most noise
-- (unrelated pairs reach 0.45: the floor is no relevance judge). The hashing fallback is a
-- lexical n-gram overlap (paraphrases median 0.047, unrelated 0.030): below 0.05 nothing is
-- shared. Models not measured get 0: only hits pointing away from the query are dropped.
CREATE FUNCTION _similarity_floor(embedding_model text) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE embedding_model
               WHEN 'all-MiniLM-L6-v2' THEN 0.15
               WHEN 'sortie-hashing-v1' THEN 0.05
               ELSE 0.0 END;
$$;

CREATE FUNCTION add_note(campaign_id uuid, content text, tags text[] DEFAULT '{}', step_id bigint DEFAULT NULL,
                         agent text DEFAULT NULL, embedding vector DEFAULT NULL, embedding_model text DEFAULT NULL,
                         request_id text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_arguments jsonb;
BEGIN
    -- SPEC §15: a worker writes notes only into the campaign of the step it holds (scope.sql).
    campaign_id := _worker_campaign(campaign_id, step_id, claim_token, 'add_note');
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    -- SPEC §14: a repeat with the same request_id returns the first result (idempotency.sql).
    -- The embedding is not compared: the same text embeds the same way.
    IF request_id IS NOT NULL THEN
        v_arguments := jsonb_build_object('campaign_id', campaign_id, 'content', content, 'tags', tags,
                                          'step_id', step_id, 'agent', agent);
        RETURN coalesce(_replay(request_id, 'add_note', v_arguments),
                        _keep(request_id, 'add_note', v_arguments, add_note(
                            campaign_id => campaign_id, content => content, tags => tags, step_id => step_id,
                            agent => agent, embedding => embedding, embedding_model => embedding_model,
                            claim_token => claim_token)));
    END IF;
    RETURN _add_note_in(campaign_id, content, tags, step_id, agent, embedding, embedding_model);
END
$$;

-- add_note() naming its campaign first (SPEC §2 scale-out rule), without a request_id: under
-- Citus it is delegated to the worker holding the campaign and runs there as one local
-- transaction (distribute.sql). sortie-mcp calls it for its session's campaign (and own step).
-- A request_id goes to add_note: request ids are serialised on the coordinator (idempotency.sql).
-- Never with a NULL campaign_id: a stock Citus 13.2 coordinator crashes on one (citusdata/citus#7242).
-- With a claim token, the token must hold a running step of this campaign (step_id when given).
-- Answers as add_note. Errors: those of add_note.
CREATE FUNCTION _add_note_delegated(campaign_id uuid, content text, tags text[] DEFAULT '{}', step_id bigint DEFAULT NULL,
                                    agent text DEFAULT NULL, embedding vector DEFAULT NULL,
                                    embedding_model text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
BEGIN
    PERFORM _require(campaign_id IS NOT NULL, 'campaign_id');
    PERFORM _worker_claim_in(campaign_id, step_id, claim_token, 'add_note');
    RETURN _add_note_in(campaign_id, content, tags, step_id, agent, embedding, embedding_model);
END
$$;

-- The note itself, in campaign `campaign_id` (the caller has checked who may write there).
-- Every statement names the campaign.
CREATE FUNCTION _add_note_in(campaign_id uuid, content text, tags text[], step_id bigint, agent text,
                             embedding vector, embedding_model text)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE
AS $$
#variable_conflict use_variable
DECLARE
    v_id bigint;
    v_agent text;
BEGIN
    IF content IS NULL OR btrim(content) = '' THEN
        PERFORM _raise('invalid_argument', 'content is empty: write what you found');
    END IF;
    -- SPEC §14: at most 100,000 characters (the MCP server checks before it embeds).
    IF length(content) > 100000 THEN
        PERFORM _raise('invalid_argument', format('content is %s characters long; at most 100000 are allowed: store large results as step output',
                                                 length(content)));
    END IF;
    IF EXISTS (SELECT 1 FROM unnest(tags) t WHERE t IS NULL OR btrim(t) = '' OR length(t) > 200) THEN
        PERFORM _raise('invalid_argument', 'tags must be non-empty strings of at most 200 characters');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM campaigns WHERE id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    IF step_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = step_id AND s.campaign_id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s has no step %s', campaign_id, step_id));
    END IF;
    -- A worker's note carries its step's agent when the caller does not name one (read before
    -- the insert: Citus takes no subquery in an INSERT's VALUES).
    v_agent := coalesce(agent, (SELECT s.agent FROM steps s WHERE s.campaign_id = campaign_id AND s.id = step_id));
    INSERT INTO notes (campaign_id, step_id, agent, content, tags, embedding, embedding_model)
    VALUES (campaign_id, step_id, v_agent, content, coalesce(tags, '{}'), embedding, embedding_model)
    RETURNING id INTO v_id;
    PERFORM _emit(campaign_id, step_id, 'note.added', jsonb_build_object('note_id', v_id, 'tags', coalesce(tags, '{}')));
    RETURN jsonb_build_object('note_id', v_id, 'campaign_id', campaign_id, 'step_id', step_id,
                              'embedded', embedding IS NOT NULL,
                              -- SPEC §18: a note stored without its embedding (sortie-mcp embeds it just
                              -- after) is compared by its words until then.
                              'similar', CASE WHEN embedding IS NOT NULL
                                              THEN _similar_notes(campaign_id, embedding, embedding_model, 5, v_id)
                                              ELSE _similar_notes_by_words(campaign_id, content, 5, v_id) END);
END
$$;

-- The nearest earlier notes of a campaign to an embedding made by the same model; above a
-- similarity of 0.9 a note is flagged as a possible duplicate.
CREATE FUNCTION _similar_notes(campaign_id uuid, embedding vector, embedding_model text, k integer DEFAULT 5,
                              exclude bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
BEGIN
    -- $1..$5: the arguments (named like the columns of notes).
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', near.id, 'content', left(near.content, 300),
                                                 'similarity', round(near.similarity::numeric, 4),
                                                 'possible_duplicate', near.similarity >= 0.9)
                              ORDER BY near.similarity DESC), '[]')
      FROM (SELECT n.id, n.content, 1 - (n.embedding <=> $2) AS similarity
              FROM notes n
             WHERE $2 IS NOT NULL AND n.campaign_id = $1 AND n.embedding IS NOT NULL
               AND n.embedding_model IS NOT DISTINCT FROM $3 AND n.id IS DISTINCT FROM $5
             ORDER BY n.embedding <=> $2
             LIMIT greatest($4, 0)) near
     -- SPEC §13: below the model's floor a note is not similar, however near it ranks.
     WHERE near.similarity >= _similarity_floor($3));
END
$$;

-- Backfill (SPEC §8): notes written without an embedding, oldest first.
CREATE FUNCTION notes_to_embed("limit" integer DEFAULT 100) RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
BEGIN
    RETURN (
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', n.id, 'content', n.content) ORDER BY n.id), '[]')
      FROM (SELECT x.id, x.content FROM notes x WHERE x.embedding IS NULL ORDER BY x.id LIMIT greatest($1, 0)) n);
END
$$;

CREATE FUNCTION set_note_embedding(note_id bigint, embedding vector, embedding_model text) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
BEGIN
    IF embedding IS NULL OR embedding_model IS NULL THEN
        PERFORM _raise('invalid_argument', 'an embedding and the model that made it are required');
    END IF;
    UPDATE notes SET embedding = set_note_embedding.embedding, embedding_model = set_note_embedding.embedding_model
     WHERE id = note_id;
    IF NOT FOUND THEN
        PERFORM _raise('not_found', format('note %s does not exist', note_id));
    END IF;
    RETURN jsonb_build_object('note_id', note_id, 'embedding_model', embedding_model);
END
$$;

-- Newest first (SPEC §12: never oldest-first). `tags` matches any of them.
-- Paged (SPEC §14): `cursor` is the `next_cursor` of the page before. With `preview_chars`
-- each content is cut to that many characters and `content_chars` gives its whole length.
CREATE FUNCTION get_notes(campaign_id uuid, tags text[] DEFAULT NULL, step_id bigint DEFAULT NULL,
                          "limit" integer DEFAULT 50, cursor text DEFAULT NULL, preview_chars integer DEFAULT NULL,
                          claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_column
DECLARE
    -- SPEC §15: a worker reads the notes of its claim's campaign only (scope.sql). Found
    -- before the query rather than inside it: a rule called inside a query on a shard may not
    -- run queries of its own (Citus).
    v_campaign uuid := _worker_campaign($1, NULL, $7, 'get_notes');
BEGIN
    PERFORM _require(v_campaign IS NOT NULL, 'campaign_id');
    -- A cursor is a next_cursor this function answered (a note id); anything else would read
    -- as "no more notes".
    IF $5 IS NOT NULL AND $5 !~ '^[0-9]{1,18}$' THEN
        PERFORM _raise('invalid_argument', 'cursor is not one get_notes returned');
    END IF;
    -- $1..$7: the arguments (some named like the columns of notes).
    RETURN (
    WITH page AS (
        SELECT * FROM notes n
         WHERE n.campaign_id = v_campaign
           AND ($2 IS NULL OR n.tags && $2)
           AND ($3 IS NULL OR n.step_id = $3)
           AND ($5 IS NULL OR n.id < $5::bigint)
         ORDER BY n.id DESC
         LIMIT least(greatest(coalesce($4, 50), 1), 500) + 1),
    shown AS (
        SELECT * FROM page ORDER BY page.id DESC LIMIT least(greatest(coalesce($4, 50), 1), 500))
    SELECT jsonb_build_object(
        'notes', coalesce((SELECT jsonb_agg(jsonb_build_object(
               'id', n.id, 'step_id', n.step_id, 'agent', n.agent,
               'content', CASE WHEN $6 IS NULL THEN n.content ELSE left(n.content, greatest($6, 1)) END,
               'tags', n.tags, 'created_at', n.created_at)
               || CASE WHEN $6 IS NULL THEN '{}'::jsonb
                       ELSE jsonb_build_object('content_chars', length(n.content),
                                               'truncated', length(n.content) > greatest($6, 1)) END
               ORDER BY n.id DESC) FROM shown n), '[]'),
        'next_cursor', CASE WHEN (SELECT count(*) FROM page) > least(greatest(coalesce($4, 50), 1), 500)
                            THEN (SELECT min(shown.id) FROM shown)::text END));
END
$$;

-- Search (SPEC §8): full-text rank fused with pgvector cosine distance by reciprocal rank
-- fusion. Each hit says how it was found: `lexical`, `semantic` or `hybrid` (both). Without a
-- query embedding the search is lexical only. SQL users bring their own vector.
CREATE FUNCTION search_notes(query text, campaign_id uuid DEFAULT NULL, top_k integer DEFAULT 5,
                             tags text[] DEFAULT NULL, query_embedding vector DEFAULT NULL,
                             embedding_model text DEFAULT NULL, claim_token uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_k integer := least(greatest(coalesce(top_k, 5), 1), 100);
    v_pool integer := least(greatest(coalesce(top_k, 5), 1), 100) * 4;
    -- Across campaigns, a word of the query that at most this many notes contain is rare.
    v_cap constant integer := 2000;
    v_tsquery tsquery;
    v_rare tsquery;
    v_common tsquery;
    v_terms text[];
    v_term text;
    v_rare_terms text[] := '{}';
    v_common_terms text[] := '{}';
    v_hits jsonb;
BEGIN
    IF query IS NULL OR btrim(query) = '' THEN
        PERFORM _raise('invalid_argument', 'query is empty: say what you are looking for');
    END IF;
    -- SPEC §15: a worker searches its claim's campaign only (scope.sql).
    campaign_id := _worker_campaign(campaign_id, NULL, claim_token, 'search_notes');
    IF campaign_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM campaigns c WHERE c.id = campaign_id) THEN
        PERFORM _raise('not_found', format('campaign %s does not exist', campaign_id));
    END IF;
    -- SPEC §13: a query of only stop words, punctuation or symbols asks for nothing; every
    -- note would be as close to it as any other.
    IF numnode(plainto_tsquery('english', query)) = 0 THEN
        RETURN jsonb_build_object('results', '[]'::jsonb,
                                  'mode', CASE WHEN query_embedding IS NULL THEN 'lexical' ELSE 'hybrid' END,
                                  'reason', format('the query %s has no searchable words (only stop words, punctuation or symbols): name what you are looking for',
                                                   left(query, 200)));
    END IF;
    -- Any of the words, so a question phrased differently from the note still meets it. Within
    -- one campaign every match is ranked. Across campaigns, ranking every note that shares a
    -- common word costs time in proportion to the whole table, so the words are split by how
    -- many notes they match (counted up to v_cap + 1): every match of a rare word is a candidate
    -- and ranks first, as the rarer word says more; of the notes sharing only common words, the
    -- newest v_cap are. One count per word, each a statement of its own (not a subquery per
    -- word of one query: Citus plans no subquery correlated with a function's rows).
    v_terms := ARRAY(SELECT quote_literal(lexeme)::tsquery::text
                       FROM unnest(to_tsvector('english', query)) AS u(lexeme, positions, weights));
    FOREACH v_term IN ARRAY v_terms LOOP
        IF campaign_id IS NOT NULL
           OR (SELECT count(*) FROM (SELECT 1 FROM notes n
                                      WHERE n.content_tsv @@ v_term::tsquery
                                        AND (tags IS NULL OR n.tags && tags)
                                      LIMIT v_cap + 1) m) <= v_cap THEN
            v_rare_terms := v_rare_terms || v_term;
        ELSE
            v_common_terms := v_common_terms || v_term;
        END IF;
    END LOOP;
    v_rare := nullif(array_to_string(v_rare_terms, ' | '), '')::tsquery;
    v_common := nullif(array_to_string(v_common_terms, ' | '), '')::tsquery;
    v_tsquery := nullif(array_to_string(v_terms, ' | '), '')::tsquery;
    WITH candidates AS (
        SELECT n.campaign_id, n.id, n.content_tsv, true AS rare
          FROM notes n
         WHERE v_rare IS NOT NULL AND n.content_tsv @@ v_rare
           AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
           AND (tags IS NULL OR n.tags && tags)
        UNION ALL
        (SELECT n.campaign_id, n.id, n.content_tsv, false
           FROM notes n
          WHERE v_common IS NOT NULL AND n.content_tsv @@ v_common
            AND NOT (v_rare IS NOT NULL AND n.content_tsv @@ v_rare)
            AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
            AND (tags IS NULL OR n.tags && tags)
          ORDER BY n.id DESC
          LIMIT v_cap)
    ),
    lexical AS (
        SELECT c.campaign_id, c.id,
               row_number() OVER (ORDER BY c.rare DESC, ts_rank_cd(c.content_tsv, v_tsquery) DESC, c.id DESC) AS rank
          FROM candidates c
         ORDER BY c.rare DESC, ts_rank_cd(c.content_tsv, v_tsquery) DESC, c.id DESC
         LIMIT v_pool
    ),
    semantic AS (
        SELECT s.campaign_id, s.id, row_number() OVER (ORDER BY s.distance, s.id) AS rank, s.distance
          FROM (SELECT n.campaign_id, n.id, n.embedding <=> query_embedding AS distance
                  FROM notes n
                 WHERE query_embedding IS NOT NULL AND n.embedding IS NOT NULL
                   AND (embedding_model IS NULL OR n.embedding_model = embedding_model)
                   AND (campaign_id IS NULL OR n.campaign_id = campaign_id)
                   AND (tags IS NULL OR n.tags && tags)
                 ORDER BY n.embedding <=> query_embedding
                 LIMIT v_pool) s
         -- SPEC §13: below the model's floor a hit is noise, not a match.
         WHERE 1 - s.distance >= _similarity_floor(embedding_model)
    ),
    fused AS (
        SELECT coalesce(l.campaign_id, s.campaign_id) AS campaign_id, coalesce(l.id, s.id) AS id,
               coalesce(1.0 / (60 + l.rank), 0) + coalesce(1.0 / (60 + s.rank), 0) AS score,
               CASE WHEN l.id IS NOT NULL AND s.id IS NOT NULL THEN 'hybrid'
                    WHEN s.id IS NOT NULL THEN 'semantic' ELSE 'lexical' END AS mode,
               1 - s.distance AS similarity
          FROM lexical l FULL JOIN semantic s ON s.campaign_id = l.campaign_id AND s.id = l.id
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object(
               'note_id', n.id, 'campaign_id', n.campaign_id, 'step_id', n.step_id, 'agent', n.agent,
               'content', n.content, 'tags', n.tags, 'created_at', n.created_at,
               'score', round(f.score::numeric, 6), 'mode', f.mode, 'similarity', round(f.similarity::numeric, 4))
               ORDER BY f.score DESC, n.id DESC), '[]')
      INTO v_hits
      FROM (SELECT * FROM fused ORDER BY score DESC, id DESC LIMIT v_k) f
      JOIN notes n ON n.campaign_id = f.campaign_id AND n.id = f.id;
    RETURN jsonb_build_object('results', v_hits,
                              'mode', CASE WHEN query_embedding IS NULL THEN 'lexical' ELSE 'hybrid' END);
END
$$;
