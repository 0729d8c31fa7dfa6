//! Causal decoders (GPT-2, OPT, LLaMA/Mistral/SmolLM, Qwen2): the forward
//! pass, the hand-written bias-only backward pass, candidate scoring and
//! greedy decoding with a KV cache, over the op vocabulary.
//!
//! Pre-LN block (GPT-2, OPT, LLaMA family):
//! ```text
//! n1 = N1(x)   q,k,v = n1·Wᵀ + b   (RoPE on q, k)   ctx = attn(q,k,v)
//! x1 = x + ctx·Woᵀ + bo
//! n2 = N2(x1)  MLP: act(n2·W1ᵀ + b1)·W2ᵀ + b2   or   silu(gate)·up·Wdᵀ + bd
//! out = x1 + mlp
//! ```
//! OPT with `do_layer_norm_before = false` (OPT-350m) is post-LN, like the
//! encoder. `N` is LayerNorm (GPT-2, OPT) or RMSNorm (LLaMA family).
//!
//! As in the encoder, the backward pass keeps no matmul input: a layer saves
//! q, k, v (after RoPE), the attention output and log-sum-exp, the norms' x̂
//! and 1/σ and the MLP pre-activations, and layers below the lowest trainable
//! bias save nothing. The LM head is evaluated only at the rows that carry a
//! loss (answer tokens): those rows are gathered with `embedding_fwd` before
//! the final norm and scattered back with `scatter_add_rows`.
//!
//! Bias-free projections (LLaMA's q/k/v/o/MLP, Qwen2's o/MLP, OPT without
//! `enable_bias`) get a trainable zero-initialised bias when asked for; its
//! slot is named as Hugging Face would name the bias (`….v_proj.bias`) and
//! listed in [`Decoder::added`].
//!
//! GPT-2's fused `c_attn` bias is split into three slots named
//! `….attn.c_attn.bias[q]`, `[k]` and `[v]` (slices `0..d`, `d..2d`,
//! `2d..3d` of `c_attn.bias`).

use crate::backend::fault::device_fault;
use crate::backend::{AttnDims, Backend, CandidateIndex, Proj};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::model::bias::{BiasTerm, SlabLayout, SlotKind};
use crate::model::config::{Arch, ModelConfig, ModelDir};
use crate::weights::{TensorView, WeightStore};

/// Where the frozen layer weights live during a step (`--offload`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Offload {
    /// Every layer's weights are uploaded to the device once, at load.
    #[default]
    Resident,
    /// Layer weights stay in the memory-mapped file and are uploaded layer
    /// by layer when a pass reaches them (the next layer's upload is issued
    /// before the current layer computes: two layers on the device at most).
    Stream,
}

impl Offload {
    /// `resident`, `stream`, or `auto` (`None`: decide from the device
    /// budget, see [`MemoryPlan::choose`]).
    pub fn parse(s: &str) -> Result<Option<Offload>> {
        match s.trim().to_ascii_lowercase().as_str() {
            "resident" => Ok(Some(Offload::Resident)),
            "stream" => Ok(Some(Offload::Stream)),
            "auto" => Ok(None),
            _ => Err(Error::msg(format!(
                "--offload: unknown mode '{s}' (resident, stream, auto)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Offload::Resident => "resident",
            Offload::Stream => "stream",
        }
    }
}

/// Estimated device memory of a training step (see
/// [`Decoder::memory_plan`]), in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MemoryPlan {
    /// Embeddings, final norm, LM head (always resident).
    pub other_weights: u64,
    /// The largest layer's frozen weights.
    pub largest_layer: u64,
    /// All layers' frozen weights.
    pub all_layers: u64,
    /// Activations, gradients and the LM head's logits (upper estimate).
    pub activations: u64,
}

impl MemoryPlan {
    /// Peak with every layer resident.
    pub fn resident(&self) -> u64 {
        self.other_weights + self.all_layers + self.activations
    }

    /// Peak with layers streamed (two on the device at once).
    pub fn streamed(&self) -> u64 {
        self.other_weights + 2 * self.largest_layer + self.activations
    }

    /// The mode for a device `budget`: resident when it fits, else streamed.
    pub fn choose(&self, budget: u64) -> Offload {
        if self.resident() <= budget {
            Offload::Resident
        } else {
            Offload::Stream
        }
    }
}

/// How to build a decoder.
#[derive(Clone, Debug, Default)]
pub struct DecoderOptions {
    /// The trainable bias terms (`--bias`).
    pub terms: Vec<BiasTerm>,
    /// Resident or streamed layer weights (`--offload`).
    pub offload: Offload,
    /// Keep only each trainable layer's input in the forward pass and
    /// recompute the layer in the backward pass (`--recompute`), instead of
    /// keeping every activation the backward pass reads.
    pub recompute: bool,
}

/// A bias read by the forward pass; `W` is a frozen tensor's handle (a
/// device buffer, or a [`Src`] before upload).
enum BiasSrc<W> {
    /// The projection has no bias (and it does not train).
    None,
    Frozen(W),
    Slab(usize),
}

impl<W> BiasSrc<W> {
    fn slab(&self) -> Option<usize> {
        match self {
            BiasSrc::Slab(o) => Some(*o),
            _ => None,
        }
    }

    fn try_map<V>(&self, f: &mut impl FnMut(&W) -> Result<V>) -> Result<BiasSrc<V>> {
        Ok(match self {
            BiasSrc::None => BiasSrc::None,
            BiasSrc::Frozen(w) => BiasSrc::Frozen(f(w)?),
            BiasSrc::Slab(o) => BiasSrc::Slab(*o),
        })
    }
}

/// A frozen linear map with an optional bias.
struct Lin<W> {
    w: W,
    n_in: usize,
    n_out: usize,
    /// Stored `[in, out]` (GPT-2's Conv1D) instead of `[out, in]`.
    in_out: bool,
    b: BiasSrc<W>,
}

impl<W> Lin<W> {
    fn try_map<V>(&self, f: &mut impl FnMut(&W) -> Result<V>) -> Result<Lin<V>> {
        Ok(Lin {
            w: f(&self.w)?,
            n_in: self.n_in,
            n_out: self.n_out,
            in_out: self.in_out,
            b: self.b.try_map(f)?,
        })
    }
}

struct Norm<W> {
    g: W,
    /// LayerNorm's beta; `None` for RMSNorm.
    b: BiasSrc<W>,
    rms: bool,
}

impl<W> Norm<W> {
    fn try_map<V>(&self, f: &mut impl FnMut(&W) -> Result<V>) -> Result<Norm<V>> {
        Ok(Norm {
            g: f(&self.g)?,
            b: self.b.try_map(f)?,
            rms: self.rms,
        })
    }
}

struct Layer<W> {
    q: Lin<W>,
    k: Lin<W>,
    v: Lin<W>,
    o: Lin<W>,
    /// c_fc / fc1 / up_proj.
    up: Lin<W>,
    /// gate_proj (LLaMA family).
    gate: Option<Lin<W>>,
    /// c_proj / fc2 / down_proj.
    down: Lin<W>,
    n1: Norm<W>,
    n2: Norm<W>,
}

impl<W> Layer<W> {
    fn try_map<V>(&self, f: &mut impl FnMut(&W) -> Result<V>) -> Result<Layer<V>> {
        Ok(Layer {
            q: self.q.try_map(f)?,
            k: self.k.try_map(f)?,
            v: self.v.try_map(f)?,
            o: self.o.try_map(f)?,
            up: self.up.try_map(f)?,
            gate: match &self.gate {
                Some(g) => Some(g.try_map(f)?),
                None => None,
            },
            down: self.down.try_map(f)?,
            n1: self.n1.try_map(f)?,
            n2: self.n2.try_map(f)?,
        })
    }

    /// Every frozen tensor of the layer.
    fn tensors(&self) -> Vec<&W> {
        let mut out = Vec::new();
        for l in [&self.q, &self.k, &self.v, &self.o, &self.up, &self.down]
            .into_iter()
            .chain(self.gate.as_ref())
        {
            out.push(&l.w);
            if let BiasSrc::Frozen(b) = &l.b {
                out.push(b);
            }
        }
        for n in [&self.n1, &self.n2] {
            out.push(&n.g);
            if let BiasSrc::Frozen(b) = &n.b {
                out.push(b);
            }
        }
        out
    }
}

/// A frozen tensor before it is on the device: a checkpoint tensor (read in
/// place from the memory map, or made on the host at load as a view of its
/// own, like GPT-2's split `c_attn`), or host values (a frozen slice of a
/// fused bias), uploaded as they are.
enum Src {
    View(TensorView),
    Host(Vec<f32>),
}

impl Src {
    /// Device bytes once uploaded.
    fn device_bytes<B: Backend>(&self, be: &B) -> u64 {
        match self {
            Src::View(t) => be.weight_bytes(t),
            Src::Host(v) => (v.len() * std::mem::size_of::<B::T>()) as u64,
        }
    }

    /// On the device: resident, or for one use by a streamed layer.
    fn upload<B: Backend>(&self, be: &B, streamed: bool) -> Result<B::Buf> {
        match self {
            Src::View(t) if streamed => be.weight_streamed(t),
            Src::View(t) => be.weight(t),
            Src::Host(v) => {
                let vals: Vec<B::T> = v.iter().map(|x| B::T::from_f32(*x)).collect();
                Ok(be.upload(&vals))
            }
        }
    }
}

/// The decoder's layers: on the device for the whole run, or streamed.
enum Layers<B: Backend> {
    Resident(Vec<Layer<B::Buf>>),
    /// Host descriptions, uploaded layer by layer when a pass needs them.
    Stream(Vec<Layer<Src>>),
}

/// A layer's device weights: borrowed (resident) or uploaded for one use.
enum LayerRef<'a, B: Backend> {
    Resident(&'a Layer<B::Buf>),
    Uploaded(Box<Layer<B::Buf>>),
}

impl<B: Backend> std::ops::Deref for LayerRef<'_, B> {
    type Target = Layer<B::Buf>;
    fn deref(&self) -> &Layer<B::Buf> {
        match self {
            LayerRef::Resident(l) => l,
            LayerRef::Uploaded(l) => l,
        }
    }
}

/// A batch of token sequences on the device.
pub struct DecBatch<B: Backend> {
    pub batch: usize,
    pub seq: usize,
    ids: B::Ids,
    /// Position of each token (count of real tokens before it in its row).
    pos: B::Ids,
    /// Row ids into the learned position table (OPT: + 2).
    pos_table: B::Ids,
    mask: B::Buf,
    /// Host copies.
    host_mask: Vec<f32>,
}

impl<B: Backend> DecBatch<B> {
    /// Whether token `t` of row `b` is real (not padding).
    pub fn is_real(&self, b: usize, t: usize) -> bool {
        self.host_mask[b * self.seq + t] > 0.0
    }
}

/// Rows of a batch at which the LM head is evaluated, with their target
/// tokens (the next token).
pub struct RowTargets<B: Backend> {
    rows: B::Ids,
    targets: B::Ids,
    n: usize,
    /// Host copy of the targets (uploaded chunk by chunk by the loss).
    host_targets: Vec<u32>,
}

/// A candidate-scoring batch: the rows (and next tokens) of every answer
/// token, each row's candidate, each candidate's example, each example's
/// gold candidate.
pub struct CandBatch<B: Backend> {
    pub x: DecBatch<B>,
    rt: RowTargets<B>,
    tok_cand: B::Ids,
    cand_ex: B::Ids,
    gold: B::Ids,
    pub cands: usize,
    pub examples: usize,
}

struct Saved<B: Backend> {
    xhat1: B::Buf,
    rstd1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    ctx: B::Buf,
    lse: B::Buf,
    xhat2: B::Buf,
    rstd2: B::Buf,
    /// MLP pre-activation (fc1) or gate pre-activation (LLaMA).
    f: B::Buf,
    /// up projection (LLaMA).
    up: Option<B::Buf>,
}

/// What a trainable layer keeps from the forward pass for the backward.
enum Kept<B: Backend> {
    /// Every activation its backward pass reads.
    All(Saved<B>),
    /// Only its input; the layer's forward pass is run again in the
    /// backward pass (`--recompute`).
    Input(B::Buf),
}

struct TopSaved<B: Backend> {
    xhat: Option<B::Buf>,
    rstd: Option<B::Buf>,
    /// The head's input at the loss rows (`[rows, word_embed_proj_dim]`).
    hs: B::Buf,
}

/// Rows of the LM head evaluated at once by the token-level loss: the
/// logits and their gradient exist for this many rows at a time only.
pub const HEAD_CHUNK: usize = 256;

/// A KV cache for greedy decoding: per layer `[batch, cap, kv_heads, head_dim]`.
struct KvCache<B: Backend> {
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    cap: usize,
    mask: B::Buf,
}

/// A causal decoder with its trainable slab layout.
pub struct Decoder<B: Backend> {
    pub cfg: ModelConfig,
    pub terms: Vec<BiasTerm>,
    pub layout: SlabLayout,
    /// Initial slab values (pre-trained biases; zeros for added ones).
    pub init: Vec<f64>,
    /// Names of trainable biases that the base model has no slot for.
    pub added: Vec<String>,
    embed: B::Buf,
    pos: Option<B::Buf>,
    project_in: Option<Lin<B::Buf>>,
    project_out: Option<Lin<B::Buf>>,
    layers: Layers<B>,
    final_norm: Option<Norm<B::Buf>>,
    /// Untied LM head `[vocab, hidden]`; `None` = tied to `embed`.
    lm_head: Option<B::Buf>,
    /// Layers below this index neither save activations nor get gradients.
    lowest: usize,
    /// Keep only trainable layers' inputs; recompute in the backward pass.
    recompute: bool,
    /// Device bytes of the weights outside the layers, and of each layer's
    /// weights ([`Backend::weight_bytes`]), for [`Decoder::memory_plan`].
    other_bytes: u64,
    layer_bytes: Vec<u64>,
    /// Device bytes of layer weights streamed so far (`--offload stream`).
    streamed: std::sync::atomic::AtomicU64,
}

/// Hugging Face names of one layer's modules.
struct Names {
    q: String,
    k: String,
    v: String,
    o: String,
    up: String,
    gate: Option<String>,
    down: String,
    n1: String,
    n2: String,
}

fn layer_names(arch: Arch, p: &str, l: usize) -> Names {
    match arch {
        Arch::Gpt2 => {
            let b = format!("{p}h.{l}.");
            Names {
                q: format!("{b}attn.c_attn"),
                k: format!("{b}attn.c_attn"),
                v: format!("{b}attn.c_attn"),
                o: format!("{b}attn.c_proj"),
                up: format!("{b}mlp.c_fc"),
                gate: None,
                down: format!("{b}mlp.c_proj"),
                n1: format!("{b}ln_1"),
                n2: format!("{b}ln_2"),
            }
        }
        Arch::Opt => {
            let b = format!("{p}layers.{l}.");
            Names {
                q: format!("{b}self_attn.q_proj"),
                k: format!("{b}self_attn.k_proj"),
                v: format!("{b}self_attn.v_proj"),
                o: format!("{b}self_attn.out_proj"),
                up: format!("{b}fc1"),
                gate: None,
                down: format!("{b}fc2"),
                n1: format!("{b}self_attn_layer_norm"),
                n2: format!("{b}final_layer_norm"),
            }
        }
        _ => {
            let b = format!("{p}layers.{l}.");
            Names {
                q: format!("{b}self_attn.q_proj"),
                k: format!("{b}self_attn.k_proj"),
                v: format!("{b}self_attn.v_proj"),
                o: format!("{b}self_attn.o_proj"),
                up: format!("{b}mlp.up_proj"),
                gate: Some(format!("{b}mlp.gate_proj")),
                down: format!("{b}mlp.down_proj"),
                n1: format!("{b}input_layernorm"),
                n2: format!("{b}post_attention_layernorm"),
            }
        }
    }
}

/// Builds slab slots and frozen buffers while loading.
struct Loader<'a, B: Backend> {
    be: &'a B,
    w: &'a WeightStore,
    layout: SlabLayout,
    init: Vec<f64>,
    added: Vec<String>,
    /// Device bytes of the always-resident weights loaded so far.
    resident_bytes: u64,
}

impl<B: Backend> Loader<'_, B> {
    fn weight(&mut self, name: &str, shape: &[usize]) -> Result<B::Buf> {
        let t = self.w.get_shaped(name, shape)?;
        self.resident_bytes += self.be.weight_bytes(t);
        self.be.weight(t)
    }

    /// A layer tensor, left in the checkpoint until it is uploaded.
    fn src(&self, name: &str, shape: &[usize]) -> Result<Src> {
        Ok(Src::View(self.w.get_shaped(name, shape)?.clone()))
    }

    /// A bias: from the checkpoint (`present`), trainable or frozen; or,
    /// absent from the checkpoint, a zero bias in the slab if it trains.
    fn bias(
        &mut self,
        name: String,
        present: bool,
        trains: bool,
        term: BiasTerm,
        layer: Option<usize>,
        n: usize,
    ) -> Result<BiasSrc<Src>> {
        if present {
            let t = self.w.get_shaped(&name, &[n])?;
            if trains {
                let off = self.layout.push(name, SlotKind::Bias(term), layer, vec![n]);
                self.init.extend(t.to_f64_vec());
                Ok(BiasSrc::Slab(off))
            } else {
                Ok(BiasSrc::Frozen(Src::View(t.clone())))
            }
        } else if trains {
            self.added.push(name.clone());
            let off = self.layout.push(name, SlotKind::Bias(term), layer, vec![n]);
            self.init.extend(std::iter::repeat_n(0.0, n));
            Ok(BiasSrc::Slab(off))
        } else {
            Ok(BiasSrc::None)
        }
    }

    /// A slice of a checkpoint bias (GPT-2's c_attn), trainable or frozen.
    fn bias_slice(
        &mut self,
        t: &TensorView,
        slot: String,
        from: usize,
        n: usize,
        trains: bool,
        term: BiasTerm,
        layer: usize,
    ) -> BiasSrc<Src> {
        let vals = t.to_f64_vec()[from..from + n].to_vec();
        if trains {
            let off = self
                .layout
                .push(slot, SlotKind::Bias(term), Some(layer), vec![n]);
            self.init.extend(vals);
            BiasSrc::Slab(off)
        } else {
            BiasSrc::Frozen(Src::Host(vals.iter().map(|v| *v as f32).collect()))
        }
    }

    /// A bias on the device (outside the streamed layers).
    fn dev_bias(&self, b: BiasSrc<Src>) -> Result<BiasSrc<B::Buf>> {
        b.try_map(&mut |s: &Src| s.upload(self.be, false))
    }
}

fn tensor_or_err<'a>(w: &'a WeightStore, name: &str) -> Result<&'a TensorView> {
    w.get(name)
}

impl<B: Backend> Decoder<B> {
    /// Build the decoder from a model directory (or any `ModelDir`-like
    /// config + weight store with Hugging Face names).
    pub fn load(be: &B, md: &ModelDir, opts: DecoderOptions) -> Result<Self> {
        Self::from_parts(be, &md.config, &md.weights, &md.dir, opts)
    }

    /// Build the decoder from a config and a weight store (`source` names
    /// the model in messages).
    pub fn from_parts(
        be: &B,
        cfg: &ModelConfig,
        w: &WeightStore,
        source: &std::path::Path,
        opts: DecoderOptions,
    ) -> Result<Self> {
        let cfg = cfg.clone();
        let arch = cfg.arch;
        if !arch.is_decoder() {
            return Err(Error::file(
                source,
                format!("model_type '{}' is not a decoder", cfg.model_type),
            ));
        }
        let all = BiasTerm::ALL.iter().all(|t| opts.terms.contains(t));
        if arch.is_llama_like() && !all {
            if let Some(t) = opts
                .terms
                .iter()
                .find(|t| matches!(t, BiasTerm::Ln1 | BiasTerm::Ln2 | BiasTerm::EmbLn))
            {
                return Err(Error::msg(format!(
                    "--bias {}: {} uses RMSNorm, which has no bias (trainable terms: q, k, v, o, mlp-in, mlp-out)",
                    t.short(),
                    cfg.model_type
                )));
            }
        }
        let trains = |t: BiasTerm| opts.terms.contains(&t);
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim());
        let (qd, kvd) = (nh * hd, nkv * hd);
        let v_size = cfg.vocab_size;

        let (probe, cands): (&str, &[&str]) = match arch {
            Arch::Gpt2 => ("wte.weight", &["transformer.", ""]),
            Arch::Opt => ("decoder.embed_tokens.weight", &["model.", ""]),
            _ => ("embed_tokens.weight", &["model.", ""]),
        };
        let prefix = w.find_prefix(probe, cands).ok_or_else(|| {
            Error::file(
                source,
                format!(
                    "no tensor named '[prefix.]{probe}': not a {} checkpoint",
                    cfg.model_type
                ),
            )
        })?;
        let p = match arch {
            Arch::Opt => format!("{prefix}decoder."),
            _ => prefix.clone(),
        };
        let mut ld = Loader {
            be,
            w,
            layout: SlabLayout::default(),
            init: Vec::new(),
            added: Vec::new(),
            resident_bytes: 0,
        };

        let dp = cfg.word_embed_proj_dim;
        let (embed, pos) = match arch {
            Arch::Gpt2 => (
                ld.weight(&format!("{p}wte.weight"), &[v_size, d])?,
                Some(ld.weight(&format!("{p}wpe.weight"), &[cfg.max_position_embeddings, d])?),
            ),
            Arch::Opt => (
                ld.weight(&format!("{p}embed_tokens.weight"), &[v_size, dp])?,
                Some(ld.weight(
                    &format!("{p}embed_positions.weight"),
                    &[cfg.max_position_embeddings + 2, d],
                )?),
            ),
            _ => (
                ld.weight(&format!("{p}embed_tokens.weight"), &[v_size, d])?,
                None,
            ),
        };
        let (mut project_in, mut project_out) = (None, None);
        if arch == Arch::Opt && dp != d {
            project_in = Some(Lin {
                w: ld.weight(&format!("{p}project_in.weight"), &[d, dp])?,
                n_in: dp,
                n_out: d,
                in_out: false,
                b: BiasSrc::None,
            });
            project_out = Some(Lin {
                w: ld.weight(&format!("{p}project_out.weight"), &[dp, d])?,
                n_in: d,
                n_out: dp,
                in_out: false,
                b: BiasSrc::None,
            });
        }

        let (mut resident, mut streamed) = (Vec::new(), Vec::new());
        let mut layer_bytes = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let n = layer_names(arch, &p, l);
            let norm = |ld: &mut Loader<'_, B>, name: &str, term: BiasTerm| -> Result<Norm<Src>> {
                let g = ld.src(&format!("{name}.weight"), &[d])?;
                if arch.is_llama_like() {
                    Ok(Norm {
                        g,
                        b: BiasSrc::None,
                        rms: true,
                    })
                } else {
                    let b =
                        ld.bias(format!("{name}.bias"), true, trains(term), term, Some(l), d)?;
                    Ok(Norm { g, b, rms: false })
                }
            };
            let n1 = norm(&mut ld, &n.n1, BiasTerm::Ln1)?;
            let n2 = norm(&mut ld, &n.n2, BiasTerm::Ln2)?;
            let lin = |ld: &mut Loader<'_, B>,
                       name: &str,
                       term: BiasTerm,
                       n_in: usize,
                       n_out: usize|
             -> Result<Lin<Src>> {
                let w = ld.src(&format!("{name}.weight"), &[n_out, n_in])?;
                let b = ld.bias(
                    format!("{name}.bias"),
                    cfg.has_bias(term),
                    trains(term),
                    term,
                    Some(l),
                    n_out,
                )?;
                Ok(Lin {
                    w,
                    n_in,
                    n_out,
                    in_out: false,
                    b,
                })
            };
            let layer = if arch == Arch::Gpt2 {
                // Conv1D weights are [in, out]; c_attn fuses q, k, v.
                let conv = |ld: &mut Loader<'_, B>,
                            name: &str,
                            term: BiasTerm,
                            n_in: usize,
                            n_out: usize|
                 -> Result<Lin<Src>> {
                    let w = ld.src(&format!("{name}.weight"), &[n_in, n_out])?;
                    let b = ld.bias(
                        format!("{name}.bias"),
                        true,
                        trains(term),
                        term,
                        Some(l),
                        n_out,
                    )?;
                    Ok(Lin {
                        w,
                        n_in,
                        n_out,
                        in_out: true,
                        b,
                    })
                };
                let cw = w.get_shaped(&format!("{}.weight", n.q), &[d, 3 * d])?;
                let cb = w.get_shaped(&format!("{}.bias", n.q), &[3 * d])?;
                let all_w = cw.to_f32_vec();
                let mut split = Vec::new();
                for (i, term) in [BiasTerm::Q, BiasTerm::K, BiasTerm::V]
                    .into_iter()
                    .enumerate()
                {
                    // Columns i·d..(i+1)·d of the [d, 3d] matrix, kept [in, out].
                    let mut part = Vec::with_capacity(d * d);
                    for r in 0..d {
                        part.extend_from_slice(&all_w[r * 3 * d + i * d..r * 3 * d + (i + 1) * d]);
                    }
                    let b = ld.bias_slice(
                        cb,
                        format!("{}.bias[{}]", n.q, term.short()),
                        i * d,
                        d,
                        trains(term),
                        term,
                        l,
                    );
                    // A 2-D tensor (not host values), so that the backend
                    // holds it as it holds every checkpoint matrix (bf16 on
                    // CUDA) and can stream it.
                    let name = format!("{}.weight[{}]", n.q, term.short());
                    split.push(Lin {
                        w: Src::View(TensorView::from_f32(&name, vec![d, d], &part)),
                        n_in: d,
                        n_out: d,
                        in_out: true,
                        b,
                    });
                }
                let v = split.pop().expect("v");
                let k = split.pop().expect("k");
                let q = split.pop().expect("q");
                Layer {
                    q,
                    k,
                    v,
                    o: conv(&mut ld, &n.o, BiasTerm::O, d, d)?,
                    up: conv(&mut ld, &n.up, BiasTerm::MlpIn, d, ff)?,
                    gate: None,
                    down: conv(&mut ld, &n.down, BiasTerm::MlpOut, ff, d)?,
                    n1,
                    n2,
                }
            } else {
                let q = lin(&mut ld, &n.q, BiasTerm::Q, d, qd)?;
                let k = lin(&mut ld, &n.k, BiasTerm::K, d, kvd)?;
                let v = lin(&mut ld, &n.v, BiasTerm::V, d, kvd)?;
                let o = lin(&mut ld, &n.o, BiasTerm::O, qd, d)?;
                let gate = match &n.gate {
                    Some(g) => Some(lin(&mut ld, g, BiasTerm::MlpIn, d, ff)?),
                    None => None,
                };
                let up = lin(&mut ld, &n.up, BiasTerm::MlpIn, d, ff)?;
                let down = lin(&mut ld, &n.down, BiasTerm::MlpOut, ff, d)?;
                Layer {
                    q,
                    k,
                    v,
                    o,
                    up,
                    gate,
                    down,
                    n1,
                    n2,
                }
            };
            layer_bytes.push(
                layer
                    .tensors()
                    .into_iter()
                    .map(|s| s.device_bytes(be))
                    .sum(),
            );
            match opts.offload {
                Offload::Resident => {
                    resident.push(layer.try_map(&mut |s: &Src| s.upload(be, false))?)
                }
                Offload::Stream => streamed.push(layer),
            }
        }
        let layers = match opts.offload {
            Offload::Resident => Layers::Resident(resident),
            Offload::Stream => Layers::Stream(streamed),
        };

        // Final norm: GPT-2 ln_f, OPT final_layer_norm (pre-LN only), LLaMA norm.
        let final_norm = match arch {
            Arch::Gpt2 => {
                let g = ld.weight(&format!("{p}ln_f.weight"), &[d])?;
                let b = ld.bias(
                    format!("{p}ln_f.bias"),
                    true,
                    trains(BiasTerm::EmbLn),
                    BiasTerm::EmbLn,
                    None,
                    d,
                )?;
                let b = ld.dev_bias(b)?;
                Some(Norm { g, b, rms: false })
            }
            Arch::Opt => {
                let name = format!("{p}final_layer_norm.weight");
                if cfg.norm_before && w.try_get(&name).is_some() {
                    let g = ld.weight(&name, &[d])?;
                    let b = ld.bias(
                        format!("{p}final_layer_norm.bias"),
                        true,
                        trains(BiasTerm::EmbLn),
                        BiasTerm::EmbLn,
                        None,
                        d,
                    )?;
                    let b = ld.dev_bias(b)?;
                    Some(Norm { g, b, rms: false })
                } else {
                    if trains(BiasTerm::EmbLn) && !all {
                        return Err(Error::msg(format!(
                            "--bias emb-ln: this {} model has no final LayerNorm",
                            cfg.model_type
                        )));
                    }
                    None
                }
            }
            _ => Some(Norm {
                g: ld.weight(&format!("{p}norm.weight"), &[d])?,
                b: BiasSrc::None,
                rms: true,
            }),
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let _ = tensor_or_err(w, "lm_head.weight").map_err(|e| {
                e.context(format!(
                    "{}: tie_word_embeddings is false, so an LM head is needed",
                    source.display()
                ))
            })?;
            Some(ld.weight("lm_head.weight", &[v_size, dp])?)
        };

        let lowest = ld
            .layout
            .slots
            .iter()
            .filter_map(|s| s.layer)
            .min()
            .unwrap_or(cfg.num_layers);
        if ld.layout.slots.is_empty() {
            return Err(Error::msg(format!(
                "--bias {}: {} has no such bias to train",
                BiasTerm::format_set(&opts.terms),
                cfg.model_type
            )));
        }
        Ok(Decoder {
            cfg,
            terms: opts.terms,
            layout: ld.layout,
            init: ld.init,
            added: ld.added,
            embed,
            pos,
            project_in,
            project_out,
            layers,
            final_norm,
            lm_head,
            lowest,
            recompute: opts.recompute,
            other_bytes: ld.resident_bytes,
            layer_bytes,
            streamed: Default::default(),
        })
    }

    /// Number of trainable values.
    pub fn trainable_params(&self) -> usize {
        self.layout.len
    }

    /// Upload a padded batch of token ids (`mask`: 1 real, 0 padding; left
    /// or right padding). Positions count the real tokens before each token.
    pub fn upload(
        &self,
        be: &B,
        batch: usize,
        seq: usize,
        ids: &[u32],
        mask: &[f32],
    ) -> Result<DecBatch<B>> {
        self.upload_from(be, batch, seq, ids, mask, &vec![0; batch])
    }

    fn upload_from(
        &self,
        be: &B,
        batch: usize,
        seq: usize,
        ids: &[u32],
        mask: &[f32],
        start: &[u32],
    ) -> Result<DecBatch<B>> {
        let cfg = &self.cfg;
        if batch == 0 || seq == 0 {
            return Err(Error::msg("empty batch"));
        }
        if ids.len() != batch * seq || mask.len() != batch * seq {
            return Err(Error::msg(format!(
                "batch of {batch}×{seq} tokens has {} ids and {} mask values",
                ids.len(),
                mask.len()
            )));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::msg(format!(
                "token id {bad} is outside the model's vocabulary of {} (tokenizer and model do not match)",
                cfg.vocab_size
            )));
        }
        let mut pos = vec![0u32; batch * seq];
        for b in 0..batch {
            let mut run = start[b];
            for t in 0..seq {
                if mask[b * seq + t] > 0.0 {
                    pos[b * seq + t] = run;
                    run += 1;
                }
            }
        }
        let max_pos = pos.iter().copied().max().unwrap_or(0) as usize;
        if self.pos.is_some() && max_pos >= cfg.max_position_embeddings {
            return Err(Error::msg(format!(
                "a sequence needs position {max_pos}, but the model has only {} position embeddings (lower --max-len)",
                cfg.max_position_embeddings
            )));
        }
        let off = if cfg.arch == Arch::Opt { 2 } else { 0 };
        let pos_table: Vec<u32> = pos.iter().map(|p| p + off).collect();
        let m: Vec<B::T> = mask.iter().map(|x| B::T::from_f32(*x)).collect();
        Ok(DecBatch {
            batch,
            seq,
            ids: be.upload_ids(ids),
            pos: be.upload_ids(&pos),
            pos_table: be.upload_ids(&pos_table),
            mask: be.upload(&m),
            host_mask: mask.to_vec(),
        })
    }

    /// Rows (`b·seq + t`) at which to evaluate the LM head, and the token
    /// each must predict.
    pub fn row_targets(
        &self,
        be: &B,
        x: &DecBatch<B>,
        rows: &[u32],
        targets: &[u32],
    ) -> Result<RowTargets<B>> {
        if rows.is_empty() || rows.len() != targets.len() {
            return Err(Error::msg(format!(
                "{} rows but {} targets (need at least one)",
                rows.len(),
                targets.len()
            )));
        }
        let n = (x.batch * x.seq) as u32;
        if let Some(r) = rows.iter().find(|&&r| r >= n) {
            return Err(Error::msg(format!(
                "row {r} is outside the batch of {n} tokens"
            )));
        }
        if let Some(t) = targets.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(Error::msg(format!(
                "target token {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            )));
        }
        Ok(RowTargets {
            rows: be.upload_ids(rows),
            targets: be.upload_ids(targets),
            n: rows.len(),
            host_targets: targets.to_vec(),
        })
    }

    /// A candidate-scoring batch: sequence `c` of `x` is candidate `c`
    /// (prompt + option); `rows`/`targets` are its answer tokens' rows and
    /// next tokens, `tok_cand` their candidates; `cand_ex[c]` its example;
    /// `gold[e]` the gold candidate of example `e` (an index into 0..cands).
    pub fn cand_batch(
        &self,
        be: &B,
        x: DecBatch<B>,
        rows: &[u32],
        targets: &[u32],
        tok_cand: &[u32],
        cand_ex: &[u32],
        gold: &[u32],
    ) -> Result<CandBatch<B>> {
        let rt = self.row_targets(be, &x, rows, targets)?;
        let cands = cand_ex.len();
        let examples = gold.len();
        if tok_cand.len() != rows.len()
            || tok_cand.iter().any(|&c| c as usize >= cands)
            || cand_ex.iter().any(|&e| e as usize >= examples)
            || gold.iter().any(|&g| g as usize >= cands)
        {
            return Err(Error::msg(
                "candidate batch: inconsistent candidate/example indices",
            ));
        }
        Ok(CandBatch {
            x,
            rt,
            tok_cand: be.upload_ids(tok_cand),
            cand_ex: be.upload_ids(cand_ex),
            gold: be.upload_ids(gold),
            cands,
            examples,
        })
    }

    fn bref<'a>(
        &'a self,
        b: &'a BiasSrc<B::Buf>,
        params: &'a B::Buf,
    ) -> Option<(&'a B::Buf, usize)> {
        match b {
            BiasSrc::None => None,
            BiasSrc::Frozen(buf) => Some((buf, 0)),
            BiasSrc::Slab(o) => Some((params, *o)),
        }
    }

    /// A linear map as the backend's [`Proj`].
    fn proj<'a>(&'a self, lin: &'a Lin<B::Buf>, params: &'a B::Buf) -> Proj<'a, B::Buf> {
        Proj {
            w: &lin.w,
            bias: self.bref(&lin.b, params),
            n: lin.n_out,
            tb: !lin.in_out,
        }
    }

    fn lin_fwd(
        &self,
        be: &B,
        lin: &Lin<B::Buf>,
        x: &B::Buf,
        rows: usize,
        params: &B::Buf,
    ) -> B::Buf {
        let mut y = be.output(rows * lin.n_out);
        let (m, n, k, tb) = (rows, lin.n_out, lin.n_in, !lin.in_out);
        be.linear(&mut y, x, &lin.w, self.bref(&lin.b, params), m, n, k, tb);
        y
    }

    /// `dx (+)= dy·W` (the input gradient of a linear map).
    fn lin_bwd(
        &self,
        be: &B,
        lin: &Lin<B::Buf>,
        dx: &mut B::Buf,
        dy: &B::Buf,
        rows: usize,
        acc: bool,
    ) {
        be.matmul(
            dx, dy, &lin.w, rows, lin.n_in, lin.n_out, false, lin.in_out, acc,
        );
    }

    fn norm_fwd(
        &self,
        be: &B,
        nm: &Norm<B::Buf>,
        x: &B::Buf,
        rows: usize,
        params: &B::Buf,
    ) -> (B::Buf, B::Buf, B::Buf) {
        let d = self.cfg.hidden_size;
        let (mut y, mut xh, mut rs) = (be.output(rows * d), be.output(rows * d), be.output(rows));
        if nm.rms {
            be.rmsnorm_fwd(
                &mut y,
                &mut xh,
                &mut rs,
                x,
                &nm.g,
                rows,
                d,
                self.cfg.layer_norm_eps,
            );
        } else {
            let (b, o) = self.bref(&nm.b, params).expect("LayerNorm bias");
            be.layernorm_fwd(
                &mut y,
                &mut xh,
                &mut rs,
                x,
                &nm.g,
                b,
                o,
                rows,
                d,
                self.cfg.layer_norm_eps,
            );
        }
        (y, xh, rs)
    }

    /// The norm of a residual sum, `N(s + res)` (post-LN); `s` is scratch
    /// after it. LayerNorm forms the sum as it reads the rows
    /// ([`Backend::residual_layernorm_fwd`]); RMSNorm adds first.
    fn residual_norm_fwd(
        &self,
        be: &B,
        nm: &Norm<B::Buf>,
        s: &mut B::Buf,
        res: &B::Buf,
        rows: usize,
        params: &B::Buf,
    ) -> (B::Buf, B::Buf, B::Buf) {
        let d = self.cfg.hidden_size;
        if nm.rms {
            be.add(s, res, rows * d);
            return self.norm_fwd(be, nm, s, rows, params);
        }
        let (mut y, mut xh, mut rs) = (be.output(rows * d), be.output(rows * d), be.output(rows));
        let (b, o) = self.bref(&nm.b, params).expect("LayerNorm bias");
        be.residual_layernorm_fwd(
            &mut y,
            &mut xh,
            &mut rs,
            s,
            res,
            None,
            &nm.g,
            b,
            o,
            rows,
            d,
            self.cfg.layer_norm_eps,
        );
        (y, xh, rs)
    }

    /// Norm backward: bias gradient (if trainable) and the input gradient.
    fn norm_bwd(
        &self,
        be: &B,
        nm: &Norm<B::Buf>,
        grads: &mut B::Buf,
        dy: &B::Buf,
        xh: &B::Buf,
        rs: &B::Buf,
        rows: usize,
        need_dx: bool,
    ) -> Option<B::Buf> {
        let d = self.cfg.hidden_size;
        if let Some(off) = nm.b.slab() {
            be.bias_grad(grads, off, dy, rows, d);
        }
        if !need_dx {
            return None;
        }
        let mut dx = be.output(rows * d);
        if nm.rms {
            be.rmsnorm_bwd(&mut dx, dy, xh, rs, &nm.g, rows, d);
        } else {
            be.layernorm_bwd(&mut dx, dy, xh, rs, &nm.g, rows, d);
        }
        Some(dx)
    }

    fn dims(&self, batch: usize, seq: usize) -> AttnDims {
        let c = &self.cfg;
        AttnDims::self_attn(batch, seq, c.num_heads, c.num_kv_heads, c.head_dim(), true)
    }

    /// Attention part of a layer: q, k, v (RoPE applied), attention output
    /// and lse. With a cache, k and v are written into it at `write` (per
    /// batch row: first slot) and the attention reads the cache.
    fn attn_fwd(
        &self,
        be: &B,
        layer: &Layer<B::Buf>,
        l: usize,
        n1: &B::Buf,
        x: &DecBatch<B>,
        params: &B::Buf,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> (B::Buf, B::Buf, B::Buf, B::Buf, B::Buf) {
        let c = &self.cfg;
        let n = x.batch * x.seq;
        let hd = c.head_dim();
        // q, k, v: three products of one input (packed once).
        let (mut q, mut k, mut v) = (
            be.output(n * layer.q.n_out),
            be.output(n * layer.k.n_out),
            be.output(n * layer.v.n_out),
        );
        be.linears(
            &mut [&mut q, &mut k, &mut v],
            n1,
            &[
                self.proj(&layer.q, params),
                self.proj(&layer.k, params),
                self.proj(&layer.v, params),
            ],
            n,
            layer.q.n_in,
        );
        if c.arch.is_llama_like() {
            be.rope(&mut q, &x.pos, n, c.num_heads, hd, c.rope_theta, false);
            be.rope(&mut k, &x.pos, n, c.num_kv_heads, hd, c.rope_theta, false);
        }
        let mut ctx = be.output(n * c.num_heads * hd);
        let mut lse = be.output(x.batch * c.num_heads * x.seq);
        match cache {
            None => {
                let dims = self.dims(x.batch, x.seq);
                be.attention_fwd(&mut ctx, &mut lse, &q, &k, &v, &x.mask, dims, None);
            }
            Some((kv, start)) => {
                let kvd = c.num_kv_heads * hd;
                for b in 0..x.batch {
                    let dst = (b * kv.cap + start) * kvd;
                    let src = b * x.seq * kvd;
                    be.copy(&mut kv.k[l], dst, &k, src, x.seq * kvd);
                    be.copy(&mut kv.v[l], dst, &v, src, x.seq * kvd);
                }
                let mut dims = self.dims(x.batch, x.seq);
                dims.kv_seq = kv.cap;
                dims.q_start = start;
                be.attention_fwd(
                    &mut ctx, &mut lse, &q, &kv.k[l], &kv.v[l], &kv.mask, dims, None,
                );
            }
        }
        (q, k, v, ctx, lse)
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        match &self.layers {
            Layers::Resident(v) => v.len(),
            Layers::Stream(v) => v.len(),
        }
    }

    /// Device bytes of layer weights uploaded by streamed passes so far
    /// (0 when the layers are resident).
    pub fn streamed_bytes(&self) -> u64 {
        self.streamed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether layer weights are streamed from the memory map.
    pub fn offload(&self) -> Offload {
        match &self.layers {
            Layers::Resident(_) => Offload::Resident,
            Layers::Stream(_) => Offload::Stream,
        }
    }

    /// Layer `l`'s weights on the device: borrowed when resident, uploaded
    /// now when streamed (a failed upload is a device fault, like any other
    /// allocation inside a pass).
    fn layer(&self, be: &B, l: usize) -> LayerRef<'_, B> {
        match &self.layers {
            Layers::Resident(v) => LayerRef::Resident(&v[l]),
            Layers::Stream(v) => {
                self.streamed
                    .fetch_add(self.layer_bytes[l], std::sync::atomic::Ordering::Relaxed);
                let up = v[l].try_map(&mut |s: &Src| s.upload(be, true));
                LayerRef::Uploaded(Box::new(up.unwrap_or_else(|e| {
                    device_fault(format!("{}: streaming layer {l}'s weights: {e}", be.name()))
                })))
            }
        }
    }

    /// Streamed layers: start reading layer `l`'s tensors from the memory
    /// map in the background, so that its upload (issued after the current
    /// layer's compute) finds them in the page cache.
    fn prefetch(&self, l: usize) {
        if let Layers::Stream(v) = &self.layers {
            if let Some(layer) = v.get(l) {
                let views = layer
                    .tensors()
                    .into_iter()
                    .filter_map(|s| match s {
                        Src::View(t) => Some(t.clone()),
                        Src::Host(_) => None,
                    })
                    .collect();
                crate::weights::prefetch(views);
            }
        }
    }

    /// Device memory a training step needs (an upper estimate), for
    /// choosing between resident and streamed layers. Weights count as the
    /// backend holds them ([`Backend::weight_bytes`]); activations at the
    /// backend's element size for `batch × seq` tokens with the LM head at
    /// up to `batch × seq` rows.
    pub fn memory_plan(&self, batch: usize, seq: usize) -> MemoryPlan {
        let other = self.other_bytes;
        let layer_bytes = &self.layer_bytes;
        let c = &self.cfg;
        let n = (batch * seq) as u64;
        let (d, ff, v, dp) = (
            c.hidden_size as u64,
            c.intermediate_size as u64,
            c.vocab_size as u64,
            c.word_embed_proj_dim as u64,
        );
        let (qd, kvd) = (
            (c.num_heads * c.head_dim()) as u64,
            (c.num_kv_heads * c.head_dim()) as u64,
        );
        let gated = u64::from(c.arch.is_llama_like());
        // What one layer keeps (Saved) and a layer pass's transients.
        let saved = n * (2 * d + 2 + 2 * qd + 2 * kvd + ff * (1 + gated))
            + (batch * c.num_heads * seq) as u64;
        let transient = 2 * saved + n * (3 * ff + 2 * qd + 2 * kvd + 6 * d);
        let trainable = (self.num_layers() - self.lowest.min(self.num_layers())) as u64;
        let kept = trainable * if self.recompute { n * d } else { saved };
        let head = 2 * n * v + 4 * n * d + n * dp;
        let el = std::mem::size_of::<B::T>() as u64;
        MemoryPlan {
            other_weights: other,
            largest_layer: layer_bytes.iter().copied().max().unwrap_or(0),
            all_layers: layer_bytes.iter().sum(),
            activations: (kept + transient + head + 2 * n * d) * el,
        }
    }

    /// Upload every streamed layer now: from here on the decoder runs with
    /// resident layers (what `--offload auto` does once it has seen that
    /// the model fits).
    pub fn make_resident(&mut self, be: &B) -> Result<()> {
        if let Layers::Stream(v) = &self.layers {
            let mut res = Vec::with_capacity(v.len());
            for layer in v {
                res.push(layer.try_map(&mut |s: &Src| s.upload(be, false))?);
            }
            self.layers = Layers::Resident(res);
        }
        Ok(())
    }

    /// One layer's forward pass from its input `h`: the activations its
    /// backward pass reads, and its output.
    #[allow(clippy::too_many_arguments)]
    fn layer_fwd(
        &self,
        be: &B,
        layer: &Layer<B::Buf>,
        l: usize,
        h: &B::Buf,
        x: &DecBatch<B>,
        params: &B::Buf,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> (Saved<B>, B::Buf) {
        let c = &self.cfg;
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let n = x.batch * x.seq;
        let mlp = |inp: &B::Buf| -> (B::Buf, B::Buf, Option<B::Buf>) {
            match &layer.gate {
                Some(g) => {
                    // The gate, then up (kept) and silu(gate)·up, one op
                    // (CUDA: in the up product's epilogue).
                    let gt = self.lin_fwd(be, g, inp, n, params);
                    let (lin, mut up, mut hm) = (&layer.up, be.output(n * ff), be.output(n * ff));
                    let (bias, k, tb) = (self.bref(&lin.b, params), lin.n_in, !lin.in_out);
                    be.linear_swiglu(&mut up, &mut hm, &gt, inp, &lin.w, bias, n, ff, k, tb);
                    let m = self.lin_fwd(be, &layer.down, &hm, n, params);
                    (m, gt, Some(up))
                }
                None => {
                    // f (kept) and m = act(f)·down (act(f): the first
                    // product's epilogue).
                    let (up, down) = (&layer.up, &layer.down);
                    let (mut f, mut m) = (be.output(n * ff), be.output(n * down.n_out));
                    let layers = (self.proj(up, params), self.proj(down, params));
                    be.mlp_fwd(&mut f, &mut m, c.hidden_act, inp, layers, n, up.n_in);
                    (m, f, None)
                }
            }
        };
        // Pre-LN: x1 = h + attn(N1(h)), out = x1 + mlp(N2(x1)).
        // Post-LN: x1 = N1(h + attn(h)), out = N2(x1 + mlp(x1)).
        let ((n1, xhat1, rstd1), (q, k, v, ctx, lse), x1);
        if c.norm_before {
            (n1, xhat1, rstd1) = self.norm_fwd(be, &layer.n1, h, n, params);
            (q, k, v, ctx, lse) = self.attn_fwd(be, layer, l, &n1, x, params, cache);
            let mut a = self.lin_fwd(be, &layer.o, &ctx, n, params);
            be.add(&mut a, h, n * d);
            x1 = a;
        } else {
            (q, k, v, ctx, lse) = self.attn_fwd(be, layer, l, h, x, params, cache);
            let mut a = self.lin_fwd(be, &layer.o, &ctx, n, params);
            (x1, xhat1, rstd1) = self.residual_norm_fwd(be, &layer.n1, &mut a, h, n, params);
        }
        let (out, f, up, xhat2, rstd2);
        if c.norm_before {
            let n2;
            (n2, xhat2, rstd2) = self.norm_fwd(be, &layer.n2, &x1, n, params);
            let (mut m, ff_in, u) = mlp(&n2);
            be.add(&mut m, &x1, n * d);
            (out, f, up) = (m, ff_in, u);
        } else {
            let (mut m, ff_in, u) = mlp(&x1);
            (out, xhat2, rstd2) = self.residual_norm_fwd(be, &layer.n2, &mut m, &x1, n, params);
            (f, up) = (ff_in, u);
        }
        let s = Saved {
            xhat1,
            rstd1,
            q,
            k,
            v,
            ctx,
            lse,
            xhat2,
            rstd2,
            f,
            up,
        };
        (s, out)
    }

    /// The layers. Returns what each layer keeps for the backward pass (when
    /// `save`, for layers at or above the lowest trainable one: all its
    /// activations, or with `recompute` only its input) and the last hidden
    /// state. Streamed layers are uploaded one ahead: layer `l+1`'s upload
    /// is issued once layer `l`'s compute is queued, so at most two layers'
    /// weights are on the device.
    fn forward(
        &self,
        be: &B,
        params: &B::Buf,
        x: &DecBatch<B>,
        save: bool,
        mut cache: Option<(&mut KvCache<B>, usize)>,
    ) -> (Vec<Option<Kept<B>>>, B::Buf) {
        let c = &self.cfg;
        let d = c.hidden_size;
        let n = x.batch * x.seq;
        let dp = c.word_embed_proj_dim;
        let mut e = be.output(n * dp);
        be.embedding_fwd(&mut e, &self.embed, &x.ids, n, dp, false);
        let mut h = match &self.project_in {
            Some(pi) => self.lin_fwd(be, pi, &e, n, params),
            None => e,
        };
        if let Some(pt) = &self.pos {
            be.embedding_fwd(&mut h, pt, &x.pos_table, n, d, true);
        }
        let nl = self.num_layers();
        let mut kept = Vec::with_capacity(nl);
        let mut next = (nl > 0).then(|| self.layer(be, 0));
        for l in 0..nl {
            let layer = next.take().expect("layer uploaded one ahead");
            self.prefetch(l + 1);
            let cache_l = cache.as_mut().map(|(kv, s)| (&mut **kv, *s));
            let (s, out) = self.layer_fwd(be, &layer, l, &h, x, params, cache_l);
            if l + 1 < nl {
                next = Some(self.layer(be, l + 1));
            }
            drop(layer);
            if !(save && l >= self.lowest) {
                kept.push(None);
            } else if self.recompute {
                drop(s);
                kept.push(Some(Kept::Input(h)));
            } else {
                kept.push(Some(Kept::All(s)));
            }
            h = out;
        }
        (kept, h)
    }

    /// The head at `r` gathered rows: final norm, project_out, logits.
    fn top_forward(
        &self,
        be: &B,
        params: &B::Buf,
        h: &B::Buf,
        rows: &B::Ids,
        r: usize,
    ) -> TopSaved<B> {
        let c = &self.cfg;
        let d = c.hidden_size;
        let mut hs = be.output(r * d);
        be.embedding_fwd(&mut hs, h, rows, r, d, false);
        let (hs, xhat, rstd) = match &self.final_norm {
            Some(nm) => {
                let (y, xh, rs) = self.norm_fwd(be, nm, &hs, r, params);
                (y, Some(xh), Some(rs))
            }
            None => (hs, None, None),
        };
        let hs = match &self.project_out {
            Some(po) => self.lin_fwd(be, po, &hs, r, params),
            None => hs,
        };
        TopSaved { xhat, rstd, hs }
    }

    /// The LM head: logits `[r, vocab]` from its input `hs` `[r, dp]`.
    fn head_fwd(&self, be: &B, hs: &B::Buf, r: usize) -> B::Buf {
        let c = &self.cfg;
        let (dp, vs) = (c.word_embed_proj_dim, c.vocab_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = be.output(r * vs);
        be.matmul(&mut logits, hs, head, r, vs, dp, false, true, false);
        logits
    }

    /// The head's input gradient `[r, dp]` from `dlogits` `[r, vocab]`.
    fn head_bwd(&self, be: &B, dlogits: &B::Buf, r: usize) -> B::Buf {
        let c = &self.cfg;
        let (dp, vs) = (c.word_embed_proj_dim, c.vocab_size);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut dhs = be.output(r * dp);
        be.matmul(&mut dhs, dlogits, head, r, dp, vs, false, false, false);
        dhs
    }

    /// Mean next-token cross-entropy at the loss rows and the head's input
    /// gradient, [`HEAD_CHUNK`] rows at a time: the `[rows, vocab]` logits
    /// and their gradient never exist whole.
    fn head_loss(&self, be: &B, top: &TopSaved<B>, rt: &RowTargets<B>) -> (f64, B::Buf) {
        let dp = self.cfg.word_embed_proj_dim;
        let r = rt.n;
        let scale = 1.0 / r as f64;
        if r <= HEAD_CHUNK {
            let (total, dhs) = self.head_chunk(be, &top.hs, &rt.targets, r, scale);
            return (total / r as f64, dhs);
        }
        let mut dhs = be.output(r * dp);
        let mut total = 0.0;
        for r0 in (0..r).step_by(HEAD_CHUNK) {
            let n = HEAD_CHUNK.min(r - r0);
            let mut hc = be.output(n * dp);
            be.copy(&mut hc, 0, &top.hs, r0 * dp, n * dp);
            let targets = be.upload_ids(&rt.host_targets[r0..r0 + n]);
            let (sum_c, dc) = self.head_chunk(be, &hc, &targets, n, scale);
            total += sum_c;
            be.copy(&mut dhs, r0 * dp, &dc, 0, n * dp);
        }
        (total / r as f64, dhs)
    }

    /// Cross-entropy of `n` head inputs `hs` against `targets`: the sum of
    /// their losses and the head-input gradient of `scale ×` that sum.
    fn head_chunk(
        &self,
        be: &B,
        hs: &B::Buf,
        targets: &B::Ids,
        n: usize,
        scale: f64,
    ) -> (f64, B::Buf) {
        let vs = self.cfg.vocab_size;
        let logits = self.head_fwd(be, hs, n);
        let (mut losses, mut dl) = (be.output(n), be.output(n * vs));
        be.cross_entropy(&mut losses, &mut dl, &logits, targets, n, vs, scale);
        drop(logits);
        (sum(be, &losses), self.head_bwd(be, &dl, n))
    }

    /// The backward pass from `dlogits` (`[r, vocab]`), accumulating into
    /// `grads`. Layers run in reverse; a layer that kept only its input is
    /// run forward again first; streamed layers are uploaded one ahead (in
    /// reverse order), as in the forward pass.
    fn backward(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        x: &DecBatch<B>,
        saved: &[Option<Kept<B>>],
        top: &TopSaved<B>,
        rows: &B::Ids,
        r: usize,
        mut dhs: B::Buf,
    ) {
        let c = &self.cfg;
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let (nh, nkv, hd) = (c.num_heads, c.num_kv_heads, c.head_dim());
        let n = x.batch * x.seq;
        let nl = self.num_layers();
        if let Some(po) = &self.project_out {
            let mut t = be.output(r * d);
            self.lin_bwd(be, po, &mut t, &dhs, r, false);
            dhs = t;
        }
        let need_layers = self.lowest < nl;
        if let Some(nm) = &self.final_norm {
            let (xh, rs) = (
                top.xhat.as_ref().expect("xhat"),
                top.rstd.as_ref().expect("rstd"),
            );
            match self.norm_bwd(be, nm, grads, &dhs, xh, rs, r, need_layers) {
                Some(t) => dhs = t,
                None => return,
            }
        }
        if !need_layers {
            return;
        }
        let mut dh = be.zeros(n * d);
        be.scatter_add_rows(&mut dh, &dhs, rows, r, d);
        let dims = self.dims(x.batch, x.seq);
        let (qd, kvd) = (nh * hd, nkv * hd);
        let mut next = Some(self.layer(be, nl - 1));
        for l in (self.lowest..nl).rev() {
            let layer_ref = next.take().expect("layer uploaded one ahead");
            let layer: &Layer<B::Buf> = &layer_ref;
            if l > self.lowest {
                self.prefetch(l - 1);
            }
            let recomputed;
            let s = match saved[l]
                .as_ref()
                .expect("saved activations of a trainable layer")
            {
                Kept::All(s) => s,
                Kept::Input(h) => {
                    recomputed = self.layer_fwd(be, layer, l, h, x, params, None).0;
                    &recomputed
                }
            };
            let need_dx = l > self.lowest;
            // Gradient at the MLP's output (dm) and the MLP backward, to the
            // gradient at the MLP's input.
            let mlp_bwd = |grads: &mut B::Buf, dm: &B::Buf| -> B::Buf {
                if let Some(off) = layer.down.b.slab() {
                    be.bias_grad(grads, off, dm, n, d);
                }
                let mut dn = be.output(n * d);
                match &layer.gate {
                    Some(g) => {
                        // dgate, dup from dm·W_down, one op (CUDA: in the
                        // product's epilogue).
                        let (down, mut dg, mut du) =
                            (&layer.down, be.output(n * ff), be.output(n * ff));
                        let up = s.up.as_ref().expect("up");
                        let (k, tb) = (down.n_out, down.in_out);
                        be.matmul_swiglu_grad(
                            &mut dg, &mut du, &s.f, up, dm, &down.w, n, ff, k, tb,
                        );
                        if let Some(off) = g.b.slab() {
                            be.bias_grad(grads, off, &dg, n, ff);
                        }
                        if let Some(off) = layer.up.b.slab() {
                            be.bias_grad(grads, off, &du, n, ff);
                        }
                        self.lin_bwd(be, g, &mut dn, &dg, n, false);
                        self.lin_bwd(be, &layer.up, &mut dn, &du, n, true);
                    }
                    None => {
                        // df = act'(f) ⊙ (dm·W_down) and the up-projection's
                        // bias gradient, one op (CUDA: both in the product's
                        // epilogue).
                        let (down, mut df) = (&layer.down, be.output(n * ff));
                        let (k, tb) = (down.n_out, down.in_out);
                        let db = layer.up.b.slab().map(|off| (&mut *grads, off));
                        let act = c.hidden_act;
                        be.matmul_act_grad(&mut df, act, &s.f, dm, &down.w, db, n, ff, k, tb);
                        self.lin_bwd(be, &layer.up, &mut dn, &df, n, false);
                    }
                }
                dn
            };
            // Attention backward from the gradient at its output projection's
            // output; returns the gradient at its input (if wanted).
            let attn_bwd = |grads: &mut B::Buf, da: &B::Buf, want_dx: bool| -> Option<B::Buf> {
                if let Some(off) = layer.o.b.slab() {
                    be.bias_grad(grads, off, da, n, d);
                }
                let any_qkv = [&layer.q, &layer.k, &layer.v]
                    .iter()
                    .any(|l| l.b.slab().is_some());
                if !(want_dx || any_qkv) {
                    return None;
                }
                let mut dctx = be.output(n * qd);
                self.lin_bwd(be, &layer.o, &mut dctx, da, n, false);
                let (mut dq, mut dk, mut dv) =
                    (be.output(n * qd), be.output(n * kvd), be.output(n * kvd));
                be.attention_bwd(
                    &mut dq, &mut dk, &mut dv, &dctx, &s.q, &s.k, &s.v, &s.ctx, &s.lse, &x.mask,
                    dims, None,
                );
                if c.arch.is_llama_like() {
                    be.rope(&mut dq, &x.pos, n, nh, hd, c.rope_theta, true);
                    be.rope(&mut dk, &x.pos, n, nkv, hd, c.rope_theta, true);
                }
                for (lin, g, w) in [
                    (&layer.q, &dq, qd),
                    (&layer.k, &dk, kvd),
                    (&layer.v, &dv, kvd),
                ] {
                    if let Some(off) = lin.b.slab() {
                        be.bias_grad(grads, off, g, n, w);
                    }
                }
                if !want_dx {
                    return None;
                }
                let mut dn = be.output(n * d);
                self.lin_bwd(be, &layer.q, &mut dn, &dq, n, false);
                self.lin_bwd(be, &layer.k, &mut dn, &dk, n, true);
                self.lin_bwd(be, &layer.v, &mut dn, &dv, n, true);
                Some(dn)
            };
            if c.norm_before {
                // out = x1 + mlp(N2(x1)); x1 = x + attn(N1(x))
                let dn2 = mlp_bwd(grads, &dh);
                let mut dx1 = dh;
                if let Some(t) =
                    self.norm_bwd(be, &layer.n2, grads, &dn2, &s.xhat2, &s.rstd2, n, true)
                {
                    be.add(&mut dx1, &t, n * d);
                }
                let want = need_dx || layer.n1.b.slab().is_some();
                let dn1 = attn_bwd(grads, &dx1, want);
                if let Some(dn1) = dn1 {
                    if let Some(t) =
                        self.norm_bwd(be, &layer.n1, grads, &dn1, &s.xhat1, &s.rstd1, n, need_dx)
                    {
                        be.add(&mut dx1, &t, n * d);
                    }
                }
                dh = dx1;
            } else {
                // out = N2(x1 + mlp(x1)); x1 = N1(x + attn(x))
                let r2 = self
                    .norm_bwd(be, &layer.n2, grads, &dh, &s.xhat2, &s.rstd2, n, true)
                    .expect("dx");
                let dn = mlp_bwd(grads, &r2);
                let mut dx1 = r2;
                be.add(&mut dx1, &dn, n * d);
                let r1 = self
                    .norm_bwd(be, &layer.n1, grads, &dx1, &s.xhat1, &s.rstd1, n, true)
                    .expect("dx");
                let dn = attn_bwd(grads, &r1, need_dx);
                let mut dx = r1;
                if let Some(t) = dn {
                    be.add(&mut dx, &t, n * d);
                }
                dh = dx;
            }
            if !need_dx {
                break;
            }
            next = Some(self.layer(be, l - 1));
        }
    }

    /// Logits `[rows, vocab]` at the given rows, in evaluation mode.
    pub fn logits_at(
        &self,
        be: &B,
        params: &B::Buf,
        x: &DecBatch<B>,
        rt: &RowTargets<B>,
    ) -> Vec<B::T> {
        let (_, h) = self.forward(be, params, x, false, None);
        let top = self.top_forward(be, params, &h, &rt.rows, rt.n);
        be.download(&self.head_fwd(be, &top.hs, rt.n))
    }

    /// Token-level LM loss (mean cross-entropy of the target tokens at the
    /// given rows: teacher forcing) and its bias gradient, **accumulated**
    /// into `grads`. Returns the mean loss.
    pub fn lm_loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        x: &DecBatch<B>,
        rt: &RowTargets<B>,
    ) -> f64 {
        let (saved, h) = self.forward(be, params, x, true, None);
        let top = self.top_forward(be, params, &h, &rt.rows, rt.n);
        let (loss, dhs) = self.head_loss(be, &top, rt);
        self.backward(be, params, grads, x, &saved, &top, &rt.rows, rt.n, dhs);
        loss
    }

    /// Candidate-scoring loss (mean over examples) and its bias gradient,
    /// **accumulated** into `grads`. Returns the loss and every candidate's
    /// length-normalised log-likelihood.
    pub fn candidate_loss_and_grad(
        &self,
        be: &B,
        params: &B::Buf,
        grads: &mut B::Buf,
        cb: &CandBatch<B>,
    ) -> (f64, Vec<f64>) {
        let (saved, h) = self.forward(be, params, &cb.x, true, None);
        let top = self.top_forward(be, params, &h, &cb.rt.rows, cb.rt.n);
        let logits = self.head_fwd(be, &top.hs, cb.rt.n);
        let (loss, scores, dl) = self.cand_loss(be, &logits, cb);
        drop(logits);
        let dhs = self.head_bwd(be, &dl, cb.rt.n);
        drop(dl);
        self.backward(
            be,
            params,
            grads,
            &cb.x,
            &saved,
            &top,
            &cb.rt.rows,
            cb.rt.n,
            dhs,
        );
        (loss, scores)
    }

    /// Candidate scores (length-normalised log-likelihoods) and the loss, in
    /// evaluation mode.
    pub fn candidate_scores(&self, be: &B, params: &B::Buf, cb: &CandBatch<B>) -> (f64, Vec<f64>) {
        let (_, h) = self.forward(be, params, &cb.x, false, None);
        let top = self.top_forward(be, params, &h, &cb.rt.rows, cb.rt.n);
        let logits = self.head_fwd(be, &top.hs, cb.rt.n);
        let (loss, scores, _) = self.cand_loss(be, &logits, cb);
        (loss, scores)
    }

    fn cand_loss(&self, be: &B, logits: &B::Buf, cb: &CandBatch<B>) -> (f64, Vec<f64>, B::Buf) {
        let vs = self.cfg.vocab_size;
        let r = cb.rt.n;
        let mut tok_loss = be.output(r);
        let mut dl = be.output(r * vs);
        be.cross_entropy(&mut tok_loss, &mut dl, logits, &cb.rt.targets, r, vs, 1.0);
        let (mut ex_loss, mut scores, mut row_w) =
            (be.output(cb.examples), be.output(cb.cands), be.output(r));
        let idx = CandidateIndex {
            tok_cand: &cb.tok_cand,
            cand_ex: &cb.cand_ex,
            gold: &cb.gold,
            rows: r,
            cands: cb.cands,
            examples: cb.examples,
        };
        be.candidate_loss(
            &mut ex_loss,
            &mut scores,
            &mut row_w,
            &tok_loss,
            &idx,
            1.0 / cb.examples as f64,
        );
        be.scale_rows(&mut dl, &row_w, r, vs);
        let loss = sum(be, &ex_loss) / cb.examples as f64;
        let scores = be.download(&scores).iter().map(|v| v.to_f64()).collect();
        (loss, scores, dl)
    }

    /// Greedy decoding with a KV cache: continues each prompt (no padding
    /// inside a prompt) by up to `max_new` tokens, stopping a row when
    /// `stop(row_tokens_so_far)` says so (e.g. a newline or EOS). Returns the
    /// generated tokens of each prompt (the stop token included).
    pub fn generate_greedy(
        &self,
        be: &B,
        params: &B::Buf,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop: &dyn Fn(&[u32]) -> bool,
    ) -> Result<Vec<Vec<u32>>> {
        let c = &self.cfg;
        let nb = prompts.len();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); nb];
        if nb == 0 || max_new == 0 {
            return Ok(out);
        }
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(Error::msg("generation: empty prompt"));
        }
        let t0 = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
        let cap = t0 + max_new;
        // Left padding, so that every row's next token comes at the same slot.
        let mut ids = vec![c.pad_token_id; nb * t0];
        let mut mask = vec![0f32; nb * t0];
        for (b, p) in prompts.iter().enumerate() {
            let o = b * t0 + t0 - p.len();
            ids[o..o + p.len()].copy_from_slice(p);
            mask[o..o + p.len()].fill(1.0);
        }
        let mut cmask = vec![1f32; nb * cap];
        for b in 0..nb {
            cmask[b * cap..b * cap + t0].copy_from_slice(&mask[b * t0..(b + 1) * t0]);
        }
        let kvd = c.num_kv_heads * c.head_dim();
        let cm: Vec<B::T> = cmask.iter().map(|x| B::T::from_f32(*x)).collect();
        let mut kv = KvCache {
            k: (0..self.num_layers())
                .map(|_| be.zeros(nb * cap * kvd))
                .collect(),
            v: (0..self.num_layers())
                .map(|_| be.zeros(nb * cap * kvd))
                .collect(),
            cap,
            mask: be.upload(&cm),
        };
        let x = self.upload(be, nb, t0, &ids, &mask)?;
        let (_, h) = self.forward(be, params, &x, false, Some((&mut kv, 0)));
        let last: Vec<u32> = (0..nb).map(|b| (b * t0 + t0 - 1) as u32).collect();
        let mut next = self.argmax_rows(be, params, &h, &last);
        let mut done = vec![false; nb];
        let lens: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
        for step in 0..max_new {
            for b in 0..nb {
                if !done[b] {
                    out[b].push(next[b]);
                    if stop(&out[b]) || Some(next[b]) == c.eos_token_id {
                        done[b] = true;
                    }
                }
            }
            if done.iter().all(|d| *d) || step + 1 == max_new {
                break;
            }
            let start: Vec<u32> = lens.iter().map(|l| l + step as u32).collect();
            let ones = vec![1f32; nb];
            let xs = self.upload_from(be, nb, 1, &next, &ones, &start)?;
            let (_, h) = self.forward(be, params, &xs, false, Some((&mut kv, t0 + step)));
            let rows: Vec<u32> = (0..nb as u32).collect();
            next = self.argmax_rows(be, params, &h, &rows);
        }
        Ok(out)
    }

    fn argmax_rows(&self, be: &B, params: &B::Buf, h: &B::Buf, rows: &[u32]) -> Vec<u32> {
        let vs = self.cfg.vocab_size;
        let ids = be.upload_ids(rows);
        let top = self.top_forward(be, params, h, &ids, rows.len());
        let lg = be.download(&self.head_fwd(be, &top.hs, rows.len()));
        (0..rows.len())
            .map(|r| crate::float::argmax(&lg[r * vs..(r + 1) * vs]) as u32)
            .collect()
    }
}

fn sum<B: Backend>(be: &B, buf: &B::Buf) -> f64 {
    be.download(buf).iter().map(|v| v.to_f64()).sum()
}
