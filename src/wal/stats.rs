//! Counters and histograms the writer keeps for metrics and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

pub struct WalStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
    /// Bytes of records written (headers included), synced or failed.
    pub bytes: AtomicU64,
    /// Segment files removed by truncation.
    pub segments_removed: AtomicU64,
    /// `fdatasync` latency in microseconds.
    fsync_us: Mutex<Histogram<u64>>,
    /// Records per group-commit batch.
    batch_records: Mutex<Histogram<u64>>,
    /// Time from taking a batch to completing it, microseconds.
    batch_us: Mutex<Histogram<u64>>,
}

impl Default for WalStats {
    fn default() -> Self {
        let hist =
            || Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"));
        WalStats {
            records: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            segments_removed: AtomicU64::new(0),
            fsync_us: hist(),
            batch_records: hist(),
            batch_us: hist(),
        }
    }
}

/// A summary of one histogram.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// A histogram as cumulative counts at fixed upper bounds (the shape of a Prometheus
/// histogram), in the unit the bounds are given in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Distribution {
    /// `(upper bound, values at or below it)`, bounds increasing.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Distribution {
    /// `h`'s values (recorded in `unit`s of the bounds times `scale`, e.g. microseconds
    /// for bounds in seconds with `scale` 1e6) at `bounds`.
    pub fn of(h: &Histogram<u64>, bounds: &[f64], scale: f64) -> Distribution {
        let buckets = bounds
            .iter()
            .map(|&b| {
                let high = (b * scale).floor().max(0.0) as u64;
                (b, h.count_between(0, high))
            })
            .collect();
        Distribution {
            buckets,
            count: h.len(),
            sum: h.mean() * h.len() as f64 / scale,
        }
    }
}

/// Bounds of the latency distributions, in seconds: 50 µs to 10 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Bounds of the records-per-batch distribution.
pub const BATCH_BOUNDS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

fn summarize(h: &Mutex<Histogram<u64>>) -> Summary {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    Summary {
        count: h.len(),
        p50: h.value_at_quantile(0.50),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
        mean: h.mean(),
    }
}

impl WalStats {
    pub(crate) fn record_batch(&self, records: usize, bytes: u64, sync_ns: u64, elapsed: Duration) {
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let clamp = |v: u64| v.clamp(1, 60_000_000);
        let _ = self
            .fsync_us
            .lock()
            .map(|mut h| h.record(clamp(sync_ns / 1000)));
        let _ = self
            .batch_records
            .lock()
            .map(|mut h| h.record(clamp(records as u64)));
        let _ = self
            .batch_us
            .lock()
            .map(|mut h| h.record(clamp(elapsed.as_micros() as u64)));
    }

    pub fn fsync_us(&self) -> Summary {
        summarize(&self.fsync_us)
    }

    pub fn batch_records(&self) -> Summary {
        summarize(&self.batch_records)
    }

    pub fn batch_us(&self) -> Summary {
        summarize(&self.batch_us)
    }

    /// `fdatasync` latency, in seconds, at [`LATENCY_BOUNDS`].
    pub fn fsync_seconds(&self) -> Distribution {
        let h = self.fsync_us.lock().unwrap_or_else(|p| p.into_inner());
        Distribution::of(&h, LATENCY_BOUNDS, 1e6)
    }

    /// Records per group-commit batch, at [`BATCH_BOUNDS`].
    pub fn batch_sizes(&self) -> Distribution {
        let h = self.batch_records.lock().unwrap_or_else(|p| p.into_inner());
        Distribution::of(&h, BATCH_BOUNDS, 1.0)
    }
}
