use std::{
    collections::HashMap,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
};

use super::*;
use crate::config::{ColumnConfig, ColumnKind};

fn config(size: u64) -> TableConfig {
    let col = |name: &str, kind| ColumnConfig {
        name: name.into(),
        kind,
    };
    TableConfig {
        size,
        columns: vec![
            col("n", ColumnKind::U64),
            col("i", ColumnKind::I64),
            col("score", ColumnKind::F64),
            col("name", ColumnKind::Str(8)),
            col("blob", ColumnKind::Bytes(20)),
        ],
        key_max: 256,
    }
}

fn table(size: u64) -> Table {
    Table::new("t", &config(size)).unwrap()
}

/// Every key hashes to 0: one bucket, one chain.
#[derive(Clone, Default)]
struct Degenerate;

impl Hasher for Degenerate {
    fn finish(&self) -> u64 {
        0
    }
    fn write(&mut self, _: &[u8]) {}
}

impl BuildHasher for Degenerate {
    type Hasher = Degenerate;
    fn build_hasher(&self) -> Degenerate {
        Degenerate
    }
}

fn u64_of<S: BuildHasher>(t: &Table<S>, key: &str) -> Option<u64> {
    t.read(key, |r| match r.num(0) {
        Some(Num::U64(v)) => v,
        other => panic!("{other:?}"),
    })
    .unwrap()
}

#[test]
fn exactly_size_distinct_keys_fit() {
    let t = table(1000);
    for i in 0..1000 {
        t.set(&format!("key-{i}"), &[(0, Cell::U64(i))]).unwrap();
    }
    assert_eq!(t.count(), 1000);
    assert_eq!(t.set("one-more", &[]), Err(TableError::Full));
    assert_eq!(
        t.incr("one-more", 0, Num::U64(1), false),
        Err(TableError::Full)
    );
    // An existing key is still written; after a delete a new key fits again.
    t.set("key-7", &[(0, Cell::U64(70))]).unwrap();
    assert_eq!(u64_of(&t, "key-7"), Some(70));
    assert!(t.del("key-3").unwrap());
    t.set("one-more", &[]).unwrap();
    assert_eq!(t.set("two-more", &[]), Err(TableError::Full));
    for i in (0..1000).filter(|i| *i != 3) {
        assert_eq!(
            u64_of(&t, &format!("key-{i}")),
            Some(if i == 7 { 70 } else { i })
        );
    }
}

#[test]
fn capacity_does_not_depend_on_hashing() {
    let t = Table::with_hasher("t", &config(100), Degenerate).unwrap();
    for i in 0..100 {
        t.set(&format!("k{i}"), &[(0, Cell::U64(i))]).unwrap();
    }
    assert_eq!(t.set("k100", &[]), Err(TableError::Full));
    for i in (0..100).step_by(3) {
        assert!(t.del(&format!("k{i}")).unwrap());
    }
    for i in 0..100 {
        let want = (i % 3 != 0).then_some(i);
        assert_eq!(u64_of(&t, &format!("k{i}")), want, "k{i}");
    }
    assert_eq!(t.count(), 66);
}

#[test]
fn limits_are_refused_never_truncated() {
    let t = table(10);
    let long_key = "k".repeat(257);
    assert_eq!(t.set(&long_key, &[]), Err(TableError::KeyTooLong));
    assert_eq!(t.exists(&long_key), Err(TableError::KeyTooLong));
    t.set(&"k".repeat(256), &[]).unwrap();
    t.set("a", &[(3, Cell::Str("12345678"))]).unwrap();
    // One byte too many: refused, and the row keeps its value (no other cell written either).
    let err = t.set("a", &[(0, Cell::U64(9)), (3, Cell::Str("123456789"))]);
    assert_eq!(err, Err(TableError::ValueTooLong));
    let row = t.read("a", |r| r.values()).unwrap().unwrap();
    assert_eq!(row[0], Value::U64(0));
    assert_eq!(row[3], Value::Str("12345678".into()));
    assert_eq!(t.set("a", &[(3, Cell::U64(1))]), Err(TableError::WrongType));
    assert_eq!(
        t.set("a", &[(9, Cell::U64(1))]),
        Err(TableError::UnknownColumn)
    );
    assert_eq!(
        t.set("b", &[(4, Cell::Bytes(&[1; 21]))]),
        Err(TableError::ValueTooLong)
    );
    assert!(!t.exists("b").unwrap(), "a refused set creates no row");
    assert_eq!(
        t.incr("a", 1, Num::U64(1), false),
        Err(TableError::WrongType)
    );
    t.incr("a", 1, Num::I64(i64::MAX), false).unwrap();
    assert_eq!(
        t.incr("a", 1, Num::I64(1), false),
        Err(TableError::Overflow)
    );
    assert_eq!(t.incr("c", 0, Num::U64(1), true), Err(TableError::Overflow));
    assert!(!t.exists("c").unwrap(), "a refused incr creates no row");
    assert_eq!(t.incr("c", 2, Num::F64(0.5), true), Ok(Num::F64(-0.5)));
}

#[test]
fn rows_round_trip_every_kind() {
    let t = table(4);
    let cells = [
        (0, Cell::U64(u64::MAX)),
        (1, Cell::I64(-5)),
        (2, Cell::F64(2.5)),
        (3, Cell::Str("héllo")),
        (4, Cell::Bytes(&[0, 1, 2, 255])),
    ];
    t.set("row", &cells).unwrap();
    let values = t.read("row", |r| r.values()).unwrap().unwrap();
    assert_eq!(
        values,
        [
            Value::U64(u64::MAX),
            Value::I64(-5),
            Value::F64(2.5),
            Value::Str("héllo".into()),
            Value::Bytes(vec![0, 1, 2, 255]),
        ]
    );
    // A shorter string after a longer one leaves nothing of the old one behind.
    t.set("row", &[(3, Cell::Str("ab"))]).unwrap();
    assert_eq!(
        t.read("row", |r| r.values()[3].clone()).unwrap(),
        Some(Value::Str("ab".into()))
    );
    assert!(t.del("row").unwrap());
    t.set("row", &[]).unwrap();
    assert_eq!(
        t.read("row", |r| r.values()[3].clone()).unwrap(),
        Some(Value::Str("".into()))
    );
}

#[test]
fn concurrent_incr_is_exact() {
    let t = Arc::new(table(100));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            thread::spawn(move || {
                for i in 0..100_000u64 {
                    t.incr("hits", 0, Num::U64(1), false).unwrap();
                    // Other keys on the way, so inserts and chains are exercised too.
                    t.incr(&format!("k{}", i % 50), 1, Num::I64(1), false)
                        .unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(u64_of(&t, "hits"), Some(400_000));
    let total: i64 = (0..50)
        .map(|i| t.read(&format!("k{i}"), |r| r.num(1)).unwrap().flatten())
        .map(|n| match n {
            Some(Num::I64(v)) => v,
            other => panic!("{other:?}"),
        })
        .sum();
    assert_eq!(total, 400_000);
}

#[test]
fn concurrent_inserts_fill_exactly_size() {
    let t = Arc::new(table(5000));
    let taken = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let (t, taken) = (t.clone(), taken.clone());
            thread::spawn(move || {
                for i in 0..2000 {
                    match t.set(&format!("{n}-{i}"), &[]) {
                        Ok(()) => taken.fetch_add(1, Ordering::Relaxed),
                        Err(TableError::Full) => 0,
                        Err(e) => panic!("{e}"),
                    };
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(taken.load(Ordering::Relaxed), 5000);
    assert_eq!(t.count(), 5000);
}

/// Walks the whole table with small batches, as the plugin API does.
fn walk<S: BuildHasher>(t: &Table<S>, mut each: impl FnMut(String)) -> usize {
    let (mut cursor, mut batches) = (Some(0), 0);
    while let Some(c) = cursor {
        let mut rows = Vec::new();
        cursor = t.scan(c, 16, &mut rows);
        rows.into_iter()
            .map(|r| String::from_utf8(r.key).unwrap())
            .for_each(&mut each);
        batches += 1;
        assert!(batches < 1_000_000, "the scan does not end");
    }
    batches
}

fn scan_under_churn<S: BuildHasher + Send + Sync + 'static>(t: Arc<Table<S>>) {
    for i in 0..300 {
        t.set(&format!("stay:{i}"), &[]).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..2)
        .map(|n| {
            let (t, stop) = (t.clone(), stop.clone());
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("churn:{n}:{}", i % 200);
                    let _ = t.set(&key, &[(0, Cell::U64(i))]);
                    if i.is_multiple_of(3) {
                        let _ = t.del(&format!("churn:{n}:{}", (i * 7) % 200));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    for _ in 0..20 {
        let mut seen: HashMap<String, u32> = HashMap::new();
        walk(&t, |k| *seen.entry(k).or_default() += 1);
        for i in 0..300 {
            assert_eq!(seen.get(&format!("stay:{i}")), Some(&1), "stay:{i}");
        }
        assert!(seen.values().all(|n| *n == 1), "a row was seen twice");
    }
    // Deleting every row while walking leaves none of them behind.
    walk(&t, |k| {
        if k.starts_with("stay:") {
            assert!(t.del(&k).unwrap());
        }
    });
    stop.store(true, Ordering::Relaxed);
    for th in churn {
        th.join().unwrap();
    }
    let mut left = 0;
    walk(&t, |k| left += usize::from(k.starts_with("stay:")));
    assert_eq!(left, 0);
}

#[test]
fn a_scan_sees_every_row_that_stays_once_under_concurrent_set_and_del() {
    scan_under_churn(Arc::new(table(1000)));
}

#[test]
fn a_scan_of_one_long_chain_under_churn() {
    scan_under_churn(Arc::new(
        Table::with_hasher("t", &config(1000), Degenerate).unwrap(),
    ));
}

#[test]
fn memory_is_reported_by_the_formula() {
    let t = table(1000);
    // Header + 32 key words + n, i, score + name (1 + 1) + blob (1 + 3) = 42 words a row.
    let rows = 1000 * 42 * 8;
    let expected = rows + 1000 * 4 + 1024 * 4 + 128 * 64;
    assert_eq!(t.bytes(), expected as u64);
    assert_eq!(t.capacity(), 1000);
}

#[test]
fn counters_are_exact_and_created_on_first_use() {
    let c = Arc::new(Counters::default());
    let id = c.open("requests").unwrap();
    assert_eq!(c.open("requests").unwrap(), id);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            thread::spawn(move || {
                let id = c.open("requests").unwrap();
                for _ in 0..100_000 {
                    c.add(id, 1).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    assert_eq!(c.get(id).unwrap(), 400_000);
    assert_eq!(c.compare_exchange(id, 1, 2).unwrap(), Err(400_000));
    assert_eq!(c.compare_exchange(id, 400_000, 7).unwrap(), Ok(400_000));
    c.set(id, -1).unwrap();
    assert_eq!(c.list(), [("requests".to_owned(), -1)]);
    assert_eq!(c.open(&"x".repeat(257)), Err(TableError::KeyTooLong));
    for i in 1..counters::MAX_COUNTERS {
        c.open(&format!("c{i}")).unwrap();
    }
    assert_eq!(c.open("one-too-many"), Err(TableError::Full));
}

#[test]
fn table_changes_are_named() {
    let old = BTreeMap::from([("a".to_owned(), config(10)), ("b".to_owned(), config(10))]);
    let mut new = old.clone();
    assert!(changes(&old, &new).is_empty());
    new.get_mut("a").unwrap().size = 20;
    new.remove("b");
    new.insert("c".into(), config(1));
    assert_eq!(
        changes(&old, &new),
        [
            "tables.a (size 10 -> 20)",
            "tables.c (added)",
            "tables.b (removed)"
        ]
    );
}
