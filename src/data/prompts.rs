//! Prompted tasks for decoders (MeZO-style protocol): prompt templates
//! loaded from JSON at run time, and the readers that turn a dataset into
//! candidate-scoring examples ([`McExample`]: a prompt and its candidate
//! continuations, one of them gold) or generation examples
//! ([`super::generation::GenExample`]).
//!
//! Template files are JSON objects mapping a template name to
//! `{"prompt": "...", "options": [...]}` (one verbaliser per label, in label
//! order), `{"prompt": "...", "choice": "..."}` (a template applied to each of
//! the example's own choices, as `{choice}`: COPA, BIG-bench) or
//! `{"prompt": "...", "target": "..."}` (generation, with `{answer}`).
//! Placeholders are `{field}`; `{{` and `}}` are literal braces. The
//! built-in templates (`templates/default.json`) are compiled in; `--templates
//! FILE` adds entries or replaces built-in ones of the same name.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::tasks::{self, Split};
use crate::error::{Error, Result};

/// The built-in templates.
pub const DEFAULT_TEMPLATES: &str = include_str!("../../templates/default.json");

/// One prompt template.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    pub name: String,
    pub prompt: String,
    /// Verbalisers, one per label.
    pub options: Option<Vec<String>>,
    /// Template of each per-example choice (`{choice}`).
    pub choice: Option<String>,
    /// Generation target (`{answer}`).
    pub target: Option<String>,
}

/// A set of templates by name.
#[derive(Clone, Debug, Default)]
pub struct Templates {
    map: BTreeMap<String, Template>,
}

impl Templates {
    /// The built-in templates, plus (replacing same-named ones) those of
    /// `file` if given.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let v: Value = serde_json::from_str(DEFAULT_TEMPLATES)
            .map_err(|e| Error::msg(format!("built-in templates: not valid JSON: {e}")))?;
        let mut t = Templates::default();
        t.merge(&v, Path::new("<built-in templates/default.json>"))?;
        if let Some(f) = file {
            let text = fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let v: Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(f, format!("not valid JSON: {e}")))?;
            t.merge(&v, f)?;
        }
        Ok(t)
    }

    fn merge(&mut self, v: &Value, path: &Path) -> Result<()> {
        let obj = v.as_object().ok_or_else(|| {
            Error::file(path, "a template file must be a JSON object of templates")
        })?;
        for (name, e) in obj {
            if name.starts_with('_') {
                continue; // comments
            }
            let err = |m: &str| Error::file(path, format!("template '{name}': {m}"));
            let o = e.as_object().ok_or_else(|| err("must be an object"))?;
            let s = |k: &str| -> Result<Option<String>> {
                match o.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(err(&format!("'{k}' must be a string"))),
                }
            };
            let prompt = s("prompt")?.ok_or_else(|| err("missing 'prompt'"))?;
            let options = match o.get("options") {
                None | Some(Value::Null) => None,
                Some(Value::Array(a)) => {
                    let v: Option<Vec<String>> =
                        a.iter().map(|x| x.as_str().map(String::from)).collect();
                    let v = v.ok_or_else(|| err("'options' must be a list of strings"))?;
                    if v.len() < 2 {
                        return Err(err("'options' needs at least two verbalisers"));
                    }
                    Some(v)
                }
                Some(_) => return Err(err("'options' must be a list of strings")),
            };
            let choice = s("choice")?;
            let target = s("target")?;
            let kinds = options.is_some() as u8 + choice.is_some() as u8 + target.is_some() as u8;
            if kinds != 1 {
                return Err(err("needs exactly one of 'options', 'choice' or 'target'"));
            }
            for t in std::iter::once(&prompt)
                .chain(options.iter().flatten())
                .chain(choice.iter())
                .chain(target.iter())
            {
                check_template(t).map_err(|m| err(&m))?;
            }
            self.map.insert(
                name.clone(),
                Template {
                    name: name.clone(),
                    prompt,
                    options,
                    choice,
                    target,
                },
            );
        }
        Ok(())
    }

    /// The template called `name`.
    pub fn get(&self, name: &str) -> Result<&Template> {
        self.map.get(name).ok_or_else(|| {
            Error::msg(format!(
                "no prompt template named '{name}' (known: {}); add one with --templates FILE",
                self.map.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }
}

/// Check a template's braces (`{name}`, `{{`, `}}`).
fn check_template(t: &str) -> std::result::Result<(), String> {
    render_with(t, &|_| Some(String::new())).map(|_| ())
}

fn render_with(
    t: &str,
    get: &dyn Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let mut it = t.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '{' if it.peek() == Some(&'{') => {
                it.next();
                out.push('{');
            }
            '}' if it.peek() == Some(&'}') => {
                it.next();
                out.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match it.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => return Err(format!("unclosed '{{' in \"{t}\"")),
                    }
                }
                let v = get(name.trim())
                    .ok_or_else(|| format!("unknown field '{{{name}}}' in \"{t}\""))?;
                out.push_str(&v);
            }
            '}' => {
                return Err(format!(
                    "unmatched '}}' in \"{t}\" (write '}}}}' for a brace)"
                ))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Fill a template's `{field}`s.
pub fn render(t: &str, fields: &BTreeMap<String, String>) -> Result<String> {
    render_with(t, &|k| fields.get(k).cloned()).map_err(Error::msg)
}

/// One candidate-scoring example: a prompt, its candidate continuations and
/// the index of the gold one.
#[derive(Clone, Debug, PartialEq)]
pub struct McExample {
    pub prompt: String,
    pub options: Vec<String>,
    pub gold: usize,
}

/// A row read from a dataset: named text fields, a label (class index) or
/// the example's own choices with the gold one.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub fields: BTreeMap<String, String>,
    pub label: usize,
    pub choices: Vec<String>,
}

/// Render records through a classification/multiple-choice template.
pub fn to_mc(tpl: &Template, recs: &[Record]) -> Result<Vec<McExample>> {
    recs.iter()
        .enumerate()
        .map(|(i, r)| {
            let ctx = |e: Error| e.context(format!("example {i} (template '{}')", tpl.name));
            let prompt = render(&tpl.prompt, &r.fields).map_err(ctx)?;
            let options = match (&tpl.options, &tpl.choice) {
                (Some(opts), _) => opts
                    .iter()
                    .map(|o| render(o, &r.fields))
                    .collect::<Result<Vec<_>>>()
                    .map_err(ctx)?,
                (None, Some(ch)) => {
                    if r.choices.len() < 2 {
                        return Err(Error::msg(format!(
                            "example {i}: template '{}' scores the example's own choices, but it has {}",
                            tpl.name,
                            r.choices.len()
                        )));
                    }
                    r.choices
                        .iter()
                        .map(|c| {
                            let mut f = r.fields.clone();
                            f.insert("choice".into(), c.clone());
                            render(ch, &f)
                        })
                        .collect::<Result<Vec<_>>>()
                        .map_err(ctx)?
                }
                _ => {
                    return Err(Error::msg(format!(
                        "template '{}' is a generation template; this task needs 'options' or 'choice'",
                        tpl.name
                    )))
                }
            };
            if r.label >= options.len() {
                return Err(Error::msg(format!(
                    "example {i}: label {} but template '{}' has {} options",
                    r.label,
                    tpl.name,
                    options.len()
                )));
            }
            Ok(McExample {
                prompt,
                options,
                gold: r.label,
            })
        })
        .collect()
}

/// The decoder tasks read as candidate scoring: GLUE tasks (TSV, through
/// [`tasks::load_split`]), SuperGLUE CB / BoolQ / COPA (JSONL) and BIG-bench
/// (`task.json`).
pub const MC_TASKS: &[&str] = &[
    "sst2", "cola", "rte", "mrpc", "qnli", "qqp", "mnli", "cb", "boolq", "copa", "bigbench",
];

/// Normalised task key (as [`tasks::task`] does).
pub fn task_key(name: &str) -> String {
    name.trim()
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Read one split of a candidate-scoring task as records.
pub fn load_records(task: &str, dir: &Path, split: Split, seed: u64) -> Result<Vec<Record>> {
    let key = task_key(task);
    match key.as_str() {
        "cb" | "boolq" | "copa" => read_superglue(&key, dir, split),
        "bigbench" => super::bigbench::load_split(dir, split, seed),
        _ => {
            let spec = tasks::task(task)?;
            if spec.is_regression() || spec.is_jsonl() {
                return Err(Error::msg(format!(
                    "task '{task}' cannot be scored by a decoder (classification tasks: {})",
                    MC_TASKS.join(", ")
                )));
            }
            let ex = tasks::load_split(&spec, dir, split)?;
            Ok(ex
                .into_iter()
                .map(|e| text_record(&e.text, e.text_pair.as_deref(), e.label as usize))
                .collect())
        }
    }
}

/// The field names [`text_record`] gives the first text.
const TEXT_FIELDS: [&str; 5] = ["text", "sentence", "sentence1", "premise", "question1"];
/// The field names [`text_record`] gives the second text of a pair.
const PAIR_FIELDS: [&str; 4] = ["text_pair", "sentence2", "hypothesis", "question2"];

/// Free texts as a record for any classification template: as
/// [`text_record`], plus BoolQ's `passage` (the first text) and `question`
/// (the second).
pub fn free_text_record(text: &str, pair: Option<&str>) -> Record {
    let mut r = text_record(text, pair, 0);
    r.fields.insert("passage".into(), text.to_string());
    if let Some(p) = pair {
        r.fields.insert("question".into(), p.to_string());
    }
    r
}

/// Whether template text `t` uses the second text of a pair (as
/// [`free_text_record`] names it).
pub fn uses_pair(t: &str) -> bool {
    PAIR_FIELDS
        .iter()
        .chain(&["question"])
        .any(|k| t.contains(&format!("{{{k}}}")))
}

/// A GLUE-style example as a record: the text (and pair) under every field
/// name the templates use for them (`text`, `sentence`, `premise`, …).
pub fn text_record(text: &str, pair: Option<&str>, label: usize) -> Record {
    let mut f = BTreeMap::new();
    for k in TEXT_FIELDS {
        f.insert(k.to_string(), text.to_string());
    }
    if let Some(p) = pair {
        for k in PAIR_FIELDS {
            f.insert(k.to_string(), p.to_string());
        }
    }
    Record {
        fields: f,
        label,
        choices: Vec::new(),
    }
}

fn split_file(dir: &Path, split: Split, names: &[&str]) -> Result<PathBuf> {
    for n in names {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
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

/// SuperGLUE JSONL: `train.jsonl` and `val.jsonl` (or `dev.jsonl`).
fn read_superglue(key: &str, dir: &Path, split: Split) -> Result<Vec<Record>> {
    let path = match split {
        Split::Train => split_file(dir, split, &["train.jsonl"])?,
        _ => split_file(dir, split, &["val.jsonl", "dev.jsonl"])?,
    };
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let mut out = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |m: String| Error::file(&path, format!("line {}: {m}", ln + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| at(format!("not valid JSON: {e}")))?;
        let s = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| at(format!("missing string field '{k}'")))
        };
        let mut f = BTreeMap::new();
        let mut rec = Record::default();
        match key {
            "cb" => {
                f.insert("premise".into(), s("premise")?);
                f.insert("hypothesis".into(), s("hypothesis")?);
                rec.label = match s("label")?.as_str() {
                    "entailment" => 0,
                    "contradiction" => 1,
                    "neutral" => 2,
                    other => return Err(at(format!("unknown CB label '{other}'"))),
                };
            }
            "boolq" => {
                f.insert("passage".into(), s("passage")?);
                f.insert("question".into(), s("question")?);
                rec.label = match v.get("label").and_then(Value::as_bool) {
                    Some(true) => 0,
                    Some(false) => 1,
                    None => return Err(at("'label' must be true or false".into())),
                };
            }
            _ => {
                let premise = s("premise")?;
                let q = s("question")?;
                let conn = match q.as_str() {
                    "cause" => "because",
                    "effect" => "so",
                    other => {
                        return Err(at(format!(
                            "COPA question must be cause or effect, got '{other}'"
                        )))
                    }
                };
                f.insert("premise".into(), premise.trim_end_matches('.').to_string());
                f.insert("question".into(), q.clone());
                f.insert("connective".into(), conn.into());
                // Lower-case the choices' first letter: they continue a sentence.
                let lower = |c: String| {
                    let mut ch = c.chars();
                    match ch.next() {
                        Some(first) => first.to_lowercase().collect::<String>() + ch.as_str(),
                        None => c,
                    }
                };
                rec.choices = vec![lower(s("choice1")?), lower(s("choice2")?)];
                rec.label = match v.get("label").and_then(Value::as_u64) {
                    Some(l @ 0..=1) => l as usize,
                    _ => return Err(at("'label' must be 0 or 1".into())),
                };
            }
        }
        rec.fields = f;
        out.push(rec);
    }
    if out.is_empty() {
        return Err(Error::file(&path, "no examples"));
    }
    Ok(out)
}
