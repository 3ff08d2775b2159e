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

-- Paths from SQL: superuser or pg_read_server_files, and a path under
-- blocktrack.allowed_repositories (superuser-only; this cluster allows
-- /tmp/blockstream-e2e).
SELECT try($$SELECT * FROM blocktrack.validate_backup(NULL)$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('relative/repo')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/nonexistent/repo')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp', 'latest')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp/blockstream-e2e/../', 'latest')$$);
SET blocktrack.allowed_repositories = '/tmp';
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp', 'latest')$$);
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp', NULL)$$);
RESET blocktrack.allowed_repositories;

CREATE ROLE blocktrack_grantee;
GRANT USAGE ON SCHEMA blocktrack TO blocktrack_grantee;
GRANT EXECUTE ON FUNCTION blocktrack.validate_backup(text, text) TO blocktrack_grantee;
SET ROLE blocktrack_grantee;
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp/blockstream-e2e', 'latest')$$);
SELECT try($$SET blocktrack.allowed_repositories = '/'$$);
RESET ROLE;
GRANT pg_read_server_files TO blocktrack_grantee;
SET ROLE blocktrack_grantee;
SELECT try($$SELECT * FROM blocktrack.validate_backup('/tmp', 'latest')$$);
RESET ROLE;
DROP OWNED BY blocktrack_grantee;
DROP ROLE blocktrack_grantee;
