//! Planner benchmarks: a 1 M-block volume (4 GiB at 4 KiB host write size) with 10 % of its
//! blocks written per generation, at random, in journal (not block) order.
//!
//! - sort planning of one generation by rank placement (the planner) and, for comparison, by a
//!   comparison sort; also a sparse generation (0.1 %);
//! - merge planning of 4 history records;
//! - restore planning over 8 history records.
//!
//! Target (seed 001 sort/merge at volume scale): sort and merge planning < 50 ms each.
//! Run: `CARGO_TARGET_DIR=/work/target-shared cargo bench --bench plan -- --measurement-time 3`

use std::hint::black_box;

use chronicle::core::element_map::ElementMap;
use chronicle::core::plan::sort::{plan_sort_with, SortStrategy};
use chronicle::core::plan::{plan_merge, plan_restore, plan_sort};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const BLOCKS: u64 = 1 << 20;

/// `count` distinct random blocks in random order, paired with journal segments 0, 1, 2, ….
fn online(seed: u64, count: usize) -> Vec<(u64, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut blocks: Vec<u64> = (0..BLOCKS).collect();
    blocks.shuffle(&mut rng);
    blocks.truncate(count);
    blocks.into_iter().enumerate().map(|(segment, block)| (block, segment as u64)).collect()
}

/// History records of `count` generations, each 10 % dirty, oldest first.
fn records(count: u64) -> Vec<ElementMap> {
    let dirty = (BLOCKS / 10) as usize;
    let mut first = 0;
    (0..count)
        .map(|seed| {
            let plan = plan_sort(BLOCKS, &online(seed, dirty), first).unwrap();
            first += plan.history_units();
            plan.history
        })
        .collect()
}

fn sort(c: &mut Criterion) {
    let dirty = online(42, (BLOCKS / 10) as usize);
    let mut group = c.benchmark_group("sort planning, 1M blocks");
    group.sample_size(20);
    group.bench_function("10% dirty (plan_sort: rank placement)", |b| {
        b.iter(|| plan_sort(BLOCKS, black_box(&dirty), 0).unwrap())
    });
    group.bench_function("10% dirty, comparison sort", |b| {
        b.iter(|| plan_sort_with(SortStrategy::ComparisonSort, BLOCKS, black_box(&dirty), 0).unwrap())
    });
    let sparse = online(43, (BLOCKS / 1000) as usize);
    group.bench_function("0.1% dirty (plan_sort: rank placement)", |b| {
        b.iter(|| plan_sort(BLOCKS, black_box(&sparse), 0).unwrap())
    });
    group.bench_function("0.1% dirty, comparison sort", |b| {
        b.iter(|| plan_sort_with(SortStrategy::ComparisonSort, BLOCKS, black_box(&sparse), 0).unwrap())
    });
    group.finish();
}

fn merge(c: &mut Criterion) {
    let records = records(4);
    let refs: Vec<&ElementMap> = records.iter().collect();
    let mut group = c.benchmark_group("merge planning, 1M blocks");
    group.sample_size(20);
    group.bench_function("4 records, 10% dirty each", |b| b.iter(|| plan_merge(black_box(&refs), 1 << 30).unwrap()));
    group.finish();
}

fn restore(c: &mut Criterion) {
    let records = records(8);
    let refs: Vec<&ElementMap> = records.iter().collect();
    let mut group = c.benchmark_group("restore planning, 1M blocks");
    group.sample_size(20);
    group.bench_function("8 records, 10% dirty each", |b| b.iter(|| plan_restore(black_box(&refs), BLOCKS).unwrap()));
    group.finish();
}

criterion_group!(benches, sort, merge, restore);
criterion_main!(benches);
