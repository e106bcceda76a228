-- Backups (pg_dump). pg_dump leaves out the rows of an extension's tables, and the positions of
-- its sequences, unless the extension marks them as configuration: without this a dump of a
-- Sortie database restores the schema and not one campaign. Every table and sequence of the
-- extension is marked, whole (no filter).
DO $backup$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT c.oid::regclass AS rel
          FROM pg_class c
          JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'sortie'
         WHERE c.relkind IN ('r', 'S')
    LOOP
        PERFORM pg_catalog.pg_extension_config_dump(r.rel, '');
    END LOOP;
END
$backup$;
