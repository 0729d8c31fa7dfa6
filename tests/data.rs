//! Integration tests for `beft::data`: task lookup, the GLUE/JSONL readers
//! (including every error path), subsets, batching, metrics and tokenizers.

mod common;
use common::tiny_tokenizer_json;
use std::path::{Path, PathBuf};

use beft::data::*;
use tempfile::TempDir;

// ---------------------------------------------------------------- helpers

fn write(dir: &Path, name: &str, content: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn load(name: &str, dir: &Path, split: Split) -> beft::Result<Vec<Example>> {
    load_split(&task(name).unwrap(), dir, split)
}

/// Load `content` as the train split of `task_name`, expecting an error; return its message.
fn load_err(task_name: &str, file: &str, content: impl AsRef<[u8]>) -> (String, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), file, content);
    let err = load(task_name, dir.path(), Split::Train)
        .expect_err("expected an error")
        .to_string();
    (err, path)
}

fn ex(text: &str, pair: Option<&str>, label: f32) -> Example {
    Example {
        text: text.into(),
        text_pair: pair.map(Into::into),
        label,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn shared_data() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (shared GLUE data not available)",
            p.display()
        );
        None
    }
}

// ---------------------------------------------------------------- tasks

#[test]
fn task_lookup_is_case_insensitive_with_aliases() {
    for (alias, canon) in [
        ("sst2", "sst2"),
        ("SST-2", "sst2"),
        ("SST2", "sst2"),
        ("sts-b", "stsb"),
        ("STS_B", "stsb"),
        ("CoLA", "cola"),
        ("rte", "rte"),
        ("MRPC", "mrpc"),
        ("qnli", "qnli"),
        ("QQP", "qqp"),
        ("MNLI", "mnli"),
        ("jsonl", "jsonl"),
        ("jsonl-regression", "jsonl"),
    ] {
        assert_eq!(task(alias).unwrap().name, canon, "{alias}");
    }
    let t = task("sst2").unwrap();
    assert_eq!(
        (t.num_labels, t.metric_name.as_str(), t.is_pair),
        (2, "accuracy", false)
    );
    let t = task("cola").unwrap();
    assert_eq!(
        (t.num_labels, t.metric_name.as_str()),
        (2, "matthews_correlation")
    );
    let t = task("stsb").unwrap();
    assert!(t.is_regression() && t.is_pair && t.metric_name == "pearson");
    let t = task("mnli").unwrap();
    assert_eq!((t.num_labels, t.is_pair), (3, true));
    assert_eq!(
        t.label_names(),
        vec!["entailment", "neutral", "contradiction"]
    );
    assert_eq!(task("mrpc").unwrap().metric_name, "f1");
    assert_eq!(task("qqp").unwrap().metric_name, "f1");
    assert_eq!(task("qnli").unwrap().metric_name, "accuracy");
    assert_eq!(task("rte").unwrap().metric_name, "accuracy");
    assert!(task("jsonl-regression").unwrap().is_regression());

    let err = task("imdb").unwrap_err().to_string();
    assert!(err.contains("imdb"), "{err}");
    for name in TASK_NAMES {
        assert!(err.contains(name), "{err} lacks {name}");
    }
}

// ---------------------------------------------------------------- GLUE readers

#[test]
fn sst2_goes_by_header_in_either_order() {
    let dir = TempDir::new().unwrap();
    // Shared copy: label first. Quotes are ordinary characters.
    write(
        dir.path(),
        "train.tsv",
        "label\tsentence\n0\tit 's \"bad\n1\tgood ' fun\n",
    );
    // Original GLUE: sentence first, CRLF line ends, no final newline.
    write(
        dir.path(),
        "dev.tsv",
        "sentence\tlabel\r\n\"quoted\"\t1\r\nmeh\t0",
    );
    let train = load("sst2", dir.path(), Split::Train).unwrap();
    assert_eq!(
        train,
        vec![ex("it 's \"bad", None, 0.0), ex("good ' fun", None, 1.0)]
    );
    let dev = load("sst-2", dir.path(), Split::Dev).unwrap();
    assert_eq!(dev, vec![ex("\"quoted\"", None, 1.0), ex("meh", None, 0.0)]);
}

#[test]
fn cola_headerless_and_rte_pairs() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.tsv",
        "gj04\t1\t\tBill broke the bathtub.\ngj04\t0\t*\tThe car honked down the road.\n",
    );
    let v = load("cola", dir.path(), Split::Train).unwrap();
    assert_eq!(
        v,
        vec![
            ex("Bill broke the bathtub.", None, 1.0),
            ex("The car honked down the road.", None, 0.0)
        ]
    );

    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "dev.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\tA man runs.\tA person moves.\tentailment\n1\tA\tB\tnot_entailment\n",
    );
    let v = load("rte", dir.path(), Split::Dev).unwrap();
    assert_eq!(
        v,
        vec![
            ex("A man runs.", Some("A person moves."), 0.0),
            ex("A", Some("B"), 1.0)
        ]
    );
}

#[test]
fn mrpc_stsb_qnli_qqp_mnli_formats() {
    let dir = TempDir::new().unwrap();
    // MRPC's original file starts with a byte-order mark.
    write(
        dir.path(),
        "train.tsv",
        "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t11\t12\tHe said \"yes\".\tHe agreed.\n0\t13\t14\tX\tY\n",
    );
    let v = load("mrpc", dir.path(), Split::Train).unwrap();
    assert_eq!(
        v,
        vec![
            ex("He said \"yes\".", Some("He agreed."), 1.0),
            ex("X", Some("Y"), 0.0)
        ]
    );

    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.tsv",
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n\
         0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n\
         1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA dog sleeps.\t0.25\n",
    );
    let v = load("stsb", dir.path(), Split::Train).unwrap();
    assert_eq!(
        v[0],
        ex(
            "A plane is taking off.",
            Some("An air plane is taking off."),
            5.0
        )
    );
    assert_eq!(v[1].label, 0.25);

    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.tsv",
        "index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tentailment\n1\tWhy?\tNo.\tnot_entailment\n",
    );
    let v = load("qnli", dir.path(), Split::Train).unwrap();
    assert_eq!(
        v,
        vec![ex("Who?", Some("Him."), 0.0), ex("Why?", Some("No."), 1.0)]
    );

    // QQP: the official file has rows broken by stray newlines; those are skipped.
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.tsv",
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n\
         1\t2\t3\tHow are you?\tHow do you do?\t1\n\
         4\t5\t6\tbroken\n\
         question\tQ2\t0\n\
         7\t8\t9\tA?\tB?\t0\n",
    );
    let v = load("qqp", dir.path(), Split::Train).unwrap();
    assert_eq!(
        v,
        vec![
            ex("How are you?", Some("How do you do?"), 1.0),
            ex("A?", Some("B?"), 0.0)
        ]
    );

    // MNLI: many columns, dev is dev_matched.tsv, label by header name.
    let dir = TempDir::new().unwrap();
    let head = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label";
    let row = |s1: &str, s2: &str, gold: &str| {
        format!("0\t1\t2\tfiction\t( x )\t( y )\t(ROOT x)\t(ROOT y)\t{s1}\t{s2}\tneutral\tneutral\tneutral\tneutral\tneutral\t{gold}")
    };
    write(
        dir.path(),
        "dev_matched.tsv",
        format!(
            "{head}\n{}\n{}\n{}\n",
            row("a", "b", "entailment"),
            row("c", "d", "neutral"),
            row("e", "f", "contradiction")
        ),
    );
    let v = load("mnli", dir.path(), Split::Dev).unwrap();
    assert_eq!(
        v.iter().map(|e| e.label).collect::<Vec<_>>(),
        vec![0.0, 1.0, 2.0]
    );
    assert_eq!(v[2], ex("e", Some("f"), 2.0));
}

// ---------------------------------------------------------------- reader errors

#[test]
fn missing_file_names_path_task_and_candidates() {
    let dir = TempDir::new().unwrap();
    let err = load("sst2", dir.path(), Split::Train)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&dir.path().join("train.tsv").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("sst2") && err.contains("train.tsv") && err.contains("not found"),
        "{err}"
    );

    let err = load("mnli", dir.path(), Split::Dev)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mnli") && err.contains("dev_matched.tsv") && err.contains("dev.tsv"),
        "{err}"
    );

    let err = load("jsonl", dir.path(), Split::Dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("dev.jsonl"), "{err}");

    let gone = dir.path().join("nope");
    let err = load("rte", &gone, Split::Train).unwrap_err().to_string();
    assert!(
        err.contains("does not exist") && err.contains("rte"),
        "{err}"
    );
}

#[test]
fn empty_dataset_is_an_error() {
    let (err, path) = load_err("sst2", "train.tsv", "sentence\tlabel\n");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("empty"),
        "{err}"
    );
    assert!(err.contains("header"), "{err}");

    let (err, path) = load_err("cola", "train.tsv", "");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("empty"),
        "{err}"
    );

    let (err, path) = load_err("jsonl", "train.jsonl", "\n\n");
    assert!(
        err.contains(&path.display().to_string()) && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn wrong_column_count() {
    let (err, path) = load_err(
        "sst2",
        "train.tsv",
        "sentence\tlabel\ngood\t1\nbad\t0\textra\n",
    );
    assert_eq!(
        err,
        format!(
            "{}:3: expected 2 tab-separated columns, found 3",
            path.display()
        )
    );
    let (err, path) = load_err(
        "cola",
        "train.tsv",
        "gj04\t1\t\tok\ngj04\t1\tmissing a column\n",
    );
    assert_eq!(
        err,
        format!(
            "{}:2: expected 4 tab-separated columns, found 3",
            path.display()
        )
    );
}

#[test]
fn missing_header_is_an_error() {
    let (err, path) = load_err("rte", "train.tsv", "0\ta\tb\tentailment\n");
    assert!(err.starts_with(&format!("{}:1:", path.display())), "{err}");
    assert!(err.contains("header") && err.contains("sentence1"), "{err}");
}

#[test]
fn over_long_line_and_text() {
    let long_line = format!(
        "sentence\tlabel\nok\t1\n{}\t1\n",
        "x".repeat((1 << 20) + 10)
    );
    let (err, path) = load_err("sst2", "train.tsv", long_line);
    assert!(err.starts_with(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("too long") && err.contains("1 MiB"), "{err}");

    // 100,001 characters (multi-byte, under 1 MiB in bytes too).
    let long_text = format!("sentence\tlabel\n{}\t1\n", "é".repeat(100_001));
    let (err, path) = load_err("sst2", "train.tsv", long_text);
    assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
    assert!(
        err.contains("100001 characters") && err.contains("100000"),
        "{err}"
    );

    let long_json = format!("{{\"text\": \"{}\", \"label\": 1}}\n", "a".repeat(100_001));
    let (err, path) = load_err("jsonl", "train.jsonl", long_json);
    assert!(
        err.starts_with(&format!("{}:1:", path.display())) && err.contains("too long"),
        "{err}"
    );

    // Exactly at the limit is fine.
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.tsv",
        format!("sentence\tlabel\n{}\t1\n", "a".repeat(100_000)),
    );
    assert_eq!(
        load("sst2", dir.path(), Split::Train).unwrap()[0]
            .text
            .len(),
        100_000
    );
}

#[test]
fn labels_outside_the_label_set() {
    let (err, path) = load_err(
        "sst2",
        "train.tsv",
        "label\tsentence\n1\tfine\n2\tnot fine\n",
    );
    assert!(err.starts_with(&format!("{}:3:", path.display())), "{err}");
    assert!(
        err.contains("\"2\"") && err.contains("\"0\", \"1\""),
        "{err}"
    );

    let (err, path) = load_err(
        "rte",
        "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n",
    );
    assert!(err.starts_with(&format!("{}:2:", path.display())), "{err}");
    assert!(
        err.contains("maybe") && err.contains("entailment") && err.contains("not_entailment"),
        "{err}"
    );

    let (err, path) = load_err(
        "stsb",
        "train.tsv",
        "sentence1\tsentence2\tscore\na\tb\t3.5\na\tb\tfive\n",
    );
    assert!(
        err.starts_with(&format!("{}:3:", path.display())) && err.contains("five"),
        "{err}"
    );
    let (err, _) = load_err(
        "stsb",
        "train.tsv",
        "sentence1\tsentence2\tscore\na\tb\t7\n",
    );
    assert!(err.contains("[0, 5]"), "{err}");
    let (err, _) = load_err("cola", "train.tsv", "gj04\t3\t\ttext\n");
    assert!(err.contains(":1:") && err.contains("\"3\""), "{err}");
}

#[test]
fn invalid_utf8_names_the_line() {
    let mut bytes = b"sentence\tlabel\nfine\t1\n".to_vec();
    bytes.extend_from_slice(b"bad \xff\xfe text\t0\n");
    let (err, path) = load_err("sst2", "train.tsv", bytes);
    assert!(err.starts_with(&format!("{}:3:", path.display())), "{err}");
    assert!(err.contains("UTF-8"), "{err}");

    let (err, path) = load_err(
        "jsonl",
        "train.jsonl",
        b"{\"text\": \"a\xc3\", \"label\": 0}\n",
    );
    assert!(
        err.starts_with(&format!("{}:1:", path.display())) && err.contains("UTF-8"),
        "{err}"
    );
}

// ---------------------------------------------------------------- JSONL

#[test]
fn jsonl_classification_regression_and_pairs() {
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"text_pair\": \"c\", \"label\": 2}\n{\"text\": \"d\", \"text_pair\": null, \"label\": 1, \"extra\": true}\n",
    );
    write(dir.path(), "dev.jsonl", "{\"text\": \"e\", \"label\": 3}\n");
    let t = task("jsonl").unwrap();
    assert_eq!(t.num_labels, 0);
    let train = load_split(&t, dir.path(), Split::Train).unwrap();
    assert_eq!(
        train,
        vec![
            ex("a", None, 0.0),
            ex("b", Some("c"), 2.0),
            ex("d", None, 1.0)
        ]
    );
    assert_eq!(jsonl_num_labels(&train), 3);
    let t = t.resolve(&train).unwrap();
    assert_eq!(
        (t.num_labels, t.metric_name.as_str(), t.is_pair),
        (3, "accuracy", true)
    );
    assert!(!t.is_regression());
    // Dev labels are checked against the resolved label set.
    let err = load_split(&t, dir.path(), Split::Dev)
        .unwrap_err()
        .to_string();
    let dev_path = dir.path().join("dev.jsonl");
    assert!(
        err.starts_with(&format!("{}:1:", dev_path.display())),
        "{err}"
    );
    assert!(
        err.contains("invalid label 3") && err.contains("0..2"),
        "{err}"
    );

    // Fractional labels make it regression.
    let reg = vec![ex("a", None, 0.5), ex("b", None, 4.0)];
    let r = task("jsonl").unwrap().resolve(&reg).unwrap();
    assert!(r.is_regression() && r.metric_name == "pearson" && !r.is_pair);
    // Forced regression accepts any finite number.
    let dir = TempDir::new().unwrap();
    write(
        dir.path(),
        "train.jsonl",
        "{\"text\": \"a\", \"label\": -1.5}\n",
    );
    let r = task("jsonl-regression").unwrap();
    assert_eq!(
        load_split(&r, dir.path(), Split::Train).unwrap()[0].label,
        -1.5
    );
    assert_eq!(jsonl_num_labels(&[]), 0);
}

#[test]
fn jsonl_errors() {
    let (err, path) = load_err(
        "jsonl",
        "train.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1\n",
    );
    assert!(
        err.starts_with(&format!("{}:2:", path.display())) && err.contains("malformed JSON"),
        "{err}"
    );
    let (err, _) = load_err("jsonl", "train.jsonl", "[1, 2]\n");
    assert!(err.contains(":1:") && err.contains("JSON object"), "{err}");
    let (err, _) = load_err("jsonl", "train.jsonl", "{\"label\": 0}\n");
    assert!(
        err.contains(":1:") && err.contains("missing \"text\""),
        "{err}"
    );
    let (err, _) = load_err("jsonl", "train.jsonl", "{\"text\": \"a\"}\n");
    assert!(
        err.contains(":1:") && err.contains("missing \"label\""),
        "{err}"
    );
    let (err, _) = load_err(
        "jsonl",
        "train.jsonl",
        "{\"text\": \"a\", \"label\": \"pos\"}\n",
    );
    assert!(
        err.contains(":1:") && err.contains("\"label\" must be a number"),
        "{err}"
    );
    let (err, _) = load_err("jsonl", "train.jsonl", "{\"text\": 5, \"label\": 0}\n");
    assert!(err.contains("\"text\" must be a string"), "{err}");
}

// ---------------------------------------------------------------- subsets and batches

#[test]
fn subset_is_deterministic_nested_and_ordered() {
    let all: Vec<Example> = (0..100)
        .map(|i| ex(&format!("t{i}"), None, (i % 2) as f32))
        .collect();
    assert_eq!(sample_subset(&all, None, 1), all);
    assert_eq!(sample_subset(&all, Some(100), 1), all);
    assert_eq!(sample_subset(&all, Some(500), 1), all);

    let a = sample_subset(&all, Some(10), 42);
    let b = sample_subset(&all, Some(10), 42);
    let c = sample_subset(&all, Some(10), 43);
    assert_eq!(a.len(), 10);
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Original order, no duplicates.
    let pos: Vec<usize> = a
        .iter()
        .map(|e| all.iter().position(|x| x == e).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    // Nested: the subset of 10 lies inside the subset of 30 (same seed).
    let big = sample_subset(&all, Some(30), 42);
    assert!(a.iter().all(|e| big.contains(e)));
    assert!(sample_subset(&all, Some(0), 42).is_empty());
}

#[test]
fn epoch_and_eval_batches() {
    let b = epoch_batches(10, 3, 7, 0, true);
    assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
    let mut flat: Vec<usize> = b.concat();
    assert_ne!(
        flat,
        (0..10).collect::<Vec<_>>(),
        "epoch 0 was not shuffled"
    );
    flat.sort();
    assert_eq!(flat, (0..10).collect::<Vec<_>>());
    assert_eq!(b, epoch_batches(10, 3, 7, 0, true));
    assert_ne!(b, epoch_batches(10, 3, 7, 1, true));
    assert_ne!(b, epoch_batches(10, 3, 8, 0, true));
    assert_eq!(
        epoch_batches(5, 2, 7, 3, false),
        vec![vec![0, 1], vec![2, 3], vec![4]]
    );
    assert_eq!(eval_batches(5, 2), vec![vec![0, 1], vec![2, 3], vec![4]]);
    assert_eq!(eval_batches(4, 4), vec![vec![0, 1, 2, 3]]);
    assert!(eval_batches(0, 4).is_empty());
}

#[test]
fn grouped_batches_cover_every_example_once_and_pad_less() {
    // Lengths with a wide spread, as in sentence-classification data.
    let mut rng = beft::rng::Rng::new(5);
    let lengths: Vec<usize> = (0..1234).map(|_| 3 + rng.below(60)).collect();
    for bs in [1, 7, 16] {
        let g = grouped_epoch_batches(&lengths, bs, 3, 0);
        // Same number of batches as the plain shuffle (the step count of an epoch).
        assert_eq!(g.len(), lengths.len().div_ceil(bs), "batch {bs}");
        assert!(g.iter().all(|b| !b.is_empty() && b.len() <= bs));
        let mut flat = g.concat();
        flat.sort();
        assert_eq!(flat, (0..lengths.len()).collect::<Vec<_>>(), "batch {bs}");
        // Seeded: same seed and epoch, same batches; others differ.
        assert_eq!(g, grouped_epoch_batches(&lengths, bs, 3, 0));
        if bs > 1 {
            assert_ne!(g, grouped_epoch_batches(&lengths, bs, 3, 1));
            assert_ne!(g, grouped_epoch_batches(&lengths, bs, 4, 0));
            let (pad_g, real) = padded_and_real(&lengths, &g);
            let (pad_r, real_r) =
                padded_and_real(&lengths, &epoch_batches(lengths.len(), bs, 3, 0, true));
            assert_eq!(real, real_r);
            assert_eq!(real, lengths.iter().sum::<usize>());
            // Random batches of 16 from lengths 3..63 pad to nearly the
            // maximum; sorted groups of 800 pad to within a few tokens.
            assert!(
                (pad_g - real) * 10 < pad_r - real,
                "batch {bs}: grouped padding {} vs random {}",
                pad_g - real,
                pad_r - real
            );
        }
    }
    // The batch order is shuffled: lengths do not simply fall batch by batch.
    let g = grouped_epoch_batches(&lengths, 16, 3, 0);
    let longest: Vec<usize> = g
        .iter()
        .map(|b| b.iter().map(|&i| lengths[i]).max().unwrap())
        .collect();
    assert!(longest.windows(2).any(|w| w[0] < w[1]), "{longest:?}");
    assert!(longest.windows(2).any(|w| w[0] > w[1]), "{longest:?}");
    assert!(grouped_epoch_batches(&[], 4, 0, 0).is_empty());
}

#[test]
fn eval_batches_by_length_sort_longest_first() {
    let lengths = [3, 9, 3, 1, 9, 5];
    assert_eq!(
        eval_batches_by_length(&lengths, 4),
        vec![vec![1, 4, 5, 0], vec![2, 3]]
    );
    assert_eq!(
        padded_and_real(&lengths, &eval_batches_by_length(&lengths, 4)),
        (9 * 4 + 3 * 2, 30)
    );
    assert_eq!(eval_batches_by_length(&lengths, 0).len(), 6);
    assert!(eval_batches_by_length(&[], 4).is_empty());
}

#[test]
fn make_batch_pads_dynamically() {
    let e1 = Encoding {
        ids: vec![2, 4, 5, 3],
        type_ids: vec![0, 0, 0, 0],
    };
    let e2 = Encoding {
        ids: vec![2, 6, 3, 9, 3],
        type_ids: vec![0, 0, 0, 1, 1],
    };
    let e3 = Encoding {
        ids: vec![2, 3],
        type_ids: vec![0, 0],
    };
    let b = make_batch(&[&e1, &e2, &e3], &[1.0, 0.0, 1.0], 99);
    assert_eq!((b.batch, b.seq, b.tokens), (3, 5, 11));
    assert_eq!(b.ids, vec![2, 4, 5, 3, 99, 2, 6, 3, 9, 3, 2, 3, 99, 99, 99]);
    assert_eq!(
        b.type_ids,
        vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        b.mask,
        vec![1., 1., 1., 1., 0., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.]
    );
    assert_eq!(b.labels, vec![1.0, 0.0, 1.0]);
    let one = make_batch(&[&e3], &[0.0], 0);
    assert_eq!((one.batch, one.seq, one.ids.clone()), (1, 2, vec![2, 3]));
}

// ---------------------------------------------------------------- metrics

#[test]
fn classification_metrics_by_hand() {
    // tp = 3 (0, 4, 6), fp = 1 (1), fn = 2 (3, 7), tn = 2 (2, 5)
    let p = [1., 1., 0., 0., 1., 0., 1., 0.];
    let l = [1., 0., 0., 1., 1., 0., 1., 1.];
    assert!(close(accuracy(&p, &l), 5.0 / 8.0));
    assert!(close(f1_binary(&p, &l), 6.0 / 9.0));
    // (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4)
    assert!(close(matthews(&p, &l), 4.0 / 240f64.sqrt()));
    assert!(close(matthews(&l, &l), 1.0));
    let inv: Vec<f32> = l.iter().map(|x| 1.0 - x).collect();
    assert!(close(matthews(&inv, &l), -1.0));
    // Degenerate: constant predictions → MCC 0, no positives → F1 0.
    assert_eq!(matthews(&[0.0; 8], &l), 0.0);
    assert_eq!(f1_binary(&[0.0; 8], &[0.0; 8]), 0.0);
    assert_eq!(accuracy(&[], &[]), 0.0);

    let m = evaluate(&task("cola").unwrap(), &p, &l);
    assert_eq!(m.name, "matthews_correlation");
    assert!(close(m.value, 4.0 / 240f64.sqrt()));
    assert!(close(m.all["accuracy"], 0.625) && close(m.all["f1"], 6.0 / 9.0));
    let m = evaluate(&task("mrpc").unwrap(), &p, &l);
    assert_eq!(m.name, "f1");
    assert!(close(m.value, 6.0 / 9.0));
    let m = evaluate(&task("sst2").unwrap(), &p, &l);
    assert_eq!(m.name, "accuracy");
    assert!(close(m.value, 0.625));
    // Multi-class: accuracy only.
    let m = evaluate(&task("mnli").unwrap(), &[0., 1., 2., 2.], &[0., 2., 2., 1.]);
    assert_eq!((m.name.as_str(), m.all.len()), ("accuracy", 1));
    assert!(close(m.value, 0.5));
    // The metrics serialise.
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains("\"name\":\"accuracy\""), "{json}");
}

#[test]
fn regression_metrics_by_hand() {
    // Pearson: sum dx*dy = 11, sum dx^2 = 5, sum dy^2 = 26.
    let a = [1., 2., 3., 4.];
    let b = [2., 4., 5., 9.];
    assert!(close(pearson(&a, &b), 11.0 / 130f64.sqrt()));
    assert!(close(pearson(&a, &a), 1.0));
    assert_eq!(pearson(&a, &[3.0; 4]), 0.0);
    // Ties get average ranks.
    assert_eq!(ranks(&[3., 1., 3., 2., 3.]), vec![4., 1., 4., 2., 4.]);
    // ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert!(close(
        spearman(&[1., 2., 2., 3.], &[1., 3., 2., 4.]),
        3.0 / 10f64.sqrt()
    ));
    // Monotone but non-linear: Spearman 1, Pearson < 1.
    let c = [1., 8., 27., 64.];
    assert!(close(spearman(&a, &c), 1.0));
    assert!(pearson(&a, &c) < 1.0);

    let m = evaluate(&task("stsb").unwrap(), &[1., 2., 3., 4.], &[2., 4., 5., 9.]);
    assert_eq!(m.name, "pearson");
    assert!((m.value - 11.0 / 130f64.sqrt()).abs() < 1e-6);
    assert!(close(m.all["spearman"], 1.0));
    assert!(!m.all.contains_key("accuracy"));
}

// ---------------------------------------------------------------- tokenizers

#[test]
fn tiny_wordpiece_tokenizer() {
    let dir = TempDir::new().unwrap();
    let path = write(dir.path(), "tokenizer.json", tiny_tokenizer_json(true));
    let tok = TextTokenizer::from_file(&path, 8).unwrap();
    assert_eq!(tok.vocab_size(), 13);
    assert_eq!(tok.pad_id(), Some(0));
    assert_eq!(tok.max_len(), 8);

    // Deliberate: an empty string encodes to the special tokens only.
    let empty = tok.encode("", None).unwrap();
    assert_eq!(empty.ids, vec![2, 3], "[CLS] [SEP]");

    // Own padding (Fixed 16 in the file) is off; lower-casing and word pieces apply.
    let e = tok.encode("Hello WORLD", None).unwrap();
    assert_eq!(
        e,
        Encoding {
            ids: vec![2, 4, 5, 3],
            type_ids: vec![0; 4]
        }
    );
    let e = tok.encode("good movies", Some("bad xyz")).unwrap();
    assert_eq!(e.ids, vec![2, 6, 7, 8, 3, 9, 1, 3]);
    assert_eq!(e.type_ids, vec![0, 0, 0, 0, 0, 1, 1, 1]);

    // Truncation to max_len, special tokens included.
    let e = tok.encode(&"the ".repeat(20), None).unwrap();
    assert_eq!(e.ids, vec![2, 10, 10, 10, 10, 10, 10, 3]);
    // Longest first: only the long side of a pair is cut.
    let e = tok.encode(&"the ".repeat(20), Some("a a")).unwrap();
    assert_eq!(e.ids, vec![2, 10, 10, 10, 3, 11, 11, 3]);
    assert_eq!(e.type_ids, vec![0, 0, 0, 0, 0, 1, 1, 1]);

    let examples = vec![ex("hello", None, 0.0), ex("a", Some("the"), 1.0)];
    let encs = tok.encode_all(&examples).unwrap();
    assert_eq!(encs[0].ids, vec![2, 4, 3]);
    assert_eq!(encs[1].ids, vec![2, 11, 3, 10, 3]);
    let refs: Vec<&Encoding> = encs.iter().collect();
    let b = make_batch(&refs, &[0.0, 1.0], tok.pad_id().unwrap());
    assert_eq!((b.seq, b.tokens), (5, 8));
    assert_eq!(b.ids, vec![2, 4, 3, 0, 0, 2, 11, 3, 10, 3]);

    // No padding config: pad id comes from the [PAD] token.
    let path2 = write(dir.path(), "nopad.json", tiny_tokenizer_json(false));
    assert_eq!(
        TextTokenizer::from_file(&path2, 8).unwrap().pad_id(),
        Some(0)
    );
}

#[test]
fn tokenizer_errors_name_the_file() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("tokenizer.json");
    let err = TextTokenizer::from_file(&missing, 128)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let bad = write(dir.path(), "bad.json", "{\"not\": \"a tokenizer\"}");
    let err = TextTokenizer::from_file(&bad, 128).unwrap_err().to_string();
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("tokenizer"),
        "{err}"
    );

    let ok = write(dir.path(), "ok.json", tiny_tokenizer_json(false));
    let err = TextTokenizer::from_file(&ok, 3).unwrap_err().to_string();
    assert!(
        err.contains(&ok.display().to_string()) && err.contains("special tokens"),
        "{err}"
    );
}

fn minilm_tokenizer() -> Option<PathBuf> {
    let cache = std::env::var_os("BEFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/beft")));
    let p = cache?.join("models/all-MiniLM-L6-v2/tokenizer.json");
    if p.is_file() {
        Some(p)
    } else {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch_default.sh to fetch all-MiniLM-L6-v2)",
            p.display()
        );
        None
    }
}

#[test]
fn real_minilm_tokenizer() {
    let Some(path) = minilm_tokenizer() else {
        return;
    };
    let tok = TextTokenizer::from_file(&path, 128).unwrap();
    assert_eq!(tok.vocab_size(), 30522);
    assert_eq!(tok.pad_id(), Some(0));
    let e = tok.encode("hello world", None).unwrap();
    assert_eq!(e.ids, vec![101, 7592, 2088, 102]);
    assert_eq!(e.type_ids, vec![0, 0, 0, 0]);
    let e = tok.encode("hello world", Some("good movie")).unwrap();
    assert_eq!((e.ids[0], *e.ids.last().unwrap()), (101, 102));
    let sep = e.ids.iter().position(|&i| i == 102).unwrap();
    assert!(e.type_ids[..=sep].iter().all(|&t| t == 0));
    assert!(e.type_ids[sep + 1..].iter().all(|&t| t == 1));
    assert!(e.type_ids[sep + 1..].len() >= 2);
    // Padding from the file (Fixed 128) is off; truncation applies.
    let long = tok
        .encode(&"word ".repeat(500), Some(&"other ".repeat(500)))
        .unwrap();
    assert_eq!(long.ids.len(), 128);
}

// ---------------------------------------------------------------- shared GLUE data

#[test]
fn shared_glue_row_counts() {
    let Some(root) = shared_data() else { return };
    let glue = root.join("glue");
    let sst2 = load("sst2", &glue.join("SST-2"), Split::Train).unwrap();
    assert_eq!(sst2.len(), 67_349);
    assert!(sst2.iter().all(|e| e.label == 0.0 || e.label == 1.0));
    assert_eq!(
        load("sst2", &glue.join("SST-2"), Split::Dev).unwrap().len(),
        872
    );
    let rte = load("rte", &glue.join("RTE"), Split::Dev).unwrap();
    assert_eq!(rte.len(), 363);
    assert!(rte.iter().all(|e| e.text_pair.is_some()));
    assert_eq!(
        load("rte", &glue.join("RTE"), Split::Train).unwrap().len(),
        2_127
    );
    let cola = load("cola", &glue.join("CoLA"), Split::Dev).unwrap();
    assert_eq!(cola.len(), 1_301);
    assert_eq!(cola[0], ex("Bill broke the bathtub.", None, 1.0));
    assert_eq!(
        load("cola", &glue.join("CoLA"), Split::Train)
            .unwrap()
            .len(),
        7_250
    );
}

#[test]
fn shared_glue_with_real_tokenizer() {
    let Some(root) = shared_data() else { return };
    let Some(tok_path) = minilm_tokenizer() else {
        return;
    };
    let tok = TextTokenizer::from_file(&tok_path, 64).unwrap();
    let dev = load("rte", &root.join("glue/RTE"), Split::Dev).unwrap();
    let encs = tok.encode_all(&dev).unwrap();
    assert_eq!(encs.len(), 363);
    assert!(encs.iter().all(|e| e.ids.len() <= 64 && e.ids[0] == 101));
    let idx = &eval_batches(encs.len(), 32)[0];
    let refs: Vec<&Encoding> = idx.iter().map(|&i| &encs[i]).collect();
    let labels: Vec<f32> = idx.iter().map(|&i| dev[i].label).collect();
    let b = make_batch(&refs, &labels, tok.pad_id().unwrap());
    assert_eq!(b.batch, 32);
    assert_eq!(b.tokens, refs.iter().map(|e| e.ids.len()).sum::<usize>());
}

#[test]
fn fetched_rt_polarity_loads_as_sst2() {
    let cache = std::env::var_os("BEFT_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/beft")));
    let Some(dir) = cache.map(|c| c.join("data/rt-polarity")) else {
        eprintln!("skipped: neither BEFT_CACHE nor HOME is set");
        return;
    };
    if !dir.join("train.tsv").is_file() {
        eprintln!(
            "skipped: {} is absent (run scripts/fetch_default.sh)",
            dir.display()
        );
        return;
    }
    let train = load("sst2", &dir, Split::Train).unwrap();
    let dev = load("sst2", &dir, Split::Dev).unwrap();
    assert_eq!((train.len(), dev.len()), (9_568, 1_000));
    assert!(train
        .iter()
        .chain(&dev)
        .all(|e| e.label == 0.0 || e.label == 1.0));
}
