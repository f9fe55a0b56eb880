#!/usr/bin/env python3
"""Slow handlers and stops, against release builds (127.0.0.1 only):

1. 20 concurrent 3-second requests, each on a new connection, on 2 and on 24 workers: when
   the last is answered (the ideal is 3 s where there are 20 free workers);
2. a graceful stop (SIGTERM) with 20 requests sent while both workers are busy: how many are
   answered.

Run: cargo build --release -p plughost -p hello -p fixture-panicky && python3 benches/fairness.py
"""

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

REL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release")


def start(workers):
    d = tempfile.mkdtemp(prefix="plughost-fair-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(f"{d}/server.ron", "w") as f:
        f.write(f"""(listen: "127.0.0.1:{port}", worker_num: {workers}, max_wait_time: 30,
 runtime_dir: "{d}/run", log: (level: "warn"),
 plugins: {{ "panicky": (path: "{REL}/libfixture_panicky.so") }},
 routes: [(path: "/slow", handler: "panicky.slow")])""")
    p = subprocess.Popen([f"{REL}/plughost", "start", "-c", f"{d}/server.ron"],
                         stderr=subprocess.DEVNULL)
    for _ in range(300):
        if request(port, "/slow?ms=0")[0] == 200:
            return p, port
        time.sleep(0.02)
    raise SystemExit("no server")


def request(port, path):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            data = s.recv(64)
            return (int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None), None
    except OSError as e:
        return None, e


def concurrent(port, n, ms):
    results = [None] * n
    t0 = time.perf_counter()

    def one(i):
        status, _ = request(port, f"/slow?ms={ms}")
        results[i] = (status, time.perf_counter() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def main():
    for workers in (2, 24):
        p, port = start(workers)
        res = concurrent(port, 20, 3000)
        ok = sum(1 for s, _ in res if s == 200)
        last = max(t for _, t in res)
        print(f"{workers} workers: 20 concurrent 3 s requests, {ok} answered, the last after {last:.2f} s")
        p.send_signal(signal.SIGTERM)
        p.wait()
    p, port = start(2)
    results = []
    threads = []
    for _ in range(20):
        t = threading.Thread(target=lambda: results.append(request(port, "/slow?ms=200")[0]))
        t.start()
        threads.append(t)
    time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    for t in threads:
        t.join()
    p.wait()
    print(f"SIGTERM with 20 requests sent while 2 workers are busy: "
          f"{results.count(200)} answered, {20 - results.count(200)} not")


if __name__ == "__main__":
    main()
