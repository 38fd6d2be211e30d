//! The serving layer's counters and histograms, in a Prometheus registry of the
//! server's own (two servers in one process count apart). What the storage measures is
//! read from it at scrape time instead ([`crate::sequencer::StorageStats`]), so the
//! write path carries no instrumentation of its own.
//!
//! Every update is an atomic add (a histogram: a short search of its bounds, then two);
//! a server built with metrics off records nothing (`quire serve --metrics off`, for
//! measuring what they cost).

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::protocol::message::ErrorCode;
use crate::wal::stats::LATENCY_BOUNDS;

pub struct Metrics {
    enabled: bool,
    registry: Registry,
    ops_accepted: IntCounter,
    ops_rejected: IntCounterVec,
    ack_seconds: Histogram,
    presence_in: IntCounter,
    presence_out: IntCounter,
    slow_reader_disconnects: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.enabled)
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(true)
    }
}

impl Metrics {
    /// A registry with every serving metric at zero; `enabled` false records nothing.
    pub fn new(enabled: bool) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("a valid metric name");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let ops_accepted = counter(
            "quire_ops_accepted_total",
            "Ops sequenced, durable and acknowledged to their submitter.",
        );
        let presence_in = counter(
            "quire_presence_in_total",
            "Presence messages received from clients.",
        );
        let presence_out = counter(
            "quire_presence_out_total",
            "Presence messages sent to clients (one per recipient).",
        );
        let slow_reader_disconnects = counter(
            "quire_slow_reader_disconnects_total",
            "Connections closed because they did not read what they were sent (code 8).",
        );
        let ops_rejected = IntCounterVec::new(
            Opts::new(
                "quire_ops_rejected_total",
                "Ops refused with Reject, by wire error code (protocol.md).",
            ),
            &["code"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(ops_rejected.clone()))
            .expect("registered once");
        let ack_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "quire_ack_latency_seconds",
                "From a Submit's arrival to its op being durable and its ack released.",
            )
            .buckets(LATENCY_BOUNDS.to_vec()),
        )
        .expect("a valid metric");
        registry
            .register(Box::new(ack_seconds.clone()))
            .expect("registered once");
        Metrics {
            enabled,
            registry,
            ops_accepted,
            ops_rejected,
            ack_seconds,
            presence_in,
            presence_out,
            slow_reader_disconnects,
        }
    }

    /// One shared registry that records nothing (what an outbox holds until its
    /// session gives it the server's).
    pub fn off() -> Arc<Metrics> {
        static OFF: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new(false)));
        OFF.clone()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// An op was acknowledged to its submitter; it arrived at `received`.
    pub fn op_accepted(&self, received: Instant) {
        if self.enabled {
            self.ops_accepted.inc();
            self.ack_seconds.observe(received.elapsed().as_secs_f64());
        }
    }

    /// An op was refused with `code`.
    pub fn op_rejected(&self, code: ErrorCode) {
        if self.enabled {
            self.ops_rejected
                .with_label_values(&[&code.to_u16().to_string()])
                .inc();
        }
    }

    pub fn presence_in(&self) {
        if self.enabled {
            self.presence_in.inc();
        }
    }

    pub fn presence_out(&self) {
        if self.enabled {
            self.presence_out.inc();
        }
    }

    pub fn slow_reader_disconnect(&self) {
        if self.enabled {
            self.slow_reader_disconnects.inc();
        }
    }

    /// The serving metrics as Prometheus metric families.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }
}
