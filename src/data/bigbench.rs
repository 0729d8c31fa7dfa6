//! BIG-bench multiple-choice tasks: a `task.json` with `examples`, each an
//! `input` and `target_scores` (choice → score; the highest-scoring choice is
//! gold). BIG-bench has no train/dev split: examples are split by a seeded
//! shuffle, 20% (at least one) for dev and the rest for training.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::prompts::Record;
use super::tasks::Split;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// The task.json of `path` (a file, or a directory holding `task.json`).
pub fn task_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("task.json")
    } else {
        path.to_path_buf()
    }
}

/// Every multiple-choice example of a BIG-bench task.json, in file order.
pub fn read_task(path: &Path) -> Result<Vec<Record>> {
    let file = task_file(path);
    let text = fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&file, format!("not valid JSON: {e}")))?;
    let ex = v
        .get("examples")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::file(&file, "no 'examples' list (not a BIG-bench task.json)"))?;
    let prefix = v
        .get("example_input_prefix")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mut out = Vec::with_capacity(ex.len());
    for (i, e) in ex.iter().enumerate() {
        let err = |m: &str| Error::file(&file, format!("example {i}: {m}"));
        let input = e
            .get("input")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing string 'input'"))?;
        let scores = e
            .get("target_scores")
            .and_then(Value::as_object)
            .ok_or_else(|| err("no 'target_scores' (only multiple-choice tasks are supported)"))?;
        if scores.len() < 2 {
            return Err(err("'target_scores' needs at least two choices"));
        }
        let mut choices = Vec::with_capacity(scores.len());
        let mut best = (f64::NEG_INFINITY, 0usize);
        for (j, (c, s)) in scores.iter().enumerate() {
            let s = s
                .as_f64()
                .ok_or_else(|| err(&format!("score of '{c}' is not a number")))?;
            if s > best.0 {
                best = (s, j);
            }
            choices.push(c.clone());
        }
        let mut fields = BTreeMap::new();
        fields.insert("input".to_string(), format!("{prefix}{input}"));
        out.push(Record {
            fields,
            label: best.1,
            choices,
        });
    }
    if out.is_empty() {
        return Err(Error::file(&file, "no examples"));
    }
    Ok(out)
}

/// One split of a task (seeded 80/20 split of the examples).
pub fn load_split(path: &Path, split: Split, seed: u64) -> Result<Vec<Record>> {
    let all = read_task(path)?;
    let n = all.len();
    if n < 2 {
        return Err(Error::file(
            &task_file(path),
            "needs at least two examples to split into train and dev",
        ));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ 0xB16_BE7C).shuffle(&mut idx);
    let n_dev = (n / 5).max(1);
    let pick = match split {
        Split::Train => &idx[n_dev..],
        _ => &idx[..n_dev],
    };
    let mut pick = pick.to_vec();
    pick.sort_unstable();
    Ok(pick.into_iter().map(|i| all[i].clone()).collect())
}
