//! Recording request durations: one shard per worker, written only by that worker's thread
//! with relaxed loads and stores on memory no other worker writes; read by the scrape.
//!
//! A worker's middleware instance finds its series in its own map (no lock, no allocation
//! once the series exists). A new series is registered once in the worker's shard, under a
//! lock the scrape takes only to copy the list of series.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex, OnceLock,
    },
};

/// The label values of one series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels {
    /// The method (`GET`, ...; `other` for anything unusual).
    pub method: &'static str,
    /// The route template, `unmatched` when no route matched.
    pub route: String,
    /// The status code (`200`) or class (`2xx`).
    pub status: String,
}

/// One histogram series, written by one thread.
#[derive(Debug)]
#[repr(align(64))]
pub struct Series {
    /// Its labels.
    pub labels: Labels,
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    pub buckets: Box<[AtomicU64]>,
    /// The sum of the observations, as `f64` bits.
    pub sum: AtomicU64,
}

impl Series {
    fn new(labels: Labels, bounds: usize) -> Series {
        Series {
            labels,
            buckets: (0..=bounds).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// Adds one observation. Only the owning worker's thread calls it, so a load and a
    /// store are enough (no read-modify-write, no lock prefix).
    pub fn observe(&self, bucket: usize, seconds: f64) {
        let b = &self.buckets[bucket];
        b.store(b.load(Relaxed) + 1, Relaxed);
        let sum = f64::from_bits(self.sum.load(Relaxed)) + seconds;
        self.sum.store(sum.to_bits(), Relaxed);
    }
}

/// One worker's series.
#[derive(Debug, Default)]
pub struct Shard {
    series: Mutex<Vec<Arc<Series>>>,
}

impl Shard {
    /// The series of `labels`, registered on first use.
    fn find_or_add(&self, labels: &Labels, bounds: usize) -> Arc<Series> {
        let mut list = self.series.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = list.iter().find(|s| s.labels == *labels) {
            return s.clone();
        }
        let s = Arc::new(Series::new(labels.clone(), bounds));
        list.push(s.clone());
        s
    }

    /// A copy of the list of series, for a scrape.
    pub fn series(&self) -> Vec<Arc<Series>> {
        self.series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Every worker's shard, and the bucket bounds, in the plugin's static (reset by a reload).
#[derive(Debug, Default)]
pub struct Registry {
    shards: Mutex<Vec<Arc<Shard>>>,
    bounds: OnceLock<Arc<[f64]>>,
}

/// The registry of this library version.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

impl Registry {
    /// The shard of worker `id`: instances recreated on that worker keep its series.
    pub fn shard(&self, id: u32) -> Arc<Shard> {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        while shards.len() <= id as usize {
            shards.push(Arc::default());
        }
        shards[id as usize].clone()
    }

    /// Every shard, for a scrape.
    pub fn shards(&self) -> Vec<Arc<Shard>> {
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The bucket bounds: the first configured wins (every series of a family must share
    /// them).
    pub fn bounds(&self, configured: Vec<f64>) -> Arc<[f64]> {
        self.bounds.get_or_init(|| configured.into()).clone()
    }

    /// The bounds in force, when any instance set them.
    pub fn current_bounds(&self) -> Option<Arc<[f64]>> {
        self.bounds.get().cloned()
    }
}

/// A worker's own view of its shard: a map from labels to series that needs no lock.
#[derive(Debug)]
pub struct Recorder {
    shard: Arc<Shard>,
    bounds: Arc<[f64]>,
    /// By a hash of (method, route, status): a few series each.
    local: HashMap<u64, Vec<Arc<Series>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Recorder {
    /// The recorder of worker `id`.
    pub fn new(id: u32, bounds: Arc<[f64]>) -> Recorder {
        Recorder {
            shard: registry().shard(id),
            bounds,
            local: HashMap::new(),
            hasher: Default::default(),
        }
    }

    /// Records one request.
    pub fn record(&mut self, method: &'static str, route: &str, status: &str, seconds: f64) {
        let key = self.hasher.hash_one((method, route, status));
        let bucket = self
            .bounds
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(self.bounds.len());
        let found = self.local.get(&key).and_then(|list| {
            list.iter().find(|s| {
                s.labels.method == method && s.labels.route == route && s.labels.status == status
            })
        });
        if let Some(s) = found {
            s.observe(bucket, seconds);
            return;
        }
        let labels = Labels {
            method,
            route: route.to_owned(),
            status: status.to_owned(),
        };
        let s = self.shard.find_or_add(&labels, self.bounds.len());
        s.observe(bucket, seconds);
        self.local.entry(key).or_default().push(s);
    }
}

/// One family's aggregate over every worker, by labels: bucket counts (not cumulative) and
/// the sum.
pub fn aggregate() -> std::collections::BTreeMap<Labels, (Vec<u64>, f64)> {
    let mut out: std::collections::BTreeMap<Labels, (Vec<u64>, f64)> = Default::default();
    for shard in registry().shards() {
        for s in shard.series() {
            let (buckets, sum) = out
                .entry(s.labels.clone())
                .or_insert_with(|| (vec![0; s.buckets.len()], 0.0));
            for (acc, b) in buckets.iter_mut().zip(s.buckets.iter()) {
                *acc += b.load(Relaxed);
            }
            *sum += f64::from_bits(s.sum.load(Relaxed));
        }
    }
    out
}
