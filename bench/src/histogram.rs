//! A small log-linear latency histogram in microseconds: 32 sub-buckets per power of two,
//! so any quantile it reports is within about 3 % of the true value. Workers send it to
//! the orchestrator as a sparse list of buckets, which merges exactly.

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (precision about 1/32).
const SUB_BUCKETS: u64 = 32;
const SUB_BITS: u32 = 5;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Bucket index → count, sorted by index, no zero counts.
    buckets: Vec<(u32, u64)>,
    count: u64,
    max: u64,
}

/// A histogram being filled: dense counts, turned into a [`Histogram`] to be sent.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    counts: Vec<u64>,
    count: u64,
    max: u64,
}

fn bucket_of(value: u64) -> u32 {
    if value < SUB_BUCKETS {
        return u32::try_from(value).unwrap_or(u32::MAX);
    }
    let exponent = 63 - value.leading_zeros() - SUB_BITS;
    let sub = (value >> exponent) - SUB_BUCKETS;
    (exponent + 1) * u32::try_from(SUB_BUCKETS).unwrap_or(32) + u32::try_from(sub).unwrap_or(0)
}

/// The largest value that falls in `bucket` (quantiles are reported as the bucket's top,
/// so they never understate).
fn bucket_top(bucket: u32) -> u64 {
    let sub_buckets = u32::try_from(SUB_BUCKETS).unwrap_or(32);
    if bucket < sub_buckets {
        return u64::from(bucket);
    }
    let exponent = bucket / sub_buckets - 1;
    let sub = u64::from(bucket % sub_buckets) + SUB_BUCKETS;
    ((sub + 1) << exponent) - 1
}

impl Recorder {
    pub fn record(&mut self, value: u64) {
        let bucket = bucket_of(value) as usize;
        if self.counts.len() <= bucket {
            self.counts.resize(bucket + 1, 0);
        }
        self.counts[bucket] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    pub fn snapshot(&self) -> Histogram {
        Histogram {
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, count)| **count > 0)
                .map(|(bucket, count)| (u32::try_from(bucket).unwrap_or(u32::MAX), *count))
                .collect(),
            count: self.count,
            max: self.max,
        }
    }

    pub fn clear(&mut self) {
        self.counts.clear();
        self.count = 0;
        self.max = 0;
    }
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn merge(&mut self, other: &Histogram) {
        let mut merged = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut left, mut right) = (self.buckets.iter().peekable(), other.buckets.iter().peekable());
        loop {
            match (left.peek(), right.peek()) {
                (Some(a), Some(b)) if a.0 == b.0 => {
                    merged.push((a.0, a.1 + b.1));
                    left.next();
                    right.next();
                }
                (Some(a), Some(b)) if a.0 < b.0 => {
                    merged.push(**a);
                    left.next();
                }
                (Some(_), Some(b)) => {
                    merged.push(**b);
                    right.next();
                }
                (Some(a), None) => {
                    merged.push(**a);
                    left.next();
                }
                (None, Some(b)) => {
                    merged.push(**b);
                    right.next();
                }
                (None, None) => break,
            }
        }
        self.buckets = merged;
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), 0 when empty; never above the maximum seen.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The rank of the wanted sample, 1-based: ceil(q × count), at least 1.
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (bucket, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                return bucket_top(*bucket).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut previous = 0;
        for value in (0..100_000u64).chain([1 << 20, 1 << 30, u64::from(u32::MAX)]) {
            let bucket = bucket_of(value);
            assert!(bucket >= previous, "bucket of {value} went down");
            previous = bucket;
            let top = bucket_top(bucket);
            assert!(top >= value, "top {top} below {value}");
            assert!(top - value <= value / 16 + 1, "bucket of {value} too wide: {top}");
        }
    }

    #[test]
    fn quantiles_of_merged_recorders() {
        let (mut a, mut b) = (Recorder::default(), Recorder::default());
        for value in 1..=500 {
            a.record(value);
        }
        for value in 501..=1000 {
            b.record(value);
        }
        let mut histogram = a.snapshot();
        histogram.merge(&b.snapshot());
        assert_eq!(histogram.count(), 1000);
        assert_eq!(histogram.max(), 1000);
        let p50 = histogram.quantile(0.5);
        assert!((500..=516).contains(&p50), "p50 {p50}");
        let p99 = histogram.quantile(0.99);
        assert!((990..=1000).contains(&p99), "p99 {p99}");
        assert_eq!(histogram.quantile(1.0), 1000);
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }
}
