//! Strict line readers for TSV and JSONL data files. Every problem is an
//! [`Error`] naming `file:line`; nothing here panics on bad input.

use std::path::Path;

use super::tasks::{Example, Labels, Layout, TsvFormat};
use crate::error::{Error, Result};

/// A line longer than this (in bytes) is rejected.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// A text field longer than this (in characters) is rejected.
pub const MAX_TEXT_CHARS: usize = 100_000;

/// The file's bytes, without a UTF-8 byte-order mark.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let mut data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if data.starts_with(b"\xEF\xBB\xBF") {
        data.drain(..3);
    }
    Ok(data)
}

/// Non-empty lines with their 1-based numbers, `\r\n` or `\n` terminated.
fn lines(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    data.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.is_empty())
}

/// Check the length limit and decode as UTF-8.
fn decode<'a>(path: &Path, line: usize, raw: &'a [u8]) -> Result<&'a str> {
    if raw.len() > MAX_LINE_BYTES {
        return Err(Error::line(
            path,
            line,
            format!(
                "line is too long: {} bytes, over the limit of {} bytes (1 MiB)",
                raw.len(),
                MAX_LINE_BYTES
            ),
        ));
    }
    std::str::from_utf8(raw).map_err(|e| {
        Error::line(
            path,
            line,
            format!("invalid UTF-8 (at byte {} of the line)", e.valid_up_to()),
        )
    })
}

/// At most 60 characters of `s`, for messages.
fn shorten(s: &str) -> String {
    const MAX: usize = 60;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}...")
    }
}

fn check_text(path: &Path, line: usize, what: &str, text: &str) -> Result<()> {
    // Cheap pre-check: a string of at most MAX bytes has at most MAX chars.
    if text.len() > MAX_TEXT_CHARS {
        let n = text.chars().count();
        if n > MAX_TEXT_CHARS {
            return Err(Error::line(
                path,
                line,
                format!("{what} is too long: {n} characters, over the limit of {MAX_TEXT_CHARS}"),
            ));
        }
    }
    Ok(())
}

fn parse_label(path: &Path, line: usize, raw: &str, labels: Labels) -> Result<f32> {
    let s = raw.trim();
    match labels {
        Labels::Names(names) => names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(s))
            .map(|i| i as f32)
            .ok_or_else(|| {
                let allowed: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                Error::line(
                    path,
                    line,
                    format!(
                        "invalid label {:?}: not in the label set {{{}}}",
                        shorten(s),
                        allowed.join(", ")
                    ),
                )
            }),
        Labels::Range(lo, hi) => match s.parse::<f32>() {
            Ok(v) if v.is_finite() && v >= lo && v <= hi => Ok(v),
            _ => Err(Error::line(
                path,
                line,
                format!(
                    "invalid label {:?}: expected a number in the range [{lo}, {hi}]",
                    shorten(s)
                ),
            )),
        },
    }
}

/// Read a TSV file of a GLUE-style task.
pub(crate) fn read_tsv(path: &Path, fmt: &TsvFormat, task: &str) -> Result<Vec<Example>> {
    let data = read_bytes(path)?;
    let mut rows = lines(&data).peekable();
    let Some(&(first_no, first_raw)) = rows.peek() else {
        return Err(Error::file(
            path,
            format!("empty file: no header and no examples (task {task})"),
        ));
    };
    let first = decode(path, first_no, first_raw)?;
    let head: Vec<&str> = first.split('\t').collect();
    let find = |name: &str| {
        head.iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let from_header = match (find(fmt.text), fmt.pair.map(find), find(fmt.label)) {
        (Some(text), None, Some(label)) => Some(Layout {
            columns: head.len(),
            text,
            pair: None,
            label,
        }),
        (Some(text), Some(Some(pair)), Some(label)) => Some(Layout {
            columns: head.len(),
            text,
            pair: Some(pair),
            label,
        }),
        _ => None,
    };
    let (layout, has_header) = match (from_header, fmt.headerless) {
        (Some(l), _) => (l, true),
        (None, Some(l)) => (l, false),
        (None, None) => {
            let mut want = vec![fmt.text];
            want.extend(fmt.pair);
            want.push(fmt.label);
            let found: Vec<String> = head
                .iter()
                .take(20)
                .map(|h| format!("{:?}", shorten(h)))
                .collect();
            return Err(Error::line(
                path,
                first_no,
                format!(
                    "expected a header line naming the columns {} (task {task}); found {}",
                    want.iter()
                        .map(|w| format!("{w:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    found.join(", ")
                ),
            ));
        }
    };
    if has_header {
        rows.next();
    }

    let mut out = Vec::new();
    let mut skipped = 0usize;
    let mut first_skipped = 0usize;
    for (no, raw) in rows {
        let line = decode(path, no, raw)?;
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != layout.columns {
            if fmt.skip_malformed {
                if skipped == 0 {
                    first_skipped = no;
                }
                skipped += 1;
                continue;
            }
            return Err(Error::line(
                path,
                no,
                format!(
                    "expected {} tab-separated columns, found {}",
                    layout.columns,
                    fields.len()
                ),
            ));
        }
        let text = fields[layout.text];
        check_text(path, no, "text", text)?;
        let text_pair = match layout.pair {
            Some(p) => {
                check_text(path, no, "second text", fields[p])?;
                Some(fields[p].to_string())
            }
            None => None,
        };
        let label = parse_label(path, no, fields[layout.label], fmt.labels)?;
        out.push(Example {
            text: text.to_string(),
            text_pair,
            label,
        });
    }
    if skipped > 0 {
        eprintln!(
            "warning: {}: skipped {skipped} row(s) with other than {} tab-separated columns (first at line {first_skipped})",
            path.display(),
            layout.columns
        );
    }
    if out.is_empty() {
        return Err(Error::file(
            path,
            if has_header {
                format!("empty dataset: the file has a header line but no examples (task {task})")
            } else {
                format!("empty dataset: no examples (task {task})")
            },
        ));
    }
    Ok(out)
}

/// Read a JSONL file: one object per line, `{"text": str, "text_pair": str
/// (optional, may be null), "label": number}`. `num_labels`: 0 (any number),
/// 1 (regression: any finite number), n >= 2 (an integer in 0..n).
pub(crate) fn read_jsonl(path: &Path, num_labels: usize) -> Result<Vec<Example>> {
    use serde_json::Value;
    let data = read_bytes(path)?;
    let mut out = Vec::new();
    for (no, raw) in lines(&data) {
        let line = decode(path, no, raw)?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line)
            .map_err(|e| Error::line(path, no, format!("malformed JSON: {e}")))?;
        let Value::Object(obj) = v else {
            return Err(Error::line(
                path,
                no,
                "expected a JSON object like {\"text\": ..., \"label\": ...}",
            ));
        };
        let text = match obj.get("text") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Error::line(path, no, "\"text\" must be a string")),
            None => return Err(Error::line(path, no, "missing \"text\"")),
        };
        check_text(path, no, "\"text\"", &text)?;
        let text_pair = match obj.get("text_pair") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => {
                check_text(path, no, "\"text_pair\"", s)?;
                Some(s.clone())
            }
            Some(_) => {
                return Err(Error::line(
                    path,
                    no,
                    "\"text_pair\" must be a string or null",
                ))
            }
        };
        let label = match obj.get("label") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
            Some(other) => {
                return Err(Error::line(
                    path,
                    no,
                    format!(
                        "invalid label {}: \"label\" must be a number",
                        shorten(&other.to_string())
                    ),
                ))
            }
            None => return Err(Error::line(path, no, "missing \"label\"")),
        };
        let l32 = label as f32;
        if !l32.is_finite() {
            return Err(Error::line(
                path,
                no,
                format!("invalid label {label}: not a finite 32-bit number"),
            ));
        }
        if num_labels >= 2 && (label.fract() != 0.0 || label < 0.0 || label >= num_labels as f64) {
            return Err(Error::line(
                path,
                no,
                format!(
                    "invalid label {label}: not in the label set {{0..{}}} (integers, from the training data)",
                    num_labels - 1
                ),
            ));
        }
        out.push(Example {
            text,
            text_pair,
            label: l32,
        });
    }
    if out.is_empty() {
        return Err(Error::file(path, "empty dataset: no examples"));
    }
    Ok(out)
}
