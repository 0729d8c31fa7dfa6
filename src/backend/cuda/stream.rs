//! Streamed layer weights (`--offload stream`): host-to-device copies on a side
//! stream, so that the upload of layer l+1 overlaps layer l's kernels.
//!
//! The backend runs with cudarc's per-buffer event tracking switched off (one
//! in-order compute stream needs none), so the ordering between the two
//! streams is explicit here:
//!
//! 1. the destination is allocated on the copy stream (stream-ordered: the
//!    driver's pool only hands it out once its previous user, on any
//!    stream, has freed it in that stream's order) and written there;
//! 2. an event recorded on the copy stream after the write is waited for by
//!    the compute stream before anything queued later runs: layer l's
//!    kernels, queued earlier, are not held back;
//! 3. the buffer then belongs to the compute stream, which frees it in its
//!    own order, after the last kernel that reads it.
//!
//! The host side goes through page-locked (pinned) staging: a ring of two
//! slots, each as large as the largest tensor seen, so that filling one slot
//! from the memory-mapped checkpoint (in parallel, converting to the device's
//! weight dtype) overlaps the DMA out of the other, and the DMA runs at the
//! bus's pinned rate instead of the driver's pageable bounce. A slot is only
//! refilled after its last copy has finished (its event). Where pinned memory
//! cannot be had, or `BEFT_PINNED_STAGING=0`, the copy reads a pageable
//! vector (the driver stages it).

use std::sync::{Arc, Mutex};

use cudarc::driver::{
    result, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, DriverError,
    PinnedHostSlice,
};
use rayon::prelude::*;

use crate::weights::{DType, TensorView};

/// Elements per parallel fill task.
const FILL_CHUNK: usize = 1 << 18;

/// Fill `out` with elements `first..first + out.len()` of `t` as bf16 bits
/// (round to nearest even from wider checkpoints).
pub(super) fn fill_bf16(t: &TensorView, first: usize, out: &mut [u16]) {
    if t.dtype == DType::BF16 {
        let b = &t.bytes()[first * 2..(first + out.len()) * 2];
        for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
            *o = u16::from_le_bytes([c[0], c[1]]);
        }
    } else {
        let mut tmp = vec![0f32; out.len()];
        t.read_f32_into(first, &mut tmp);
        for (o, x) in out.iter_mut().zip(&tmp) {
            *o = half::bf16::from_f32(*x).to_bits();
        }
    }
}

/// Fill all of `out` from `t` with `fill`, in parallel chunks.
pub(super) fn par_fill<T: Send>(
    t: &TensorView,
    out: &mut [T],
    fill: fn(&TensorView, usize, &mut [T]),
) {
    out.par_chunks_mut(FILL_CHUNK)
        .enumerate()
        .for_each(|(i, c)| fill(t, i * FILL_CHUNK, c));
}

/// One page-locked staging buffer and the event recorded after the last
/// copy out of it.
struct Slot {
    host: PinnedHostSlice<u8>,
    done: CudaEvent,
}

enum Mode {
    Pinned {
        slots: Vec<Slot>,
        next: usize,
    },
    /// Pageable vectors: pinned memory is off or could not be had.
    Pageable {
        ready: CudaEvent,
    },
}

/// The copy stream and its staging, made on the first streamed upload.
pub(super) struct Streamer {
    copy: Arc<CudaStream>,
    mode: Mutex<Mode>,
}

const SLOTS: usize = 2;

impl Streamer {
    pub(super) fn new(
        ctx: &Arc<CudaContext>,
        compute: &Arc<CudaStream>,
    ) -> Result<Self, DriverError> {
        let mode = if std::env::var("BEFT_PINNED_STAGING").is_ok_and(|v| v == "0") {
            pageable(ctx)?
        } else {
            Mode::Pinned {
                slots: Vec::new(),
                next: 0,
            }
        };
        Ok(Streamer {
            copy: compute.fork()?,
            mode: Mutex::new(mode),
        })
    }

    /// Whether copies go through pinned staging.
    pub(super) fn pinned(&self) -> bool {
        matches!(
            *self.mode.lock().unwrap_or_else(|e| e.into_inner()),
            Mode::Pinned { .. }
        )
    }

    /// `n` elements of `t` on the device, written on the copy stream; the
    /// returned buffer belongs to `compute` (see the module comment).
    pub(super) fn upload<T: DeviceRepr + Send + Clone + Default>(
        &self,
        ctx: &Arc<CudaContext>,
        compute: &Arc<CudaStream>,
        t: &TensorView,
        n: usize,
        fill: fn(&TensorView, usize, &mut [T]),
    ) -> Result<CudaSlice<T>, DriverError> {
        let bytes = n * std::mem::size_of::<T>();
        let mut mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY (alloc): every element is written by the copy below before
        // any kernel reads the buffer (the compute stream waits for it).
        let mut dst = unsafe { self.copy.alloc::<T>(n) }?;
        if let Mode::Pinned { slots, next } = &mut *mode {
            let i = *next;
            if stage(ctx, slots, i, bytes)? {
                *next = (i + 1) % SLOTS;
                let slot = &mut slots[i];
                // SAFETY: the slot is page-aligned, at least `bytes` long, and no
                // copy reads it any more (stage waited for its last one).
                let host = unsafe {
                    let p = slot.host.as_mut_ptr()?;
                    std::slice::from_raw_parts_mut(p as *mut T, n)
                };
                par_fill(t, host, fill);
                self.copy_in(&mut dst, host)?;
                return self.hand_over(compute, &slot.done, dst, n);
            }
            // No pinned memory (a locked-memory limit, say): pageable from now
            // on, once the copies out of the slots have finished.
            for slot in slots.iter() {
                slot.done.synchronize()?;
            }
            *mode = pageable(ctx)?;
        }
        let Mode::Pageable { ready } = &*mode else {
            unreachable!("pinned mode returned above")
        };
        let mut host = vec![T::default(); n];
        par_fill(t, &mut host, fill);
        // A pageable source is staged by the driver before the call returns,
        // so `host` may be dropped right after.
        self.copy_in(&mut dst, &host)?;
        self.hand_over(compute, ready, dst, n)
    }

    /// Queue the copy of `host` into `dst` on the copy stream.
    fn copy_in<T: DeviceRepr>(
        &self,
        dst: &mut CudaSlice<T>,
        host: &[T],
    ) -> Result<(), DriverError> {
        let (ptr, _record) = dst.device_ptr_mut(&self.copy);
        // SAFETY: `dst` holds `host.len()` elements; `host` outlives the copy
        // (pinned: the slot is not refilled before `done`; pageable: staged
        // by the driver before return).
        unsafe { result::memcpy_htod_async(ptr, host, self.copy.cu_stream()) }
    }

    /// Record `event` after the copy, make the compute stream wait for it,
    /// and give the buffer to the compute stream.
    fn hand_over<T: DeviceRepr>(
        &self,
        compute: &Arc<CudaStream>,
        event: &CudaEvent,
        dst: CudaSlice<T>,
        n: usize,
    ) -> Result<CudaSlice<T>, DriverError> {
        event.record(&self.copy)?;
        compute.wait(event)?;
        // SAFETY: the pointer came from an allocation of `n` elements that
        // nothing else owns now (leak gives up the copy stream's ownership);
        // every later use is on the compute stream, after the wait above.
        Ok(unsafe { compute.upgrade_device_ptr::<T>(dst.leak(), n) })
    }
}

fn pageable(ctx: &Arc<CudaContext>) -> Result<Mode, DriverError> {
    Ok(Mode::Pageable {
        ready: ctx.new_event(None)?,
    })
}

/// Make slot `i` of the ring at least `bytes` long, its last copy finished.
/// False when no pinned memory can be allocated.
fn stage(
    ctx: &Arc<CudaContext>,
    slots: &mut Vec<Slot>,
    i: usize,
    bytes: usize,
) -> Result<bool, DriverError> {
    if i < slots.len() {
        slots[i].done.synchronize()?;
        if slots[i].host.num_bytes() >= bytes {
            return Ok(true);
        }
    }
    // Round up so that slightly larger tensors later reuse the slot.
    let size = bytes.next_multiple_of(1 << 20);
    // SAFETY: the contents are written before every copy out of it.
    let Ok(host) = (unsafe { ctx.alloc_pinned::<u8>(size) }) else {
        return Ok(false);
    };
    let slot = Slot {
        host,
        done: ctx.new_event(None)?,
    };
    if i < slots.len() {
        slots[i] = slot;
    } else {
        slots.push(slot);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_view(bits: &[u16]) -> TensorView {
        let bytes = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        TensorView::from_bytes("w", DType::BF16, vec![bits.len() / 3, 3], bytes)
    }

    /// The parallel fill (several chunks and a ragged last one) gives what a
    /// serial conversion gives, from bf16 and from f32 sources.
    #[test]
    fn par_fill_matches_serial_conversion() {
        let n = 3 * FILL_CHUNK + 4_101 * 3;
        let vals: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.618_034).sin() * (1.0 + (i % 97) as f32))
            .collect();
        let want: Vec<u16> = vals
            .iter()
            .map(|x| half::bf16::from_f32(*x).to_bits())
            .collect();

        let f32_src = TensorView::from_f32("w", vec![n / 3, 3], &vals);
        let mut got = vec![0u16; n];
        par_fill(&f32_src, &mut got, fill_bf16);
        assert_eq!(got, want, "f32 -> bf16");

        let bf16_src = bf16_view(&want);
        let mut got = vec![0u16; n];
        par_fill(&bf16_src, &mut got, fill_bf16);
        assert_eq!(got, want, "bf16 -> bf16");

        let mut got = vec![0f32; n];
        par_fill(&f32_src, &mut got, TensorView::read_f32_into);
        assert_eq!(got, vals, "f32 -> f32");
    }
}
