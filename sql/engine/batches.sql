-- Batches (SPEC §18): several completions in one transaction. Claims in batches are
-- claim_next(..., max_steps => n) in claim.sql.

-- Completes several claims in one transaction: `items` is a JSON array of up to 1,000 objects
-- {step_id, claim_token, summary?, tokens_used?}, each done exactly as complete_step does it.
-- Each item runs in its own subtransaction: an item complete_step refuses (stale_claim,
-- skipped, invalid_state, not_found, a bad item) changes nothing and is reported, and the
-- others are applied. Items are taken in (campaign, step) order, whatever the array's order,
-- so two batches touching the same campaigns lock them in the same order and cannot
-- deadlock. Returns {completed: [complete_step's answer per applied item],
-- refused: [{step_id, code, message}]}, both in that order.
-- Errors (the whole call): invalid_argument when `items` is not an array of 1..1000 objects.
CREATE FUNCTION complete_steps(items jsonb) RETURNS jsonb
LANGUAGE plpgsql VOLATILE
SET search_path FROM CURRENT
AS $$
#variable_conflict use_variable
DECLARE
    v_item record;
    v_completed jsonb := '[]';
    v_refused jsonb := '[]';
    v_code text;
    v_message text;
BEGIN
    IF items IS NULL OR jsonb_typeof(items) <> 'array' OR jsonb_array_length(items) NOT BETWEEN 1 AND 1000 THEN
        PERFORM raise('invalid_argument', 'items must be a JSON array of 1 to 1000 {step_id, claim_token, summary, tokens_used} objects');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(items) e WHERE jsonb_typeof(e) <> 'object') THEN
        PERFORM raise('invalid_argument', 'each item must be an object {step_id, claim_token, summary, tokens_used}');
    END IF;
    FOR v_item IN
        SELECT e.value AS item, e.ordinality
          FROM jsonb_array_elements(items) WITH ORDINALITY e
          -- bigint, not numeric: `id = numeric` cannot use the primary key (a scan of steps
          -- per batch). Only the order comes from this join; each item is checked below.
          LEFT JOIN steps s ON s.id = CASE WHEN jsonb_typeof(e.value -> 'step_id') = 'number'
                                            AND (e.value ->> 'step_id')::numeric BETWEEN 1 AND 9223372036854775807
                                           THEN (e.value ->> 'step_id')::numeric::bigint END
         ORDER BY s.campaign_id, s.id, e.ordinality
    LOOP
        BEGIN
            IF jsonb_typeof(v_item.item -> 'step_id') IS DISTINCT FROM 'number'
               OR jsonb_typeof(v_item.item -> 'claim_token') IS DISTINCT FROM 'string' THEN
                PERFORM raise('invalid_argument', 'step_id (a number) and claim_token (a string) are required');
            END IF;
            v_completed := v_completed || jsonb_build_array(complete_step(
                (v_item.item ->> 'step_id')::bigint,
                (v_item.item ->> 'claim_token')::uuid,
                coalesce(v_item.item ->> 'summary', ''),
                coalesce((v_item.item ->> 'tokens_used')::bigint, 0)));
        EXCEPTION
            WHEN SQLSTATE 'SR001' OR SQLSTATE 'SR002' OR SQLSTATE 'SR003' OR SQLSTATE 'SR005'
                 OR SQLSTATE 'SR006' OR SQLSTATE 'SR008' OR SQLSTATE 'SR009'
                 OR invalid_text_representation OR numeric_value_out_of_range THEN
                GET STACKED DIAGNOSTICS v_message = MESSAGE_TEXT;
                v_code := CASE WHEN v_message ~ '^[a-z_]+: ' THEN split_part(v_message, ': ', 1) ELSE 'invalid_argument' END;
                v_refused := v_refused || jsonb_build_array(jsonb_build_object(
                    'step_id', v_item.item -> 'step_id', 'code', v_code,
                    'message', CASE WHEN v_message ~ '^[a-z_]+: ' THEN substr(v_message, length(v_code) + 3) ELSE v_message END));
        END;
    END LOOP;
    RETURN jsonb_build_object('completed', v_completed, 'refused', v_refused);
END
$$;
