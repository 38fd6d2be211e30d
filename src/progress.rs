//! Progress of long work (startup recovery, `wal-inspect verify`, backup, restore): a
//! bar on a terminal (indicatif), else a log line every few seconds with the bytes
//! done, the rate and the time left, so that a service's journal shows it too.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Time between two log lines when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    what: &'static str,
    total: AtomicU64,
    done: AtomicU64,
    started: Instant,
    bar: Option<ProgressBar>,
    last_log: Mutex<Instant>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("what", &self.what)
            .field("total", &self.total.load(Ordering::Relaxed))
            .field("done", &self.done.load(Ordering::Relaxed))
            .finish()
    }
}

impl Progress {
    /// Work of `total` bytes, shown as `what`: a bar when stderr is a terminal, log
    /// lines otherwise.
    pub fn new(what: &'static str, total: u64) -> Progress {
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        Progress::with_bar(what, total, terminal)
    }

    fn with_bar(what: &'static str, total: u64, bar: bool) -> Progress {
        let bar = bar.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        let started = Instant::now();
        Progress {
            what,
            total: AtomicU64::new(total),
            done: AtomicU64::new(0),
            started,
            bar,
            last_log: Mutex::new(started),
        }
    }

    /// The work turned out to be `total` bytes.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// `done` bytes of the total are done (clamped to it).
    pub fn set(&self, done: u64) {
        let done = done.min(self.total.load(Ordering::Relaxed));
        self.done.store(done, Ordering::Relaxed);
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None => {
                let mut last = self.last_log.lock().unwrap_or_else(|p| p.into_inner());
                if last.elapsed() >= LOG_EVERY {
                    *last = Instant::now();
                    drop(last);
                    self.log("in progress");
                }
            }
        }
    }

    /// Adds `bytes` to what is done.
    pub fn add(&self, bytes: u64) {
        self.set(self.done.load(Ordering::Relaxed).saturating_add(bytes));
    }

    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The work ended (whether or not it reached its total).
    pub fn finish(&self) {
        match &self.bar {
            Some(bar) => bar.finish_and_clear(),
            None if self.started.elapsed() >= LOG_EVERY => self.log("done"),
            None => {}
        }
    }

    fn log(&self, state: &str) {
        let done = self.done();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let total = self.total.load(Ordering::Relaxed);
        let left = if rate > 0.0 {
            total.saturating_sub(done) as f64 / rate
        } else {
            f64::INFINITY
        };
        tracing::info!(
            what = self.what,
            mib_done = done >> 20,
            mib_total = total >> 20,
            mb_per_s = format!("{:.0}", rate / 1e6),
            secs_left = format!("{left:.0}"),
            "{state}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_clamped_to_its_total_and_adds_up() {
        let p = Progress::with_bar("test", 100, false);
        p.add(30);
        p.add(30);
        assert_eq!(p.done(), 60);
        p.set(1_000);
        assert_eq!(p.done(), 100);
        p.finish();
    }
}
