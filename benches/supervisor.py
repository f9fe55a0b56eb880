#!/usr/bin/env python3
"""Figures for the supervisor, against release builds on this machine (127.0.0.1 only):

1. time from a server process's crash (a plugin segfault) to the first response of the new
   one, median of 10;
2. the cost of the per-call record: hello req/s under wrk with the supervisor (record on)
   and without it (`supervisor: (enable: false)`, record off), interleaved rounds, ratio;
3. RSS of the server process after 100 reloads, and after one `plughost restart`.

Run: cargo build --release -p plughost -p hello -p fixture-panicky && python3 benches/supervisor.py
"""

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
PLUGHOST = os.path.join(REL, "plughost")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(dir_, port, supervisor=True):
    return f"""(
    listen: "127.0.0.1:{port}",
    worker_num: 2,
    runtime_dir: "{dir_}/run",
    log: (level: "warn"),
    supervisor: (enable: {str(supervisor).lower()}, max_crashes: 100),
    plugins: {{
        "hello": (path: "{REL}/libhello.so"),
        "panicky": (path: "{REL}/libfixture_panicky.so"),
    }},
    routes: [
        (path: "/hello", handler: "hello.hello"),
        (path: "/crash/*", handler: "panicky.crash"),
    ],
)
"""


class Server:
    def __init__(self, supervisor=True):
        self.dir = tempfile.mkdtemp(prefix="plughost-sup-")
        self.port = free_port()
        self.cfg = os.path.join(self.dir, "server.ron")
        with open(self.cfg, "w") as f:
            f.write(config(self.dir, self.port, supervisor))
        self.proc = subprocess.Popen(
            [PLUGHOST, "start", "-c", self.cfg],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 30
        while time.time() < deadline:
            if get(self.port, "/hello") == 200:
                return
            time.sleep(0.02)
        raise SystemExit("server did not start")

    def plughost(self, *args):
        return subprocess.run(
            [PLUGHOST, *args, "-c", self.cfg], capture_output=True, text=True, timeout=120
        )

    def server_pid(self):
        out = self.plughost("info").stdout
        return int(re.search(r"^pid: (\d+)", out, re.M).group(1))

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def get(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(64)
            return int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None
    except OSError:
        return None


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def crash_to_first_response():
    server = Server()
    times = []
    for _ in range(10):
        before = server.server_pid()
        t0 = time.perf_counter()
        get(server.port, "/crash/segv")  # no answer: the server process dies
        while get(server.port, "/hello") != 200:
            pass
        times.append((time.perf_counter() - t0) * 1000)
        while True:  # the new process's control socket, before the next round
            try:
                if server.server_pid() != before:
                    break
            except (AttributeError, ValueError):
                pass
            time.sleep(0.01)
    server.stop()
    return times


def wrk(port, secs=5):
    out = subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{secs}s", f"http://127.0.0.1:{port}/hello"],
        capture_output=True, text=True, check=True,
    ).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def record_cost(rounds=3):
    on, off = [], []
    for _ in range(rounds):
        for sup, into in ((True, on), (False, off)):
            server = Server(supervisor=sup)
            wrk(server.port, 1)
            into.append(wrk(server.port))
            server.stop()
    return on, off


def reload_memory():
    server = Server()
    pid = server.server_pid()
    start = rss_kb(pid)
    for i in range(100):
        server.plughost("reload")
        deadline = time.time() + 30
        while time.time() < deadline:
            if f"reloads: {i + 1} ok" in server.plughost("info").stdout:
                break
            time.sleep(0.01)
    after_reloads = rss_kb(pid)
    held = re.search(r"library versions held: (\d+)", server.plughost("info").stdout).group(1)
    out = server.plughost("restart")
    assert out.returncode == 0, out
    new = server.server_pid()
    time.sleep(0.5)
    after_restart = rss_kb(new)
    held_after = re.search(r"library versions held: (\d+)", server.plughost("info").stdout).group(1)
    server.stop()
    return start, after_reloads, held, after_restart, held_after


def main():
    if not os.path.exists(PLUGHOST):
        sys.exit("build first: cargo build --release -p plughost -p hello -p fixture-panicky")
    times = crash_to_first_response()
    print(f"crash to first response: median {statistics.median(times):.1f} ms "
          f"(min {min(times):.1f}, max {max(times):.1f}; {len(times)} crashes)")
    on, off = record_cost()
    ratio = statistics.median(on) / statistics.median(off)
    print(f"hello req/s with the supervisor and its call record: {[round(x) for x in on]}; "
          f"without: {[round(x) for x in off]}; ratio of medians {ratio:.3f}")
    start, reloads, held, restart, held_after = reload_memory()
    print(f"server RSS: {start} kB at start, {reloads} kB after 100 reloads "
          f"({held} library versions held), {restart} kB after one restart ({held_after} held)")


if __name__ == "__main__":
    main()
