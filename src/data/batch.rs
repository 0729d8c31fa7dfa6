//! Batching: dynamic padding (each batch is as long as its longest
//! example) and seeded per-epoch orders.

use super::tokenize::Encoding;
use crate::rng::Rng;

/// One padded batch, row-major `[batch, seq]`.
#[derive(Clone, Debug)]
pub struct Batch {
    /// B: number of examples.
    pub batch: usize,
    /// T: the longest encoding in this batch.
    pub seq: usize,
    /// B*T token ids, right-padded with the pad id.
    pub ids: Vec<u32>,
    /// B*T token type ids, right-padded with 0.
    pub type_ids: Vec<u32>,
    /// B*T: 1.0 for a real token, 0.0 for padding.
    pub mask: Vec<f32>,
    /// B labels (class index as f32, or regression target).
    pub labels: Vec<f32>,
    /// Number of real (non-padding) tokens.
    pub tokens: usize,
}

/// Pad `encs` to the longest one. `labels` must have one entry per encoding.
pub fn make_batch(encs: &[&Encoding], labels: &[f32], pad_id: u32) -> Batch {
    assert_eq!(
        encs.len(),
        labels.len(),
        "make_batch: {} encodings but {} labels",
        encs.len(),
        labels.len()
    );
    let b = encs.len();
    let t = encs.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = vec![pad_id; b * t];
    let mut type_ids = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    let mut tokens = 0;
    for (r, e) in encs.iter().enumerate() {
        let n = e.ids.len();
        let row = r * t;
        ids[row..row + n].copy_from_slice(&e.ids);
        // type_ids normally has the same length; be lenient if it does not.
        let m = e.type_ids.len().min(n);
        type_ids[row..row + m].copy_from_slice(&e.type_ids[..m]);
        mask[row..row + n].fill(1.0);
        tokens += n;
    }
    Batch {
        batch: b,
        seq: t,
        ids,
        type_ids,
        mask,
        labels: labels.to_vec(),
        tokens,
    }
}

/// The shuffle seed for one epoch: a hash of `(seed, epoch)`.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let a = Rng::new(seed).next_u64();
    let b = Rng::new(epoch ^ 0xE90C_4B1D_7A5F_3C21).next_u64();
    Rng::new(a ^ b.rotate_left(17)).next_u64()
}

/// Index lists covering `0..n` in batches of `batch_size` (0 is taken as 1);
/// shuffled with a seed derived from `(seed, epoch)` when `shuffle`. The last
/// batch may be smaller.
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        Rng::new(epoch_seed(seed, epoch)).shuffle(&mut idx);
    }
    idx.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// Examples per length group of [`grouped_epoch_batches`], in batches.
pub const GROUP_BATCHES: usize = 50;

/// Like [`epoch_batches`] with `shuffle`, but batches hold examples of
/// similar length so that dynamic padding wastes little (the idea of
/// Hugging Face's `group_by_length`): the seeded shuffle is cut into groups
/// of [`GROUP_BATCHES`] batches, each group is sorted by length (longest
/// first, ties in shuffled order), cut into batches, and the order of all
/// batches is shuffled again with the same epoch seed. `lengths[i]` is the
/// token count of example `i`. Every index appears exactly once; a group's
/// last batch may be smaller.
pub fn grouped_epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let bs = batch_size.max(1);
    let mut rng = Rng::new(epoch_seed(seed, epoch));
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut idx);
    let mut batches = Vec::with_capacity(lengths.len().div_ceil(bs));
    for group in idx.chunks_mut(bs * GROUP_BATCHES) {
        // Stable: equal lengths keep their shuffled order.
        group.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(group.chunks(bs).map(|c| c.to_vec()));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Index lists covering `0..n` in order, in batches of `batch_size` (0 is taken as 1).
pub fn eval_batches(n: usize, batch_size: usize) -> Vec<Vec<usize>> {
    epoch_batches(n, batch_size, 0, 0, false)
}

/// Index lists covering `0..lengths.len()` for evaluation, in batches of
/// `batch_size` (0 is taken as 1) of examples sorted by length (longest
/// first, ties in index order), so that dynamic padding wastes little.
/// An example's result does not depend on its batch mates (up to float
/// rounding in sums over padded lengths), so callers put each result back
/// at its index.
pub fn eval_batches_by_length(lengths: &[usize], batch_size: usize) -> Vec<Vec<usize>> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    idx.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    idx.chunks(batch_size.max(1)).map(|c| c.to_vec()).collect()
}

/// `f` over the batches of [`eval_batches_by_length`], each of its results
/// (one per index of the batch, in the batch's order) put back at its
/// index: the results in the items' order.
pub fn map_by_length<T: Clone + Default>(
    lengths: &[usize],
    batch_size: usize,
    mut f: impl FnMut(&[usize]) -> crate::error::Result<Vec<T>>,
) -> crate::error::Result<Vec<T>> {
    let mut out = vec![T::default(); lengths.len()];
    for idx in eval_batches_by_length(lengths, batch_size) {
        let results = f(&idx)?;
        assert_eq!(results.len(), idx.len(), "one result per item");
        for (&i, r) in idx.iter().zip(results) {
            out[i] = r;
        }
    }
    Ok(out)
}

/// Padded positions (batch rows × longest length, summed over `batches`)
/// and real tokens, for `lengths`: how much of a batching's work is padding.
pub fn padded_and_real(lengths: &[usize], batches: &[Vec<usize>]) -> (usize, usize) {
    let mut padded = 0;
    let mut real = 0;
    for b in batches {
        let t = b.iter().map(|&i| lengths[i]).max().unwrap_or(0);
        padded += t * b.len();
        real += b.iter().map(|&i| lengths[i]).sum::<usize>();
    }
    (padded, real)
}
