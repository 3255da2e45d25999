//! Benchmarks of the pure core: difference-bitmap scans (the sort, merge and restore walk
//! them), crc32c of elements (every structure and every shipped element), and the delta codec
//! of replication. Results and the command are in BENCHMARKS.md §Core.

use std::hint::black_box;

use chronicle::core::bitmap::DifferenceBitmap;
use chronicle::core::checksum::crc32c;
use chronicle::core::delta;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const ELEMENT_BYTES: usize = 4096;

/// A bitmap of `bits` with each bit set with probability `density` (seeded, reproducible).
fn random_bitmap(bits: u64, density: f64, seed: u64) -> DifferenceBitmap {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut bitmap = DifferenceBitmap::new(bits);
    let ones = (bits as f64 * density) as u64;
    for _ in 0..ones {
        bitmap.set(rng.random_range(0..bits));
    }
    bitmap
}

fn bitmap_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitmap_scan");
    for (label, bits) in [("1M", 1u64 << 20), ("64M", 1u64 << 26)] {
        for (density_label, density) in [("0.1%", 0.001), ("1%", 0.01), ("10%", 0.10)] {
            let bitmap = random_bitmap(bits, density, 7);
            eprintln!("bitmap {label} at {density_label}: {} bits set", bitmap.count_ones());
            group.throughput(Throughput::Bytes(bitmap.words().len() as u64 * 8));
            let id = format!("{label}/{density_label}");
            if density_label == "0.1%" {
                // The ceiling: reading every word once, no decoding.
                group.bench_with_input(BenchmarkId::new("read_words", label), &bitmap, |b, bitmap| {
                    b.iter(|| black_box(bitmap).words().iter().fold(0u64, |any, word| any | word))
                });
            }
            group.bench_with_input(BenchmarkId::new("iter_ones", &id), &bitmap, |b, bitmap| {
                b.iter(|| black_box(bitmap).iter_ones().fold(0u64, |sum, bit| sum.wrapping_add(bit)))
            });
            group.bench_with_input(BenchmarkId::new("for_each_one", &id), &bitmap, |b, bitmap| {
                b.iter(|| {
                    let mut sum = 0u64;
                    black_box(bitmap).for_each_one(|bit| sum = sum.wrapping_add(bit));
                    sum
                })
            });
        }
    }
    group.finish();
}

fn checksum(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    let mut element = vec![0u8; ELEMENT_BYTES];
    ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut element);
    group.throughput(Throughput::Bytes(ELEMENT_BYTES as u64));
    group.bench_function("4KiB", |b| b.iter(|| crc32c(black_box(&element))));
    group.finish();
}

fn delta_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("delta");
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut base = vec![0u8; ELEMENT_BYTES];
    rng.fill_bytes(&mut base);
    group.throughput(Throughput::Bytes(ELEMENT_BYTES as u64));
    for (label, changed) in [("1%", ELEMENT_BYTES / 100), ("10%", ELEMENT_BYTES / 10), ("random", usize::MAX)] {
        let new = if changed == usize::MAX {
            let mut new = vec![0u8; ELEMENT_BYTES];
            rng.fill_bytes(&mut new);
            new
        } else {
            let mut new = base.clone();
            for _ in 0..changed {
                let at = rng.random_range(0..ELEMENT_BYTES);
                new[at] = new[at].wrapping_add(rng.random_range(1..=255));
            }
            new
        };
        let frame = delta::encode(&base, &new);
        eprintln!("delta 4KiB {label}: frame {} bytes ({:?})", frame.len(), delta::header(&frame).unwrap().kind);
        group.bench_with_input(BenchmarkId::new("encode", label), &new, |b, new| {
            b.iter(|| delta::encode(black_box(&base), black_box(new)))
        });
        let mut out = vec![0u8; ELEMENT_BYTES];
        group.bench_with_input(BenchmarkId::new("decode_into", label), &frame, |b, frame| {
            b.iter(|| delta::decode_into(black_box(&base), black_box(frame), &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bitmap_scan, checksum, delta_codec);
criterion_main!(benches);
