//! A free list of f32 vectors, so that the buffers of one training step are
//! served from the previous step's instead of fresh (page-faulting)
//! allocations.
//!
//! Bounded two ways. By bytes: beyond [`MAX_POOLED_BYTES`] the least
//! recently returned vectors are released to the allocator. And by age: a
//! request that no pooled vector fits (capacity within 2× of it) first
//! releases every vector returned more than [`MAX_AGE`] requests ago, so
//! buffers of shapes that stopped occurring (a long batch, the evaluation's
//! larger batches) drain away instead of sitting in memory for the rest of
//! the run, while a training step's working set (reused every step, a few
//! hundred requests apart) stays.

use std::sync::Mutex;

/// The most bytes the free list keeps.
pub const MAX_POOLED_BYTES: usize = 1 << 30;

/// Vectors shorter than this are never pooled.
const MIN_POOLED: usize = 1024;

/// Requests after which an unused pooled vector counts as stale. A
/// MiniLM training step makes ~150 requests; measured on SST-2 runs with
/// dynamic padding (docs/performance.md), 256 cuts the peak RSS by a
/// quarter to a third against 8192 at the same step time, and releases the
/// evaluation's buffers within a couple of training steps.
pub const MAX_AGE: u64 = 256;

/// Free vectors with the request count at their return, least recently
/// returned first.
struct Pool {
    free: Vec<(Vec<f32>, u64)>,
    bytes: usize,
    cap: usize,
    /// Requests so far.
    clock: u64,
    max_age: u64,
}

impl Pool {
    const fn new(cap: usize, max_age: u64) -> Self {
        Pool {
            free: Vec::new(),
            bytes: 0,
            cap,
            clock: 0,
            max_age,
        }
    }

    /// The smallest pooled vector whose capacity is within 2× of `n`
    /// (with the length and values it was returned with); on a miss, the
    /// stale vectors are taken out for the caller to drop, and `Err`
    /// carries them.
    fn take(&mut self, n: usize) -> Result<Vec<f32>, Vec<Vec<f32>>> {
        self.clock += 1;
        let mut best: Option<(usize, usize)> = None;
        for (i, (v, _)) in self.free.iter().enumerate() {
            let c = v.capacity();
            if c >= n && c <= 2 * n && best.is_none_or(|(_, bc)| c < bc) {
                best = Some((i, c));
                if c == n {
                    break;
                }
            }
        }
        match best {
            Some((i, c)) => {
                self.bytes -= c * 4;
                Ok(self.free.remove(i).0)
            }
            None => {
                // Oldest first: the stale ones are a prefix.
                let k = self
                    .free
                    .iter()
                    .take_while(|(_, at)| self.clock - at > self.max_age)
                    .count();
                let stale: Vec<Vec<f32>> = self.free.drain(..k).map(|(v, _)| v).collect();
                self.bytes -= stale.iter().map(|v| v.capacity() * 4).sum::<usize>();
                Err(stale)
            }
        }
    }

    /// Keep `v`; returns what no longer fits under the cap (the least
    /// recently returned vectors, or `v` itself if it alone is too big).
    fn give(&mut self, v: Vec<f32>) -> Vec<Vec<f32>> {
        let c = v.capacity() * 4;
        if c > self.cap {
            return vec![v];
        }
        let mut out = Vec::new();
        let mut k = 0;
        let mut bytes = self.bytes;
        while bytes + c > self.cap {
            bytes -= self.free[k].0.capacity() * 4;
            k += 1;
        }
        out.extend(self.free.drain(..k).map(|(v, _)| v));
        self.bytes = bytes + c;
        self.free.push((v, self.clock));
        out
    }
}

static POOL: Mutex<Pool> = Mutex::new(Pool::new(MAX_POOLED_BYTES, MAX_AGE));

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A vector of capacity at least `n` and length 0: the smallest pooled one
/// whose capacity is within 2× of `n`, else a new allocation (after
/// releasing the stale pooled vectors).
pub fn take(n: usize) -> Vec<f32> {
    let mut v = take_as_returned(n).unwrap_or_else(|| Vec::with_capacity(n));
    v.clear();
    v
}

/// A vector of length `n` whose values are unspecified (whatever its last
/// user left, zeros past that): for an output that the next op overwrites
/// in full, without the memset of [`take`] + `resize`.
pub fn take_any(n: usize) -> Vec<f32> {
    match take_as_returned(n) {
        Some(mut v) => {
            if v.len() >= n {
                v.truncate(n);
            } else {
                v.resize(n, 0.0);
            }
            v
        }
        None => vec![0.0; n],
    }
}

/// A pooled vector that fits `n`, as it was given back.
fn take_as_returned(n: usize) -> Option<Vec<f32>> {
    if n < MIN_POOLED {
        return None;
    }
    let got = lock().take(n);
    // Stale vectors are freed outside the lock.
    got.ok()
}

/// Return a vector to the free list.
pub fn give(v: Vec<f32>) {
    if v.capacity() < MIN_POOLED {
        return;
    }
    let evicted = lock().give(v);
    drop(evicted);
}

/// Release every pooled vector (e.g. between training and evaluation).
pub fn clear() {
    let free = {
        let mut p = lock();
        p.bytes = 0;
        std::mem::take(&mut p.free)
    };
    drop(free);
}

#[cfg(test)]
mod tests {
    use super::Pool;

    fn cap_of(v: &Result<Vec<f32>, Vec<Vec<f32>>>) -> Option<usize> {
        v.as_ref().ok().map(Vec::capacity)
    }

    #[test]
    fn reuses_within_twice_the_size_smallest_first() {
        let mut p = Pool::new(1 << 20, 100);
        for n in [4000, 2000, 2500] {
            assert!(p.give(Vec::with_capacity(n)).is_empty());
        }
        assert_eq!(p.bytes, 8500 * 4);
        let mut v = p.take(1900).unwrap();
        assert!(
            v.capacity() >= 2000 && v.capacity() < 2500,
            "{}",
            v.capacity()
        );
        v.push(1.0);
        assert_eq!(p.free.len(), 2);
        assert_eq!(p.bytes, (8500 - v.capacity()) * 4);
        // Returned vectors come back as they were given.
        p.give(v);
        assert_eq!(p.take(2000).unwrap(), [1.0]);
        // 2500, then 4000 (within 2x of 2100) are the fits left.
        let c = cap_of(&p.take(2100)).unwrap();
        assert!((2500..4000).contains(&c), "{c}");
        assert!(cap_of(&p.take(2100)).unwrap() >= 4000);
        assert!(p.free.is_empty() && p.bytes == 0);
        // Too large (more than 2x) is not a fit either.
        p.give(Vec::with_capacity(10_000));
        assert!(p.take(4000).unwrap_err().is_empty(), "nothing is stale yet");
        assert_eq!(p.free.len(), 1);
    }

    #[test]
    fn a_miss_releases_what_went_unused_too_long() {
        let mut p = Pool::new(1 << 20, 3);
        p.give(Vec::with_capacity(50_000)); // returned at request 0
        p.give(Vec::with_capacity(1000));
        for _ in 0..2 {
            // Hits keep the working set (1000) fresh.
            let v = p.take(1000).unwrap();
            p.give(v);
        }
        // Request 3: the 50,000 vector is 3 requests old, not stale yet.
        assert!(p.take(10_000).unwrap_err().is_empty());
        let stale = p.take(10_000).unwrap_err();
        assert_eq!(stale.len(), 1, "the 50,000 vector, unused for 4 requests");
        assert!(stale[0].capacity() >= 50_000);
        assert_eq!(p.free.len(), 1);
        assert_eq!(p.bytes, p.free[0].0.capacity() * 4);
        // A hit never releases anything, however old the rest.
        for _ in 0..10 {
            assert!(p.take(5000).is_err());
        }
        assert!(p.free.is_empty() && p.bytes == 0, "1000 went stale as well");
    }

    #[test]
    fn the_byte_cap_releases_the_oldest_first() {
        let mut p = Pool::new(40_000 * 4, 100);
        p.give(Vec::with_capacity(15_000));
        p.give(Vec::with_capacity(16_000));
        let out = p.give(Vec::with_capacity(20_000));
        assert_eq!(out.len(), 1, "only the oldest has to go");
        assert!(out[0].capacity() >= 15_000 && out[0].capacity() < 16_000);
        assert!(p.bytes <= 40_000 * 4);
        // Too big for the cap on its own: handed back.
        let out = p.give(Vec::with_capacity(50_000));
        assert_eq!(out.len(), 1);
        assert!(out[0].capacity() >= 50_000);
        assert_eq!(p.free.len(), 2);
        let total: usize = p.free.iter().map(|(v, _)| v.capacity() * 4).sum();
        assert_eq!(total, p.bytes);
    }
}
