//! Task definitions (GLUE and a generic JSONL task), split loading and
//! subsetting.
//!
//! # File layout
//!
//! | task  | files in DIR | text column(s) | label column | labels |
//! |-------|--------------|----------------|--------------|--------|
//! | sst2  | train.tsv, dev.tsv | `sentence` | `label` | `0`, `1` |
//! | cola  | train.tsv, dev.tsv (no header: source, label, mark, sentence) | 4th | 2nd | `0`, `1` |
//! | rte   | train.tsv, dev.tsv | `sentence1`, `sentence2` | `label` | `entailment`=0, `not_entailment`=1 |
//! | mrpc  | train.tsv, dev.tsv | `#1 String`, `#2 String` | `Quality` | `0`, `1` |
//! | stsb  | train.tsv, dev.tsv | `sentence1`, `sentence2` | `score` | a number in 0–5 |
//! | qnli  | train.tsv, dev.tsv | `question`, `sentence` | `label` | `entailment`=0, `not_entailment`=1 |
//! | qqp   | train.tsv, dev.tsv | `question1`, `question2` | `is_duplicate` | `0`, `1` |
//! | mnli  | train.tsv, dev_matched.tsv (or dev.tsv) | `sentence1`, `sentence2` | `gold_label` | `entailment`=0, `neutral`=1, `contradiction`=2 |
//! | jsonl | train.jsonl, dev.jsonl | `"text"`, optional `"text_pair"` | `"label"` | see below |
//!
//! TSV files are split on tabs only (quotes are ordinary characters); columns
//! are found by their header name (case-insensitive), so column order does
//! not matter. CoLA is read by position unless its first line is a header
//! naming `sentence` and `label`.
//!
//! # The generic JSONL task
//!
//! `task("jsonl")` starts *unresolved* (`num_labels == 0`, `is_pair == false`);
//! after loading the training split, call [`TaskSpec::resolve`] with it:
//! if every training label is a non-negative integer the task is
//! classification with `num_labels = max label + 1` (at least 2) and metric
//! `accuracy`; otherwise (any fractional or negative label) it is regression
//! (`num_labels == 1`, metric `pearson`). `is_pair` becomes true when any
//! training example has a `text_pair`. Loading the dev split with the
//! resolved spec then checks every dev label against the label set.
//! `task("jsonl-regression")` forces regression from the start.
//!
//! QQP's official train.tsv has a few rows broken by stray newlines inside
//! questions; for `qqp` only, rows with the wrong number of columns are
//! skipped (with a warning on stderr naming the count and the first line)
//! instead of being an error. Every other task is strict.

use std::fmt;
use std::path::Path;

use super::read;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Which part of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Dev,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The canonical task names accepted by [`task`] (besides `jsonl-regression`).
pub const TASK_NAMES: &[&str] = &[
    "sst2", "cola", "rte", "mrpc", "stsb", "qnli", "qqp", "mnli", "jsonl",
];

/// Largest number of classes a JSONL classification task may infer.
pub const MAX_JSONL_CLASSES: usize = 100_000;

/// What a task is: its name, label space, primary metric and input shape.
#[derive(Clone, Debug)]
pub struct TaskSpec {
    /// Canonical name: "sst2", "cola", "rte", "mrpc", "stsb", "qnli", "qqp", "mnli" or "jsonl".
    pub name: String,
    /// Number of classes; 1 means regression (STS-B); 0 means an unresolved
    /// JSONL task (see [`TaskSpec::resolve`]).
    pub num_labels: usize,
    /// The primary metric: "accuracy", "f1", "matthews_correlation" or "pearson".
    pub metric_name: String,
    /// Whether examples are sentence pairs.
    pub is_pair: bool,
    pub(crate) format: Format,
}

/// How a task's files are laid out.
#[derive(Clone, Debug)]
pub(crate) enum Format {
    Tsv(TsvFormat),
    Jsonl,
}

#[derive(Clone, Debug)]
pub(crate) struct TsvFormat {
    /// Header names of the text, pair and label columns.
    pub text: &'static str,
    pub pair: Option<&'static str>,
    pub label: &'static str,
    pub labels: Labels,
    /// Positional layout for files without a header (CoLA).
    pub headerless: Option<Layout>,
    pub train_files: &'static [&'static str],
    pub dev_files: &'static [&'static str],
    /// Skip (and count) rows with the wrong number of columns instead of failing.
    pub skip_malformed: bool,
}

/// Column positions (0-based) and the expected number of columns.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub columns: usize,
    pub text: usize,
    pub pair: Option<usize>,
    pub label: usize,
}

/// The label set of a TSV task.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Labels {
    /// Class `i` is written `names[i]` (compared case-insensitively).
    Names(&'static [&'static str]),
    /// A real-valued target in `[lo, hi]`.
    Range(f32, f32),
}

const BINARY: &[&str] = &["0", "1"];
const ENTAIL2: &[&str] = &["entailment", "not_entailment"];
const MNLI: &[&str] = &["entailment", "neutral", "contradiction"];
const TRAIN_TSV: &[&str] = &["train.tsv"];
const DEV_TSV: &[&str] = &["dev.tsv"];

#[allow(clippy::too_many_arguments)]
fn tsv(
    name: &str,
    metric: &str,
    text: &'static str,
    pair: Option<&'static str>,
    label: &'static str,
    labels: Labels,
    headerless: Option<Layout>,
    dev_files: &'static [&'static str],
) -> TaskSpec {
    let num_labels = match labels {
        Labels::Names(n) => n.len(),
        Labels::Range(..) => 1,
    };
    TaskSpec {
        name: name.to_string(),
        num_labels,
        metric_name: metric.to_string(),
        is_pair: pair.is_some(),
        format: Format::Tsv(TsvFormat {
            text,
            pair,
            label,
            labels,
            headerless,
            train_files: TRAIN_TSV,
            dev_files,
            skip_malformed: name == "qqp",
        }),
    }
}

/// Look a task up by name: case-insensitive, `-` and `_` ignored
/// ("SST-2", "sts_b", "sst2" all work). Unknown names are an error listing
/// the known tasks.
pub fn task(name: &str) -> Result<TaskSpec> {
    let key: String = name
        .trim()
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    let names = Labels::Names;
    let spec = match key.as_str() {
        "sst2" => tsv(
            "sst2",
            "accuracy",
            "sentence",
            None,
            "label",
            names(BINARY),
            None,
            DEV_TSV,
        ),
        "cola" => tsv(
            "cola",
            "matthews_correlation",
            "sentence",
            None,
            "label",
            names(BINARY),
            Some(Layout {
                columns: 4,
                text: 3,
                pair: None,
                label: 1,
            }),
            DEV_TSV,
        ),
        "rte" => tsv(
            "rte",
            "accuracy",
            "sentence1",
            Some("sentence2"),
            "label",
            names(ENTAIL2),
            None,
            DEV_TSV,
        ),
        "mrpc" => tsv(
            "mrpc",
            "f1",
            "#1 String",
            Some("#2 String"),
            "Quality",
            names(BINARY),
            None,
            DEV_TSV,
        ),
        "stsb" => tsv(
            "stsb",
            "pearson",
            "sentence1",
            Some("sentence2"),
            "score",
            Labels::Range(0.0, 5.0),
            None,
            DEV_TSV,
        ),
        "qnli" => tsv(
            "qnli",
            "accuracy",
            "question",
            Some("sentence"),
            "label",
            names(ENTAIL2),
            None,
            DEV_TSV,
        ),
        "qqp" => tsv(
            "qqp",
            "f1",
            "question1",
            Some("question2"),
            "is_duplicate",
            names(BINARY),
            None,
            DEV_TSV,
        ),
        "mnli" => tsv(
            "mnli",
            "accuracy",
            "sentence1",
            Some("sentence2"),
            "gold_label",
            names(MNLI),
            None,
            &["dev_matched.tsv", "dev.tsv"],
        ),
        "jsonl" => TaskSpec {
            name: "jsonl".into(),
            num_labels: 0,
            metric_name: "accuracy".into(),
            is_pair: false,
            format: Format::Jsonl,
        },
        "jsonlregression" | "jsonlreg" => TaskSpec {
            name: "jsonl".into(),
            num_labels: 1,
            metric_name: "pearson".into(),
            is_pair: false,
            format: Format::Jsonl,
        },
        _ => {
            return Err(Error::msg(format!(
                "unknown task {name:?}; known tasks: {} (and jsonl-regression)",
                TASK_NAMES.join(", ")
            )))
        }
    };
    Ok(spec)
}

impl TaskSpec {
    /// True for regression tasks (one output, MSE loss, Pearson/Spearman).
    pub fn is_regression(&self) -> bool {
        self.num_labels == 1
    }

    /// True for the generic JSONL task.
    pub fn is_jsonl(&self) -> bool {
        matches!(self.format, Format::Jsonl)
    }

    /// Human-readable class names, index = class id (empty for regression
    /// and for an unresolved JSONL task).
    pub fn label_names(&self) -> Vec<String> {
        match &self.format {
            Format::Tsv(TsvFormat {
                labels: Labels::Names(n),
                ..
            }) => n.iter().map(|s| s.to_string()).collect(),
            Format::Tsv(_) => Vec::new(),
            Format::Jsonl if self.num_labels >= 2 => {
                (0..self.num_labels).map(|i| i.to_string()).collect()
            }
            Format::Jsonl => Vec::new(),
        }
    }

    /// The file names tried (in order) for `split`, relative to the data directory.
    pub fn file_names(&self, split: Split) -> Vec<&'static str> {
        match (&self.format, split) {
            (Format::Tsv(f), Split::Train) => f.train_files.to_vec(),
            (Format::Tsv(f), Split::Dev) => f.dev_files.to_vec(),
            (Format::Jsonl, Split::Train) => vec!["train.jsonl"],
            (Format::Jsonl, Split::Dev) => vec!["dev.jsonl"],
        }
    }

    /// Fix what the data decides. For an unresolved JSONL task
    /// (`num_labels == 0`): classification with `max label + 1` classes when
    /// every label in `train` is a non-negative integer, regression
    /// otherwise; `is_pair` when any example has a pair. For every other
    /// task, a copy of `self` (a JSONL task still picks up `is_pair`).
    pub fn resolve(&self, train: &[Example]) -> Result<TaskSpec> {
        let mut t = self.clone();
        if !self.is_jsonl() {
            return Ok(t);
        }
        t.is_pair = self.is_pair || train.iter().any(|e| e.text_pair.is_some());
        if self.num_labels != 0 {
            return Ok(t);
        }
        if train.is_empty() {
            return Err(Error::msg(
                "task jsonl: cannot decide the label set from an empty training set",
            ));
        }
        let integral = train
            .iter()
            .all(|e| e.label >= 0.0 && e.label.fract() == 0.0);
        if integral {
            let n = jsonl_num_labels(train).max(2);
            if n > MAX_JSONL_CLASSES {
                return Err(Error::msg(format!(
                    "task jsonl: the largest training label is {}, which would mean {n} classes \
                     (limit {MAX_JSONL_CLASSES}); for a regression target use task jsonl-regression",
                    n - 1
                )));
            }
            t.num_labels = n;
            t.metric_name = "accuracy".into();
        } else {
            t.num_labels = 1;
            t.metric_name = "pearson".into();
        }
        Ok(t)
    }
}

/// One example: a text (or text pair) and its label (class index as `f32`,
/// or the regression target).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    pub text_pair: Option<String>,
    pub label: f32,
}

/// Read one split of `task` from `dir` (see the module docs for the file
/// names and formats). Every problem is an error naming the file and, for a
/// row, its 1-based line number.
pub fn load_split(task: &TaskSpec, dir: &Path, split: Split) -> Result<Vec<Example>> {
    let names = task.file_names(split);
    let Some(path) = names.iter().map(|n| dir.join(n)).find(|p| p.is_file()) else {
        let mut msg = format!(
            "file not found (task {}, {} split; looked for {} in {})",
            task.name,
            split,
            names.join(", "),
            dir.display()
        );
        if !dir.is_dir() {
            msg.push_str(&format!("; the directory {} does not exist", dir.display()));
        }
        return Err(Error::file(&dir.join(names[0]), msg));
    };
    match &task.format {
        Format::Tsv(f) => read::read_tsv(&path, f, &task.name),
        Format::Jsonl => read::read_jsonl(&path, task.num_labels),
    }
}

/// A seeded random subset of `n` examples, in their original order.
/// `None`, or `n >= examples.len()`, gives all of them (original order).
/// Deterministic per seed, and nested: for one seed, the subset of `n` is
/// contained in the subset of any `m > n`.
pub fn sample_subset(examples: &[Example], n: Option<usize>, seed: u64) -> Vec<Example> {
    let len = examples.len();
    let n = match n {
        Some(n) if n < len => n,
        _ => return examples.to_vec(),
    };
    let mut idx: Vec<usize> = (0..len).collect();
    let mut rng = Rng::new(seed);
    // Forward partial Fisher–Yates: the first k picks do not depend on n.
    for i in 0..n {
        let j = i + rng.below(len - i);
        idx.swap(i, j);
    }
    let mut chosen = idx[..n].to_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| examples[i].clone()).collect()
}

/// For the generic JSONL task: the largest label (rounded, negatives count
/// as 0) plus one; 0 for no examples. [`TaskSpec::resolve`] uses it.
pub fn jsonl_num_labels(examples: &[Example]) -> usize {
    examples
        .iter()
        .map(|e| e.label)
        .filter(|l| l.is_finite())
        .fold(None, |m: Option<f32>, l| Some(m.map_or(l, |m| m.max(l))))
        .map_or(0, |m| m.max(0.0).round() as usize + 1)
}
