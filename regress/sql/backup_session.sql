-- The backup session functions: argument checks, order checks, privileges.

-- Stopping before starting is refused (with a hint).
SELECT * FROM blocktrack.backup_stop();
SELECT try('SELECT * FROM blocktrack.backup_stop()');

-- Bad labels.
SELECT try('SELECT * FROM blocktrack.backup_start(NULL)');
SELECT try($$SELECT * FROM blocktrack.backup_start('')$$);
SELECT try($$SELECT * FROM blocktrack.backup_start(repeat('x', 2000))$$);
SELECT try($$SELECT * FROM blocktrack.backup_start(E'two\nlines')$$);

-- A backup: start, the slot that holds WAL, a second start refused, stop.
SELECT start_lsn > '0/0' AS has_lsn, start_tli, data_checksums,
       system_identifier = (SELECT system_identifier FROM pg_control_system()) AS same_system
  FROM blocktrack.backup_start('regress', fast => true);
SELECT try($$SELECT * FROM blocktrack.backup_stop(NULL)$$);
SELECT try($$SELECT * FROM blocktrack.backup_start('x', NULL)$$);
SELECT slot_name LIKE 'blocktrack_backup_%' AS ours, temporary, slot_type, restart_lsn IS NOT NULL AS holds_wal
  FROM pg_replication_slots WHERE active_pid = pg_backend_pid();
SELECT * FROM blocktrack.backup_start('again');
SELECT try($$SELECT * FROM blocktrack.backup_start('again')$$);
SELECT stop_lsn > '0/0' AS has_lsn, stop_tli,
       labelfile LIKE 'START WAL LOCATION: %' AS label_ok,
       labelfile LIKE '%LABEL: regress%' AS label_named, spcmapfile
  FROM blocktrack.backup_stop();
SELECT * FROM blocktrack.backup_stop();

-- A second backup in the same session replaces the slot of the first.
SELECT start_tli FROM blocktrack.backup_start('second');
SELECT count(*) FROM pg_replication_slots WHERE active_pid = pg_backend_pid();
SELECT stop_tli FROM blocktrack.backup_stop(wait_for_archive => false);

-- Nothing is granted to PUBLIC.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'blocktrack' ORDER BY 1;
CREATE ROLE blocktrack_nobody;
SET ROLE blocktrack_nobody;
SELECT try($$SELECT * FROM blocktrack.backup_start('nobody')$$);
RESET ROLE;
DROP ROLE blocktrack_nobody;
