#!/bin/sh
# The example cluster on one machine (docs/operations.md, "Running a cluster"):
#   127.0.0.10  HAProxy (SMTP 8025, submission 8587/8465, gateway HTTP 8081),
#               nginx (IMAP 8143, POP3 8110, submission 8588, webmail 8880), Redis 16379
#   127.0.0.11  gateway gw1     127.0.0.12  gateway gw2
#   127.0.0.21  backend be1     127.0.0.22  backend be2
# Usage: etc/cluster/start.sh [start|stop|status]   (state and logs in etc/cluster/run/)
# Environment: TWISTD, MAILGW (commands; default: from PATH, else python -m), PYTHON,
# MAILGW_REPO (the checkout put on PYTHONPATH; default: the one holding this script).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=${MAILGW_REPO:-$(cd "$HERE/../.." && pwd)}
RUN="$HERE/run"
PYTHON=${PYTHON:-python3}
TWISTD=${TWISTD:-$(command -v twistd || echo "$PYTHON -m twisted.scripts.twistd")}
MAILGW=${MAILGW:-$(command -v mailgw || echo "$PYTHON -m mailgw.cli")}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
NODES="be1 be2 gw1 gw2"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM by PID, wait up to 15 s
    if alive "$2"; then
        pid=$(cat "$2")
        kill "$pid"
        i=0
        while kill -0 "$pid" 2>/dev/null && [ $i -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
        echo "stopped $1 ($pid)"
    fi
    rm -f "$2"
}

wait_port() {  # wait_port HOST PORT
    i=0
    until "$PYTHON" -c "import socket,sys; socket.create_connection(('$1', $2), 1)" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 200 ]; then echo "nothing listening on $1:$2" >&2; exit 1; fi
        sleep 0.1
    done
}

start() {
    mkdir -p "$RUN/shared" "$RUN/nginx" "$RUN/redis"
    cd "$HERE"
    if [ ! -f "$RUN/tls/mailgw.crt" ]; then
        $MAILGW --config "$HERE/gw1.ini" cert selfsigned --hostname mail.example.test \
            --out "$RUN/tls" >/dev/null
    fi
    # Users and their mailbox nodes (one shared directory in this example).
    if ! $MAILGW --config "$HERE/gw1.ini" domain list | grep -qx example.test; then
        $MAILGW --config "$HERE/gw1.ini" domain add example.test
        $MAILGW --config "$HERE/gw1.ini" user add alice@example.test --password "alice password"
        $MAILGW --config "$HERE/gw1.ini" user add bob@example.test --password "bob password"
        $MAILGW --config "$HERE/gw1.ini" user node alice@example.test be1
        $MAILGW --config "$HERE/gw1.ini" user node bob@example.test be2
    fi
    if command -v redis-server >/dev/null && ! alive "$RUN/redis/redis.pid"; then
        redis-server --bind 127.0.0.10 --port 16379 --dir "$RUN/redis" --daemonize yes \
            --pidfile "$RUN/redis/redis.pid" --logfile "$RUN/redis/redis.log" --save ""
        echo "started redis 127.0.0.10:16379"
    fi
    for node in $NODES; do
        if alive "$RUN/$node.pid"; then continue; fi
        $TWISTD --pidfile "$RUN/$node.pid" --logfile "$RUN/$node.log" \
            mailgw --config "$HERE/$node.ini"
        echo "started $node (log: $RUN/$node.log)"
    done
    wait_port 127.0.0.21 8024; wait_port 127.0.0.22 8024
    wait_port 127.0.0.11 8080; wait_port 127.0.0.12 8080
    if ! alive "$RUN/haproxy.pid"; then
        haproxy -D -p "$RUN/haproxy.pid" -f "$HERE/haproxy.cfg"
        echo "started haproxy"
    fi
    if ! alive "$RUN/nginx/nginx.pid"; then
        nginx -p "$RUN/nginx" -c "$HERE/nginx.conf"
        echo "started nginx"
    fi
    wait_port 127.0.0.10 8025; wait_port 127.0.0.10 8143
    echo "cluster up: SMTP 127.0.0.10:8025, IMAP 127.0.0.10:8143, POP3 127.0.0.10:8110"
}

stop() {
    stop_pid nginx "$RUN/nginx/nginx.pid"
    stop_pid haproxy "$RUN/haproxy.pid"
    for node in gw1 gw2 be1 be2; do stop_pid "$node" "$RUN/$node.pid"; done
    stop_pid redis "$RUN/redis/redis.pid"
}

status() {
    for p in "$RUN/redis/redis.pid" "$RUN/haproxy.pid" "$RUN/nginx/nginx.pid" \
        "$RUN/be1.pid" "$RUN/be2.pid" "$RUN/gw1.pid" "$RUN/gw2.pid"; do
        name=$(basename "$p" .pid)
        if alive "$p"; then echo "$name: running ($(cat "$p"))"; else echo "$name: stopped"; fi
    done
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
