//! Counters and histograms the writer keeps for metrics and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;

pub struct WalStats {
    pub records: AtomicU64,
    pub batches: AtomicU64,
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
    pub(crate) fn record_batch(&self, records: usize, sync_ns: u64, elapsed: Duration) {
        self.records.fetch_add(records as u64, Ordering::Relaxed);
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
}
