#!/bin/bash
# Instruction profile of the TCP line echo (a `sockets` port, the echo plugin's echo.tcp)
# under callgrind: 1 worker, no supervisor; 10 connections × 200 lines to warm up, then the
# counters are zeroed and 10 × 2000 = 20,000 lines are measured, each with 8 in flight.
# Instruction counts do not depend on what else the machine does, so two builds compare
# exactly.
#
# Usage: benches/tcp_profile.sh BIN_DIR OUT_DIR
#   BIN_DIR holds a release `plughost` and `libecho.so`
#   (cargo build --release -p plughost -p echo: target/release).
# Needs valgrind.
set -euo pipefail
BIN=$(realpath "$1"); D=$(realpath -m "$2")
rm -rf "$D"; mkdir -p "$D/run"
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=$(free_port); TCP=$(free_port)
cat > "$D/server.ron" <<RON
(
    listen: "127.0.0.1:$PORT",
    worker_num: 1,
    runtime_dir: "$D/run",
    log: (level: "warn"),
    supervisor: (enable: false),
    plugins: { "echo": (path: "$BIN/libecho.so") },
    sockets: [(listen: "127.0.0.1:$TCP", protocol: Tcp, framing: Eof("\r\n"), handler: "echo.tcp")],
)
RON
valgrind --tool=callgrind --callgrind-out-file="$D/callgrind.out" "$BIN/plughost" start -c "$D/server.ron" > "$D/log" 2>&1 &
VPID=$!
for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$TCP") 2>/dev/null && break; sleep 0.1; done
lines() {
    python3 - "$TCP" "$1" <<'PY'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
for c in conns:
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
line = b"0123456789abcdefghijklmnopqrst\r\n"
want = b"plughost: " + line
for c in conns:
    sent = got = 0
    buf = b""
    while got < n:
        while sent < n and sent - got < 8:
            c.sendall(line); sent += 1
        buf += c.recv(65536)
        while len(buf) >= len(want):
            assert buf[:len(want)] == want, buf[:64]
            buf = buf[len(want):]; got += 1
PY
}
lines 200
callgrind_control -z "$VPID" >/dev/null
lines 2000
callgrind_control -d "$VPID" >/dev/null
sleep 1
kill -TERM "$VPID"; wait "$VPID" || true
callgrind_annotate --inclusive=no --threshold=100 "$D/callgrind.out.1" > "$D/annotate.txt" 2>/dev/null
TOTAL=$(grep "PROGRAM TOTALS" "$D/annotate.txt" | awk '{print $1}' | tr -d ,)
echo "instructions per line (user space): $((TOTAL / 20000))"
sed -n '/file:function/,$p' "$D/annotate.txt" | sed -n 3,200p \
    | grep -v 'clone.S\|start_thread\|thread_start\|call_once{{vtable\|__rust_begin_short_backtrace' \
    | head -16 | sed -E 's|/root/.cargo/registry/src/index.crates.io-[0-9a-f]+/||; s|/rustc/[0-9a-f]+/library/||; s| \[/[^]]*\]||' | cut -c1-160
