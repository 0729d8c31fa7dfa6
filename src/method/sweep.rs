//! `beft sweep`: the grid of bias terms × seeds (× learning rates), run
//! sequentially and resumably (a cell whose `summary.json` exists is not run
//! again), summarised as `results.csv`, `results.md` (mean ± std per term)
//! and a PNG of the dev metric per epoch per term.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::method::plot::{line_chart, read_jsonl};
use crate::train::checkpoint::staging_dir;
use crate::train::run::{resume, train, TrainArgs, RUN_ARGS};

/// BEFT's per-task learning rates for bias tuning (low-data protocol).
pub fn paper_lr(task: &str) -> Option<f64> {
    Some(match task {
        "cola" => 7e-4,
        "mnli" => 1e-4,
        "mrpc" => 7e-4,
        "qnli" => 1e-4,
        "qqp" => 4e-4,
        "rte" => 1e-3,
        "sst2" => 4e-4,
        "stsb" => 1e-4,
        _ => return None,
    })
}

/// BEFT's low-data training-set sizes.
pub fn paper_train_size(task: &str) -> Option<usize> {
    Some(match task {
        "sst2" | "qnli" | "qqp" | "mnli" => 1000,
        "rte" => 300,
        "mrpc" => 367,
        "cola" => 1710,
        "stsb" => 287,
        _ => return None,
    })
}

/// The grid of a sweep.
#[derive(Clone, Debug)]
pub struct SweepArgs {
    /// Settings shared by every cell (its `bias`, `seed`, `lr` and `out`
    /// are set per cell).
    pub base: TrainArgs,
    pub terms: Vec<String>,
    pub seeds: Vec<u64>,
    pub lrs: Vec<f64>,
    pub out: PathBuf,
}

/// One finished cell.
#[derive(Clone, Debug)]
pub struct Cell {
    pub term: String,
    pub lr: f64,
    pub seed: u64,
    pub dir: PathBuf,
    pub summary: serde_json::Value,
}

fn cell_name(term: &str, lr: f64, seed: u64, several_lrs: bool) -> String {
    let t = term.replace(',', "+");
    if several_lrs {
        format!("{t}-lr{lr:e}-seed{seed}")
    } else {
        format!("{t}-seed{seed}")
    }
}

/// Run (or resume) the grid and write the summaries.
pub fn sweep(args: &SweepArgs) -> Result<Vec<Cell>> {
    if args.terms.is_empty() || args.seeds.is_empty() || args.lrs.is_empty() {
        return Err(Error::msg(
            "sweep: --terms, --seeds and the learning rates must not be empty",
        ));
    }
    let runs = args.out.join("runs");
    fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, e))?;
    let several = args.lrs.len() > 1;
    let total = args.terms.len() * args.seeds.len() * args.lrs.len();
    let mut cells = Vec::new();
    let mut k = 0;
    for term in &args.terms {
        for &lr in &args.lrs {
            for &seed in &args.seeds {
                k += 1;
                let dir = runs.join(cell_name(term, lr, seed, several));
                let summary_path = dir.join("summary.json");
                if summary_path.is_file() {
                    eprintln!(
                        "sweep [{k}/{total}] {}: done already, skipped",
                        dir.display()
                    );
                } else {
                    eprintln!(
                        "sweep [{k}/{total}] bias {term}, lr {lr:e}, seed {seed} -> {}",
                        dir.display()
                    );
                    let mut a = args.base.clone();
                    a.bias = term.clone();
                    a.lr = lr;
                    a.seed = seed;
                    a.out = dir.clone();
                    a.overwrite = true;
                    if staging_dir(&dir).join(RUN_ARGS).is_file() {
                        // A cell that was killed part-way continues from its checkpoint.
                        resume(&dir)?;
                    } else {
                        train(&a)?;
                    }
                }
                let summary: serde_json::Value = serde_json::from_str(
                    &fs::read_to_string(&summary_path).map_err(|e| Error::io(&summary_path, e))?,
                )
                .map_err(|e| Error::file(&summary_path, e))?;
                cells.push(Cell {
                    term: term.clone(),
                    lr,
                    seed,
                    dir,
                    summary,
                });
            }
        }
    }
    write_results(args, &cells)?;
    Ok(cells)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

fn write_results(args: &SweepArgs, cells: &[Cell]) -> Result<()> {
    let f = |c: &Cell, k: &str| c.summary[k].as_f64().unwrap_or(f64::NAN);
    let mut csv = String::from("term,lr,seed,metric_name,initial_dev_metric,final_dev_metric,best_dev_metric,trainable_params,train_tokens_per_s,run\n");
    for c in cells {
        let _ = writeln!(
            csv,
            "{},{:e},{},{},{},{},{},{},{:.1},{}",
            c.term.replace(',', "+"),
            c.lr,
            c.seed,
            c.summary["metric_name"].as_str().unwrap_or(""),
            f(c, "initial_dev_metric"),
            f(c, "final_dev_metric"),
            f(c, "best_dev_metric"),
            c.summary["trainable_params"],
            f(c, "train_tokens_per_s"),
            c.dir.display()
        );
    }
    let p = args.out.join("results.csv");
    fs::write(&p, csv).map_err(|e| Error::io(&p, e))?;

    let metric = cells
        .first()
        .and_then(|c| c.summary["metric_name"].as_str())
        .unwrap_or("metric")
        .to_string();
    let mut md = String::new();
    let b = &args.base;
    let _ = writeln!(md, "# Sweep: {} on {}\n", b.model.display(), b.task);
    let _ = writeln!(
        md,
        "train size {}, epochs {}, batch {}, max length {}, pooling {}, schedule {:?}, clip {}, weight decay {}, seeds {:?}. Dev {metric}, mean ± std over seeds.\n",
        b.train_size.map(|n| n.to_string()).unwrap_or_else(|| "all".into()),
        b.epochs,
        b.batch,
        b.max_len,
        b.pooling.clone().unwrap_or_else(|| {
            // The pooling the runs resolved (the model's own).
            cells
                .first()
                .and_then(|c| c.summary["pooling"].as_str())
                .map(|p| format!("{p} (the model's own)"))
                .unwrap_or_else(|| "model default".into())
        }),
        b.schedule,
        b.clip,
        b.weight_decay,
        args.seeds
    );
    let _ = writeln!(md, "| bias | lr | final dev {metric} | best dev {metric} | before training | trainable values | train tokens/s |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    let mut groups: BTreeMap<(String, String), Vec<&Cell>> = BTreeMap::new();
    for c in cells {
        groups
            .entry((c.term.clone(), format!("{:e}", c.lr)))
            .or_default()
            .push(c);
    }
    for term in &args.terms {
        for lr in &args.lrs {
            let Some(g) = groups.get(&(term.clone(), format!("{lr:e}"))) else {
                continue;
            };
            let col = |k: &str| mean_std(&g.iter().map(|c| f(c, k)).collect::<Vec<_>>());
            let (fm, fs_) = col("final_dev_metric");
            let (bm, bs) = col("best_dev_metric");
            let (im, _) = col("initial_dev_metric");
            let (tm, _) = col("train_tokens_per_s");
            let _ = writeln!(md, "| {term} | {lr:e} | {fm:.4} ± {fs_:.4} | {bm:.4} ± {bs:.4} | {im:.4} | {} | {tm:.0} |", g[0].summary["trainable_params"]);
        }
    }
    if args.terms.iter().any(|t| t == "k") {
        let _ = writeln!(
            md,
            "\nb_k receives an exactly-zero gradient in softmax attention (adding a constant to every key of a query shifts all its scores alike), so the k row trains only the task head (and pooler bias): it is the head-only baseline."
        );
    }
    let _ = writeln!(
        md,
        "\nRuns: `{}`; per-cell files in `runs/`.",
        args.out.join("results.csv").display()
    );
    let p = args.out.join("results.md");
    fs::write(&p, md).map_err(|e| Error::io(&p, e))?;

    // Dev metric per epoch, mean over seeds, one line per (term, lr).
    let mut series = Vec::new();
    for term in &args.terms {
        for lr in &args.lrs {
            let Some(g) = groups.get(&(term.clone(), format!("{lr:e}"))) else {
                continue;
            };
            let mut by_epoch: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
            for c in g {
                for v in read_jsonl(&c.dir.join("metrics.jsonl"))? {
                    if let (Some(e), Some(m)) = (v["epoch"].as_i64(), v["metric"].as_f64()) {
                        by_epoch.entry(e).or_default().push(m);
                    }
                }
            }
            let pts: Vec<(f64, f64)> = by_epoch
                .iter()
                .map(|(e, v)| (*e as f64, v.iter().sum::<f64>() / v.len() as f64))
                .collect();
            let name = if args.lrs.len() > 1 {
                format!("{term} (lr {lr:e})")
            } else {
                term.clone()
            };
            series.push((name, pts));
        }
    }
    line_chart(
        &args.out.join("dev_metric_by_epoch.png"),
        &format!("{}: dev {metric} per epoch (mean over seeds)", b.task),
        "epoch",
        &metric,
        &series,
    )
}

/// Parse a comma list of numbers.
pub fn parse_list<T: std::str::FromStr>(flag: &str, s: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim())
        .filter(|x| !x.is_empty())
        .map(|x| {
            x.parse::<T>()
                .map_err(|_| Error::msg(format!("{flag}: '{x}' is not a number")))
        })
        .collect()
}

/// Terms for `--terms`: a comma list where each entry is one `--bias` value
/// (`all` is BitFit); `+` joins several terms into one cell (`q+v`).
pub fn parse_terms(s: &str) -> Result<Vec<String>> {
    let v: Vec<String> = s
        .split(',')
        .map(|x| x.trim().replace('+', ","))
        .filter(|x| !x.is_empty())
        .collect();
    for t in &v {
        crate::model::BiasTerm::parse_set(t)?;
    }
    Ok(v)
}

/// Used by the CLI to place the sweep's default output.
pub fn default_out(task: &str) -> PathBuf {
    Path::new("runs").join(format!("sweep-{task}"))
}
