//! Shared tables against `dashmap` and a `Mutex<HashMap>`, in the same run: a get/set/incr
//! mix (60/20/20) from 2 threads over 10^5 rows with keys of 16 to 64 bytes, all three
//! holding the same row (a `u64` counter, an `f64` score, a name of up to 32 bytes); then
//! the latency tail of each operation, with a third thread walking the whole table the whole
//! time (plughost only); then memory per row against Swoole's documented formula.
//!
//! Run: `cargo bench -p plughost-benches --bench table` (writes `benches/TABLE_RESULTS.md`).
//! `-- --ops N` sets the operations per thread per round (default 2,000,000).

use std::{
    collections::{BTreeMap, HashMap},
    hint::black_box,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Barrier, Mutex,
    },
    thread,
    time::Instant,
};

use dashmap::DashMap;
use plughost::{
    config::{ColumnConfig, ColumnKind, TableConfig},
    plugin::host::Host,
    table::{Cell, Num, Table, Tables},
};
use plughost_plugin_api::abi::{CellRef, HostBox, ValueRef};

const ROWS: usize = 100_000;
const THREADS: usize = 2;
const ROUNDS: usize = 3;

/// One row, as the baselines hold it.
#[derive(Debug, Default, Clone)]
struct Rec {
    n: u64,
    score: f64,
    name: String,
}

/// What each contender does for one operation.
trait Store: Send + Sync {
    fn get(&self, key: &str) -> u64;
    fn set(&self, key: &str, score: f64, name: &str);
    fn incr(&self, key: &str) -> u64;
}

impl Store for Table {
    fn get(&self, key: &str) -> u64 {
        let n = self.read(key, |r| (r.num(0), r.num(1))).unwrap();
        match n {
            Some((Some(Num::U64(n)), _)) => n,
            _ => 0,
        }
    }
    fn set(&self, key: &str, score: f64, name: &str) {
        self.set(key, &[(1, Cell::F64(score)), (2, Cell::Str(name))])
            .unwrap();
    }
    fn incr(&self, key: &str) -> u64 {
        match self.incr(key, 0, Num::U64(1), false).unwrap() {
            Num::U64(n) => n,
            _ => 0,
        }
    }
}

/// The same table through the plugin ABI (the `HostFfi` calls a plugin's `Table` makes).
struct ViaAbi(HostBox);

impl Store for ViaAbi {
    fn get(&self, key: &str) -> u64 {
        let row = self.0.table_get(0, key.into()).unwrap();
        match row.into_option().and_then(|r| r.into_iter().next()) {
            Some(plughost_plugin_api::Value::U64(n)) => n,
            _ => 0,
        }
    }
    fn set(&self, key: &str, score: f64, name: &str) {
        let cells = [
            CellRef {
                column: 1,
                value: ValueRef::F64(score),
            },
            CellRef {
                column: 2,
                value: ValueRef::Str(name.into()),
            },
        ];
        self.0
            .table_set(0, key.into(), cells.as_slice().into())
            .unwrap();
    }
    fn incr(&self, key: &str) -> u64 {
        match self
            .0
            .table_incr(0, key.into(), 0, ValueRef::U64(1), false)
            .unwrap()
        {
            plughost_plugin_api::Value::U64(n) => n,
            _ => 0,
        }
    }
}

impl Store for DashMap<String, Rec> {
    fn get(&self, key: &str) -> u64 {
        self.get(key).map_or(0, |r| black_box((r.n, r.score)).0)
    }
    fn set(&self, key: &str, score: f64, name: &str) {
        if let Some(mut r) = self.get_mut(key) {
            r.score = score;
            r.name.clear();
            r.name.push_str(name);
        }
    }
    fn incr(&self, key: &str) -> u64 {
        self.get_mut(key).map_or(0, |mut r| {
            r.n += 1;
            r.n
        })
    }
}

impl Store for Mutex<HashMap<String, Rec>> {
    fn get(&self, key: &str) -> u64 {
        let map = self.lock().unwrap();
        map.get(key).map_or(0, |r| black_box((r.n, r.score)).0)
    }
    fn set(&self, key: &str, score: f64, name: &str) {
        if let Some(r) = self.lock().unwrap().get_mut(key) {
            r.score = score;
            r.name.clear();
            r.name.push_str(name);
        }
    }
    fn incr(&self, key: &str) -> u64 {
        self.lock().unwrap().get_mut(key).map_or(0, |r| {
            r.n += 1;
            r.n
        })
    }
}

/// xorshift64*: cheap enough not to show in the figures.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Keys of 16 to 64 bytes, all distinct.
fn keys() -> Vec<String> {
    let mut s = 42u64;
    (0..ROWS)
        .map(|i| {
            let len = 16 + (next(&mut s) % 49) as usize;
            let mut k = format!("user:{i:08}:");
            while k.len() < len {
                k.push((b'a' + (next(&mut s) % 26) as u8) as char);
            }
            k
        })
        .collect()
}

fn table_config(key_max: u32) -> TableConfig {
    let col = |name: &str, kind| ColumnConfig {
        name: name.into(),
        kind,
    };
    TableConfig {
        size: ROWS as u64,
        columns: vec![
            col("n", ColumnKind::U64),
            col("score", ColumnKind::F64),
            col("name", ColumnKind::Str(32)),
        ],
        key_max,
    }
}

/// One operation of the mix on a random key; `lat` records its duration in ns when given.
fn op(
    store: &dyn Store,
    keys: &[String],
    names: &[String],
    s: &mut u64,
    lat: Option<&mut Vec<u32>>,
) {
    let r = next(s);
    let key = &keys[(r >> 8) as usize % keys.len()];
    let start = lat.as_ref().map(|_| Instant::now());
    match r % 10 {
        0..=5 => {
            black_box(store.get(key));
        }
        6 | 7 => store.set(
            key,
            (r >> 20) as f64,
            &names[(r >> 40) as usize % names.len()],
        ),
        _ => {
            black_box(store.incr(key));
        }
    }
    if let (Some(lat), Some(start)) = (lat, start) {
        lat.push(start.elapsed().as_nanos().min(u32::MAX as u128) as u32);
    }
}

/// This thread's CPU time in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Wall-clock ops/s of `THREADS` threads doing `ops` operations each, started together, and
/// ops per second of their CPU time (which a busy machine's preemption does not change).
fn throughput(
    store: Arc<dyn Store>,
    keys: &Arc<Vec<String>>,
    names: &Arc<Vec<String>>,
    ops: usize,
) -> (f64, f64) {
    let barrier = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, keys, names, barrier) =
                (store.clone(), keys.clone(), names.clone(), barrier.clone());
            thread::spawn(move || {
                let mut s = 0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1);
                barrier.wait();
                let cpu = thread_cpu();
                for _ in 0..ops {
                    op(&*store, &keys, &names, &mut s, None);
                }
                thread_cpu() - cpu
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let cpu: f64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let total = (THREADS * ops) as f64;
    (total / started.elapsed().as_secs_f64(), total / cpu)
}

/// Per-operation latencies (ns) of `THREADS` threads doing `ops` operations each; with
/// `walk`, a third thread scans the whole plughost table meanwhile.
fn latencies(
    store: Arc<dyn Store>,
    keys: &Arc<Vec<String>>,
    names: &Arc<Vec<String>>,
    ops: usize,
    walk: Option<Arc<Table>>,
) -> Vec<u32> {
    let stop = Arc::new(AtomicBool::new(false));
    let walker = walk.map(|t| {
        let stop = stop.clone();
        thread::spawn(move || {
            // How long each batch takes (without a lock, unless it fell back to the read lock).
            let mut batches = Vec::new();
            let mut walks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut cursor = Some(0);
                while let Some(c) = cursor {
                    let started = Instant::now();
                    let mut rows = Vec::with_capacity(64);
                    cursor = t.scan(c, 64, &mut rows);
                    black_box(rows);
                    batches.push(started.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
                walks += 1;
            }
            batches.sort_unstable();
            (walks, batches)
        })
    });
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, keys, names) = (store.clone(), keys.clone(), names.clone());
            thread::spawn(move || {
                let mut s = 0xD1B5_4A32_D192_ED03 ^ (t as u64 + 1);
                let mut lat = Vec::with_capacity(ops);
                for _ in 0..ops {
                    op(&*store, &keys, &names, &mut s, Some(&mut lat));
                }
                lat
            })
        })
        .collect();
    let mut all: Vec<u32> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    stop.store(true, Ordering::Relaxed);
    if let Some(w) = walker {
        let (walks, batches) = w.join().unwrap();
        eprintln!(
            "  scan batches (µs): p50 {} p99 {} p99.9 {} max {} over {walks} full walks",
            pct(&batches, 50.0),
            pct(&batches, 99.0),
            pct(&batches, 99.9),
            pct(&batches, 100.0)
        );
    }
    all.sort_unstable();
    all
}

fn pct(sorted: &[u32], p: f64) -> String {
    let i = ((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1);
    format!("{:.2}", f64::from(sorted[i]) / 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ops = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    if args.iter().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --benches` runs bench targets with --test: nothing to check here.
    }
    let keys = Arc::new(keys());
    let names: Arc<Vec<String>> = Arc::new(
        (0..64)
            .map(|i| format!("name-{i}-{}", "x".repeat(i % 24)))
            .collect(),
    );

    let table = Arc::new(Table::new("bench", &table_config(256)).unwrap());
    // The same with each row's key space cut to the longest key of this benchmark (64).
    let table64 = Arc::new(Table::new("bench64", &table_config(64)).unwrap());
    let dash: Arc<DashMap<String, Rec>> = Arc::new(DashMap::new());
    let mutex: Arc<Mutex<HashMap<String, Rec>>> = Arc::new(Mutex::default());
    let tables =
        Arc::new(Tables::new(&BTreeMap::from([("bench".to_owned(), table_config(256))])).unwrap());
    let abi: Arc<dyn Store> = Arc::new(ViaAbi(
        Host::new(String::new(), None, tables.clone()).boxed(),
    ));
    for k in keys.iter() {
        Store::set(&*table, k, 0.0, "");
        Store::set(&*table64, k, 0.0, "");
        abi.set(k, 0.0, "");
        dash.insert(k.clone(), Rec::default());
        mutex.lock().unwrap().insert(k.clone(), Rec::default());
    }
    // Each with the plughost table a walker scans during the latency run.
    let contenders: Vec<Contender<'_>> = vec![
        ("plughost table", table.clone(), Some(table.clone())),
        (
            "plughost table, key_max 64",
            table64.clone(),
            Some(table64.clone()),
        ),
        ("plughost table via the plugin ABI", abi.clone(), None),
        ("dashmap 6", dash.clone(), None),
        ("Mutex<HashMap>", mutex.clone(), None),
    ];
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        // For a profiler: one contender's mix, no report.
        let (name, store, _) = contenders
            .iter()
            .find(|(n, _, _)| n.starts_with(only.as_str()))
            .expect("--only names a contender");
        let (wall, cpu) = throughput(store.clone(), &keys, &names, ops);
        eprintln!("{name}: {wall:.0} ops/s, {cpu:.0} ops per CPU-second");
        return;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    let mut cpu_rates: Vec<Vec<f64>> = vec![Vec::new(); contenders.len()];
    for round in 0..ROUNDS {
        // Every other round in reverse order, so no contender always runs first.
        let mut order: Vec<usize> = (0..contenders.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (name, store, _) = &contenders[i];
            let (wall, cpu) = throughput(store.clone(), &keys, &names, ops);
            eprintln!("round {round}: {name}: {wall:.0} ops/s, {cpu:.0} ops per CPU-second");
            rates[i].push(wall);
            cpu_rates[i].push(cpu);
        }
    }
    let medians: Vec<(f64, f64)> = rates
        .into_iter()
        .zip(cpu_rates)
        .map(|(w, c)| (plughost_benches::median(w), plughost_benches::median(c)))
        .collect();
    let tails: Vec<Vec<u32>> = contenders
        .iter()
        .map(|(name, store, walk)| {
            eprintln!("latency: {name}");
            latencies(store.clone(), &keys, &names, ops / 2, walk.clone())
        })
        .collect();
    report(&contenders, &medians, &tails, ops);
}

type Contender<'a> = (&'a str, Arc<dyn Store>, Option<Arc<Table>>);

fn report(contenders: &[Contender<'_>], medians: &[(f64, f64)], tails: &[Vec<u32>], ops: usize) {
    use std::fmt::Write as _;
    let (dash, dash_cpu) = medians[3];
    let mut s = String::from("# Shared tables: benchmark results\n\n");
    let _ = writeln!(
        s,
        "{} on {}; load average {}.\n",
        plughost_benches::utc_now(),
        plughost_benches::machine(),
        plughost_benches::load_average()
    );
    let _ = writeln!(s, "`cargo bench -p plughost-benches --bench table` (release profile): {THREADS} threads, {ROWS} rows, keys of 16 to 64 bytes, a mix of 60% get (read the counter and the score), 20% set (write the score and a name of up to 32 bytes) and 20% incr (the counter), on random existing keys; {ops} operations per thread per round, {ROUNDS} interleaved rounds, median. dashmap and the `Mutex<HashMap>` hold `String -> {{n: u64, score: f64, name: String}}` and update in place (`get_mut`), so they allocate nothing either.\n");
    let _ = writeln!(s, "| | ops per CPU-second (median) | vs dashmap | wall-clock ops/s (median) | vs dashmap |\n|---|---:|---:|---:|---:|");
    for ((name, _, _), (wall, cpu)) in contenders.iter().zip(medians) {
        let _ = writeln!(
            s,
            "| {name} | {cpu:.0} | {:.2}x | {wall:.0} | {:.2}x |",
            cpu / dash_cpu,
            wall / dash
        );
    }
    let _ = writeln!(s, "\nOps per CPU-second is the figure to compare on this shared machine: it counts only the time the two threads ran, so another process taking a core does not move it; wall-clock figures moved up to 2x between rounds.");
    let _ = writeln!(s, "\nLatency of one operation (µs), {} operations per thread, the two threads of the mix; for the two direct plughost tables a third thread walks the whole table (`scan`, 64 rows a batch copied out, optimistically: it takes no lock unless a writer keeps moving its shard) the whole time:\n", ops / 2);
    let _ = writeln!(
        s,
        "| | p50 | p99 | p99.9 | p99.99 | max |\n|---|---:|---:|---:|---:|---:|"
    );
    for ((name, _, _), lat) in contenders.iter().zip(tails) {
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} | {} |",
            pct(lat, 50.0),
            pct(lat, 99.0),
            pct(lat, 99.9),
            pct(lat, 99.99),
            pct(lat, 100.0)
        );
    }
    memory(&mut s);
    print!("{s}");
    let path = plughost_benches::root().join("benches/TABLE_RESULTS.md");
    std::fs::write(&path, s).unwrap();
    eprintln!("wrote {}", path.display());
}

/// Bytes per row, ours (measured) against Swoole's formula for the same columns.
fn memory(s: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        s,
        "\nMemory per row for these columns (`n` U64, `score` F64, `name` Str(32)), {ROWS} rows:\n"
    );
    let _ = writeln!(s, "| | bytes per row | table bytes |\n|---|---:|---:|");
    for key_max in [256, 64] {
        let t = Table::new("m", &table_config(key_max)).unwrap();
        let _ = writeln!(
            s,
            "| plughost, key_max {key_max} | {:.1} | {} |",
            t.bytes() as f64 / ROWS as f64,
            t.bytes()
        );
    }
    // Swoole: (row header + 64-byte key + row data) * 1.2, for size rounded up to 2^n rows.
    // Row header (TableRow: lock, lock pid, active, key length, next pointer) 24 bytes; data:
    // 8 (int) + 8 (float) + 4 (string length) + 32.
    let rows = ROWS.next_power_of_two() as f64;
    let per_row = (24.0 + 64.0 + 8.0 + 8.0 + 4.0 + 32.0) * 1.2;
    let _ = writeln!(
        s,
        "| Swoole (documented formula) | {:.1} | {:.0} |",
        per_row * rows / ROWS as f64,
        per_row * rows
    );
    let _ = writeln!(s, "\nplughost: `size * 8 * (1 + ceil(key_max/8) + sum of column words) + size * 4 + next_pow2(size) * 4 + shards * 64` (a number column is 1 word, a `Str(n)`/`Bytes(n)` column 1 + ceil(n/8) words; shards = min(next_pow2(size), 128)). Swoole: `(row header + 64 + row data) * 1.2 * size`, its `size` rounded up to a power of two (here {} rows), and keys cut at 63 bytes; the header (24 bytes: lock, lock pid, flags, next pointer) is as we read Swoole 4.8's `TableRow`.", ROWS.next_power_of_two());
}
