#!/bin/sh
# The replicas profile's PostgreSQL. Starts as root only to hand the password file (made by the
# fleet's certs step, 0600 for the fedpers user) to the postgres user; everything else runs as postgres.
# First start: a cluster whose only login is `fedpers` with that password (read from a file, never
# argv), scram-sha-256 over the compose network, and the database `fedpers`.
set -eu
PWFILE=${FEDPERS_STATE_PASSWORD_FILE:?the password file of the fedpers database user}
if [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /run/postgresql
  chown postgres:postgres "$PGDATA" /run/postgresql
  install -o postgres -g postgres -m 600 "$PWFILE" /run/postgresql/pw
  export FEDPERS_STATE_PASSWORD_FILE=/run/postgresql/pw
  exec setpriv --reuid=postgres --regid=postgres --init-groups sh "$0"  # exec: postgres gets the signals
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb -D "$PGDATA" -U fedpers --pwfile="$PWFILE" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >/dev/null
  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  createdb -U fedpers fedpers
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c max_connections=50
