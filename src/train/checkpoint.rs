//! Crash-safe training state. A checkpoint holds the trainable slab, both
//! AdamW moments and the loop's counters; it is written atomically
//! (temporary file, fsync, rename — see `weights::write_safetensors`), so a
//! run killed at any moment leaves either the previous checkpoint or the new
//! one, never a torn file. Data order and dropout masks are pure functions
//! of (seed, epoch, step), so the counters are all the randomness there is
//! to restore: a resumed run is bit-identical to an uninterrupted one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::weights::{write_safetensors, WeightStore};

/// Set by a Ctrl-C handler (the CLI installs one); the training loop saves
/// a checkpoint and stops cleanly when it sees it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C was pressed.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// The training loop's counters.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoopState {
    /// Optimiser steps done.
    pub step: u64,
    /// The epoch in progress (1-based).
    pub epoch: usize,
    /// Batches of that epoch done.
    pub batch: usize,
    /// Whether that epoch's evaluation is logged already.
    pub epoch_evaluated: bool,
    pub loss_sum: f64,
    pub loss_n: usize,
    pub train_tokens: u64,
    pub train_time: f64,
    pub step_secs: Vec<f64>,
    pub best: Option<(f64, usize)>,
    pub last: Option<f64>,
    pub initial: Option<f64>,
    pub epochs_run: usize,
    /// Lengths of steps.jsonl and metrics.jsonl at the checkpoint (a resumed
    /// run truncates them back to these).
    pub steps_bytes: u64,
    pub metrics_bytes: u64,
}

/// Where an unfinished run lives: a hidden sibling of the run directory
/// (`runs/.NAME.partial`), renamed into place when the run is complete.
pub fn staging_dir(out: &Path) -> PathBuf {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "run".into());
    parent.join(format!(".{name}.partial"))
}

/// File name of the checkpoint inside the staging directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";

/// Write a checkpoint atomically.
pub fn save(
    path: &Path,
    params: &[f32],
    m: &[f32],
    v: &[f32],
    best: Option<&[f32]>,
    state: &LoopState,
) -> Result<()> {
    let n = params.len();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "beft-checkpoint".to_string());
    meta.insert(
        "state".to_string(),
        serde_json::to_string(state).map_err(|e| Error::msg(e.to_string()))?,
    );
    let mut tensors = vec![
        ("params".to_string(), vec![n], params.to_vec()),
        ("adam_m".to_string(), vec![n], m.to_vec()),
        ("adam_v".to_string(), vec![n], v.to_vec()),
    ];
    if let Some(b) = best {
        tensors.push(("best_params".to_string(), vec![n], b.to_vec()));
    }
    write_safetensors(path, &tensors, &meta)
}

/// What a checkpoint holds: params, AdamW's m and v, the loop's state, and
/// (with `--save-best`) the best epoch's params.
pub type Loaded = (Vec<f32>, Vec<f32>, Vec<f32>, LoopState, Option<Vec<f32>>);

/// Read a checkpoint. `len` is the slab length the run expects.
pub fn load(path: &Path, len: usize) -> Result<Loaded> {
    let store = WeightStore::open_file(path)?;
    let state: LoopState = serde_json::from_str(
        store
            .metadata()
            .get("state")
            .ok_or_else(|| Error::file(path, "not a beft checkpoint (no state)"))?,
    )
    .map_err(|e| Error::file(path, format!("bad checkpoint state: {e}")))?;
    let get = |name: &str| -> Result<Vec<f32>> { Ok(store.get_shaped(name, &[len])?.to_f32_vec()) };
    let best = if store.try_get("best_params").is_some() {
        Some(get("best_params")?)
    } else {
        None
    };
    Ok((get("params")?, get("adam_m")?, get("adam_v")?, state, best))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best epoch's values (`--save-best`) survive a checkpoint, and a
    /// checkpoint without them reads back as none.
    #[test]
    fn best_params_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        let (p, m, v, best) = ([1.0f32, 2.0], [0.5f32, 0.25], [3.0f32, 4.0], [7.0f32, -8.0]);
        let state = LoopState {
            step: 3,
            best: Some((0.75, 2)),
            ..Default::default()
        };
        save(&path, &p, &m, &v, Some(&best), &state).unwrap();
        let (lp, lm, lv, ls, lb) = load(&path, 2).unwrap();
        assert_eq!((lp, lm, lv), (p.to_vec(), m.to_vec(), v.to_vec()));
        assert_eq!((ls.step, ls.best), (3, Some((0.75, 2))));
        assert_eq!(lb, Some(best.to_vec()));
        save(&path, &p, &m, &v, None, &state).unwrap();
        assert_eq!(load(&path, 2).unwrap().4, None);
    }
}
