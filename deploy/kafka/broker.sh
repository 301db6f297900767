#!/usr/bin/env bash
# Run a local single-node Kafka broker (real Apache Kafka 4.x from Maven Central,
# no Docker) in the background, for `rex-stream run` on a developer machine.
#
#   deploy/kafka/broker.sh start  [port]   # default port 9092; prints the bootstrap address
#   deploy/kafka/broker.sh stop   [port]
#   deploy/kafka/broker.sh status [port]
#
# State lives in <repo>/.cache/kafka/<port>/ (git-ignored): broker.pid, data/
# (topics survive stop/start), broker.out (console output; the full broker log
# is data/logs/server.log). Needs Java 17+, and Maven for the first jar download
# (cached in ~/.cache/rex_stream/kafka, or $REX_KAFKA_CACHE).
# Env: PYTHON (default: python3), REX_KAFKA_HEAP (default 512m).
set -euo pipefail

cmd=${1:-}
port=${2:-9092}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state="$repo/.cache/kafka/$port"
pidfile="$state/broker.pid"
out="$state/broker.out"
python=${PYTHON:-python3}

usage() { echo "usage: $0 start|stop|status [port]" >&2; exit 2; }

is_running() {
    [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

case "$cmd" in
start)
    if is_running; then
        echo "kafka already running on 127.0.0.1:$port (pid $(cat "$pidfile"))"
        exit 0
    fi
    mkdir -p "$state"
    cd "$repo"
    # The module prints the bootstrap address on stdout once the broker is ready.
    PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" nohup "$python" -m rex_stream.devbroker \
        start --port "$port" --data-dir "$state/data" >"$out" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 1 240); do
        if grep -qx "127.0.0.1:$port" "$out" 2>/dev/null; then
            echo "kafka ready: bootstrap 127.0.0.1:$port (pid $(cat "$pidfile"); log $out)"
            exit 0
        fi
        if ! is_running; then
            echo "kafka failed to start; last output ($out):" >&2
            tail -n 40 "$out" >&2 || true
            rm -f "$pidfile"
            exit 1
        fi
        sleep 0.5
    done
    echo "kafka not ready after 120s; see $out (pid $(cat "$pidfile") still running)" >&2
    exit 1
    ;;
stop)
    if ! is_running; then
        echo "kafka not running on port $port"
        rm -f "$pidfile"
        exit 0
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 120); do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$pidfile"
            echo "kafka on port $port stopped"
            exit 0
        fi
        sleep 0.5
    done
    echo "kafka (pid $pid) did not stop in 60s; killing it" >&2
    # The JVM is a child of the wrapper, leading its own process group.
    for child in $(pgrep -P "$pid" || true); do
        kill -KILL -- "-$child" 2>/dev/null || true
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
    exit 1
    ;;
status)
    if is_running; then
        echo "kafka running: bootstrap 127.0.0.1:$port (pid $(cat "$pidfile"); data $state/data)"
        exit 0
    fi
    echo "kafka not running on port $port"
    exit 3
    ;;
*)
    usage
    ;;
esac
