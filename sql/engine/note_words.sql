-- Similar notes by their words (SPEC §8, §18). sortie-mcp stores a note at once and embeds it
-- off the request path (the embedding lands a few milliseconds later through
-- set_note_embedding); until then add_note answers the notes that share its words.

-- The notes of a campaign sharing the most words with `content`: at most `k` (newest 1,000
-- sharing a word are ranked), each {note_id, content (first 300 characters), similarity,
-- possible_duplicate, by: 'words'}, most similar first. Similarity is the Jaccard index of the
-- two notes' lexeme sets (English stemming, as content_tsv): 1.0 for the same words, and a
-- note at 0.9 or more is flagged as a possible duplicate, as similar_notes does for vectors.
-- Below 0.2 (one word in five shared) a note is not similar. `exclude` leaves out a note
-- (the one just added).
CREATE FUNCTION similar_notes_by_words(campaign_id uuid, content text, k integer DEFAULT 5,
                                       exclude bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE
SET search_path FROM CURRENT
AS $$
    WITH query AS (
        SELECT tsvector_to_array(to_tsvector('english', coalesce($2, ''))) AS lexemes
    ),
    -- Any shared lexeme, through the GIN index on content_tsv (quotes and backslashes
    -- escaped as tsquery reads them).
    any_word AS (
        SELECT (SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')
                  FROM unnest(q.lexemes) l)::tsquery AS tsq
          FROM query q
         WHERE cardinality(q.lexemes) > 0
    ),
    candidates AS (
        SELECT n.id, n.content, tsvector_to_array(n.content_tsv) AS lexemes
          FROM notes n, any_word w
         WHERE n.campaign_id = $1 AND n.id IS DISTINCT FROM $4 AND n.content_tsv @@ w.tsq
         ORDER BY n.id DESC
         LIMIT 1000
    ),
    scored AS (
        SELECT c.id, c.content, shared.n::double precision
                   / (cardinality(c.lexemes) + cardinality(q.lexemes) - shared.n) AS similarity
          FROM candidates c CROSS JOIN query q
         CROSS JOIN LATERAL (SELECT count(*) AS n FROM unnest(c.lexemes) x WHERE x = ANY (q.lexemes)) shared
    )
    SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', id, 'content', left(content, 300),
                                                 'similarity', round(similarity::numeric, 4),
                                                 'possible_duplicate', similarity >= 0.9, 'by', 'words')
                              ORDER BY similarity DESC, id DESC), '[]')
      FROM (SELECT * FROM scored WHERE similarity >= 0.2
             ORDER BY similarity DESC, id DESC LIMIT greatest($3, 0)) best;
$$;
