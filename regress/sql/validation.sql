-- page_checksum and validate_backup: argument errors, and agreement with the
-- checksum stored on disk.
CREATE TABLE pages AS SELECT g FROM generate_series(1, 5000) g;
CHECKPOINT;
-- The server's checksum of each page equals pd_checksum on disk (bytes 8-9, little-endian).
SELECT count(*) AS pages,
       bool_and(blocktrack.page_checksum(p, b) = get_byte(p, 8) + 256 * get_byte(p, 9)) AS all_match
  FROM generate_series(0, pg_relation_size('pages') / 8192 - 1) b,
       LATERAL pg_read_binary_file(pg_relation_filepath('pages'), b * 8192, 8192) p;

SELECT try($$SELECT blocktrack.page_checksum(NULL, 0)$$);
SELECT try($$SELECT blocktrack.page_checksum('\x00', 0)$$);
SELECT try($$SELECT blocktrack.page_checksum(pg_read_binary_file(pg_relation_filepath('pages'), 0, 8192), -1)$$);
SELECT try($$SELECT blocktrack.page_checksum(decode(repeat('00', 8192), 'hex'), 0)$$);

SELECT try($$SELECT * FROM blocktrack.validate_backup(NULL)$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('relative/repo')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/nonexistent/repo')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp', 'latest')$$);
