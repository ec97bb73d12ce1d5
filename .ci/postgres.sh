# A throwaway PostgreSQL server on 127.0.0.1 for the tests of workers on several machines
# (tests/test_stage1_workers.py). Sourced by .ci/run; by hand:
#     . .ci/postgres.sh && start_test_postgres    # exports VIT_TEST_POSTGRES_URL
#     ... python -m pytest tests/test_stage1_workers.py ...
#     stop_test_postgres
# The password is random and never printed; the tests create a fresh database each.

_as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

_as_postgres() {  # initdb and postgres refuse to run as root
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start_test_postgres() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        _as_root apt-get update -q >/dev/null
        _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    fi
    local bin port password
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    PG_TEST_DIR=$(mktemp -d /tmp/vit-postgres.XXXXXX)
    if [ "$(id -u)" = 0 ]; then chown postgres "$PG_TEST_DIR"; fi
    _as_postgres "$bin/initdb" -D "$PG_TEST_DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    # Only 127.0.0.1 (and a socket in its own folder): nothing outside this machine can reach it.
    # No fsync: a test server need not survive a power cut, and dropping databases gets fast.
    _as_postgres "$bin/pg_ctl" -D "$PG_TEST_DIR/data" -l "$PG_TEST_DIR/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_TEST_DIR -c fsync=off -c full_page_writes=off" start >/dev/null
    _as_postgres "$bin/psql" -h "$PG_TEST_DIR" -p "$port" -U postgres -q -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE vit LOGIN CREATEDB PASSWORD '$password'" -c "CREATE DATABASE vit OWNER vit" >/dev/null
    PG_TEST_BIN=$bin
    export VIT_TEST_POSTGRES_URL="postgresql://vit:$password@127.0.0.1:$port/vit"
    export PG_TEST_DIR PG_TEST_BIN  # a test restarts the server under a running worker (restart_test_postgres)
}

stop_test_postgres() {
    if [ -n "${PG_TEST_DIR:-}" ]; then
        _as_postgres "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -m fast -w stop >/dev/null || true
        rm -rf "$PG_TEST_DIR"
        PG_TEST_DIR=
    fi
}
