//! Generation tasks (SQuAD format): the reader, and SQuAD's answer
//! normalisation with token-level F1 and exact match.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use serde_json::Value;

use super::tasks::Split;
use crate::error::{Error, Result};

/// One question with its reference answers.
#[derive(Clone, Debug, PartialEq)]
pub struct GenExample {
    /// Template fields: `title`, `context`, `question`, `answer` (the first
    /// reference, the training target).
    pub fields: BTreeMap<String, String>,
    pub answers: Vec<String>,
}

/// Read a SQuAD-format JSON file (`data[].paragraphs[].qas[]`); questions
/// without an answer (SQuAD 2.0's impossible ones) are skipped.
pub fn read_squad(path: &Path) -> Result<Vec<GenExample>> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    let data = v
        .get("data")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::file(path, "no 'data' list (not a SQuAD-format file)"))?;
    let mut out = Vec::new();
    for (i, art) in data.iter().enumerate() {
        let title = art.get("title").and_then(Value::as_str).unwrap_or("");
        let paras = art
            .get("paragraphs")
            .and_then(Value::as_array)
            .ok_or_else(|| Error::file(path, format!("data[{i}]: no 'paragraphs' list")))?;
        for (j, p) in paras.iter().enumerate() {
            let ctx = p.get("context").and_then(Value::as_str).ok_or_else(|| {
                Error::file(
                    path,
                    format!("data[{i}].paragraphs[{j}]: no 'context' string"),
                )
            })?;
            let qas = p.get("qas").and_then(Value::as_array).ok_or_else(|| {
                Error::file(path, format!("data[{i}].paragraphs[{j}]: no 'qas' list"))
            })?;
            for (k, qa) in qas.iter().enumerate() {
                let q = qa.get("question").and_then(Value::as_str).ok_or_else(|| {
                    Error::file(
                        path,
                        format!("data[{i}].paragraphs[{j}].qas[{k}]: no 'question' string"),
                    )
                })?;
                let answers: Vec<String> = qa
                    .get("answers")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.get("text").and_then(Value::as_str))
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                if answers.is_empty() {
                    continue;
                }
                let mut f = fields(&title.replace('_', " "), ctx, q);
                f.insert("answer".to_string(), answers[0].clone());
                out.push(GenExample { fields: f, answers });
            }
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no answerable questions"));
    }
    Ok(out)
}

/// A question's template fields: `title`, `context` and the trimmed
/// `question`.
pub fn fields(title: &str, context: &str, question: &str) -> BTreeMap<String, String> {
    let mut f = BTreeMap::new();
    f.insert("title".to_string(), title.to_string());
    f.insert("context".to_string(), context.to_string());
    f.insert("question".to_string(), question.trim().to_string());
    f
}

/// One split from a directory: `train.json` / `dev.json` (or SQuAD's
/// `train-v1.1.json` / `dev-v1.1.json`).
pub fn load_split(dir: &Path, split: Split) -> Result<Vec<GenExample>> {
    let names: &[&str] = match split {
        Split::Train => &["train.json", "train-v1.1.json", "train-v2.0.json"],
        _ => &[
            "dev.json",
            "dev-v1.1.json",
            "dev-v2.0.json",
            "validation.json",
        ],
    };
    for n in names {
        let p = dir.join(n);
        if p.is_file() {
            return read_squad(&p);
        }
    }
    Err(Error::file(
        dir,
        format!(
            "no {} file (looked for {})",
            split.as_str(),
            names.join(", ")
        ),
    ))
}

/// SQuAD's normalisation: lower case, no punctuation, no articles (a, an,
/// the), single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Exact match after normalisation (1.0 or 0.0).
pub fn exact_match(pred: &str, gold: &str) -> f64 {
    (normalize_answer(pred) == normalize_answer(gold)) as u8 as f64
}

/// Token-level F1 after normalisation.
pub fn token_f1(pred: &str, gold: &str) -> f64 {
    let p = normalize_answer(pred);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    if pt.is_empty() || gt.is_empty() {
        return (pt.is_empty() && gt.is_empty()) as u8 as f64;
    }
    let mut counts: HashMap<&str, i64> = HashMap::new();
    for t in &gt {
        *counts.entry(t).or_default() += 1;
    }
    let mut same = 0i64;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let prec = same as f64 / pt.len() as f64;
    let rec = same as f64 / gt.len() as f64;
    2.0 * prec * rec / (prec + rec)
}

/// Best F1 and EM of a prediction over the reference answers.
pub fn best_f1_em(pred: &str, golds: &[String]) -> (f64, f64) {
    let f1 = golds.iter().map(|g| token_f1(pred, g)).fold(0.0, f64::max);
    let em = golds
        .iter()
        .map(|g| exact_match(pred, g))
        .fold(0.0, f64::max);
    (f1, em)
}
