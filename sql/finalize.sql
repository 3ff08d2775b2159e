-- pg_blocktrack: privileges, applied after every function exists.
-- Backups read the whole cluster: nothing is granted to PUBLIC.
REVOKE ALL ON FUNCTION blocktrack.backup_start(text, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION blocktrack.backup_stop(boolean) FROM PUBLIC;
