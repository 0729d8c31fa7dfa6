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
//! Blocks of [`LARGE`] bytes or more get at least 64-byte alignment; all
//! others are the system allocator's, unchanged.

use std::alloc::{GlobalAlloc, Layout, System};

/// The system allocator, with blocks of [`LARGE`] bytes or more on 64-byte
/// boundaries.
pub struct LineAligned;

/// Blocks of at least this many bytes are cache-line aligned.
pub const LARGE: usize = 64 << 10;

/// A cache line.
const LINE: usize = 64;

/// The layout actually asked of the system: the same for a block's
/// allocation and its release, as it depends only on size and alignment.
#[inline]
fn adjust(l: Layout) -> Layout {
    if l.size() >= LARGE && l.align() < LINE {
        Layout::from_size_align(l.size(), LINE).unwrap_or(l)
    } else {
        l
    }
}

// SAFETY: every call goes to the system allocator with the layout
// `adjust` gives, for allocation and release alike; a reallocation that
// changes that layout's alignment moves the block itself.
unsafe impl GlobalAlloc for LineAligned {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        System.alloc(adjust(l))
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        System.alloc_zeroed(adjust(l))
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, adjust(l))
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let old = adjust(l);
        // The caller guarantees `new_size` rounded up to `l.align()` fits.
        let new = adjust(Layout::from_size_align_unchecked(new_size, l.align()));
        if new.align() == old.align() {
            return System.realloc(p, old, new_size);
        }
        let q = System.alloc(new);
        if !q.is_null() {
            std::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
            System.dealloc(p, old);
        }
        q
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
        }
    }
}
