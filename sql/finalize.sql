-- pg_blocktrack: privileges, applied after every function exists.
-- Backups read the whole cluster and the tracker sees every change: nothing
-- in schema blocktrack is granted to PUBLIC.
DO $$
DECLARE
  f regprocedure;
BEGIN
  FOR f IN SELECT p.oid::regprocedure FROM pg_proc p WHERE p.pronamespace = 'blocktrack'::regnamespace LOOP
    EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
  END LOOP;
END
$$;

-- What runs now, like pg_stat_progress_basebackup: backups started from SQL
-- (blocktrack.run_backup) and by the command line.
CREATE VIEW blocktrack.progress AS SELECT * FROM blocktrack.progress_rows();
REVOKE ALL ON blocktrack.progress FROM PUBLIC;
