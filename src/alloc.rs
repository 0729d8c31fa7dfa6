//! A global allocator that starts every large block on a cache-line
//! boundary: opt in with
//!
//! ```
//! #[global_allocator]
//! static ALLOC: beft::alloc::LineAligned = beft::alloc::LineAligned;
//! ```
//!
//! The `beft` binary, its examples and benchmarks do. Why: the fast CPU
//! backend's bf16 products write large results with streaming
//! (non-temporal) stores, which need whole, aligned 64-byte lines
//! (`backend::fast::gemm16::streams`). Buffers are plain `Vec<f32>`s, which
//! the system allocator places 16 bytes past a page for large sizes, so no
//! row of them would qualify. Without this allocator everything works the
//! same, with ordinary stores (on an Intel Xeon with AMX, a BERT-base bf16
//! forward pass runs ~25 % slower; `docs/performance.md`).
//!
//! Blocks of [`LARGE`] bytes or more get 64-byte alignment: each sits in a
//! system block 72 bytes larger, on its first line boundary, with the system
//! block's address kept just before it. Zeroed blocks stay the system's
//! zeroed ones (fresh pages untouched until used), which asking the system
//! for 64-byte alignment would not give (it zeroes such blocks byte by byte:
//! 59 ms for 128 MiB here). All other blocks are the system allocator's,
//! unchanged.

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with blocks of [`LARGE`] bytes or more on 64-byte
/// boundaries.
pub struct LineAligned;

/// Blocks of at least this many bytes are cache-line aligned.
pub const LARGE: usize = 64 << 10;

/// A cache line.
const LINE: usize = 64;

/// Bytes asked of the system beyond a large block's size: room to move the
/// block onto a line boundary and to keep the system's pointer just before
/// it.
const EXTRA: usize = LINE + std::mem::size_of::<usize>();

/// Whether a block of this layout is placed by [`LineAligned`] itself:
/// large (and not so large that the system block's size would overflow),
/// and not asking for more than a line of alignment (larger alignments go
/// to the system as they are).
#[inline]
fn ours(l: Layout) -> bool {
    (LARGE..=isize::MAX as usize - 2 * LINE).contains(&l.size()) && l.align() <= LINE
}

/// The system block behind a large block of `size` bytes.
#[inline]
fn outer(size: usize) -> Layout {
    // SAFETY: a block is ours only when `size + EXTRA`, rounded up to 16,
    // stays within `isize::MAX`.
    unsafe { Layout::from_size_align_unchecked(size + EXTRA, 16) }
}

/// Where the line-aligned block starts inside the system block at `p`:
/// the first line boundary that leaves room for `p` before it (8 to 71
/// bytes in).
///
/// # Safety
/// `p` is a system block of at least `EXTRA` bytes more than the caller
/// uses.
#[inline]
unsafe fn inner(p: *mut u8) -> *mut u8 {
    let skip = std::mem::size_of::<usize>();
    p.add((p as usize + skip).next_multiple_of(LINE) - p as usize)
}

/// Keep the system block's address `p` just before the block `q`; `q`.
///
/// # Safety
/// `q` is `inner(p)`.
#[inline]
unsafe fn keep(p: *mut u8, q: *mut u8) -> *mut u8 {
    (q as *mut usize).sub(1).write_unaligned(p as usize);
    q
}

/// The line-aligned block inside the system block `p`, which it keeps.
///
/// # Safety
/// As [`inner`], and `p` is not null.
#[inline]
unsafe fn place(p: *mut u8) -> *mut u8 {
    keep(p, inner(p))
}

/// The system block behind the large block `q`.
///
/// # Safety
/// `q` came from [`place`].
#[inline]
unsafe fn base(q: *mut u8) -> *mut u8 {
    (q as *mut usize).sub(1).read_unaligned() as *mut u8
}

/// A block of layout `l` from `get` (the system's `alloc` or
/// `alloc_zeroed`): the system's own, or a large one placed inside a
/// system block.
///
/// # Safety
/// As [`GlobalAlloc::alloc`].
unsafe fn make(l: Layout, get: unsafe fn(&System, Layout) -> *mut u8) -> *mut u8 {
    if !ours(l) {
        return get(&System, l);
    }
    let p = get(&System, outer(l.size()));
    if p.is_null() {
        return p;
    }
    place(p)
}

// SAFETY: small blocks (and over-aligned ones) are the system's, released
// with the layout they were made with. A large block sits inside a system
// block of `outer(size)` whose address is kept just before it; it is
// released through that address and layout, so a block is always freed as
// it was allocated. `place` keeps the block and the kept address inside
// the system block (`EXTRA` bytes cover the largest shift).
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        make(l, <System as GlobalAlloc>::alloc)
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // The system's zeroed block (fresh pages stay untouched until used)
        // rather than an aligned one that is zeroed byte by byte.
        make(l, <System as GlobalAlloc>::alloc_zeroed)
    }

    unsafe fn dealloc(&self, q: *mut u8, l: Layout) {
        if !ours(l) {
            return System.dealloc(q, l);
        }
        System.dealloc(base(q), outer(l.size()))
    }

    unsafe fn realloc(&self, q: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // The caller guarantees `new_size` rounded up to `l.align()` fits.
        let new = Layout::from_size_align_unchecked(new_size, l.align());
        match (ours(l), ours(new)) {
            (false, false) => System.realloc(q, l, new_size),
            (true, true) => {
                // Let the system grow or move the block, then shift the
                // values onto the new block's line boundary if they moved
                // off it.
                let p = base(q);
                let off = q as usize - p as usize;
                let np = System.realloc(p, outer(l.size()), new_size + EXTRA);
                if np.is_null() {
                    return np;
                }
                // The kept address is written after the shift: before it,
                // its place may still hold values being moved.
                let nq = inner(np);
                if nq as usize - np as usize != off {
                    std::ptr::copy(np.add(off), nq, l.size().min(new_size));
                }
                keep(np, nq)
            }
            _ => {
                let nq = self.alloc(new);
                if !nq.is_null() {
                    std::ptr::copy_nonoverlapping(q, nq, l.size().min(new_size));
                    self.dealloc(q, l);
                }
                nq
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_line_aligned_and_keep_their_bytes() {
        let a = LineAligned;
        // SAFETY: layouts are valid and non-zero; each block is released
        // once with the layout it was last given.
        unsafe {
            let small = Layout::from_size_align(100, 4).unwrap();
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..100 {
                *p.add(i) = i as u8;
            }
            // Small -> large: moved onto a line boundary, bytes kept.
            let q = a.realloc(p, small, LARGE + 12);
            assert_eq!(q as usize % LINE, 0);
            assert!((0..100).all(|i| *q.add(i) == i as u8));
            for i in 100..LARGE + 12 {
                *q.add(i) = (i % 251) as u8;
            }
            // Large -> larger: still aligned, bytes kept.
            let large = Layout::from_size_align(LARGE + 12, 4).unwrap();
            let r = a.realloc(q, large, 3 * LARGE);
            assert_eq!(r as usize % LINE, 0);
            assert!((100..LARGE + 12).all(|i| *r.add(i) == (i % 251) as u8));
            // Large -> small: bytes kept.
            let larger = Layout::from_size_align(3 * LARGE, 4).unwrap();
            let s = a.realloc(r, larger, 64);
            assert!((0..64).all(|i| *s.add(i) == i as u8));
            a.dealloc(s, Layout::from_size_align(64, 4).unwrap());
            // Zeroed.
            let z = Layout::from_size_align(2 * LARGE, 4).unwrap();
            let p = a.alloc_zeroed(z);
            assert_eq!(p as usize % LINE, 0);
            assert!((0..2 * LARGE).all(|i| *p.add(i) == 0));
            a.dealloc(p, z);
            // Alignment beyond a line is the system's to give.
            let wide = Layout::from_size_align(LARGE, 4096).unwrap();
            let p = a.alloc(wide);
            assert_eq!(p as usize % 4096, 0);
            a.dealloc(p, wide);
        }
    }

    /// Large blocks grown and shrunk many times (the system moves them, and
    /// their line boundary moves within the system block): every byte
    /// kept, always aligned, with other blocks made in between.
    #[test]
    fn large_reallocations_keep_bytes_and_alignment() {
        let a = LineAligned;
        let mut rng = crate::rng::Rng::new(3);
        // SAFETY: every block is released once, with its last layout.
        unsafe {
            let mut size = LARGE;
            let mut l = Layout::from_size_align(size, 8).unwrap();
            let mut p = a.alloc(l);
            for i in 0..size {
                *p.add(i) = (i % 253) as u8;
            }
            let mut others = Vec::new();
            for round in 0..60 {
                let new = LARGE + rng.below(40 * LARGE);
                p = a.realloc(p, l, new);
                assert!(!p.is_null());
                assert_eq!(p as usize % LINE, 0, "round {round}");
                let kept = size.min(new);
                assert!(
                    (0..kept).all(|i| *p.add(i) == (i % 253) as u8),
                    "round {round}: bytes lost growing {size} -> {new}"
                );
                for i in kept..new {
                    *p.add(i) = (i % 253) as u8;
                }
                size = new;
                l = Layout::from_size_align(size, 8).unwrap();
                let o = Layout::from_size_align(LARGE + 8 * round, 4).unwrap();
                others.push((a.alloc(o), o));
            }
            a.dealloc(p, l);
            for (q, o) in others {
                assert_eq!(q as usize % LINE, 0);
                a.dealloc(q, o);
            }
        }
    }
}
