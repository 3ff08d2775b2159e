-- Change tracking: status, summaries, changed_blocks, flush_summary, and the
-- incremental check of backup_start. LSNs in messages vary: try() masks them.
SELECT enabled, worker_pid IS NOT NULL AS running, timeline, slot_name,
       slot_restart_lsn <= summarized_lsn AS slot_holds_unsummarized_wal, last_error
  FROM blocktrack.status();
SELECT blocktrack.flush_summary() >= lsn AS reached FROM pg_current_wal_flush_lsn() lsn;
SELECT count(*) > 0 AS has_summaries, bool_or(is_gap) AS any_gap,
       bool_and(end_lsn >= start_lsn) AS ordered FROM blocktrack.summaries();

-- A table and two summary boundaries around changes to it.
CREATE TABLE tracked (id int, v text);
SELECT blocktrack.flush_summary() AS a \gset
INSERT INTO tracked SELECT g, repeat('t', 100) FROM generate_series(1, 1000) g;
SELECT blocktrack.flush_summary() AS b \gset
SELECT path = pg_relation_filepath('tracked') AS right_file, forknum, segno, limit_block, full_copy,
       nblocks = pg_relation_size('tracked') / 8192 AS every_block, length(blocks) = 4 * nblocks AS u32_each
  FROM blocktrack.changed_blocks(:'a', :'b') WHERE relfilenode = pg_relation_filenode('tracked');
-- The same blocks WAL references (pg_walinspect), for this table's main fork.
SELECT count(DISTINCT substring(block_ref FROM 'blk ([0-9]+)')) = pg_relation_size('tracked') / 8192 AS matches_wal
  FROM pg_get_wal_records_info(:'a', :'b')
 WHERE block_ref LIKE '%/' || pg_relation_filenode('tracked') || ' fork main%';
SELECT count(*) AS rows_for_an_empty_range FROM blocktrack.changed_blocks(:'b', :'b');

-- Argument errors.
SELECT try($$SELECT * FROM blocktrack.changed_blocks(NULL, '0/1')$$, true);
SELECT try($$SELECT * FROM blocktrack.changed_blocks('0/2', NULL)$$, true);
SELECT try($$SELECT * FROM blocktrack.changed_blocks('0/2', '0/1')$$, true);
SELECT try($$SELECT * FROM blocktrack.changed_blocks('0/1', 'FFFFFFFF/0')$$, true);
SELECT try($$SELECT * FROM blocktrack.changed_blocks('0/1', pg_current_wal_flush_lsn())$$, true);
SELECT try(format($$SELECT * FROM blocktrack.changed_blocks(%L, %L, 99)$$, :'a', :'b'), true);
SELECT try($$SELECT blocktrack.flush_summary('FFFFFFFF/0')$$, true);
SELECT try($$SELECT blocktrack.flush_summary(NULL, -1)$$, true);
SELECT try($$SELECT blocktrack.flush_summary(NULL, NULL)$$, true);
SELECT try($$SELECT * FROM blocktrack.backup_start('x', true, NULL, NULL, NULL)$$, true);
SELECT try($$SELECT * FROM blocktrack.backup_start('x', true, '0/1', 0)$$, true);
SELECT try($$SELECT * FROM blocktrack.backup_start('x', true, '0/1', 1, -5)$$, true);

-- backup_start says whether an incremental on a parent is possible, and why
-- not: the changes since the parent must be known and the parent must lie in
-- this server's WAL history (its checkpoint record, same LSN and CRC).
SELECT incremental_ok, reason FROM blocktrack.backup_start('no parent');
SELECT stop_tli FROM blocktrack.backup_stop();
SELECT start_lsn AS p_start FROM blocktrack.backup_start('parent') \gset
SELECT stop_lsn AS p_stop, checkpoint_lsn AS p_ckpt, checkpoint_crc AS p_crc FROM blocktrack.backup_stop() \gset
SELECT :'p_ckpt'::pg_lsn >= :'p_start'::pg_lsn AS checkpoint_after_start,
       :'p_stop'::pg_lsn >= :'p_ckpt'::pg_lsn AS stop_after_checkpoint;
INSERT INTO tracked VALUES (0, 'after the parent');
SELECT incremental_ok, reason FROM blocktrack.backup_start('child', true, :'p_start', 1,
  parent_stop_lsn => :'p_stop', parent_checkpoint_lsn => :'p_ckpt', parent_checkpoint_crc => :'p_crc');
SELECT stop_tli FROM blocktrack.backup_stop();
-- The same checkpoint LSN with another CRC: a parent from another history.
SELECT incremental_ok, regexp_replace(reason, '[0-9A-F]+/[0-9A-F]+|CRC [0-9a-f]+', 'X', 'g') AS reason
  FROM blocktrack.backup_start('forged', true, :'p_start', 1,
  parent_stop_lsn => :'p_stop', parent_checkpoint_lsn => :'p_ckpt', parent_checkpoint_crc => :'p_crc'::int8 # 1);
SELECT stop_tli FROM blocktrack.backup_stop();
-- A checkpoint LSN where this server has none.
SELECT incremental_ok, regexp_replace(reason, '[0-9A-F]+/[0-9A-F]+', 'X/X', 'g') AS reason
  FROM blocktrack.backup_start('nowhere', true, :'p_start', 1,
  parent_stop_lsn => :'p_stop', parent_checkpoint_lsn => :'p_ckpt'::pg_lsn + 8, parent_checkpoint_crc => :'p_crc');
SELECT stop_tli FROM blocktrack.backup_stop();
-- A parent that ends after this backup starts (PostgreSQL 17 refuses it too).
SELECT incremental_ok, regexp_replace(reason, '[0-9A-F]+/[0-9A-F]+', 'X/X', 'g') AS reason
  FROM blocktrack.backup_start('ends later', true, :'p_start', 1,
  parent_stop_lsn => 'FFFFFFFF/0', parent_checkpoint_lsn => :'p_ckpt', parent_checkpoint_crc => :'p_crc');
SELECT stop_tli FROM blocktrack.backup_stop();
-- No checkpoint given (a backup from before this check).
SELECT incremental_ok, reason FROM blocktrack.backup_start('tracked parent', true, :'a', 1);
SELECT stop_tli FROM blocktrack.backup_stop();
SELECT incremental_ok, regexp_replace(reason, '[0-9A-F]+/[0-9A-F]+', 'X/X', 'g') AS reason
  FROM blocktrack.backup_start('untracked parent', true, '0/1', 1);
SELECT stop_tli FROM blocktrack.backup_stop();
SELECT incremental_ok, reason FROM blocktrack.backup_start('other timeline', true, :'a', 2);
SELECT stop_tli FROM blocktrack.backup_stop();
SELECT try($$SELECT * FROM blocktrack.backup_start('x', true, '0/1', 1, parent_checkpoint_crc => -1)$$);
