#!/bin/bash
# Instruction profile of WebSocket traffic under callgrind, ws-echo with no supervisor.
# Instruction counts do not depend on what else the machine does, so two builds compare
# exactly.
#
# - pingpong (default): 1 worker; 10 connections × 200 echoes (one message in flight each)
#   to warm up, then the counters are zeroed and 10 × 2000 = 20,000 echoes are measured.
# - fanout: 2 workers (callgrind runs them one at a time); 200 connections on `/ws/fanout`,
#   one of them sending, a window of 8 messages over the whole fan-out (ws_fanout.py);
#   20 broadcasts to warm up, then 500 broadcasts = 100,000 deliveries are measured.
#
# Usage: benches/ws_profile.sh BIN_DIR OUT_DIR [pingpong|fanout]
#   BIN_DIR holds a release `plughost` and `libws_echo.so`
#   (cargo build --release -p plughost -p ws-echo: target/release).
# Needs valgrind and Python's websockets (pip install websockets).
set -euo pipefail
BIN=$(realpath "$1"); D=$(realpath -m "$2"); MODE=${3:-pingpong}
case $MODE in
    pingpong) WORKERS=1 ;;
    fanout) WORKERS=2 ;;
    *) echo "unknown mode $MODE (pingpong or fanout)" >&2; exit 2 ;;
esac
HERE=$(dirname "$(realpath "$0")")
rm -rf "$D"; mkdir -p "$D/run"
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$D/server.ron" <<RON
(
    listen: "127.0.0.1:$PORT",
    worker_num: $WORKERS,
    runtime_dir: "$D/run",
    log: (level: "warn"),
    supervisor: (enable: false),
    plugins: { "ws-echo": (path: "$BIN/libws_echo.so") },
    websocket: (enable: true, send_queue: 1024, routes: [
        (path: "/ws/echo", handler: "ws-echo.echo"),
        (path: "/ws/fanout", handler: "ws-echo.fanout"),
    ]),
)
RON
valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.out" "$BIN/plughost" start -c "$D/server.ron" > "$D/log" 2>&1 &
VPID=$!
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
if [ "$MODE" = pingpong ]; then
    python3 "$HERE/ws_pingpong.py" "ws://127.0.0.1:$PORT/ws/echo" 10 200
    callgrind_control -z "$VPID" >/dev/null
    python3 "$HERE/ws_pingpong.py" "ws://127.0.0.1:$PORT/ws/echo" 10 2000
    N=20000; WHAT=echo
else
    python3 "$HERE/ws_fanout.py" "ws://127.0.0.1:$PORT/ws/fanout" 200 20 8
    callgrind_control -z "$VPID" >/dev/null
    python3 "$HERE/ws_fanout.py" "ws://127.0.0.1:$PORT/ws/fanout" 200 500 8
    N=100000; WHAT=delivery
fi
callgrind_control -d "$VPID" >/dev/null
sleep 1
kill -TERM "$VPID"; wait "$VPID" || true
callgrind_annotate --inclusive=no --threshold=100 "$D/callgrind.out.1" > "$D/annotate.txt" 2>/dev/null
TOTAL=$(grep "PROGRAM TOTALS" "$D/annotate.txt" | awk '{print $1}' | tr -d ,)
echo "instructions per $WHAT (user space): $((TOTAL / N))"
sed -n '/file:function/,$p' "$D/annotate.txt" | sed -n 3,200p \
    | grep -v 'clone.S\|start_thread\|thread_start\|call_once{{vtable\|__rust_begin_short_backtrace' \
    | head -12 | sed -E 's|/root/.cargo/registry/src/index.crates.io-[0-9a-f]+/||; s|/rustc/[0-9a-f]+/library/||; s| \[/[^]]*\]||' | cut -c1-160
