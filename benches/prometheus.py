#!/usr/bin/env python3
"""The cost of the Prometheus middleware (plugins/prometheus) on hello, and the scrape time.

hello with and without `prometheus.requests` in the same run, alternating, `wrk -t1 -c64`
on `/hello` with 2 workers; allocations per request from an `alloc-stats` build of plughost
(`plughost info`); then the time of one scrape of `/metrics` with 2 workers and 50 routes that
all saw traffic. Writes benches/PROMETHEUS_RESULTS.md.

Usage: bash benches/run.sh prometheus [--duration SECS] [--rounds N] [--no-build]
"""
import argparse, http.client, os, re, signal, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target/release")
PLUGHOST = os.path.join(REL, "plughost")
PLUGHOST_ALLOC = os.path.join(ROOT, "target/bench-alloc/release/plughost")
HELLO = os.path.join(REL, "libhello.so")
PROM = os.path.join(REL, "libprometheus.so")


def log(msg):
    print(f"[prometheus-bench] {msg}", file=sys.stderr, flush=True)


def build():
    run = lambda args: subprocess.run(["cargo"] + args, cwd=ROOT, check=True)
    run(["build", "--release", "-p", "plughost", "-p", "hello", "-p", "prometheus"])
    run(["build", "--release", "-p", "plughost", "--bin", "plughost", "--features",
         "alloc-stats", "--target-dir", "target/bench-alloc"])


def config(d, middleware, routes=1):
    os.makedirs(d, exist_ok=True)
    rs = ['(path: "/hello", handler: "hello.hello")']
    rs += [f'(path: "/r{i}/{{name}}", handler: "hello.hello")' for i in range(routes - 1)]
    if middleware:
        rs.append('(path: "/metrics", handler: "prometheus.metrics")')
    text = f"""(
    listen: "127.0.0.1:0",
    worker_num: 2,
    runtime_dir: "{d}/run",
    log: (level: "info"),
    plugins: {{ "hello": (path: "{HELLO}"), "prometheus": (path: "{PROM}") }},
    routes: [{", ".join(rs)}],
    middleware: [{'"prometheus.requests"' if middleware else ""}],
)
"""
    path = os.path.join(d, "server.ron")
    with open(path, "w") as f:
        f.write(text)
    return path


class Server:
    def __init__(self, binary, cfg):
        self.cfg, self.binary = cfg, binary
        self.p = subprocess.Popen([binary, "start", "-c", cfg], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        for line in self.p.stdout:
            m = re.search(r"http://(127\.0\.0\.1:\d+)", line)
            if m:
                self.addr = m.group(1)
                # Keep draining the log so the server never blocks on a full pipe.
                threading.Thread(target=self.p.stdout.read, daemon=True).start()
                return
        raise RuntimeError("plughost did not start")

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=30)

    def info(self):
        out = subprocess.run([self.binary, "info", "-c", self.cfg], capture_output=True,
                             text=True).stdout
        field = lambda k: int(re.search(rf"^{k}: (\d+)", out, re.M).group(1))
        return field("allocations"), field("requests")


def wrk(addr, secs, path="/hello"):
    out = subprocess.run(["wrk", "-t1", "-c64", f"-d{secs}s", f"http://{addr}{path}"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def throughput(rounds, secs, tmp):
    runs = {False: [], True: []}
    for r in range(rounds):
        for mw in (False, True) if r % 2 == 0 else (True, False):
            s = Server(PLUGHOST, config(f"{tmp}/t{int(mw)}", mw))
            wrk(s.addr, 1)  # warm-up
            runs[mw].append(wrk(s.addr, secs))
            s.stop()
            log(f"round {r + 1}: {'with' if mw else 'without'} middleware {runs[mw][-1]:.0f} req/s")
    return runs


def allocations(secs, tmp):
    per = {}
    for mw in (False, True):
        s = Server(PLUGHOST_ALLOC, config(f"{tmp}/a{int(mw)}", mw))
        wrk(s.addr, 1)
        a0, r0 = s.info()
        wrk(s.addr, secs)
        a1, r1 = s.info()
        s.stop()
        per[mw] = (a1 - a0) / max(1, r1 - r0)
    return per


def scrape(tmp, n=200):
    s = Server(PLUGHOST, config(f"{tmp}/s", True, routes=50))
    host, port = s.addr.split(":")
    c = http.client.HTTPConnection(host, int(port))
    for i in range(49):
        for w in range(4):
            c.request("GET", f"/r{i}/x{w}")
            c.getresponse().read()
    times, size = [], 0
    for _ in range(n):
        t = time.perf_counter()
        c.request("GET", "/metrics")
        body = c.getresponse().read()
        times.append(time.perf_counter() - t)
        size = len(body)
    series = body.decode().count("plughost_http_requests_total{")
    s.stop()
    times.sort()
    return statistics.median(times) * 1e3, times[int(n * 0.99) - 1] * 1e3, size, series


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--no-build", action="store_true")
    o = ap.parse_args()
    if not o.no_build:
        build()
    with tempfile.TemporaryDirectory() as tmp:
        runs = throughput(o.rounds, o.duration, tmp)
        allocs = allocations(o.duration, tmp)
        med, p99, size, series = scrape(tmp)
    base, mw = statistics.median(runs[False]), statistics.median(runs[True])
    cost = (1 - mw / base) * 100
    extra = allocs[True] - allocs[False]
    cmd = os.environ.get("PLUGHOST_BENCH_CMD", "bash benches/run.sh prometheus")
    fmt = lambda xs: ", ".join(f"{x:.0f}" for x in xs)
    text = f"""# Prometheus middleware: cost on hello, and scrape time

Command: `{cmd}` ({o.rounds} alternating rounds of `wrk -t1 -c64 -d{o.duration}s` on `/hello`,
2 workers, release builds; this machine has {os.cpu_count()} cores shared with other work,
so compare the two columns of the same run, not across runs).

| | req/s (median) | runs | allocations per request |
| --- | --- | --- | --- |
| hello | {base:.0f} | {fmt(runs[False])} | {allocs[False]:.3f} |
| hello + `prometheus.requests` | {mw:.0f} | {fmt(runs[True])} | {allocs[True]:.3f} |

- req/s cost of the middleware: **{cost:.1f}%** (target: at most 5%) — {"met" if cost <= 5 else "NOT met"}
- extra allocations per request: **{extra:.3f}** (target: at most 1) — {"met" if extra <= 1 else "NOT met"}

Scrape of `/metrics` with 2 workers and 50 routes that all saw traffic ({series} request series,
{size} bytes), 200 scrapes over one keep-alive connection: median **{med:.2f} ms**, p99 {p99:.2f} ms.
"""
    with open(os.path.join(ROOT, "benches/PROMETHEUS_RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
