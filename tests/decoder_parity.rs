//! Parity of the decoders (GPT-2, OPT pre-/post-LN, LLaMA with GQA, Qwen2)
//! with Hugging Face transformers: logits at the loss rows, the next-token
//! loss and the gradient of every bias — including the zero biases attached
//! to bias-free projections — from fixtures written by
//! `scripts/make_fixtures.py` (float64 in PyTorch; the engine runs in f32;
//! relative error ≤ 1e-4 of each tensor's largest magnitude).

mod common;

use beft::backend::cpu::CpuBackend;
use beft::backend::Backend;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Decoder, DecoderOptions};
use beft::train::Slab;
use common::fixtures::{fixture, max_abs, read_expected, rel_err, Expected};

fn check_case(case: &str) {
    let Expected { tensors: exp, meta } = read_expected(case);
    let md = ModelDir::open(&fixture(case).join("model")).expect("fixture model opens");
    let be = CpuBackend::<f32>::new();
    let dec = Decoder::load(
        &be,
        &md,
        DecoderOptions {
            terms: BiasTerm::parse_set("all").unwrap(),
            ..Default::default()
        },
    )
    .expect("decoder loads");
    let ids: Vec<u32> = exp["input_ids"].1.iter().map(|x| *x as u32).collect();
    let (b, t) = (exp["input_ids"].0[0], exp["input_ids"].0[1]);
    let mask: Vec<f32> = exp["attention_mask"].1.iter().map(|x| *x as f32).collect();
    let rows: Vec<u32> = exp["rows"].1.iter().map(|x| *x as u32).collect();
    let targets: Vec<u32> = exp["targets"].1.iter().map(|x| *x as u32).collect();
    let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(&be, &dec.init);
    let loss = dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
    let logits: Vec<f64> = dec
        .logits_at(&be, &slab.params, &x, &rt)
        .iter()
        .map(|v| *v as f64)
        .collect();
    let want = &exp["logits"].1;
    let e = rel_err(&logits, want, max_abs(want));
    println!("{case}: logits rel err {e:.2e}");
    assert!(e <= 1e-4, "{case}: logits differ (rel err {e:.2e})");
    let lw = exp["loss"].1[0];
    assert!(
        (loss - lw).abs() / lw.abs() <= 1e-4,
        "{case}: loss {loss} vs {lw}"
    );

    // Added biases are exactly the fixture's.
    let mut added: Vec<String> = meta
        .get("added_biases")
        .map(|s| {
            s.split(',')
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let mut ours = dec.added.clone();
    added.sort();
    ours.sort();
    assert_eq!(ours, added, "{case}: added biases");

    let grads: Vec<f64> = be.download(&slab.grads).iter().map(|x| *x as f64).collect();
    let all_scale = exp
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, (_, v))| max_abs(v))
        .fold(0.0, f64::max);
    let rope = matches!(
        md.config.arch,
        beft::model::config::Arch::Llama | beft::model::config::Arch::Qwen2
    );
    let mut covered = std::collections::HashSet::new();
    for slot in &dec.layout.slots {
        // GPT-2's c_attn slices: "….c_attn.bias[q|k|v]".
        let (name, from) = match slot.name.strip_suffix(']').and_then(|s| s.rsplit_once('[')) {
            Some((base, part)) => {
                let i = ["q", "k", "v"].iter().position(|p| *p == part).unwrap();
                (base.to_string(), i * slot.len())
            }
            None => (slot.name.clone(), 0),
        };
        let (_, want) = exp
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{case}: no fixture gradient for {name}"));
        let want = &want[from..from + slot.len()];
        covered.insert(name.clone());
        let got = &grads[slot.offset..slot.offset + slot.len()];
        let is_key = !rope && (slot.name.contains("k_proj") || slot.name.ends_with("[k]"));
        let scale = if is_key { all_scale } else { max_abs(want) };
        let e = rel_err(got, want, scale);
        assert!(
            e <= 1e-4,
            "{case}: gradient of {} differs (rel err {e:.2e})",
            slot.name
        );
    }
    let n_fixture = exp.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(
        covered.len(),
        n_fixture,
        "{case}: every fixture gradient is checked"
    );
    println!("{case}: {} slots match", dec.layout.slots.len());
}

#[test]
fn gpt2_matches_transformers() {
    check_case("gpt2_lm");
}

#[test]
fn opt_matches_transformers() {
    check_case("opt_lm");
}

#[test]
fn opt_post_ln_with_projections_matches_transformers() {
    check_case("opt_postln_lm");
}

#[test]
fn llama_gqa_with_added_biases_matches_transformers() {
    check_case("llama_lm");
}

#[test]
fn qwen2_matches_transformers() {
    check_case("qwen2_lm");
}
