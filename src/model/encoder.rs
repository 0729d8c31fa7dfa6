//! BERT-family encoders (BERT, RoBERTa, MiniLM): the forward pass and the
//! hand-written bias-only backward pass, over the op vocabulary.
//!
//! Post-LN blocks:
//! ```text
//! q,k,v = x·Wᵀ + b        ctx = attn(q,k,v)        a = drop(ctx·Woᵀ + bo)
//! h1 = LN1(x + a)          f = h1·W1ᵀ + b1          m = drop(act(f)·W2ᵀ + b2)
//! out = LN2(h1 + m)
//! ```
//! With every W frozen, a bias gradient is a column sum of the gradient at
//! its output, and the gradient travels down through `dy·W` only. No
//! matmul input is kept: a layer saves q, k, v, the attention output and its
//! log-sum-exp, LayerNorm's x̂ and 1/σ, and the MLP pre-activation — and only
//! layers at or above the lowest trainable one save anything at all.

use crate::backend::{sub_seed, Act, AttnDims, Backend, Dropout, PoolKind, Proj};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::bias::{BiasTerm, SlabLayout, SlotKind};
use crate::model::config::{Arch, ModelConfig, ModelDir};
use crate::rng::Rng;
use crate::weights::WeightStore;

/// How to build an encoder for a task.
#[derive(Clone, Debug)]
pub struct EncoderOptions {
    pub pooling: PoolKind,
    /// 1 = regression (MSE), otherwise classification (cross-entropy).
    pub num_labels: usize,
    /// The trainable bias terms (the head and pooler bias always train).
    pub terms: Vec<BiasTerm>,
    /// Seed of a freshly initialised head.
    pub seed: u64,
}

/// A bias read by the forward pass: frozen (from the checkpoint) or a slot of
/// the trainable slab.
enum BiasSrc<B: Backend> {
    Frozen(B::Buf),
    Slab(usize),
}

struct Layer<B: Backend> {
    wq: B::Buf,
    wk: B::Buf,
    wv: B::Buf,
    wo: B::Buf,
    w1: B::Buf,
    w2: B::Buf,
    ln1_g: B::Buf,
    ln2_g: B::Buf,
    /// Biases in [`LAYER_TERMS`] order.
    biases: Vec<BiasSrc<B>>,
}

const LAYER_TERMS: [BiasTerm; 8] = [
    BiasTerm::Q,
    BiasTerm::K,
    BiasTerm::V,
    BiasTerm::O,
    BiasTerm::MlpIn,
    BiasTerm::MlpOut,
    BiasTerm::Ln1,
    BiasTerm::Ln2,
];

fn term_index(t: BiasTerm) -> usize {
    LAYER_TERMS
        .iter()
        .position(|x| *x == t)
        .expect("layer term")
}

/// A batch on the device.
pub struct DeviceBatch<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    pub tokens: usize,
    ids: B::Ids,
    type_ids: B::Ids,
    pos_ids: B::Ids,
    mask: B::Buf,
    labels: B::Ids,
    targets: B::Buf,
}

/// What one layer's forward pass keeps for the backward pass.
struct Saved<B: Backend> {
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    ctx: B::Buf,
    lse: B::Buf,
    xhat1: B::Buf,
    rstd1: B::Buf,
    f: B::Buf,
    xhat2: B::Buf,
    rstd2: B::Buf,
}

/// What the head keeps.
struct HeadSaved<B: Backend> {
    /// Input of the classifier (after the pooler and dropout).
    pooled: B::Buf,
    /// Pre-activation of the pooler dense layer (when there is one).
    z: Option<B::Buf>,
    logits: B::Buf,
}

/// Dropout seeds of one training step (None in evaluation).
#[derive(Clone, Copy)]
struct Drop {
    seed: u64,
    hidden: f32,
    attn: f32,
    head: f32,
}

impl Drop {
    fn site(&self, layer: usize, site: u64) -> u64 {
        sub_seed(self.seed, layer as u64 * 16 + site)
    }
}

/// An encoder for sequence classification/regression with a trainable slab.
pub struct Encoder<B: Backend> {
    pub cfg: ModelConfig,
    pub opts: EncoderOptions,
    /// Layout of the trainable slab.
    pub layout: SlabLayout,
    /// Initial slab values (the pre-trained biases and the initial head).
    pub init: Vec<f64>,
    /// Whether the head came from the checkpoint (vs freshly initialised).
    pub head_from_checkpoint: bool,
    /// The checkpoint's tensor-name prefix (`""`, `"bert."`, `"roberta."`).
    pub prefix: String,
    word: B::Buf,
    pos: B::Buf,
    tok_type: B::Buf,
    emb_ln_g: B::Buf,
    emb_ln_b: BiasSrc<B>,
    layers: Vec<Layer<B>>,
    /// Pooler dense weight and bias (BERT pooler, RoBERTa classifier.dense).
    pooler: Option<(B::Buf, BiasSrc<B>)>,
    /// Dropout before the pooler dense layer (RoBERTa's head only).
    dropout_before_pooler: bool,
    head_w_off: usize,
    head_b_off: usize,
    /// Layers below this index neither save activations nor get gradients.
    lowest: usize,
    /// Whether the gradient must reach the embeddings (emb-ln trainable).
    need_emb_grad: bool,
}

fn hf_layer_name(prefix: &str, l: usize, t: BiasTerm) -> String {
    let p = format!("{prefix}encoder.layer.{l}.");
    let s = match t {
        BiasTerm::Q => "attention.self.query",
        BiasTerm::K => "attention.self.key",
        BiasTerm::V => "attention.self.value",
        BiasTerm::O => "attention.output.dense",
        BiasTerm::MlpIn => "intermediate.dense",
        BiasTerm::MlpOut => "output.dense",
        BiasTerm::Ln1 => "attention.output.LayerNorm",
        BiasTerm::Ln2 => "output.LayerNorm",
        BiasTerm::EmbLn => unreachable!(),
    };
    format!("{p}{s}")
}

impl<B: Backend> Encoder<B> {
    /// Build the encoder from a model directory: frozen weights stay where
    /// the backend puts them (memory-mapped on the CPU); trainable biases go
    /// to the slab.
    pub fn load(be: &B, md: &ModelDir, opts: EncoderOptions) -> Result<Self> {
        let cfg = md.config.clone();
        let w = &md.weights;
        let d = cfg.hidden_size;
        let ff = cfg.intermediate_size;
        if opts.num_labels == 0 {
            return Err(Error::msg("num_labels must be at least 1"));
        }
        let prefix = w
            .find_prefix("embeddings.word_embeddings.weight", &["", "bert.", "roberta.", "model.", "encoder."])
            .ok_or_else(|| {
                Error::file(
                    &md.dir,
                    "no tensor named '[prefix.]embeddings.word_embeddings.weight': not a BERT/RoBERTa checkpoint",
                )
            })?;
        let p = prefix.as_str();
        let wt = |name: &str, shape: &[usize]| -> Result<B::Buf> {
            be.weight(w.get_shaped(name, shape)?)
        };
        let mut layout = SlabLayout::default();
        let mut init: Vec<f64> = Vec::new();
        let bias = |layout: &mut SlabLayout,
                    init: &mut Vec<f64>,
                    name: String,
                    trainable: bool,
                    kind: SlotKind,
                    layer: Option<usize>,
                    n: usize|
         -> Result<BiasSrc<B>> {
            let t = w.get_shaped(&name, &[n])?;
            if trainable {
                let off = layout.push(name, kind, layer, vec![n]);
                init.extend(t.to_f64_vec());
                Ok(BiasSrc::Slab(off))
            } else {
                Ok(BiasSrc::Frozen(be.weight(t)?))
            }
        };
        let trains = |t: BiasTerm| opts.terms.contains(&t);

        let word = wt(
            &format!("{p}embeddings.word_embeddings.weight"),
            &[cfg.vocab_size, d],
        )?;
        let pos = wt(
            &format!("{p}embeddings.position_embeddings.weight"),
            &[cfg.max_position_embeddings, d],
        )?;
        let tok_type = wt(
            &format!("{p}embeddings.token_type_embeddings.weight"),
            &[cfg.type_vocab_size, d],
        )?;
        let emb_ln_g = wt(&format!("{p}embeddings.LayerNorm.weight"), &[d])?;
        let emb_ln_b = bias(
            &mut layout,
            &mut init,
            format!("{p}embeddings.LayerNorm.bias"),
            trains(BiasTerm::EmbLn),
            SlotKind::Bias(BiasTerm::EmbLn),
            None,
            d,
        )?;

        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let n = |t: BiasTerm| hf_layer_name(p, l, t);
            let mut biases = Vec::with_capacity(8);
            for t in LAYER_TERMS {
                let len = if t == BiasTerm::MlpIn { ff } else { d };
                biases.push(bias(
                    &mut layout,
                    &mut init,
                    format!("{}.bias", n(t)),
                    trains(t),
                    SlotKind::Bias(t),
                    Some(l),
                    len,
                )?);
            }
            layers.push(Layer {
                wq: wt(&format!("{}.weight", n(BiasTerm::Q)), &[d, d])?,
                wk: wt(&format!("{}.weight", n(BiasTerm::K)), &[d, d])?,
                wv: wt(&format!("{}.weight", n(BiasTerm::V)), &[d, d])?,
                wo: wt(&format!("{}.weight", n(BiasTerm::O)), &[d, d])?,
                w1: wt(&format!("{}.weight", n(BiasTerm::MlpIn)), &[ff, d])?,
                w2: wt(&format!("{}.weight", n(BiasTerm::MlpOut)), &[d, ff])?,
                ln1_g: wt(&format!("{}.weight", n(BiasTerm::Ln1)), &[d])?,
                ln2_g: wt(&format!("{}.weight", n(BiasTerm::Ln2)), &[d])?,
                biases,
            });
        }

        // Head. RoBERTa's classification head is dense+tanh+out_proj on <s>;
        // BERT's is the tanh pooler + a linear classifier; mean pooling uses
        // a linear classifier on the mean of the last hidden states.
        let roberta_head = cfg.arch == Arch::Roberta && opts.pooling == PoolKind::Cls;
        let (pooler_name, head_name) = if roberta_head {
            let dense = if w.try_get("classifier.dense.weight").is_some() {
                "classifier.dense".to_string()
            } else {
                format!("{p}pooler.dense")
            };
            (Some(dense), "classifier.out_proj")
        } else if opts.pooling == PoolKind::Cls {
            (Some(format!("{p}pooler.dense")), "classifier")
        } else {
            (None, "classifier")
        };
        let mut rng = Rng::new(sub_seed(opts.seed, 0x4ead));
        let pooler = match pooler_name {
            Some(pn) if w.try_get(&format!("{pn}.weight")).is_some() => {
                let pw = wt(&format!("{pn}.weight"), &[d, d])?;
                let pb = bias(
                    &mut layout,
                    &mut init,
                    format!("{pn}.bias"),
                    true,
                    SlotKind::PoolerBias,
                    None,
                    d,
                )?;
                Some((pw, pb))
            }
            _ => None,
        };
        let c = opts.num_labels;
        let (hw_name, hb_name) = (format!("{head_name}.weight"), format!("{head_name}.bias"));
        let saved_head = match (w.try_get(&hw_name), w.try_get(&hb_name)) {
            (Some(hw), Some(hb)) if hw.shape == [c, d] && hb.shape == [c] => {
                Some((hw.to_f64_vec(), hb.to_f64_vec()))
            }
            _ => None,
        };
        let head_from_checkpoint = saved_head.is_some();
        let (hw, hb) = saved_head.unwrap_or_else(|| {
            // Hugging Face's initialisation: N(0, 0.02) weights, zero bias.
            (
                (0..c * d).map(|_| rng.normal() * 0.02).collect(),
                vec![0.0; c],
            )
        });
        let head_w_off = layout.push(hw_name, SlotKind::HeadWeight, None, vec![c, d]);
        init.extend(hw);
        let head_b_off = layout.push(hb_name, SlotKind::HeadBias, None, vec![c]);
        init.extend(hb);

        let need_emb_grad = trains(BiasTerm::EmbLn);
        let lowest = if need_emb_grad {
            0
        } else {
            layout
                .slots
                .iter()
                .filter_map(|s| s.layer)
                .min()
                .unwrap_or(cfg.num_layers)
        };
        Ok(Encoder {
            cfg,
            opts,
            layout,
            init,
            head_from_checkpoint,
            prefix: prefix.clone(),
            word,
            pos,
            tok_type,
            emb_ln_g,
            emb_ln_b,
            layers,
            pooler,
            dropout_before_pooler: roberta_head,
            head_w_off,
            head_b_off,
            lowest,
            need_emb_grad,
        })
    }

    /// Number of trainable values (biases and head).
    pub fn trainable_params(&self) -> usize {
        self.layout.len
    }

    /// Check a host batch against the model and move it to the device.
    pub fn upload_batch(&self, be: &B, b: &Batch) -> Result<DeviceBatch<B>> {
        let cfg = &self.cfg;
        let (nb, t) = (b.batch, b.seq);
        if nb == 0 || t == 0 {
            return Err(Error::msg("empty batch"));
        }
        if let Some(&bad) = b.ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::msg(format!(
                "token id {bad} is outside the model's vocabulary of {} (tokenizer and model do not match)",
                cfg.vocab_size
            )));
        }
        // Position ids: BERT counts from 0; RoBERTa from pad+1 over real
        // tokens, with padding at pad_token_id (as Hugging Face computes them).
        let mut pos_ids = vec![0u32; nb * t];
        for bi in 0..nb {
            let mut run = 0u32;
            for ti in 0..t {
                let i = bi * t + ti;
                pos_ids[i] = match cfg.arch {
                    Arch::Roberta => {
                        if b.ids[i] != cfg.pad_token_id {
                            run += 1;
                            cfg.pad_token_id + run
                        } else {
                            cfg.pad_token_id
                        }
                    }
                    _ => ti as u32,
                };
            }
        }
        let max_pos = pos_ids.iter().copied().max().unwrap_or(0) as usize;
        if max_pos >= cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "sequence of {t} tokens needs position {max_pos}, but the model has only {} position embeddings (lower --max-len)",
                cfg.max_position_embeddings
            )));
        }
        let type_ids: Vec<u32> = if cfg.type_vocab_size <= 1 {
            vec![0; nb * t]
        } else {
            b.type_ids.clone()
        };
        if let Some(&bad) = type_ids
            .iter()
            .find(|&&i| i as usize >= cfg.type_vocab_size)
        {
            return Err(Error::msg(format!(
                "token type id {bad} is outside the model's {} token types",
                cfg.type_vocab_size
            )));
        }
        let c = self.opts.num_labels;
        let mut labels = vec![0u32; nb];
        for (i, &y) in b.labels.iter().enumerate() {
            if c > 1 {
                if !(y >= 0.0 && (y as usize) < c && y.fract() == 0.0) {
                    return Err(Error::msg(format!(
                        "label {y} is outside the label set 0..{}",
                        c - 1
                    )));
                }
                labels[i] = y as u32;
            } else if !y.is_finite() {
                return Err(Error::msg(format!("regression target {y} is not finite")));
            }
        }
        let cast = |v: &[f32]| -> Vec<B::T> {
            v.iter()
                .map(|x| <B::T as crate::float::Float>::from_f32(*x))
                .collect()
        };
        Ok(DeviceBatch {
            batch: nb,
            seq: t,
            tokens: b.tokens,
            ids: be.upload_ids(&b.ids),
            type_ids: be.upload_ids(&type_ids),
            pos_ids: be.upload_ids(&pos_ids),
            mask: be.upload(&cast(&b.mask)),
            labels: be.upload_ids(&labels),
            targets: be.upload(&cast(&b.labels)),
        })
    }

    fn bias_ref<'a>(&'a self, src: &'a BiasSrc<B>, params: &'a B::Buf) -> (&'a B::Buf, usize) {
        match src {
            BiasSrc::Frozen(b) => (b, 0),
            BiasSrc::Slab(off) => (params, *off),
        }
    }

    fn dims(&self, x: &DeviceBatch<B>) -> AttnDims {
        let h = self.cfg.num_heads;
        AttnDims::self_attn(x.batch, x.seq, h, h, self.cfg.hidden_size / h, false)
    }

    /// `y = x·Wᵀ + b` for `rows` rows, a new buffer.
    fn linear(
        &self,
        be: &B,
        x: &B::Buf,
        w: &B::Buf,
        b: (&B::Buf, usize),
        rows: usize,
        n_in: usize,
        n_out: usize,
    ) -> B::Buf {
        let mut y = be.output(rows * n_out);
        be.matmul_bias(&mut y, x, w, b, rows, n_out, n_in, false, true);
        y
    }

    /// The whole forward pass. With `save`, layers at or above the lowest
    /// trainable one keep what the backward pass needs.
    fn forward(
        &self,
        be: &B,
        params: &B::Buf,
        x: &DeviceBatch<B>,
        drop: Option<Drop>,
        save: bool,
    ) -> (Vec<Option<Saved<B>>>, B::Buf, HeadSaved<B>) {
        let cfg = &self.cfg;
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let n = x.batch * x.seq;
        let dims = self.dims(x);

        // Embeddings: word + position + token type, LayerNorm, dropout.
        let mut e = be.output(n * d);
        be.embedding_fwd(&mut e, &self.word, &x.ids, n, d, false);
        be.embedding_fwd(&mut e, &self.pos, &x.pos_ids, n, d, true);
        be.embedding_fwd(&mut e, &self.tok_type, &x.type_ids, n, d, true);
        let mut h = be.output(n * d);
        let (mut xh, mut rs) = (be.output(n * d), be.output(n));
        let (bb, bo) = self.bias_ref(&self.emb_ln_b, params);
        be.layernorm_fwd(
            &mut h,
            &mut xh,
            &mut rs,
            &e,
            &self.emb_ln_g,
            bb,
            bo,
            n,
            d,
            cfg.layer_norm_eps,
        );
        if let Some(dr) = drop {
            be.dropout(&mut h, n * d, dr.hidden, dr.site(0, 0));
        }

        // The dropout of a sublayer's output before its residual add (site
        // `site` of layer l).
        let res_drop = |l: usize, site: u64| {
            drop.map(|dr| Dropout {
                p: dr.hidden,
                seed: dr.site(l, site),
            })
        };
        let mut saved = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let bias = |t: BiasTerm| self.bias_ref(&layer.biases[term_index(t)], params);
            // q, k, v: three products of one input (packed once).
            let proj = |w, t, n| Proj {
                w,
                bias: Some(bias(t)),
                n,
                tb: true,
            };
            let (mut q, mut k, mut v) = (be.output(n * d), be.output(n * d), be.output(n * d));
            be.linears(
                &mut [&mut q, &mut k, &mut v],
                &h,
                &[
                    proj(&layer.wq, BiasTerm::Q, d),
                    proj(&layer.wk, BiasTerm::K, d),
                    proj(&layer.wv, BiasTerm::V, d),
                ],
                n,
                d,
            );
            let mut ctx = be.output(n * d);
            let mut lse = be.output(x.batch * dims.heads * x.seq);
            let attn_drop = drop.filter(|dr| dr.attn > 0.0).map(|dr| Dropout {
                p: dr.attn,
                seed: dr.site(l, 1),
            });
            be.attention_fwd(&mut ctx, &mut lse, &q, &k, &v, &x.mask, dims, attn_drop);
            let mut a = self.linear(be, &ctx, &layer.wo, bias(BiasTerm::O), n, d, d);
            // h1 = LN1(drop(a) + h), one pass (a is scratch after it).
            let mut h1 = be.output(n * d);
            let (mut xhat1, mut rstd1) = (be.output(n * d), be.output(n));
            let (b1, o1) = bias(BiasTerm::Ln1);
            be.residual_layernorm_fwd(
                &mut h1,
                &mut xhat1,
                &mut rstd1,
                &mut a,
                &h,
                res_drop(l, 2),
                &layer.ln1_g,
                b1,
                o1,
                n,
                d,
                cfg.layer_norm_eps,
            );
            // f = h1·W1ᵀ + b1 (kept), m = act(f)·W2ᵀ + b2 (act(f): the
            // first product's epilogue).
            let (mut f, mut m) = (be.output(n * ff), be.output(n * d));
            be.mlp_fwd(
                &mut f,
                &mut m,
                cfg.hidden_act,
                &h1,
                (
                    proj(&layer.w1, BiasTerm::MlpIn, ff),
                    proj(&layer.w2, BiasTerm::MlpOut, d),
                ),
                n,
                d,
            );
            // out = LN2(drop(m) + h1), one pass.
            let mut out = be.output(n * d);
            let (mut xhat2, mut rstd2) = (be.output(n * d), be.output(n));
            let (b2, o2) = bias(BiasTerm::Ln2);
            be.residual_layernorm_fwd(
                &mut out,
                &mut xhat2,
                &mut rstd2,
                &mut m,
                &h1,
                res_drop(l, 3),
                &layer.ln2_g,
                b2,
                o2,
                n,
                d,
                cfg.layer_norm_eps,
            );
            saved.push(if save && l >= self.lowest {
                Some(Saved {
                    q,
                    k,
                    v,
                    ctx,
                    lse,
                    xhat1,
                    rstd1,
                    f,
                    xhat2,
                    rstd2,
                })
            } else {
                None
            });
            h = out;
        }

        let head = self.head_forward(be, params, &h, x, drop);
        (saved, h, head)
    }

    fn head_forward(
        &self,
        be: &B,
        params: &B::Buf,
        h: &B::Buf,
        x: &DeviceBatch<B>,
        drop: Option<Drop>,
    ) -> HeadSaved<B> {
        let d = self.cfg.hidden_size;
        let nb = x.batch;
        let c = self.opts.num_labels;
        let top = self.layers.len();
        let mut pooled = be.output(nb * d);
        be.pool_fwd(self.opts.pooling, &mut pooled, h, &x.mask, nb, x.seq, d);
        let mut z_saved = None;
        if let Some((pw, pb)) = &self.pooler {
            if self.dropout_before_pooler {
                if let Some(dr) = drop {
                    be.dropout(&mut pooled, nb * d, dr.head, dr.site(top, 4));
                }
            }
            let z = self.linear(be, &pooled, pw, self.bias_ref(pb, params), nb, d, d);
            be.act_fwd(Act::Tanh, &mut pooled, &z, nb * d);
            z_saved = Some(z);
        }
        if let Some(dr) = drop {
            be.dropout(&mut pooled, nb * d, dr.head, dr.site(top, 5));
        }
        let mut hw = be.output(c * d);
        be.copy(&mut hw, 0, params, self.head_w_off, c * d);
        let logits = self.linear(be, &pooled, &hw, (params, self.head_b_off), nb, d, c);
        HeadSaved {
            pooled,
            z: z_saved,
            logits,
        }
    }

    /// Logits `[batch, num_labels]` in evaluation mode (no dropout, nothing
    /// saved).
    pub fn logits(&self, be: &B, params: &B::Buf, x: &DeviceBatch<B>) -> Vec<B::T> {
        let (_, _, head) = self.forward(be, params, x, None, false);
        be.download(&head.logits)
    }

    /// One training step's forward and bias-only backward pass: returns the
    /// mean loss of the batch and the logits, and **accumulates** the
    /// gradient of every trainable value into `grads` (same layout as
    /// `params`). `dropout_seed = None` disables dropout (evaluation-mode
    /// gradients, as in the parity tests).
    pub fn loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        x: &DeviceBatch<B>,
        dropout_seed: Option<u64>,
    ) -> (f64, Vec<B::T>) {
        let cfg = &self.cfg;
        let drop = dropout_seed.map(|seed| Drop {
            seed,
            hidden: cfg.hidden_dropout as f32,
            attn: cfg.attention_dropout as f32,
            head: cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout) as f32,
        });
        let (saved, _h, head) = self.forward(be, params, x, drop, true);
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let nb = x.batch;
        let n = nb * x.seq;
        let c = self.opts.num_labels;
        let top = self.layers.len();
        let dims = self.dims(x);

        // Loss (mean over the batch) and its gradient at the logits.
        let mut losses = be.output(nb);
        let mut dlogits = be.output(nb * c);
        if c == 1 {
            be.mse(
                &mut losses,
                &mut dlogits,
                &head.logits,
                &x.targets,
                nb,
                1.0 / nb as f64,
            );
        } else {
            be.cross_entropy(
                &mut losses,
                &mut dlogits,
                &head.logits,
                &x.labels,
                nb,
                c,
                1.0 / nb as f64,
            );
        }
        let loss = be
            .download(&losses)
            .iter()
            .map(|v| crate::float::Float::to_f64(*v))
            .sum::<f64>()
            / nb as f64;

        // Head: classifier weight and bias, then back through the pooler.
        be.bias_grad(grads, self.head_b_off, &dlogits, nb, c);
        let mut dhw = be.output(c * d);
        be.copy(&mut dhw, 0, grads, self.head_w_off, c * d);
        be.matmul(
            &mut dhw,
            &dlogits,
            &head.pooled,
            c,
            d,
            nb,
            true,
            false,
            true,
        );
        be.copy(grads, self.head_w_off, &dhw, 0, c * d);
        let mut hw = be.output(c * d);
        be.copy(&mut hw, 0, params, self.head_w_off, c * d);
        let mut dpooled = be.output(nb * d);
        be.matmul(&mut dpooled, &dlogits, &hw, nb, d, c, false, false, false);
        if let Some(dr) = drop {
            be.dropout(&mut dpooled, nb * d, dr.head, dr.site(top, 5));
        }
        if let (Some((pw, pb)), Some(z)) = (&self.pooler, &head.z) {
            let mut dz = be.output(nb * d);
            be.act_bwd(Act::Tanh, &mut dz, z, &dpooled, nb * d);
            if let BiasSrc::Slab(off) = pb {
                be.bias_grad(grads, *off, &dz, nb, d);
            }
            be.matmul(&mut dpooled, &dz, pw, nb, d, d, false, false, false);
            if self.dropout_before_pooler {
                if let Some(dr) = drop {
                    be.dropout(&mut dpooled, nb * d, dr.head, dr.site(top, 4));
                }
            }
        }
        if self.lowest >= top {
            return (loss, be.download(&head.logits));
        }
        let mut dh = be.output(n * d);
        be.pool_bwd(self.opts.pooling, &mut dh, &dpooled, &x.mask, nb, x.seq, d);

        // Layers, top down, stopping at the lowest trainable one.
        let slab_off = |l: usize, t: BiasTerm| match self.layers[l].biases[term_index(t)] {
            BiasSrc::Slab(off) => Some(off),
            BiasSrc::Frozen(_) => None,
        };
        // The gradient of a dropped-out sublayer output from that of the
        // sum it feeds (dropout site `site` of layer l); `None` without
        // dropout: the gradient is the same tensor.
        let undrop = |g: &B::Buf, l: usize, site: u64| {
            drop.map(|dr| {
                let mut t = be.output(n * d);
                be.dropout_from(&mut t, g, n * d, dr.hidden, dr.site(l, site));
                t
            })
        };
        for l in (self.lowest..top).rev() {
            let layer = &self.layers[l];
            let s = saved[l]
                .as_ref()
                .expect("saved activations of a trainable layer");
            let need_dx = l > self.lowest || self.need_emb_grad;
            // out = LN2(h1 + m)
            let mut r2 = be.output(n * d);
            be.layernorm_bwd(&mut r2, &dh, &s.xhat2, &s.rstd2, &layer.ln2_g, n, d);
            if let Some(off) = slab_off(l, BiasTerm::Ln2) {
                be.bias_grad(grads, off, &dh, n, d);
            }
            // m = drop(act(f)·W2ᵀ + b2): its gradient is r2 itself without dropout.
            let dm_dropped = undrop(&r2, l, 3);
            let dm = dm_dropped.as_ref().unwrap_or(&r2);
            if let Some(off) = slab_off(l, BiasTerm::MlpOut) {
                be.bias_grad(grads, off, dm, n, d);
            }
            // df = act'(f) ⊙ (dm·W2) and b1's gradient, one op (CUDA: both
            // in the product's epilogue).
            let mut df = be.output(n * ff);
            let db1 = slab_off(l, BiasTerm::MlpIn).map(|off| (&mut *grads, off));
            let act = cfg.hidden_act;
            be.matmul_act_grad(&mut df, act, &s.f, dm, &layer.w2, db1, n, ff, d, false);
            // h1 feeds both the MLP and the residual.
            let mut dh1 = r2;
            be.matmul(&mut dh1, &df, &layer.w1, n, d, ff, false, false, true);
            // h1 = LN1(x + a)
            let mut r1 = be.output(n * d);
            be.layernorm_bwd(&mut r1, &dh1, &s.xhat1, &s.rstd1, &layer.ln1_g, n, d);
            if let Some(off) = slab_off(l, BiasTerm::Ln1) {
                be.bias_grad(grads, off, &dh1, n, d);
            }
            // a = drop(ctx·Woᵀ + bo): its gradient is r1 itself without dropout.
            let da_dropped = undrop(&r1, l, 2);
            let da = da_dropped.as_ref().unwrap_or(&r1);
            if let Some(off) = slab_off(l, BiasTerm::O) {
                be.bias_grad(grads, off, da, n, d);
            }
            let needs_qkv = need_dx
                || [BiasTerm::Q, BiasTerm::K, BiasTerm::V]
                    .iter()
                    .any(|t| slab_off(l, *t).is_some());
            if !needs_qkv {
                continue;
            }
            let mut dctx = be.output(n * d);
            be.matmul(&mut dctx, da, &layer.wo, n, d, d, false, false, false);
            let (mut dq, mut dk, mut dv) = (be.output(n * d), be.output(n * d), be.output(n * d));
            let attn_drop = drop.filter(|dr| dr.attn > 0.0).map(|dr| Dropout {
                p: dr.attn,
                seed: dr.site(l, 1),
            });
            be.attention_bwd(
                &mut dq, &mut dk, &mut dv, &dctx, &s.q, &s.k, &s.v, &s.ctx, &s.lse, &x.mask, dims,
                attn_drop,
            );
            for (t, g) in [(BiasTerm::Q, &dq), (BiasTerm::K, &dk), (BiasTerm::V, &dv)] {
                if let Some(off) = slab_off(l, t) {
                    be.bias_grad(grads, off, g, n, d);
                }
            }
            if need_dx {
                // x feeds q, k, v and the residual.
                let mut dx = r1;
                be.matmul(&mut dx, &dq, &layer.wq, n, d, d, false, false, true);
                be.matmul(&mut dx, &dk, &layer.wk, n, d, d, false, false, true);
                be.matmul(&mut dx, &dv, &layer.wv, n, d, d, false, false, true);
                dh = dx;
            }
        }
        if self.need_emb_grad {
            if let BiasSrc::Slab(off) = self.emb_ln_b {
                if let Some(dr) = drop {
                    be.dropout(&mut dh, n * d, dr.hidden, dr.site(0, 0));
                }
                be.bias_grad(grads, off, &dh, n, d);
            }
        }
        (loss, be.download(&head.logits))
    }
}

/// Fingerprint of a base model, stored with trained biases so that a biases
/// file is never applied to a different model.
pub fn model_fingerprint(w: &WeightStore) -> String {
    w.fingerprint()
}
