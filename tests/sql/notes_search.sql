-- Notes and search (SPEC §8, §13): newest first, full-text search, no results for a query
-- without searchable words, and the similarity floor per model.
SELECT plan(8);

SELECT t.campaign() AS c \gset
SELECT sortie.add_note(:'c', 'The connection pool ran out during the Tuesday outage', ARRAY['finding']);
SELECT sortie.add_note(:'c', 'Pinned the TLS library to keep old ciphers', ARRAY['decision']);
SELECT is(sortie.get_notes(:'c') -> 'notes' -> 0 ->> 'content', 'Pinned the TLS library to keep old ciphers', 'newest first');
SELECT is(jsonb_array_length(sortie.get_notes(:'c', ARRAY['finding']) -> 'notes'), 1, 'tags filter');
SELECT is(sortie.search_notes('connection pool outage', :'c') -> 'results' -> 0 ->> 'content',
          'The connection pool ran out during the Tuesday outage', 'words find their note');
SELECT is(sortie.search_notes('the and of', :'c') -> 'results', '[]'::jsonb, 'stop words alone find nothing');
SELECT matches(sortie.search_notes('?! ***', :'c') ->> 'reason', 'no searchable words', 'and say why');
SELECT cmp_ok(sortie._similarity_floor('all-MiniLM-L6-v2'), '>', 0::double precision, 'the offline model has a floor');
SELECT is(sortie._similarity_floor('some-unmeasured-model'), 0::double precision, 'an unmeasured model drops only negatives');

SELECT t.invariants_hold();
SELECT * FROM finish();
