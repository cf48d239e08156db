#!/usr/bin/env bash
# Make sure the local services the tests use are up (`make test` runs this first): Redis at
# 127.0.0.1:6379 and PostgreSQL at 127.0.0.1:5432. A service that is down is started when
# its server is installed here; otherwise the tests that need it skip (or fail under CI=true).
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {
    for _ in $(seq 1 50); do up "$1" && return 0; sleep 0.1; done
    return 1
}

if ! up 6379 && command -v redis-server >/dev/null; then
    echo "starting Redis on 127.0.0.1:6379" >&2
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_up 6379 || echo "Redis did not start" >&2
fi

if ! up 5432 && command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL on 127.0.0.1:5432" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_up 5432 || echo "PostgreSQL did not start" >&2
fi
exit 0
