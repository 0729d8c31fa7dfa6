//! A free list of f32 vectors, so that the buffers of one training step are
//! served from the previous step's instead of fresh (page-faulting)
//! allocations. Bounded: beyond [`MAX_POOLED_BYTES`] a freed vector is
//! released to the allocator.

use std::sync::Mutex;

/// The most bytes the free list keeps.
pub const MAX_POOLED_BYTES: usize = 1 << 30;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

/// A vector of capacity at least `n` and length 0: the smallest pooled one
/// whose capacity is within 2× of `n`, else a new allocation.
pub fn take(n: usize) -> Vec<f32> {
    if n >= 1024 {
        let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let mut best: Option<(usize, usize)> = None;
        for (i, v) in p.free.iter().enumerate() {
            let c = v.capacity();
            if c >= n
                && c <= 2 * n
                && match best {
                    None => true,
                    Some((_, bc)) => c < bc,
                }
            {
                best = Some((i, c));
                if c == n {
                    break;
                }
            }
        }
        if let Some((i, c)) = best {
            p.bytes -= c * 4;
            let mut v = p.free.swap_remove(i);
            v.clear();
            return v;
        }
    }
    Vec::with_capacity(n)
}

/// Return a vector to the free list.
pub fn give(v: Vec<f32>) {
    let c = v.capacity();
    if c < 1024 {
        return;
    }
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if p.bytes + c * 4 > MAX_POOLED_BYTES {
        return;
    }
    p.bytes += c * 4;
    p.free.push(v);
}

/// Release every pooled vector (e.g. between training and evaluation).
pub fn clear() {
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    p.free.clear();
    p.bytes = 0;
}
