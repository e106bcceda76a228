-- Similar notes by their words (SPEC §8, §18). sortie-mcp stores a note at once and embeds it
-- off the request path (the embedding lands a few milliseconds later through
-- set_note_embedding); until then add_note answers the notes that share its words.

-- The notes of a campaign sharing the most words with `content`: at most `k` (the newest 300
-- sharing a word are ranked), each {note_id, content (first 300 characters), similarity,
-- possible_duplicate, by: 'words'}, most similar first. Similarity is the Jaccard index of the
-- two notes' lexeme sets (English stemming, as content_tsv): 1.0 for the same words, and a
-- note at 0.9 or more is flagged as a possible duplicate, as similar_notes does for vectors.
-- Below 0.2 (one word in five shared) a note is not similar. `exclude` leaves out a note
-- (the one just added).
-- PL/pgSQL rather than SQL: its plans are cached per session, and planning this query (GIN,
-- tsquery) cost more than running it (2.9 ms against 0.8 ms over 600 notes sharing words).
CREATE FUNCTION _similar_notes_by_words(campaign_id uuid, content text, k integer DEFAULT 5,
                                       exclude bigint DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_tsv tsvector := to_tsvector('english', coalesce(content, ''));
    v_any tsquery;
BEGIN
    IF length(v_tsv) = 0 THEN
        RETURN '[]';
    END IF;
    -- Any shared lexeme, through the GIN index on content_tsv (quotes and backslashes escaped
    -- as tsquery reads them).
    SELECT string_agg('''' || replace(replace(l, '\', '\\'), '''', '''''') || '''', ' | ')::tsquery
      INTO v_any
      FROM unnest(tsvector_to_array(v_tsv)) l;
    -- The union of two lexeme sets is the length of the concatenated tsvectors (built in, no
    -- unnesting): shared = |a| + |b| - |a ∪ b|.
    RETURN (
        SELECT coalesce(jsonb_agg(jsonb_build_object('note_id', best.id, 'content', left(n.content, 300),
                                                     'similarity', round(best.similarity::numeric, 4),
                                                     'possible_duplicate', best.similarity >= 0.9, 'by', 'words')
                                  ORDER BY best.similarity DESC, best.id DESC), '[]')
          FROM (SELECT s.id, s.similarity
                  FROM (SELECT x.id, (length(x.content_tsv) + length(v_tsv) - length(x.content_tsv || v_tsv))::double precision
                                     / length(x.content_tsv || v_tsv) AS similarity
                          FROM notes x
                         WHERE x.campaign_id = _similar_notes_by_words.campaign_id
                           AND x.id IS DISTINCT FROM exclude AND x.content_tsv @@ v_any
                         ORDER BY x.id DESC
                         LIMIT 300) s
                 WHERE s.similarity >= 0.2
                 ORDER BY s.similarity DESC, s.id DESC
                 LIMIT greatest(k, 0)) best
          JOIN notes n ON n.campaign_id = _similar_notes_by_words.campaign_id AND n.id = best.id);
END
$$;
