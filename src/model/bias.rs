//! Which biases train: the bias-term vocabulary (`--bias v`, `q,k`, `all`)
//! and the trainable slab that holds them contiguously, with the task head.

use crate::error::{Error, Result};

/// A bias term, repeated in every layer (or once, for `EmbLn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BiasTerm {
    /// Query projection bias `b_q`.
    Q,
    /// Key projection bias `b_k` (its gradient is exactly zero in softmax
    /// attention: a per-query constant shifts every score alike).
    K,
    /// Value projection bias `b_v` — BEFT's recommended choice.
    V,
    /// Attention output projection bias.
    O,
    /// First MLP projection (intermediate / fc1 / up) bias.
    MlpIn,
    /// Second MLP projection (output / fc2 / down) bias.
    MlpOut,
    /// LayerNorm after attention (its bias, beta).
    Ln1,
    /// LayerNorm after the MLP (its bias, beta).
    Ln2,
    /// The embedding LayerNorm's bias.
    EmbLn,
}

impl BiasTerm {
    /// Every term, in slab order within a layer.
    pub const ALL: [BiasTerm; 9] = [
        BiasTerm::Q,
        BiasTerm::K,
        BiasTerm::V,
        BiasTerm::O,
        BiasTerm::MlpIn,
        BiasTerm::MlpOut,
        BiasTerm::Ln1,
        BiasTerm::Ln2,
        BiasTerm::EmbLn,
    ];

    /// The short name used on the command line and in files.
    pub fn short(self) -> &'static str {
        match self {
            BiasTerm::Q => "q",
            BiasTerm::K => "k",
            BiasTerm::V => "v",
            BiasTerm::O => "o",
            BiasTerm::MlpIn => "mlp-in",
            BiasTerm::MlpOut => "mlp-out",
            BiasTerm::Ln1 => "ln1",
            BiasTerm::Ln2 => "ln2",
            BiasTerm::EmbLn => "emb-ln",
        }
    }

    fn parse_one(s: &str) -> Option<BiasTerm> {
        Some(match s {
            "q" | "query" | "b_q" => BiasTerm::Q,
            "k" | "key" | "b_k" => BiasTerm::K,
            "v" | "value" | "b_v" => BiasTerm::V,
            "o" | "out" | "attn-out" | "attention-output" => BiasTerm::O,
            "mlp-in" | "mlp_in" | "intermediate" | "fc1" | "up" => BiasTerm::MlpIn,
            "mlp-out" | "mlp_out" | "output" | "fc2" | "down" => BiasTerm::MlpOut,
            "ln1" | "ln-1" | "layernorm1" => BiasTerm::Ln1,
            "ln2" | "ln-2" | "layernorm2" => BiasTerm::Ln2,
            "emb-ln" | "emb_ln" | "embeddings" | "ln0" => BiasTerm::EmbLn,
            _ => return None,
        })
    }

    /// Parse `--bias`: `v`, `q,k`, `all` (every bias: BitFit), ... Returns the
    /// terms sorted and without repeats.
    pub fn parse_set(spec: &str) -> Result<Vec<BiasTerm>> {
        let mut out = Vec::new();
        for part in spec
            .split(',')
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty())
        {
            if part == "all" || part == "bitfit" {
                out.extend(BiasTerm::ALL);
                continue;
            }
            match BiasTerm::parse_one(&part) {
                Some(t) => out.push(t),
                None => {
                    return Err(Error::msg(format!(
                        "--bias: unknown bias term '{part}' (known: q, k, v, o, mlp-in, mlp-out, ln1, ln2, emb-ln, all)"
                    )))
                }
            }
        }
        if out.is_empty() {
            return Err(Error::msg(
                "--bias: no bias term given (e.g. --bias v, --bias q,k, --bias all)",
            ));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The terms a biases file was trained on, from its `bias_terms`
    /// metadata (`spec`); `v`, BEFT's default, when there is none.
    pub fn trained_set(spec: Option<&str>) -> Result<Vec<BiasTerm>> {
        match spec {
            Some(t) => BiasTerm::parse_set(t),
            None => Ok(vec![BiasTerm::V]),
        }
    }

    /// Format a set back to its command-line form.
    pub fn format_set(terms: &[BiasTerm]) -> String {
        if BiasTerm::ALL.iter().all(|t| terms.contains(t)) {
            return "all".to_string();
        }
        terms
            .iter()
            .map(|t| t.short())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What a slab entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A bias term of layer `layer` (or the embedding LayerNorm).
    Bias(BiasTerm),
    /// The pooler's dense bias (BERT pooler / RoBERTa classifier.dense).
    PoolerBias,
    /// The classifier's weight `[num_labels, hidden]`.
    HeadWeight,
    /// The classifier's bias.
    HeadBias,
}

/// One tensor in the trainable slab.
#[derive(Clone, Debug, PartialEq)]
pub struct Slot {
    /// The Hugging Face parameter name (used in saved files and adapters).
    pub name: String,
    pub kind: SlotKind,
    pub layer: Option<usize>,
    pub offset: usize,
    pub shape: Vec<usize>,
}

impl Slot {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The layout of the trainable slab: every trainable tensor, contiguous.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SlabLayout {
    pub slots: Vec<Slot>,
    pub len: usize,
}

impl SlabLayout {
    /// Copy every slot's tensor from a trained-biases file into `values`
    /// (the slab, laid out by `self`); a missing or misshapen tensor is an
    /// error naming `path`.
    pub fn read_values(
        &self,
        store: &crate::weights::WeightStore,
        path: &std::path::Path,
        values: &mut [f64],
    ) -> Result<()> {
        for slot in &self.slots {
            let t = store
                .get_shaped(&slot.name, &slot.shape)
                .map_err(|e| e.context(path.display()))?;
            values[slot.offset..slot.offset + slot.len()].copy_from_slice(&t.to_f64_vec());
        }
        Ok(())
    }

    pub fn push(
        &mut self,
        name: String,
        kind: SlotKind,
        layer: Option<usize>,
        shape: Vec<usize>,
    ) -> usize {
        let off = self.len;
        let n: usize = shape.iter().product();
        self.slots.push(Slot {
            name,
            kind,
            layer,
            offset: off,
            shape,
        });
        self.len += n;
        off
    }

    /// The slot holding a given bias of a given layer, if trainable.
    pub fn find(&self, kind: SlotKind, layer: Option<usize>) -> Option<&Slot> {
        self.slots
            .iter()
            .find(|s| s.kind == kind && s.layer == layer)
    }

    /// Number of trainable values that are biases (excluding the head weight).
    pub fn bias_params(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.kind != SlotKind::HeadWeight)
            .map(|s| s.len())
            .sum()
    }
}
