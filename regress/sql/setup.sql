-- Runs first: the extension every other test uses.
CREATE EXTENSION pg_blocktrack;
CREATE EXTENSION pg_walinspect;

-- try(query, mask_lsns): the SQLSTATE and message of the error a query
-- raises, LSNs masked when they vary from run to run.
CREATE FUNCTION try(query text, mask_lsns bool DEFAULT false) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE query;
  RETURN 'no error';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || CASE WHEN mask_lsns
    THEN regexp_replace(SQLERRM, '[0-9A-F]+/[0-9A-F]+', 'X/X', 'g') ELSE SQLERRM END;
END $$;
