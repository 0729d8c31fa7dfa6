//! Frozen weights: memory-mapped safetensors (single file or sharded),
//! read in place.

pub mod gguf;
mod store;
mod tensor;

pub use store::*;
pub use tensor::{Bytes, DType, TensorView};

/// Read the pages of `views` into the page cache on a background thread
/// (one byte per 4 KiB page), so that a later upload of these tensors reads
/// memory instead of waiting on the disk. Returns at once; the thread holds
/// its own references to the mapped bytes.
pub fn prefetch(views: Vec<TensorView>) {
    if views.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("beft-prefetch".into())
        .spawn(move || {
            let mut acc = 0u8;
            for t in &views {
                for page in t.bytes().chunks(4096) {
                    acc ^= page[0];
                }
            }
            std::hint::black_box(acc);
        });
    // No thread to spare: the upload reads the pages itself.
    drop(spawned);
}
