//! The memory planner (`modpo-trainer plan`): the peak memory of a training step predicted
//! from the shapes alone, broken into its parts, and the fastest setting that fits a memory
//! budget (issue 22, item 1).
//!
//! # What a step holds at its peak
//!
//! Notation: rows `R` of a forward, each `T` tokens (padded); with a shared prompt, response
//! b's gathered view `[prompt | b]` of `T2` tokens; `N` scored tokens (every response token);
//! hidden `H`, query width `Q = heads x head_dim`, key/value width `KV = kv_heads x
//! head_dim`, MLP width `F`, vocabulary `V`, `L` decoder layers; `s` bytes per activation
//! (bf16 2, f32 4); `rt` the stacked adapter rank of a projection in the pass (`r` at w = 0,
//! `(k + 1) r` for the k + 1 blocks, `k r` without a shared block; a unit pass run alone at
//! w = 1_i runs the shared block and block i only, `2 r`, or `r` without a shared block).
//!
//! **Saved for backward, per decoder layer**, read off the forward (`model/llama.rs`,
//! `model/llama/layout.rs`, `model/adapter.rs`) and what each ATen backward node keeps
//! (`torch/csrc/autograd/generated/Functions.h` of the pinned torch: a node keeps an input
//! only when another input needs its gradient, so a frozen weight's `mm` keeps nothing new):
//!
//! | tensor | kept by | bytes per token |
//! |---|---|---|
//! | layer input (f32; a bf16 model keeps the f32 copy it normalises) + 1/rms | `FusedRmsNormBackward0` | `4H + 4` |
//! | normed attention input | the adapters' `x A^T` of q, k, v (one tensor) | `H s` |
//! | `(x A^T) * scale`, one per projection | `AddmmBackward0` (`addmm_` of `h B^T`) | `7 rt s` |
//! | q, k, v after rotary, the attention output, logsumexp | SDPA (flash / efficient) | `(2Q + 2KV) s + 4 heads` |
//! | middle residual (f32 as above) + 1/rms | the second norm | `4H + 4` |
//! | normed MLP input | gate and up adapters | `H s` |
//! | gate (silu input), silu(gate), up, silu(gate) * up | `SiluBackward0`, `MulBackward0`, down's adapter | `4F s` |
//!
//! The attention output of the causal kernels is laid out `[b, t, heads, d]`, so merging the
//! heads is a view and o_proj's adapter keeps that same tensor. Shared-prompt rows run their
//! first attention over the first `T1` tokens only (the longest prompt + a), so its output
//! and logsumexp are `T1` long, and add, per row: b's gathered q, k, v and its second
//! attention output over `T2` tokens (`T2 (2Q + 2KV) s + 4 heads T2`), the concatenation of
//! both outputs that the merging `gather` keeps (`GatherBackward0` keeps its input:
//! `(T1 + T2) Q s`) and the merged heads, a copy since the gather's output is
//! `[b, heads, t, d]` (`T Q s`). So per layer:
//!
//! ```text
//! A_layer = R T (8H + 8 + 2H s + 7 rt s + 4F s + (2Q + 2KV) s + 4 heads)
//!         + shared: R [T2 ((3Q + 2KV) s + 4 heads) + (T1 + T) Q s - (T - T1) (Q s + 4 heads)]
//! ```
//!
//! The last layer (`DecoderLayer::forward_at`, `CausalLm::hidden_states_at`) runs its norm,
//! q, k, v and attention at every token and the rest at the `N` positions that predict a
//! response token only, where o_proj's adapter keeps the selected attention output (a copy):
//!
//! ```text
//! A_last = R T (4H + 4 + H s + 3 rt s + (2Q + 2KV) s + 4 heads) + shared
//!        + N (4H + 4 + H s + Q s + 4 rt s + 4F s)
//! ```
//!
//! The head (`logps.rs` `token_logps`) gets those `N` rows: the final norm's input
//! `N (4H + 4)`, its output `N H s` and each chunk's `d log p / d h`, kept for the backward,
//! `N H s`; it runs the LM head and log-softmax over chunks of `c = min(N, 2^26 / V)` rows: at
//! a chunk's backward the f32 log-softmax result, the gradient scattered into a zero `[c, V]`
//! f32 tensor and the log-softmax's input gradient exist at once, `12 c V` bytes, plus the
//! `[c, V]` cast of the logits when `s < 4` (`c V s`). The backward of a layer then holds,
//! besides what is still saved, the gradients of the MLP (`3 F s` per token: of `silu * up`,
//! of each factor; the last layer's at its `N` positions) and of the residual stream and the
//! normed inputs (`3 H s` per token). With `head_kept = N (4H + 4) + N H s`:
//!
//! ```text
//! forward peak  = (L - 1) A_layer + A_last + N (4H + 4) + 2 N H s + head_chunk
//! backward peak = (L - 1) A_layer + head_kept
//!                 + max(A_last + N 3F s + R T 3H s, R T (3F + 3H) s if L > 1)
//! ```
//!
//! With recomputation (`[train] recompute_activations`, `CausalLm::backward_recomputing`) the
//! decoder keeps each block's input (`R T H s` per layer, the last layer's with them); the last
//! layer and the head run with autograd, then one earlier block at a time is rebuilt:
//! `L R T H s + max(A_last + max(head, head_kept + N 3F s + R T 4H s), A_layer + R T (3F + 5H)
//! s)`, the extra `H s` the gradient of the last layer's input, the extra `2 H s` of a block its
//! output and the gradient arriving from above.
//!
//! The passes of a step are one forward over `passes x B` rows when batched, else `B` rows
//! with a backward after each (`[method] batch_passes`). Beside the activations: the base
//! weights (in their dtype), the adapters (f32) with the trained ones' f32 gradients and
//! AdamW's two f32 moments (and for AdaLoRA the allocator's two f32 averages), what the
//! all-reduce adds (nothing on NCCL, which reduces the optimizer's flat gradient buffer in
//! place; MPI on a CPU reduces it into one host receive buffer of the same size; nothing on
//! one process), and the runtime: on a CPU the process before any tensor (libtorch, MKL,
//! the allocator: [`CPU_RUNTIME_BYTES`], measured),
//! on a GPU the CUDA context, cuBLAS workspaces and NCCL ([`CUDA_RUNTIME_BYTES`], stated, not
//! measured here). The reference log-probs are cached on the host (8 bytes per pair); their
//! pass before stage 1 is a no-grad forward of the same rows, below stage 1's step.
//!
//! # Hand derivation
//!
//! The test `layer_formula_by_hand` works one small shape through these formulas by hand.

pub mod auto;
pub mod config_plan;

use serde::Serialize;
use tch::Kind;

use crate::method::{Stage, Trainable, UnitPasses};
use crate::model::llama::{layer_projections, parameter_shapes};
use crate::model::{AdapterKind, AdapterSpec, ModelConfig};

/// The process's resident memory before any tensor on a CPU: libtorch, MKL and OpenMP, the
/// allocator's arenas and the binary, measured as the peak of a benchmark child with a
/// minimal model (docs/benchmarks.md, "Memory planner").
pub const CPU_RUNTIME_BYTES: u64 = 394 << 20;

/// What a CUDA process holds outside PyTorch's tensors: the context (~0.5 GiB on a recent
/// driver), cuBLAS workspaces and NCCL's buffers. Stated, not measured here (no GPU).
pub const CUDA_RUNTIME_BYTES: u64 = 1 << 30;

/// Rows of the LM head's logits that exist at once (`logps.rs`, 2^26 logits).
const LOGITS_CHUNK_ELEMENTS: i64 = 1 << 26;

/// The model's shapes that memory depends on.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ModelDims {
    pub hidden: i64,
    pub q_dim: i64,
    pub kv_dim: i64,
    pub ffn: i64,
    pub vocab: i64,
    pub layers: i64,
    pub heads: i64,
    /// Elements of the base model.
    pub base_params: i64,
}

impl ModelDims {
    pub fn of(config: &ModelConfig) -> Self {
        ModelDims {
            hidden: config.hidden_size,
            q_dim: config.num_heads * config.head_dim,
            kv_dim: config.num_kv_heads * config.head_dim,
            ffn: config.intermediate_size,
            vocab: config.vocab_size,
            layers: config.num_layers,
            heads: config.num_heads,
            base_params: parameter_shapes(config)
                .iter()
                .map(|(_, shape)| shape.iter().product::<i64>())
                .sum(),
        }
    }
}

/// The rows of one forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rows {
    pub rows: i64,
    /// T: tokens per row, padded.
    pub seq_len: i64,
    /// T2: tokens of response b's view `[prompt | b]` of a shared-prompt row (0 otherwise).
    pub b_view_len: i64,
    /// T1: the longest prompt + a of shared-prompt rows, where their first attention ends (0
    /// otherwise).
    pub a_end: i64,
    /// N: scored tokens (every response token).
    pub scored: i64,
}

impl Rows {
    /// The rows of pairs of `(prompt, a, b)` tokens, one row per pair after one copy of the
    /// prompt (`shared`), or one per response.
    pub fn of_pairs(lengths: &[(i64, i64, i64)], shared: bool) -> Rows {
        let max = |f: &dyn Fn(&(i64, i64, i64)) -> i64| lengths.iter().map(f).max().unwrap_or(0);
        let n = lengths.len() as i64;
        let scored = lengths.iter().map(|(_, a, b)| a + b).sum();
        match shared {
            true => Rows {
                rows: n,
                seq_len: max(&|(p, a, b)| p + a + b),
                b_view_len: max(&|(p, _, b)| p + b),
                a_end: max(&|(p, a, _)| p + a),
                scored,
            },
            false => Rows {
                rows: 2 * n,
                seq_len: max(&|(p, a, b)| p + a.max(b)),
                b_view_len: 0,
                a_end: 0,
                scored,
            },
        }
    }

    /// The same rows `copies` times (the passes batched).
    pub fn replicated(self, copies: i64) -> Rows {
        Rows {
            rows: self.rows * copies,
            scored: self.scored * copies,
            ..self
        }
    }

    fn tokens(self) -> i64 {
        self.rows * self.seq_len
    }
}

/// Activation bytes of one forward and backward over `rows`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Activations {
    /// Saved for backward by one decoder layer without recomputation.
    pub per_layer: u64,
    /// Kept per layer with recomputation: the block's input.
    pub per_layer_recomputed: u64,
    /// The LM head and log-softmax's working set at one chunk (f32 logits and gradients).
    pub lm_head: u64,
    /// Everything that is not the base, the adapters or the runtime, at the step's peak.
    pub peak: u64,
}

/// Activations of a forward and backward of `rows`: `s` bytes per activation, `rt` the
/// stacked adapter rank per projection.
pub fn activations(dims: &ModelDims, rows: Rows, s: i64, rt: i64, recompute: bool) -> Activations {
    let d = dims;
    let (r, t, t2, t1, n) = (
        rows.rows,
        rows.seq_len,
        rows.b_view_len,
        rows.a_end,
        rows.scored,
    );
    let tokens = rows.tokens();
    let norm_input = 4 * d.hidden + 4;
    let attention_kept = (2 * d.q_dim + 2 * d.kv_dim) * s + 4 * d.heads;
    let per_token = 2 * norm_input + 2 * d.hidden * s + 7 * rt * s + 4 * d.ffn * s + attention_kept;
    // Shared-prompt rows: b's view, the concatenation of both outputs and the merged heads,
    // less the first attention's output and logsumexp beyond T1.
    let shared = match t2 {
        0 => 0,
        t2 => {
            r * (t2 * ((3 * d.q_dim + 2 * d.kv_dim) * s + 4 * d.heads) + (t1 + t) * d.q_dim * s
                - (t - t1) * (d.q_dim * s + 4 * d.heads))
        }
    };
    let per_layer = tokens * per_token + shared;
    // The last layer (`DecoderLayer::forward_at`) runs its attention at every position and the
    // rest at the scored ones only, where o_proj's adapter keeps the selected attention output.
    let last_at_every_token = norm_input + d.hidden * s + 3 * rt * s + attention_kept;
    let last_at_scored = norm_input + d.hidden * s + d.q_dim * s + 4 * rt * s + 4 * d.ffn * s;
    let last_layer = tokens * last_at_every_token + shared + n * last_at_scored;
    let early = (d.layers - 1) * per_layer;
    let chunk = n.min((LOGITS_CHUNK_ELEMENTS / d.vocab).max(1));
    let lm_head = chunk * d.vocab * (12 + if s < 4 { s } else { 0 });
    // The head's input is already the scored rows [N, hidden]: the final norm's input, its
    // output and each chunk's d log p / d h.
    let final_norm = n * norm_input;
    let forward_head = final_norm + 2 * n * d.hidden * s + lm_head;
    let hidden = tokens * d.hidden * s;
    let layer_backward = tokens * (3 * d.ffn + 3 * d.hidden) * s;
    let last_backward = n * 3 * d.ffn * s + tokens * 3 * d.hidden * s;
    // Still held while the decoder's backward runs (an upper bound: the head's node frees them).
    let head_kept = final_norm + n * d.hidden * s;
    let below_last = |working: i64| if d.layers > 1 { working } else { 0 };
    let peak = match recompute {
        false => {
            let forward = early + last_layer + forward_head;
            let backward_last = early + last_layer + head_kept + last_backward;
            let backward_below = below_last(early + head_kept + layer_backward);
            forward.max(backward_last).max(backward_below)
        }
        true => {
            // The block inputs, the last layer's with them; the last layer and the head run
            // with autograd, then one earlier block at a time with its output and gradient.
            let inputs = d.layers * hidden;
            let head = last_layer + forward_head.max(head_kept + last_backward + hidden);
            inputs + head.max(below_last(per_layer + layer_backward + 2 * hidden))
        }
    };
    Activations {
        per_layer: per_layer as u64,
        per_layer_recomputed: hidden as u64,
        lm_head: lm_head as u64,
        peak: peak as u64,
    }
}

/// Adapter elements of the whole model: `(all, shared block, dimension blocks)`.
pub fn adapter_params(config: &ModelConfig, spec: &AdapterSpec) -> (i64, i64, i64) {
    let (r, k) = (spec.rank, spec.num_dimensions);
    let singular = i64::from(spec.kind == AdapterKind::AdaLora);
    let (mut shared, mut dims) = (0, 0);
    for (_, out, inp, _) in layer_projections(config) {
        if spec.shared {
            shared += r * (inp + out + singular);
        }
        dims += k * r * (inp + out + singular);
    }
    let layers = config.num_layers;
    (layers * (shared + dims), layers * shared, layers * dims)
}

/// Where a step runs: what the runtime costs and how the gradients are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Target {
    Cpu,
    Cuda,
}

impl Target {
    pub fn runtime_bytes(self) -> u64 {
        match self {
            Target::Cpu => CPU_RUNTIME_BYTES,
            Target::Cuda => CUDA_RUNTIME_BYTES,
        }
    }

    /// Copies of the gradients the all-reduce makes on `world_size` ranks.
    fn reduce_copies(self, world_size: usize) -> u64 {
        match (world_size, self) {
            (0 | 1, _) => 0,
            (_, Target::Cuda) => 0,
            (_, Target::Cpu) => 1,
        }
    }

    /// Forward overhead in token-equivalents for the speed ranking: a forward of few rows
    /// under-fills a GPU; a CPU's two cores are full at any size measured.
    fn forward_overhead_tokens(self) -> f64 {
        match self {
            Target::Cpu => 0.0,
            Target::Cuda => 2048.0,
        }
    }
}

/// What one stage trains and runs, independent of the setting.
#[derive(Debug, Clone, Serialize)]
pub struct StageLoad {
    pub dims: ModelDims,
    /// Bytes per base weight and activation.
    pub dtype_bytes: i64,
    pub dtype_name: String,
    /// All adapter elements and the trained ones.
    pub adapter_params: i64,
    pub trainable_params: i64,
    /// AdaLoRA's allocator keeps two f32 averages per trained element.
    pub rank_allocator: bool,
    /// Stacked adapter rank of a projection in this stage's passes batched (every block).
    pub pass_rank: i64,
    /// The largest of a pass run alone: at w = 1_i only the shared block and block i run
    /// (`Conditioning::Dimension`), a drawn w runs every block.
    pub single_pass_rank: i64,
    pub passes: i64,
    /// The longest pair `(prompt, a, b)` in tokens, and whether rows share the prompt.
    pub longest_pair: (i64, i64, i64),
    pub shared_prompt: bool,
    /// Pairs per optimizer step on one rank, and the ranks.
    pub rank_batch: usize,
    pub world_size: usize,
    pub target: Target,
}

/// A way to run a stage's step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Setting {
    pub micro_batch: usize,
    pub batch_passes: bool,
    pub recompute: bool,
}

/// The predicted peak of a stage's step in one setting, by part (bytes).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Breakdown {
    pub setting: Setting,
    pub weights: u64,
    pub adapters: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub communication: u64,
    pub activations: Activations,
    pub runtime: u64,
    pub total: u64,
    /// Relative step time for the ranking (lower is faster): tokens plus a per-forward
    /// overhead, a third more with recomputation (one extra forward of three).
    pub relative_time: f64,
}

/// How a stage runs beside the model: the method's adapters, the data and the ranks.
#[derive(Debug, Clone)]
pub struct StageContext<'a> {
    pub model: &'a ModelConfig,
    pub kind: Kind,
    pub spec: &'a AdapterSpec,
    /// Preference dimensions k.
    pub k: usize,
    pub longest_pair: (i64, i64, i64),
    pub shared_prompt: bool,
    pub rank_batch: usize,
    pub world_size: usize,
    pub target: Target,
}

impl StageLoad {
    /// What `stage` trains and runs in `context`.
    pub fn of_stage(stage: &Stage, context: &StageContext) -> StageLoad {
        let c = context;
        let (all, shared, dimensions) = adapter_params(c.model, c.spec);
        StageLoad {
            dims: ModelDims::of(c.model),
            dtype_bytes: c.kind.elt_size_in_bytes() as i64,
            dtype_name: format!("{:?}", c.kind),
            adapter_params: all,
            trainable_params: match stage.trainable {
                Trainable::Shared => shared,
                Trainable::Dimensions => dimensions,
                Trainable::All => all,
            },
            rank_allocator: c.spec.kind == AdapterKind::AdaLora,
            pass_rank: match stage.step.unit {
                UnitPasses::Shared => c.spec.rank,
                UnitPasses::PerDimension => c.spec.num_blocks() * c.spec.rank,
            },
            single_pass_rank: match (stage.step.unit, stage.step.drawn) {
                (UnitPasses::Shared, _) => c.spec.rank,
                (UnitPasses::PerDimension, Some(_)) => c.spec.num_blocks() * c.spec.rank,
                (UnitPasses::PerDimension, None) => (1 + i64::from(c.spec.shared)) * c.spec.rank,
            },
            passes: stage.step.passes(c.k) as i64,
            longest_pair: c.longest_pair,
            shared_prompt: c.shared_prompt,
            rank_batch: c.rank_batch,
            world_size: c.world_size,
            target: c.target,
        }
    }

    /// The rows of one forward of `setting`.
    pub fn rows(&self, setting: Setting) -> Rows {
        let pairs = vec![self.longest_pair; setting.micro_batch];
        let rows = Rows::of_pairs(&pairs, self.shared_prompt);
        match setting.batch_passes {
            true => rows.replicated(self.passes),
            false => rows,
        }
    }

    /// The predicted peak of `setting` at the longest pair.
    pub fn predict(&self, setting: Setting) -> Breakdown {
        self.predict_rows(setting, self.rows(setting))
    }

    /// The predicted peak of `setting` whose forwards carry `rows` (the passes replicated in
    /// them when batched).
    pub fn predict_rows(&self, setting: Setting, rows: Rows) -> Breakdown {
        let s = self.dtype_bytes;
        let rank = match setting.batch_passes {
            true => self.pass_rank,
            false => self.single_pass_rank,
        };
        let activations = activations(&self.dims, rows, s, rank, setting.recompute);
        let trained = self.trainable_params as u64;
        let weights = (self.dims.base_params * s) as u64;
        let adapters = 4 * self.adapter_params as u64;
        let gradients = 4 * trained;
        let optimizer = 8 * trained + if self.rank_allocator { 8 * trained } else { 0 };
        let communication = self.target.reduce_copies(self.world_size) * gradients;
        let runtime = self.target.runtime_bytes();
        let total =
            weights + adapters + gradients + optimizer + communication + activations.peak + runtime;
        let forwards = match setting.batch_passes {
            true => 1,
            false => self.passes,
        } as f64
            * (self.rank_batch / setting.micro_batch) as f64;
        let tokens = (rows.tokens() * (self.rank_batch / setting.micro_batch) as i64) as f64;
        let tokens = if setting.batch_passes {
            tokens
        } else {
            tokens * self.passes as f64
        };
        let overhead = self.target.forward_overhead_tokens() * forwards;
        let relative_time = (tokens + overhead) * if setting.recompute { 4.0 / 3.0 } else { 1.0 };
        Breakdown {
            setting,
            weights,
            adapters,
            gradients,
            optimizer,
            communication,
            activations,
            runtime,
            total,
            relative_time,
        }
    }

    /// Every setting to consider: micro-batches dividing the rank's batch, the passes batched
    /// or one by one (when there are several), with and without recomputation.
    pub fn candidates(&self) -> Vec<Setting> {
        let mut all = Vec::new();
        for micro_batch in (1..=self.rank_batch).filter(|m| self.rank_batch.is_multiple_of(*m)) {
            for batch_passes in [true, false] {
                if batch_passes && self.passes == 1 {
                    continue;
                }
                for recompute in [false, true] {
                    all.push(Setting {
                        micro_batch,
                        batch_passes: batch_passes || self.passes == 1,
                        recompute,
                    });
                }
            }
        }
        all
    }

    /// The fastest candidate whose predicted peak fits `budget` bytes (ties: the larger
    /// micro-batch, whose GEMMs are larger, then the smaller peak); Err with the smallest peak
    /// of all candidates when none fits.
    pub fn choose(&self, budget: u64) -> Result<Breakdown, Breakdown> {
        let predicted: Vec<Breakdown> =
            self.candidates().iter().map(|&c| self.predict(c)).collect();
        let by_speed = |a: &&Breakdown, b: &&Breakdown| {
            a.relative_time
                .total_cmp(&b.relative_time)
                .then(b.setting.micro_batch.cmp(&a.setting.micro_batch))
                .then(a.total.cmp(&b.total))
        };
        if let Some(best) = predicted
            .iter()
            .filter(|b| b.total <= budget)
            .min_by(by_speed)
        {
            return Ok(*best);
        }
        Err(*predicted
            .iter()
            .min_by_key(|b| b.total)
            .expect("micro-batch 1 is always a candidate"))
    }
}

#[cfg(test)]
mod tests;
