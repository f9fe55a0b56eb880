#!/usr/bin/env python3
"""Static files: plughost's `static` section against nginx serving the same folder.

Both servers run at once with 2 workers each (nginx: `worker_processes 2`, `sendfile on`,
`access_log off`, no open_file_cache; plughost: `worker_num: 2`, no plugins), and are loaded
in turn by `wrk -t1` on a 1 KiB file (64 connections) and a 1 MiB file (16 connections), in
interleaved rounds (the order flips every round). Reports req/s and MB/s (medians) and the
servers' CPU time per request and per GB (from /proc), so "limited by the loopback" can be
checked: equal MB/s with less (or equal) CPU per byte. Writes benches/STATIC_RESULTS.md.

Usage: bash benches/run.sh static [--duration SECS] [--rounds N] [--no-build]
"""
import argparse, os, re, signal, socket, statistics, subprocess, sys, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGHOST = os.path.join(ROOT, "target/release/plughost")
NGINX = "/usr/sbin/nginx"
FILES = {"1 KiB": ("small.txt", 1024, 64), "1 MiB": ("large.bin", 1 << 20, 16)}
TICKS = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[static-bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids):
    """User + system CPU of the processes `pids` and all their threads."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICKS


class Plughost:
    name = "plughost"

    def __init__(self, tmp, www):
        os.makedirs(tmp, exist_ok=True)
        cfg = os.path.join(tmp, "server.ron")
        with open(cfg, "w") as f:
            f.write(f"""(
    listen: "127.0.0.1:0",
    worker_num: 2,
    runtime_dir: "{tmp}/run",
    log: (level: "warn"),
    supervisor: (enable: false),
    static: (root: "{www}"),
)
""")
        self.p = subprocess.Popen([PLUGHOST, "start", "-c", cfg], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        # The ready line is logged at info: read the address from `info` instead.
        deadline = time.time() + 30
        while time.time() < deadline:
            out = subprocess.run([PLUGHOST, "info", "-c", cfg], capture_output=True, text=True)
            m = re.search(r"^listen: http://(\S+)", out.stdout, re.M)
            if m:
                self.addr = m.group(1)
                threading.Thread(target=self.p.stdout.read, daemon=True).start()
                return
            time.sleep(0.1)
        raise RuntimeError("plughost did not start")

    def pids(self):
        return [self.p.pid]

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=30)


class Nginx:
    name = "nginx"

    def __init__(self, tmp, www):
        port = free_port()
        d = os.path.join(tmp, "nginx")
        os.makedirs(d, exist_ok=True)
        temps = "\n".join(f"    {k}_temp_path {d}/{k};"
                          for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        cfg = os.path.join(d, "nginx.conf")
        with open(cfg, "w") as f:
            f.write(f"""worker_processes 2;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;
    types {{ text/plain txt; application/octet-stream bin; }}
{temps}
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {www};
    }}
}}
""")
        self.p = subprocess.Popen([NGINX, "-c", cfg, "-p", d], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.STDOUT)
        self.addr = f"127.0.0.1:{port}"
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    def pids(self):
        kids = []
        try:
            with open(f"/proc/{self.p.pid}/task/{self.p.pid}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            pass
        return [self.p.pid] + kids

    def stop(self):
        self.p.send_signal(signal.SIGQUIT)
        self.p.wait(timeout=30)


def size_bytes(text):
    m = re.match(r"([\d.]+)([KMG]?B)", text)
    return float(m.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(2)]


def wrk(server, path, conns, secs):
    """req/s, bytes/s, server CPU seconds per request."""
    before = cpu_seconds(server.pids())
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{secs}s",
                          f"http://{server.addr}/{path}"],
                         capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds(server.pids()) - before
    if "Non-2xx" in out or "Socket errors" in out:
        log(f"{server.name} {path}: {out}")
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bps = size_bytes(re.search(r"Transfer/sec:\s+(\S+)", out).group(1))
    return rps, bps, cpu / max(1, reqs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    o = ap.parse_args()
    if not o.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "plughost"], cwd=ROOT, check=True)
    runs = {(s, f): [] for s in ("plughost", "nginx") for f in FILES}
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)  # nginx's workers run as nobody when started as root
        www = os.path.join(tmp, "www")
        os.makedirs(www)
        for name, size, _ in FILES.values():
            with open(os.path.join(www, name), "wb") as f:
                f.write(os.urandom(size))
        servers = [Plughost(os.path.join(tmp, "p"), www), Nginx(tmp, www)]
        try:
            for s in servers:
                for name, _, conns in FILES.values():
                    wrk(s, name, conns, 1)  # warm-up
            for r in range(o.rounds):
                for s in servers if r % 2 == 0 else servers[::-1]:
                    for label, (name, _, conns) in FILES.items():
                        runs[(s.name, label)].append(wrk(s, name, conns, o.duration))
                        rps, bps, cpu = runs[(s.name, label)][-1]
                        log(f"round {r + 1}: {s.name} {label}: {rps:.0f} req/s, "
                            f"{bps / 1e6:.0f} MB/s, {cpu * 1e6:.1f} us CPU/req")
        finally:
            for s in servers:
                s.stop()
    write(o, runs)


def write(o, runs):
    med = lambda s, f, i: statistics.median(r[i] for r in runs[(s, f)])
    rows, lines = [], []
    for f, (_, size, conns) in FILES.items():
        p = [med("plughost", f, i) for i in range(3)]
        n = [med("nginx", f, i) for i in range(3)]
        # The two servers of one round ran back to back: their ratio is less exposed to the
        # load other work puts on the machine than the ratio of the medians.
        paired = statistics.median(a[0] / b[0] for a, b in zip(runs[("plughost", f)],
                                                                runs[("nginx", f)]))
        busy = lambda s: statistics.median(r[0] * r[2] * 100 for r in runs[(s, f)])
        if size < 65536:
            cpu = f"{p[2] * 1e6:.2f} / {n[2] * 1e6:.2f} µs per request"
        else:
            per_gb = (1 << 30) / size
            cpu = f"{p[2] * per_gb:.2f} / {n[2] * per_gb:.2f} s per GiB"
        rows.append(f"| {f} ({conns} conns) | {p[0]:,.0f} | {n[0]:,.0f} | **{p[0] / n[0]:.2f}x** "
                    f"| {paired:.2f}x | {p[1] / 1e6:,.0f} | {n[1] / 1e6:,.0f} | {cpu} "
                    f"| {busy('plughost'):.0f}% / {busy('nginx'):.0f}% |")
        fmt = lambda xs: ", ".join(f"{x[0]:,.0f}" for x in xs)
        lines.append(f"- {f} req/s per round: plughost {fmt(runs[('plughost', f)])}; "
                     f"nginx {fmt(runs[('nginx', f)])}")
    cmd = os.environ.get("PLUGHOST_BENCH_CMD", "bash benches/run.sh static")
    nl = "\n"
    text = f"""# Static files: plughost against nginx

Command: `{cmd}` ({o.rounds} interleaved rounds of `wrk -t1 -d{o.duration}s` per file and
server, after a 1 s warm-up; both servers up at once, 2 workers each, release build; nginx
{nginx_version()} with `sendfile on`, `tcp_nopush on`, `access_log off`, no `open_file_cache`;
plughost's `static` section with its defaults. This machine has {os.cpu_count()} cores shared
with wrk and other work: compare the columns of one run, not runs.)

| file | plughost req/s | nginx req/s | ratio of medians | median of per-round ratios | plughost MB/s | nginx MB/s | server CPU, plughost / nginx | servers busy (% of one core) |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |
{nl.join(rows)}

{nl.join(lines)}

"Busy" is the server's CPU time over the run's wall time: a server far below 100% per worker
is not what limits the rate; wrk (one thread, receiving and parsing) and the loopback are.
"""
    with open(os.path.join(ROOT, "benches/STATIC_RESULTS.md"), "w") as f:
        f.write(text)
    print(text)


def nginx_version():
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\S+)", out)
    return m.group(1) if m else "?"


if __name__ == "__main__":
    main()
