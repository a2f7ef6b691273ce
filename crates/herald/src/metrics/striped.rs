//! A counter and a histogram that each runtime thread updates on cache lines of its
//! own, summed when `/metrics` is read.
//!
//! Every published message and every socket write counted into one shared atomic (and
//! the publish-to-send histogram took one shared mutex): on two runtime threads, that
//! line moved between the cores at about every message, a transfer for each counter on
//! the hottest paths herald has (issue 19; bench/notes.md has the measurement). Here a
//! thread adds to its own stripe, which no other thread writes; the reader sums them.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use crate::sync::lock;

/// Stripes per metric: more than the runtime's threads on the machines herald is run
/// on; two threads that share a stripe are still counted right, only slower.
const STRIPES: usize = 8;

/// This thread's stripe: threads take the next one in turn as they first count. Which
/// stripe a thread gets only matters for speed; any assignment counts right.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|stripe| *stripe)
}

/// One value on a cache line (and its neighbour, which some CPUs fetch in pairs) of its
/// own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// A Prometheus counter, striped.
#[derive(Debug, Clone, Default)]
pub struct StripedCounter(Arc<[Padded<AtomicU64>; STRIPES]>);

impl StripedCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0
            .iter()
            .map(|stripe| stripe.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for StripedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for StripedCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Buckets a [`StripedHistogram`] holds at most, +Inf included: a stripe's counts sit in
/// its own padded block, not in a heap block that could share a line with another's.
const MAX_BUCKETS: usize = 24;

/// A Prometheus histogram with fixed buckets, striped: the same series
/// `prometheus_client`'s `Histogram` exports.
#[derive(Debug, Clone)]
pub struct StripedHistogram {
    /// Upper bounds, ascending, the last one +Inf; at most [`MAX_BUCKETS`].
    bounds: Arc<[f64]>,
    stripes: Arc<[Padded<Mutex<Tally>>; STRIPES]>,
}

#[derive(Debug, Default)]
struct Tally {
    sum: f64,
    count: u64,
    /// Observations per bucket (not cumulative), as `bounds`.
    buckets: [u64; MAX_BUCKETS],
}

impl StripedHistogram {
    /// `bounds` are the finite upper bounds, ascending; +Inf is added. Bounds past the
    /// first `MAX_BUCKETS - 1` are dropped (their observations count under +Inf).
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let bounds: Arc<[f64]> = bounds
            .into_iter()
            .filter(|bound| bound.is_finite())
            .take(MAX_BUCKETS - 1)
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        Self {
            bounds,
            stripes: Arc::default(),
        }
    }

    pub fn observe(&self, value: f64) {
        // NaN goes to +Inf, as prometheus_client files it.
        let bucket = self
            .bounds
            .iter()
            .position(|bound| *bound >= value)
            .unwrap_or(self.bounds.len() - 1);
        let mut tally = lock(&self.stripes[stripe()].0);
        tally.sum += value;
        tally.count += 1;
        if let Some(n) = tally.buckets.get_mut(bucket) {
            *n += 1;
        }
    }

    /// The stripes summed: (sum, count, per-bucket counts with their upper bounds).
    fn total(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut sum = 0.0;
        let mut count = 0;
        let mut buckets: Vec<(f64, u64)> = self.bounds.iter().map(|bound| (*bound, 0)).collect();
        for stripe in self.stripes.iter() {
            // `bounds` and a stripe's `buckets` are zipped: the counts past the bounds
            // are never written.
            let tally = lock(&stripe.0);
            sum += tally.sum;
            count += tally.count;
            for ((_, total), n) in buckets.iter_mut().zip(&tally.buckets) {
                *total += n;
            }
        }
        (sum, count, buckets)
    }
}

impl TypedMetric for StripedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for StripedHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.total();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use super::*;

    fn render(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn counts_from_every_thread_are_summed() {
        let counter = StripedCounter::default();
        std::thread::scope(|scope| {
            for _ in 0..STRIPES + 3 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        counter.inc();
                    }
                    counter.inc_by(5);
                });
            }
        });
        assert_eq!(counter.get(), (STRIPES as u64 + 3) * 1005);
    }

    #[test]
    fn exports_what_prometheus_clients_own_metrics_export() {
        // Values a binary fraction apart, so the sum is exact in any order; then NaN,
        // which both file under +Inf (and which makes both sums NaN).
        let values = [0.25, 0.000_488_281_25, 0.5, 0.75, 1.0, 7.0, 1024.0, 0.125];
        let bounds = [0.0005, 0.001, 0.5, 1.0, 4.0];
        for with_nan in [false, true] {
            let striped = StripedHistogram::new(bounds);
            let plain = Histogram::new(bounds);
            std::thread::scope(|scope| {
                for value in values.into_iter().chain(with_nan.then_some(f64::NAN)) {
                    let striped = striped.clone();
                    scope.spawn(move || striped.observe(value));
                    plain.observe(value);
                }
            });
            let striped_counter = StripedCounter::default();
            let plain_counter = prometheus_client::metrics::counter::Counter::<u64>::default();
            striped_counter.inc_by(42);
            plain_counter.inc_by(42);
            let ours = render(|registry| {
                registry.register("latency", "help", striped);
                registry.register("things", "help", striped_counter);
            });
            let theirs = render(|registry| {
                registry.register("latency", "help", plain);
                registry.register("things", "help", plain_counter);
            });
            assert_eq!(ours, theirs);
            assert!(ours.contains("latency_bucket{le=\"1.0\"} 6"), "{ours}");
            assert!(ours.contains("things_total 42"), "{ours}");
            if !with_nan {
                assert!(ours.contains("latency_sum 1033.62548828125"), "{ours}");
            }
        }
    }
}
