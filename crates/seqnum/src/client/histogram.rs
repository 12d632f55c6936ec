//! A compact log-linear latency histogram.
//!
//! Values (microseconds, but any `u64` unit works) below 128 get a bucket
//! each; above, every power of two is split into 64 equal buckets, so a
//! bucket is at most 1/64 of its lower bound wide and a percentile reported
//! at the bucket's midpoint is within 1/128 (< 0.8 %) of the true value.
//! Values up to 2^40 are tracked (about 12.7 days in microseconds); larger
//! ones land in the last bucket. Memory is fixed: 2 240 `u64` counters.
//! The minimum, maximum, count and sum are exact.
//!
//! A histogram serializes as its non-empty buckets plus those exact figures
//! (the `latency_histogram` of `seqnum-client --json`), so that the
//! histograms of several client processes [`merge`](Histogram::merge) into
//! the histogram of them all: the percentiles of a merged histogram are
//! those of the union of the samples; a percentile of percentiles is not a
//! percentile.

use serde::{Deserialize, Serialize};

/// Bits of precision: values below `1 << SUB_BITS` are exact.
const SUB_BITS: u32 = 7;
const SUB_COUNT: u64 = 1 << SUB_BITS;
const HALF: u64 = SUB_COUNT / 2;
/// Values of `1 << MAX_BITS` and above share the last bucket.
const MAX_BITS: u32 = 40;
/// Number of buckets.
pub const BUCKETS: usize = (SUB_COUNT + (MAX_BITS - SUB_BITS) as u64 * HALF) as usize;

/// Log-linear histogram of `u64` samples with fixed memory.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "Sparse", try_from = "Sparse")]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count)
            .field("min", &self.min())
            .field("max", &self.max)
            .field("mean", &self.mean())
            .finish_non_exhaustive()
    }
}

/// A histogram as JSON: `[bucket, count]` for each non-empty bucket, and
/// the exact count, sum (saturating at `u64::MAX`), min and max.
#[derive(Serialize, Deserialize)]
struct Sparse {
    buckets: Vec<(usize, u64)>,
    count: u64,
    sum: u64,
    min: u64,
    max: u64,
}

impl From<Histogram> for Sparse {
    fn from(h: Histogram) -> Sparse {
        let buckets = h.counts.iter().enumerate().filter(|(_, c)| **c > 0).map(|(i, c)| (i, *c)).collect();
        Sparse { buckets, count: h.count, sum: h.sum.min(u128::from(u64::MAX)) as u64, min: h.min(), max: h.max }
    }
}

impl TryFrom<Sparse> for Histogram {
    type Error = String;

    fn try_from(s: Sparse) -> Result<Histogram, String> {
        let mut h = Histogram::new();
        for (i, c) in s.buckets {
            *h.counts.get_mut(i).ok_or_else(|| format!("histogram bucket {i} is past the last ({BUCKETS})"))? += c;
        }
        if h.counts.iter().sum::<u64>() != s.count {
            return Err(format!("histogram buckets do not add up to its count {}", s.count));
        }
        (h.count, h.sum) = (s.count, u128::from(s.sum));
        if s.count > 0 {
            (h.min, h.max) = (s.min, s.max);
        }
        Ok(h)
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket of `v`.
fn index(v: u64) -> usize {
    if v < SUB_COUNT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros(); // >= SUB_BITS
    if msb >= MAX_BITS {
        return BUCKETS - 1;
    }
    let shift = msb - (SUB_BITS - 1);
    let sub = (v >> shift) - HALF; // 0..HALF
    (SUB_COUNT + u64::from(msb - SUB_BITS) * HALF + sub) as usize
}

/// Lowest value and width of bucket `i`.
fn bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB_COUNT {
        return (i, 1);
    }
    let k = i - SUB_COUNT;
    let msb = SUB_BITS as u64 + k / HALF;
    let shift = msb - u64::from(SUB_BITS - 1);
    ((HALF + k % HALF) << shift, 1 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Histogram { counts: vec![0; BUCKETS].into_boxed_slice(), count: 0, sum: 0, min: u64::MAX, max: 0 }
    }

    /// Adds one sample.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.count += 1;
        self.sum += u128::from(v);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Forgets every sample.
    pub fn reset(&mut self) {
        if self.count != 0 {
            self.counts.fill(0);
        }
        self.count = 0;
        self.sum = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest sample (exact), 0 if empty.
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest sample (exact), 0 if empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Arithmetic mean (exact), 0 if empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// The `q`-quantile (`q` in 0..=1; 0.99 is p99): the smallest recorded
    /// bucket holding at least `ceil(q * count)` samples at or below it,
    /// reported at its midpoint and clamped to the exact min and max.
    /// 0 if empty; `q >= 1` is the exact maximum.
    pub fn percentile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max;
        }
        let rank = ((q.max(0.0) * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                if i == BUCKETS - 1 {
                    // The overflow bucket: its midpoint means nothing.
                    return self.max;
                }
                let (lo, width) = bounds(i);
                return (lo + width / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: u64, want: f64, rel: f64) -> bool {
        (got as f64 - want).abs() <= want * rel + 1.0
    }

    #[test]
    fn layout_is_consistent() {
        const { assert!(BUCKETS <= 4096) };
        // Every bucket's bounds map back to it, and buckets tile the range.
        let mut next = 0;
        for i in 0..BUCKETS {
            let (lo, width) = bounds(i);
            assert_eq!(lo, next, "bucket {i}");
            assert_eq!(index(lo), i);
            assert_eq!(index(lo + width - 1), i);
            if i > 0 && lo >= SUB_COUNT {
                assert!(width * 64 <= lo, "bucket {i} too wide");
            }
            next = lo + width;
        }
        assert_eq!(next, 1 << MAX_BITS);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        assert_eq!(index(1 << MAX_BITS), BUCKETS - 1);
    }

    #[test]
    fn midpoint_error_is_below_one_percent() {
        let mut v = 1u64;
        while v < (1 << MAX_BITS) {
            for x in [v, v + v / 3, v + v / 2, 2 * v - 1] {
                let (lo, width) = bounds(index(x));
                let mid = lo + width / 2;
                let err = (mid as f64 - x as f64).abs() / x as f64;
                assert!(err <= 0.01, "x={x} mid={mid} err={err}");
            }
            v *= 2;
        }
    }

    #[test]
    fn empty() {
        let h = Histogram::new();
        assert_eq!(h.count(), 0);
        assert_eq!(h.percentile(0.5), 0);
        assert_eq!(h.percentile(1.0), 0);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 0);
        assert_eq!(h.mean(), 0.0);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 1..=100 {
            h.record(v);
        }
        assert_eq!(h.percentile(0.5), 50);
        assert_eq!(h.percentile(0.99), 99);
        assert_eq!(h.percentile(0.0), 1);
        assert_eq!(h.percentile(1.0), 100);
        assert_eq!(h.mean(), 50.5);
    }

    #[test]
    fn constant_is_exact() {
        let mut h = Histogram::new();
        for _ in 0..1000 {
            h.record(123_457);
        }
        for q in [0.0, 0.5, 0.99, 0.999, 1.0] {
            assert_eq!(h.percentile(q), 123_457);
        }
    }

    #[test]
    fn uniform() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 100_000);
        assert!(close(h.percentile(0.5), 50_000.0, 0.01), "{}", h.percentile(0.5));
        assert!(close(h.percentile(0.99), 99_000.0, 0.01), "{}", h.percentile(0.99));
        assert!(close(h.percentile(0.999), 99_900.0, 0.01), "{}", h.percentile(0.999));
        assert_eq!(h.percentile(1.0), 100_000);
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.min(), 1);
        assert_eq!(h.mean(), 50_000.5);
    }

    #[test]
    fn exponential() {
        // Exact quantiles of an exponential distribution, mean 1000.
        let n = 200_000;
        let mut h = Histogram::new();
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            h.record((-(1.0 - u).ln() * 1000.0).round() as u64);
        }
        for q in [0.5, 0.9, 0.99, 0.999] {
            let want = -(1.0f64 - q).ln() * 1000.0;
            let got = h.percentile(q);
            assert!(close(got, want, 0.01), "q={q} got={got} want={want}");
        }
        assert!((h.mean() - 1000.0).abs() < 5.0, "{}", h.mean());
    }

    #[test]
    fn bimodal_tail() {
        // 99 % fast (100 µs), 1 % slow (50 ms): p50 fast, p99.9 slow.
        let mut h = Histogram::new();
        for i in 0..10_000 {
            h.record(if i % 100 == 0 { 50_000 } else { 100 });
        }
        assert_eq!(h.percentile(0.5), 100);
        assert_eq!(h.percentile(0.99), 100);
        assert!(close(h.percentile(0.999), 50_000.0, 0.01));
        assert_eq!(h.max(), 50_000);
    }

    #[test]
    fn huge_values_clamp_to_max() {
        let mut h = Histogram::new();
        h.record(u64::MAX / 2);
        h.record(1);
        assert_eq!(h.max(), u64::MAX / 2);
        assert_eq!(h.percentile(0.99), u64::MAX / 2);
        assert_eq!(h.percentile(0.1), 1);
    }

    #[test]
    fn merging_gives_the_percentiles_of_the_union() {
        // Two processes: one fast (1 000 samples of 100..1100 µs), one slow
        // (100 samples of 50..60 ms). The p99 of the union is fast (the slow
        // ones are 9 %): the highest of the two p99s would say 60 ms.
        let (mut fast, mut slow, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        for v in 0..1000u64 {
            fast.record(100 + v);
            all.record(100 + v);
        }
        for v in 0..100u64 {
            slow.record(50_000 + v * 100);
            all.record(50_000 + v * 100);
        }
        let highest_p99 = fast.percentile(0.99).max(slow.percentile(0.99));
        let mut merged = fast.clone();
        merged.merge(&slow);
        assert_eq!(merged, all);
        for q in [0.0, 0.5, 0.9, 0.91, 0.99, 0.999, 1.0] {
            assert_eq!(merged.percentile(q), all.percentile(q), "q={q}");
        }
        assert!(merged.percentile(0.99) > 50_000 && highest_p99 > 50_000);
        assert!(merged.percentile(0.5) < 1100, "{}", merged.percentile(0.5));
        assert!(fast.percentile(0.5).max(slow.percentile(0.5)) > 50_000, "the highest p50 is no median");
        assert_eq!((merged.count(), merged.min(), merged.max()), (1100, 100, 59_900));
    }

    #[test]
    fn json_round_trip_keeps_every_figure() {
        let mut h = Histogram::new();
        for v in [0, 1, 127, 128, 5_000, 5_001, 1 << 41] {
            h.record(v);
        }
        let text = serde_json::to_string(&h).unwrap();
        let back: Histogram = serde_json::from_str(&text).unwrap();
        assert_eq!(back, h);
        let empty: Histogram = serde_json::from_str(&serde_json::to_string(&Histogram::new()).unwrap()).unwrap();
        assert_eq!(empty, Histogram::new());
        assert!(
            serde_json::from_str::<Histogram>(r#"{"buckets":[[99999,1]],"count":1,"sum":1,"min":1,"max":1}"#).is_err()
        );
        assert!(serde_json::from_str::<Histogram>(r#"{"buckets":[[1,2]],"count":1,"sum":1,"min":1,"max":1}"#).is_err());
    }

    #[test]
    fn reset_and_merge() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..1000 {
            a.record(v);
            b.record(v + 1000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 2000);
        assert_eq!(a.min(), 0);
        assert_eq!(a.max(), 1999);
        assert!(close(a.percentile(0.5), 1000.0, 0.01));
        a.reset();
        assert_eq!(a.count(), 0);
        assert_eq!(a.percentile(0.5), 0);
        a.record(7);
        assert_eq!(a.percentile(0.5), 7);
    }
}
