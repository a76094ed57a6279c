//! The request latency histogram, in one shard per proxy thread.
//!
//! prometheus-client's `Histogram` takes a lock on every observation, and every proxy thread
//! would take the same one (its cache line going from core to core on each request). Here
//! each proxy thread observes into its own shard of atomic counters, and a scrape adds the
//! shards up: the exposition is that of a `Histogram` fed the same observations.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds of the buckets, in seconds (`+Inf` follows).
pub(crate) const LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// Buckets with `+Inf`.
const SLOTS: usize = LATENCY_BUCKETS.len() + 1;

/// A histogram of request latencies whose observations go through [`LatencyShard`]s.
#[derive(Clone, Debug, Default)]
pub(crate) struct LatencyHistogram {
    shards: Arc<Mutex<Vec<Arc<LatencyShard>>>>,
}

/// One thread's part of a [`LatencyHistogram`]; aligned so that two shards never share a
/// cache line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct LatencyShard {
    /// Observations by bucket (not cumulative; the last one is `+Inf`).
    counts: [AtomicU64; SLOTS],
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// A new shard, counted from now on in this histogram.
    pub(crate) fn shard(&self) -> Arc<LatencyShard> {
        let shard = Arc::new(LatencyShard::default());
        self.shards.lock().unwrap_or_else(PoisonError::into_inner).push(shard.clone());
        shard
    }

    /// Sum (seconds), count and the per-bucket counts over all shards.
    fn totals(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let shards = self.shards.lock().unwrap_or_else(PoisonError::into_inner);
        let mut sum_nanos: u128 = 0;
        let mut buckets: Vec<(f64, u64)> =
            LATENCY_BUCKETS.iter().copied().chain([f64::INFINITY]).map(|bound| (bound, 0)).collect();
        for shard in shards.iter() {
            sum_nanos += u128::from(shard.sum_nanos.load(Ordering::Relaxed));
            for (bucket, count) in buckets.iter_mut().zip(&shard.counts) {
                bucket.1 += count.load(Ordering::Relaxed);
            }
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        // u128 -> f64: exact far beyond any real sum
        #[allow(clippy::cast_precision_loss)]
        let sum = sum_nanos as f64 / 1e9;
        (sum, count, buckets)
    }
}

impl LatencyShard {
    /// Counts one request that took `elapsed`.
    pub(crate) fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(SLOTS - 1);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use super::*;

    fn text(register: impl FnOnce(&mut Registry)) -> String {
        let mut registry = Registry::default();
        register(&mut registry);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        out
    }

    /// Latencies on both sides of every bound, on the bounds, and past the last one.
    fn mk_latencies() -> Vec<Duration> {
        let mut all = vec![Duration::ZERO, Duration::from_secs(31), Duration::from_secs(3600)];
        for bound in LATENCY_BUCKETS {
            let at = Duration::from_secs_f64(bound);
            all.extend([at, at - Duration::from_nanos(1), at + Duration::from_nanos(1)]);
        }
        all
    }

    #[test]
    fn shards_add_up_to_the_histogram_of_the_same_observations() {
        let latencies = mk_latencies();
        let sharded = LatencyHistogram::default();
        let shards = [sharded.shard(), sharded.shard(), sharded.shard()];
        for (i, latency) in latencies.iter().enumerate() {
            shards[i % 3].observe(*latency);
        }
        let reference = Histogram::new(LATENCY_BUCKETS);
        for latency in &latencies {
            reference.observe(latency.as_secs_f64());
        }
        let ours = text(|r| r.register("latency", "help", sharded.clone()));
        let theirs = text(|r| r.register("latency", "help", reference));
        // the sums are added in a different order: compare them as numbers
        let (ours_sum, ours_rest) = split_sum(&ours);
        let (theirs_sum, theirs_rest) = split_sum(&theirs);
        assert_eq!(ours_rest, theirs_rest);
        assert!((ours_sum - theirs_sum).abs() < 1e-6, "{ours_sum} vs {theirs_sum}");
        assert!(ours.contains(&format!("latency_count {}\n", latencies.len())), "{ours}");
    }

    fn split_sum(text: &str) -> (f64, String) {
        let mut sum = f64::NAN;
        let mut rest = String::new();
        for line in text.lines() {
            match line.strip_prefix("latency_sum ") {
                Some(value) => sum = value.parse().unwrap(),
                None => {
                    rest.push_str(line);
                    rest.push('\n');
                }
            }
        }
        (sum, rest)
    }

    #[test]
    fn observations_from_many_threads_are_all_counted() {
        let histogram = LatencyHistogram::default();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let shard = histogram.shard();
                s.spawn(move || {
                    for i in 0..10_000u64 {
                        shard.observe(Duration::from_micros((i * 7 + t) % 2_000));
                    }
                });
            }
        });
        let (_, count, buckets) = histogram.totals();
        assert_eq!(count, 40_000);
        assert_eq!(buckets.iter().map(|(_, n)| n).sum::<u64>(), 40_000);
        // 2 ms at most: nothing past the 2.5 ms bucket
        assert!(buckets[5..].iter().all(|(_, n)| *n == 0), "{buckets:?}");
    }

    #[test]
    fn a_shard_taken_later_still_counts() {
        let histogram = LatencyHistogram::default();
        histogram.shard().observe(Duration::from_millis(1));
        assert_eq!(histogram.totals().1, 1);
        let later = histogram.shard();
        later.observe(Duration::from_millis(2));
        later.observe(Duration::from_secs(40));
        let (sum, count, buckets) = histogram.totals();
        assert_eq!(count, 3);
        assert!((sum - 40.003).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[SLOTS - 1].1, 1);
    }
}
