//! The measured runs and the report they make (`benches/WS_RESULTS.md`).

use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use plughost_benches::{load_average, machine, median, utc_now};

use crate::{Mode, Opts, SEND_QUEUE, SETTLE};

/// Figures measured on this project's machine before this benchmark existed (the issue).
const EARLIER: &str = "tokio-tungstenite 32k msg/s at 27 µs CPU/msg; smol + async-tungstenite 29k msg/s at 34 µs CPU/msg";

/// One measured run against one server.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// Messages received by the client over the window: echoes, or fan-out deliveries.
    pub msgs: u64,
    /// Fan-out: messages broadcast over the window.
    pub sent: u64,
    pub secs: f64,
    pub errors: u64,
    pub cpu_s: f64,
    pub client_cpu_s: f64,
    pub rss_max_kb: u64,
    /// Fan-out delivery latency (NaN for the echo modes).
    pub p50_us: f64,
    pub p99_us: f64,
    pub threads: BTreeMap<String, u64>,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    pub fn us_per_msg(&self) -> f64 {
        if self.msgs == 0 {
            f64::NAN
        } else {
            1e6 * self.cpu_s / self.msgs as f64
        }
    }
}

fn rustc_version() -> String {
    Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A latency in µs: µs below 10 ms, else ms.
pub fn fmt_us(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x < 10_000.0 {
        format!("{x:.0} µs")
    } else {
        format!("{:.1} ms", x / 1e3)
    }
}

pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

const NAMES: [&str; 2] = ["plughost", "baseline"];

pub struct Report<'a> {
    pub o: &'a Opts,
    /// Per mode, runs[server] = one Run per round; server 0 = plughost, 1 = baseline.
    pub modes: Vec<(Mode, [Vec<Run>; 2])>,
    pub idle_rss_kb: [u64; 2],
    pub load_before: String,
}

fn med(runs: &[Vec<Run>; 2], server: usize, f: impl Fn(&Run) -> f64) -> f64 {
    median(runs[server].iter().map(f).collect())
}

/// `| name | p | b | p/b |` with the medians of `f`, formatted by `show`.
fn row(
    s: &mut String,
    runs: &[Vec<Run>; 2],
    name: &str,
    f: impl Fn(&Run) -> f64,
    show: impl Fn(f64) -> String,
) {
    let (p, b) = (med(runs, 0, &f), med(runs, 1, &f));
    let _ = writeln!(s, "| {name} | {} | {} | {:.2}x |", show(p), show(b), p / b);
}

impl Report<'_> {
    pub fn render(&self) -> String {
        let mut s = String::new();
        self.header(&mut s);
        self.summary(&mut s);
        for (mode, runs) in &self.modes {
            self.mode_section(&mut s, *mode, runs);
        }
        s
    }

    fn header(&self, s: &mut String) {
        let o = self.o;
        let command = std::env::var("PLUGHOST_BENCH_CMD").unwrap_or_else(|_| {
            format!(
                "cargo run --release -p plughost-benches --bin ws_bench --{}",
                o.args.iter().map(|a| format!(" {a}")).collect::<String>()
            )
        });
        let kind = if o.binary { "binary" } else { "text" };
        let _ = writeln!(s, "# plughost WebSocket benchmark\n");
        let _ = writeln!(s, "- date: {}", utc_now());
        let _ = writeln!(s, "- machine: {}", machine());
        let _ = writeln!(
            s,
            "- load average (1 min) before the runs: {}, after: {}",
            self.load_before,
            load_average()
        );
        let _ = writeln!(s, "- command: `{command}`");
        let _ = writeln!(
            s,
            "- load: {kind} messages of {} bytes, from a client of {} threads (tungstenite blocking client, non-blocking sockets and poll(2)) sharing the connections; {} s measured per run after {} ms of ramp-up, {} interleaved round{} per mode (the two servers alternate who goes first), each mode after a 1 s warm-up of each server; figures are medians over the rounds, loaded RSS the maximum",
            o.size,
            o.threads,
            o.duration,
            SETTLE.as_millis(),
            o.rounds,
            if o.rounds == 1 { "" } else { "s" }
        );
        let _ = writeln!(
            s,
            "- plughost: `target/release/plughost start`, 2 workers, the ws-echo plugin: `ws-echo.echo` on `/ws/echo` (`on_message` answers with `host.push(conn, message)`), `ws-echo.fanout` on `/ws/fanout` (`host.broadcast(message, \"/ws/fanout\", 0)`, the sender included), `send_queue: {SEND_QUEUE}`"
        );
        let _ = writeln!(
            s,
            "- baseline: `target/release/ws_baseline` (tokio-tungstenite 0.27, tokio with 2 worker threads): echo with `next()` then `send()` per message; fan-out through one `tokio::sync::broadcast` channel of capacity {SEND_QUEUE}, each connection task `select!`ing on its socket and its receiver and writing what the channel holds with one flush (a receiver that lags is closed with 1008, like a plughost send queue overflow)"
        );
        let _ = writeln!(
            s,
            "- idle RSS (both servers up, before any load): plughost {:.1} MiB, baseline {:.1} MiB",
            self.idle_rss_kb[0] as f64 / 1024.0,
            self.idle_rss_kb[1] as f64 / 1024.0
        );
        let _ = writeln!(s, "- {}", rustc_version());
        let _ = writeln!(
            s,
            "- measured here before (the WebSocket issue): {EARLIER}; that load (client, connections, messages in flight) was not recorded, so those figures are context, not comparable with the tables below\n"
        );
        let _ = writeln!(
            s,
            "Server CPU = utime+stime delta of the server process from /proc/PID/stat over the measured window. The client runs on the same 2 cores, so messages/s is shared-machine throughput; CPU per message is the efficiency figure. Nothing is asserted.\n"
        );
    }

    /// Messages/s and server CPU per message of every mode, from the tables below.
    fn summary(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "| mode | messages/s plughost | baseline | ratio | server CPU/msg plughost | baseline | ratio |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
        for (mode, runs) in &self.modes {
            let (p, b) = (med(runs, 0, Run::rate), med(runs, 1, Run::rate));
            let (pc, bc) = (med(runs, 0, Run::us_per_msg), med(runs, 1, Run::us_per_msg));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.2}x | {pc:.2} µs | {bc:.2} µs | {:.2}x |",
                mode.name(),
                fmt_num(p),
                fmt_num(b),
                p / b,
                pc / bc
            );
        }
        let _ = writeln!(s);
    }

    fn describe(&self, mode: Mode) -> String {
        let o = self.o;
        match mode {
            Mode::Pipelined => format!(
                "{} connections to `/ws/echo`, each keeping {} messages in flight (a new one sent for every echo received). Messages = echoes received.",
                o.conns, o.window
            ),
            Mode::PingPong => format!(
                "{} connections to `/ws/echo`, each with one message in flight: the next is sent when the echo arrives. Messages = echoes received.",
                o.pingpong_conns
            ),
            Mode::Fanout => format!(
                "{} connections to `/ws/fanout`; one of them sends, every message is broadcast by the server to all {} (the sender included). Message k+1 is sent once every connection has received message k-{} (a window over the whole fan-out). Messages = deliveries, summed over the receivers; latency = receive time minus the send time the message carries (both read by the client, same clock), over every delivery in the measured window, from a log-linear histogram (3 % buckets). With up to {} messages in flight to each of {} connections, the latency is mostly queueing (by Little's law, mean latency ≤ {} × {} / delivered messages/s).",
                o.fanout_conns,
                o.fanout_conns,
                o.fanout_window,
                o.fanout_window + 1,
                o.fanout_conns,
                o.fanout_window + 1,
                o.fanout_conns
            ),
        }
    }

    fn mode_section(&self, s: &mut String, mode: Mode, runs: &[Vec<Run>; 2]) {
        let _ = writeln!(s, "## {}\n", mode.name());
        let _ = writeln!(s, "{}\n", self.describe(mode));
        let _ = writeln!(
            s,
            "| metric | plughost | baseline (tokio-tungstenite) | plughost/baseline |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|");
        let what = if mode == Mode::Fanout {
            "delivered messages/s"
        } else {
            "echo messages/s"
        };
        row(s, runs, what, Run::rate, fmt_num);
        if mode == Mode::Fanout {
            let sent = |r: &Run| r.sent as f64 / r.secs;
            row(s, runs, "broadcasts/s (sent)", sent, fmt_num);
            row(s, runs, "delivery latency p50", |r| r.p50_us, fmt_us);
            row(s, runs, "delivery latency p99", |r| r.p99_us, fmt_us);
        }
        let per_msg = |x: f64| format!("{x:.2} µs");
        row(s, runs, "server CPU per message", Run::us_per_msg, per_msg);
        let cores = |x: f64| format!("{x:.2}");
        row(
            s,
            runs,
            "server CPU (cores busy)",
            |r| r.cpu_s / r.secs,
            cores,
        );
        let client = |r: &Run| r.client_cpu_s / r.secs;
        row(s, runs, "client CPU (cores busy)", client, cores);
        let max = |server: usize| runs[server].iter().map(|r| r.rss_max_kb).max().unwrap_or(0);
        let (p, b) = (max(0), max(1));
        let _ = writeln!(
            s,
            "| loaded RSS | {:.1} MiB | {:.1} MiB | {:.2}x |",
            p as f64 / 1024.0,
            b as f64 / 1024.0,
            p as f64 / b as f64
        );
        let errs = |server: usize| runs[server].iter().map(|r| r.errors).sum::<u64>();
        let _ = writeln!(s, "| errors (all runs) | {} | {} | - |", errs(0), errs(1));
        self.every_run(s, mode, runs);
        by_thread(s, runs);
    }

    fn every_run(&self, s: &mut String, mode: Mode, runs: &[Vec<Run>; 2]) {
        let fan = mode == Mode::Fanout;
        let _ = writeln!(s, "\n### {}: every run\n", mode.name());
        let _ = writeln!(
            s,
            "| round | server | messages/s | messages | {}seconds | server CPU s | CPU µs/msg | client CPU s | max RSS | errors |",
            if fan { "broadcasts | p50 | p99 | " } else { "" }
        );
        let _ = writeln!(
            s,
            "|---:|---|---:|---:|{}---:|---:|---:|---:|---:|---:|",
            if fan { "---:|---:|---:|" } else { "" }
        );
        for round in 0..self.o.rounds {
            for (server, name) in NAMES.iter().enumerate() {
                let Some(r) = runs[server].get(round) else {
                    continue;
                };
                let fan_cols = if fan {
                    format!(
                        "{} | {} | {} | ",
                        fmt_num(r.sent as f64),
                        fmt_us(r.p50_us),
                        fmt_us(r.p99_us)
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "| {} | {name} | {} | {} | {fan_cols}{:.2} | {:.2} | {:.2} | {:.2} | {:.1} MiB | {} |",
                    round + 1,
                    fmt_num(r.rate()),
                    fmt_num(r.msgs as f64),
                    r.secs,
                    r.cpu_s,
                    r.us_per_msg(),
                    r.client_cpu_s,
                    r.rss_max_kb as f64 / 1024.0,
                    r.errors
                );
            }
        }
    }
}

/// Server CPU by thread over all runs of a mode.
fn by_thread(s: &mut String, runs: &[Vec<Run>; 2]) {
    let _ = writeln!(s, "\nServer CPU by thread (all runs):\n");
    for (server, name) in NAMES.iter().enumerate() {
        let mut sum: BTreeMap<String, u64> = BTreeMap::new();
        for r in &runs[server] {
            for (k, v) in &r.threads {
                *sum.entry(k.clone()).or_insert(0) += v;
            }
        }
        let total: u64 = sum.values().sum();
        let mut parts: Vec<(String, u64)> = sum.into_iter().filter(|(_, v)| *v > 0).collect();
        parts.sort_by_key(|x| std::cmp::Reverse(x.1));
        let list: Vec<String> = parts
            .iter()
            .map(|(k, v)| format!("`{k}` {:.0}%", 100.0 * *v as f64 / total.max(1) as f64))
            .collect();
        let _ = writeln!(s, "- {name}: {}", list.join(", "));
    }
    let _ = writeln!(s);
}
