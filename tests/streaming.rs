//! Layer streaming (`--offload stream`) and activation recomputation
//! (`--recompute`) on the CPU backend, with a simulated small device
//! ([`SimDevice`]) that counts every buffer as device memory:
//!
//! - the four combinations of resident/streamed and kept/recomputed give
//!   the same loss and bias gradients, bit for bit, for every decoder
//!   family (GPT-2, OPT pre- and post-LN, LLaMA with GQA, Qwen2), and the
//!   same generations;
//! - streaming holds at most two layers' weights at once: its peak is below
//!   the resident peak by at least all but two layers' bytes;
//! - recomputation keeps only each layer's input: its training peak is below
//!   the kept-activation peak and close to the inference peak;
//! - under a device budget that the resident model does not fit, loading
//!   the resident model is an out-of-memory error (not a panic) and the
//!   streamed run trains with the same gradients.

mod decoder_common;

use beft::backend::fast::FastCpu;
use beft::backend::fault::catch_device_fault;
use beft::backend::sim::SimDevice;
use beft::backend::Backend;
use beft::model::config::ModelDir;
use beft::model::{BiasTerm, Decoder, DecoderOptions, Offload};
use beft::train::Slab;
use decoder_common::{
    next_token_rows, tiny_batch, write_decoder, write_tiny_decoder, Size, Tiny,
};

const ARCHS: [Tiny; 5] = [
    Tiny::Gpt2,
    Tiny::Opt,
    Tiny::OptPost,
    Tiny::Llama,
    Tiny::Qwen2,
];

fn load<B: Backend>(
    be: &B,
    md: &ModelDir,
    terms: &str,
    offload: Offload,
    recompute: bool,
) -> Decoder<B> {
    Decoder::load(
        be,
        md,
        DecoderOptions {
            terms: BiasTerm::parse_set(terms).unwrap(),
            offload,
            recompute,
        },
    )
    .expect("decoder loads")
}

/// Loss and bias gradients of one LM step on a padded batch.
fn step<B: Backend>(be: &B, dec: &Decoder<B>, lens: &[usize], seed: u64) -> (f64, Vec<f32>) {
    let (b, t, ids, mask) = tiny_batch(lens, false, seed);
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let x = dec.upload(be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(be, &dec.init);
    let loss = dec.lm_loss_and_grad(be, &slab.params, &mut slab.grads, &x, &rt);
    let g = be
        .download(&slab.grads)
        .iter()
        .map(|v| v.to_f64() as f32)
        .collect();
    (loss, g)
}

use beft::float::Float;

const MODES: [(Offload, bool); 4] = [
    (Offload::Resident, false),
    (Offload::Resident, true),
    (Offload::Stream, false),
    (Offload::Stream, true),
];

#[test]
fn streamed_and_recomputed_steps_match_resident_bit_for_bit() {
    let be = FastCpu::new();
    for arch in ARCHS {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_decoder(tmp.path(), arch, 7);
        let md = ModelDir::open(tmp.path()).unwrap();
        for terms in ["all", "v", "mlp-out"] {
            let reference = step(&be, &load(&be, &md, terms, Offload::Resident, false), &[9, 5, 7], 3);
            assert!(reference.0.is_finite() && reference.1.iter().any(|g| *g != 0.0));
            for (offload, recompute) in &MODES[1..] {
                let dec = load(&be, &md, terms, *offload, *recompute);
                assert_eq!(dec.offload(), *offload);
                let got = step(&be, &dec, &[9, 5, 7], 3);
                assert_eq!(
                    got.0.to_bits(),
                    reference.0.to_bits(),
                    "{arch:?} --bias {terms} {offload:?} recompute={recompute}: loss {} vs {}",
                    got.0,
                    reference.0
                );
                assert_eq!(
                    got.1, reference.1,
                    "{arch:?} --bias {terms} {offload:?} recompute={recompute}: gradients differ"
                );
            }
        }
        println!("{arch:?}: 4 modes x 3 bias sets identical");
    }
}

#[test]
fn streamed_generation_matches_resident() {
    let be = FastCpu::new();
    for arch in [Tiny::Opt, Tiny::Llama] {
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_decoder(tmp.path(), arch, 11);
        let md = ModelDir::open(tmp.path()).unwrap();
        let prompts = vec![vec![5u32, 9, 12], vec![7u32, 3]];
        let gen = |offload| {
            let dec = load(&be, &md, "v", offload, false);
            let slab = Slab::new(&be, &dec.init);
            dec.generate_greedy(&be, &slab.params, &prompts, 6, &|_| false)
                .unwrap()
        };
        let (a, b) = (gen(Offload::Resident), gen(Offload::Stream));
        assert_eq!(a, b, "{arch:?}: streamed generation differs");
        assert!(a.iter().all(|r| r.len() == 6), "{arch:?}: {a:?}");
    }
}

/// An OPT model big enough that weights and activations are both visible
/// in the memory counts: 6 layers, hidden 64, ffn 256.
const MID: Size = Size {
    layers: 6,
    hidden: 64,
    ff: 256,
};

struct Peaks {
    load: u64,
    train: u64,
    infer: u64,
    grads: Vec<f32>,
}

fn measure(md: &ModelDir, offload: Offload, recompute: bool, cap: Option<u64>) -> Peaks {
    let be = SimDevice::new(FastCpu::new(), cap);
    let dec = load(&be, md, "v", offload, recompute);
    let load = be.memory().unwrap().peak;
    let lens = [30, 30, 30, 30];
    let (b, t, ids, mask) = tiny_batch(&lens, false, 5);
    let (rows, targets) = next_token_rows(b, t, &ids, &mask);
    let x = dec.upload(&be, b, t, &ids, &mask).unwrap();
    let rt = dec.row_targets(&be, &x, &rows, &targets).unwrap();
    let mut slab = Slab::new(&be, &dec.init);
    be.reset_peak();
    let _ = dec.logits_at(&be, &slab.params, &x, &rt);
    let infer = be.memory().unwrap().peak;
    be.reset_peak();
    dec.lm_loss_and_grad(&be, &slab.params, &mut slab.grads, &x, &rt);
    let train = be.memory().unwrap().peak;
    let grads = be.download(&slab.grads);
    Peaks {
        load,
        train,
        infer,
        grads,
    }
}

#[test]
fn streaming_holds_two_layers_and_recompute_keeps_only_layer_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    write_decoder(tmp.path(), Tiny::Opt, 3, MID);
    let md = ModelDir::open(tmp.path()).unwrap();
    let probe = FastCpu::new();
    let dec = load(&probe, &md, "v", Offload::Stream, false);
    let (other, layer, all_layers) = dec.weight_bytes(&probe);
    let nl = dec.num_layers() as u64;
    assert_eq!(nl, 6);
    assert!(layer > 0 && all_layers >= nl * layer - nl, "{layer} {all_layers}");

    let res = measure(&md, Offload::Resident, false, None);
    let st = measure(&md, Offload::Stream, false, None);
    let res_rc = measure(&md, Offload::Resident, true, None);
    let st_rc = measure(&md, Offload::Stream, true, None);
    for (name, p) in [("res", &res), ("stream", &st), ("res+rc", &res_rc), ("stream+rc", &st_rc)] {
        println!(
            "{name:>10}: load {:>8} B, inference peak {:>8} B, training peak {:>8} B (x{:.2} of inference)",
            p.load,
            p.infer,
            p.train,
            p.train as f64 / p.infer as f64
        );
        assert_eq!(p.grads, res.grads, "{name}: gradients differ from resident");
    }
    // Resident: every layer is on the device from load on; streamed: none.
    assert!(res.load >= other + all_layers, "{} < {}", res.load, other + all_layers);
    assert!(st.load < other + layer, "streamed load holds layer weights: {}", st.load);
    // A streamed pass holds at most two layers at once, so it saves at
    // least all but two layers' bytes against the resident pass.
    let saving = all_layers - 2 * layer;
    for (r, s, what) in [
        (res.infer, st.infer, "inference"),
        (res.train, st.train, "training"),
        (res_rc.train, st_rc.train, "training with recompute"),
    ] {
        assert!(
            s + saving <= r,
            "{what}: streamed peak {s} is not {saving} bytes below resident {r}"
        );
    }
    // Recomputation keeps one [rows, hidden] input per layer instead of all
    // of a layer's activations.
    assert!(res_rc.train < res.train, "{} vs {}", res_rc.train, res.train);
    assert!(st_rc.train < st.train, "{} vs {}", st_rc.train, st.train);
    // Bias-only training with recomputation stays near inference (no weight
    // gradients, no weight optimizer state); the target on a GPU is 1.1x.
    let ratio = res_rc.train as f64 / res_rc.infer as f64;
    assert!(ratio < 1.5, "resident+recompute training/inference peak {ratio:.2}");
}

#[test]
fn a_budget_the_resident_model_exceeds_is_an_oom_error_and_streaming_fits() {
    let tmp = tempfile::tempdir().unwrap();
    write_decoder(tmp.path(), Tiny::Opt, 3, MID);
    let md = ModelDir::open(tmp.path()).unwrap();
    let st = measure(&md, Offload::Stream, true, None);
    let res = measure(&md, Offload::Resident, true, None);
    let budget = st.train.max(st.infer).max(st.load) + 1024;
    assert!(budget < res.load, "the test model must not fit resident: {budget} vs {}", res.load);
    let err = catch_device_fault(|| measure(&md, Offload::Resident, true, Some(budget)))
        .err()
        .expect("the resident model does not fit the budget");
    let msg = err.to_string();
    assert!(msg.contains("out of device memory"), "{msg}");
    assert!(msg.contains("--offload stream"), "{msg}");
    let fitted = catch_device_fault(|| measure(&md, Offload::Stream, true, Some(budget)))
        .expect("the streamed model fits the budget");
    assert_eq!(fitted.grads, res.grads);
    assert!(fitted.train <= budget);
}
