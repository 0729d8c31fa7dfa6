//! Evaluation metrics. Predictions and labels of classification tasks are
//! class indices stored as `f32` (compared after rounding); class 1 is the
//! positive class of the binary metrics.
//!
//! Degenerate inputs give 0.0 rather than NaN: an empty slice, a Matthews
//! correlation or F1 with a zero denominator (as scikit-learn does), and a
//! Pearson/Spearman correlation where one side is constant.

use std::collections::BTreeMap;

use super::tasks::TaskSpec;

/// The primary metric of a task (`name`, `value`) and every metric computed (`all`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Metrics {
    pub name: String,
    pub value: f64,
    pub all: BTreeMap<String, f64>,
}

fn class(x: f32) -> i64 {
    x.round() as i64
}

fn check_len(what: &str, a: usize, b: usize) {
    assert_eq!(a, b, "{what}: {a} predictions but {b} labels");
}

/// Fraction of predictions equal to their label.
pub fn accuracy(preds: &[f32], labels: &[f32]) -> f64 {
    check_len("accuracy", preds.len(), labels.len());
    if preds.is_empty() {
        return 0.0;
    }
    let right = preds
        .iter()
        .zip(labels)
        .filter(|(p, l)| class(**p) == class(**l))
        .count();
    right as f64 / preds.len() as f64
}

/// (tp, fp, fn, tn) with class 1 positive.
fn confusion(preds: &[f32], labels: &[f32]) -> (f64, f64, f64, f64) {
    let (mut tp, mut fp, mut fneg, mut tn) = (0u64, 0u64, 0u64, 0u64);
    for (p, l) in preds.iter().zip(labels) {
        match (class(*p) == 1, class(*l) == 1) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fneg += 1,
            (false, false) => tn += 1,
        }
    }
    (tp as f64, fp as f64, fneg as f64, tn as f64)
}

/// F1 of the positive class (1): `2 tp / (2 tp + fp + fn)`.
pub fn f1_binary(preds: &[f32], labels: &[f32]) -> f64 {
    check_len("f1_binary", preds.len(), labels.len());
    let (tp, fp, fneg, _) = confusion(preds, labels);
    let den = 2.0 * tp + fp + fneg;
    if den == 0.0 {
        0.0
    } else {
        2.0 * tp / den
    }
}

/// Matthews correlation coefficient of a binary task (class 1 positive).
pub fn matthews(preds: &[f32], labels: &[f32]) -> f64 {
    check_len("matthews", preds.len(), labels.len());
    let (tp, fp, fneg, tn) = confusion(preds, labels);
    let den = ((tp + fp) * (tp + fneg) * (tn + fp) * (tn + fneg)).sqrt();
    if den == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fneg) / den
    }
}

/// Pearson correlation.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    check_len("pearson", a.len(), b.len());
    let n = a.len();
    if n == 0 {
        return 0.0;
    }
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    let den = (saa * sbb).sqrt();
    if den == 0.0 || !den.is_finite() {
        0.0
    } else {
        (sab / den).clamp(-1.0, 1.0)
    }
}

/// 1-based ranks, ties given the average of the ranks they span.
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson of the average ranks).
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    check_len("spearman", a.len(), b.len());
    pearson(&ranks(a), &ranks(b))
}

/// Every metric that applies to `task`, with its primary metric picked out:
/// regression → pearson, spearman; classification → accuracy, plus f1 and
/// matthews_correlation for binary tasks.
pub fn evaluate(task: &TaskSpec, preds: &[f32], labels: &[f32]) -> Metrics {
    check_len("evaluate", preds.len(), labels.len());
    let mut all = BTreeMap::new();
    let fallback = if task.is_regression() {
        let a: Vec<f64> = preds.iter().map(|&x| x as f64).collect();
        let b: Vec<f64> = labels.iter().map(|&x| x as f64).collect();
        all.insert("pearson".to_string(), pearson(&a, &b));
        all.insert("spearman".to_string(), spearman(&a, &b));
        "pearson"
    } else {
        all.insert("accuracy".to_string(), accuracy(preds, labels));
        let binary = task.num_labels == 2
            || (task.num_labels == 0
                && preds
                    .iter()
                    .chain(labels)
                    .all(|&x| matches!(class(x), 0 | 1)));
        if binary {
            all.insert("f1".to_string(), f1_binary(preds, labels));
            all.insert("matthews_correlation".to_string(), matthews(preds, labels));
        }
        "accuracy"
    };
    let name = if all.contains_key(&task.metric_name) {
        task.metric_name.clone()
    } else {
        fallback.to_string()
    };
    Metrics {
        value: all[&name],
        name,
        all,
    }
}
