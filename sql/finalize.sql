-- pg_blocktrack: privileges, applied after every function exists.
-- Backups read the whole cluster and the tracker sees every change: nothing
-- in schema blocktrack is granted to PUBLIC.
-- Archive health as the server sees it: pg_stat_archiver, the age of the
-- last archived segment, and the WAL still waiting to be archived (marked
-- .ready; archive-push --async archives from that same queue) in bytes and
-- seconds.
CREATE FUNCTION blocktrack.archive_status(
  OUT archive_mode text,
  OUT archived_count bigint,
  OUT last_archived_wal text,
  OUT last_archived_time timestamptz,
  OUT last_archived_age_seconds double precision,
  OUT failed_count bigint,
  OUT last_failed_wal text,
  OUT last_failed_time timestamptz,
  OUT ready_segments bigint,
  OUT lag_bytes bigint,
  OUT lag_seconds double precision,
  OUT async_push_error text)
LANGUAGE sql VOLATILE AS $$
  SELECT current_setting('archive_mode'),
         a.archived_count, a.last_archived_wal, a.last_archived_time,
         extract(epoch FROM clock_timestamp() - a.last_archived_time)::double precision,
         a.failed_count, a.last_failed_wal, a.last_failed_time,
         q.ready_segments,
         q.ready_segments * pg_size_bytes(current_setting('wal_segment_size')),
         coalesce(q.ready_oldest_age_seconds, 0),
         q.spool_error
  FROM pg_stat_archiver a, blocktrack.archive_queue() q
$$;

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
