-- The operating loop's SQL surface: argument errors with SQLSTATEs, and an
-- empty progress view. (Backups, cancels, pg_cron, metrics and retention on
-- real repositories: streamer/tests/operations.rs.)
SELECT * FROM blocktrack.progress;
SELECT try($$SELECT blocktrack.run_backup(NULL)$$);
SELECT try($$SELECT blocktrack.run_backup('/tmp/blockstream-e2e/regress-repo', 'weekly')$$);
SELECT try($$SELECT blocktrack.run_backup('/tmp/blockstream-e2e/regress-repo', 'full', jobs => 0)$$);
SELECT try($$SELECT blocktrack.run_backup('/tmp/blockstream-e2e/regress-repo', 'full', compress => 'lz4')$$);
SELECT try($$SELECT blocktrack.run_backup('/tmp/blockstream-e2e/regress-repo', NULL)$$);
SELECT try($$SELECT blocktrack.run_backup('/elsewhere/repo')$$);
SELECT try($$SELECT * FROM blocktrack.expire('/tmp/blockstream-e2e', NULL)$$);
SELECT try($$SELECT * FROM blocktrack.expire('/tmp/blockstream-e2e', 0)$$);
SELECT try($$SELECT * FROM blocktrack.expire('/tmp/blockstream-e2e', -1)$$);
SELECT try($$SELECT * FROM blocktrack.expire('/tmp/blockstream-e2e', 1, retain_incr => 1, retain_days => 2)$$);
SELECT try($$SELECT * FROM blocktrack.backups('/tmp/blockstream-e2e/absent')$$);
SELECT try($$SELECT * FROM blocktrack.metrics(NULL)$$);
SELECT try($$SELECT blocktrack.progress_report('upload', 'copy')$$);
SELECT blocktrack.cancel_backup();
-- Archive health from the server (archiving is off in this cluster):
-- nothing archived, nothing waiting, no pusher error.
SELECT archive_mode, archived_count, failed_count, ready_segments, lag_bytes, lag_seconds, async_push_error
FROM blocktrack.archive_status();
