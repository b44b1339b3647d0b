//! Throughput of the core crate's cryptographic primitives, through its own public API: AES-256-GCM
//! batch sealing and opening, SHA-256, Ed25519 signing and verification, Merkle roots.
//! `benches/core.sh` runs this and sets the figures beside what `openssl speed` reports for the
//! same primitives on the same machine.
//!
//!   cargo bench -p vsql_vault_core --bench primitives -- --noplot

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vsql_vault_core::canonical::sha256;
use vsql_vault_core::envelope::{open, random_key, seal, BatchBinding};
use vsql_vault_core::{keys, merkle};

/// Buffer sizes for the byte-oriented primitives: openssl speed's largest block, and a large batch.
const SIZES: [(&str, usize); 2] = [("16KiB", 16 * 1024), ("1MiB", 1024 * 1024)];

/// Merkle tree sizes: a small sweep and a large one.
const LEAVES: [usize; 2] = [1_000, 100_000];

fn buffer(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn binding() -> BatchBinding<'static> {
    BatchBinding {
        slot: "vsql_vault_bench",
        session: "0123456789abcdef0123456789abcdef",
        seq: 42,
        lsn_start: "0/16B3748",
        lsn_end: "0/16B9F20",
    }
}

fn aes_256_gcm(c: &mut Criterion) {
    let key = random_key().expect("randomness");
    let b = binding();
    let mut g = c.benchmark_group("aes-256-gcm");
    for (name, len) in SIZES {
        let plain = buffer(len);
        let sealed = seal(&key, &b, &plain).expect("seal");
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("seal", name), &plain, |bench, p| {
            bench.iter(|| seal(&key, &b, black_box(p)).expect("seal"))
        });
        g.bench_with_input(BenchmarkId::new("open", name), &sealed, |bench, s| {
            bench.iter(|| open(&key, &b, black_box(s)).expect("open"))
        });
    }
    g.finish();
}

fn sha_256(c: &mut Criterion) {
    let mut g = c.benchmark_group("sha256");
    for (name, len) in SIZES {
        let data = buffer(len);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::new("digest", name), &data, |bench, d| {
            bench.iter(|| sha256(black_box(d)))
        });
    }
    g.finish();
}

fn ed25519(c: &mut Criterion) {
    // A fixed seed keeps runs comparable; the message is the size of a signed batch record.
    let key = keys::decode_file("bench", "07".repeat(32).as_bytes()).expect("seed");
    let public = key.verifying_key();
    let message = buffer(64);
    let signature = keys::sign(&key, &message);
    assert!(keys::verify(&public, &message, &signature));
    let mut g = c.benchmark_group("ed25519");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |bench| {
        bench.iter(|| keys::sign(&key, black_box(&message)))
    });
    g.bench_function("verify", |bench| {
        bench.iter(|| keys::verify(&public, black_box(&message), black_box(&signature)))
    });
    g.finish();
}

fn merkle_root(c: &mut Criterion) {
    let mut g = c.benchmark_group("merkle");
    for n in LEAVES {
        let leaves: Vec<[u8; 32]> = (0..n as u64)
            .map(|i| merkle::leaf_hash(&i.to_be_bytes()))
            .collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("root", n), &leaves, |bench, l| {
            bench.iter(|| merkle::root(black_box(l)))
        });
    }
    g.finish();
}

fn config() -> Criterion {
    // Modest on a 2-core machine: about 4 s per benchmark.
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = aes_256_gcm, sha_256, ed25519, merkle_root
}
criterion_main!(benches);
