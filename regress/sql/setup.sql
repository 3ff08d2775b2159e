-- Runs first: the extension every other test uses.
CREATE EXTENSION pg_blocktrack;
CREATE EXTENSION pg_walinspect;
