//! FLOPs of a training step, counted from the model's shapes and the batch's real tokens, and
//! the machine's measured dense matmul rate they are divided by (MFU).
//!
//! Model FLOPs of one pass over a row of `L` real tokens of which `R` are scored response
//! tokens, for a decoder with frozen base weights and LoRA adapters:
//!
//! ```text
//! T_base   = L N_base - (L - R) N_base_late        (and T_lora likewise)
//! forward  = 2 T_base + 2 T_lora + A(L) + R 2 H V
//! backward = 2 T_base + 4 T_lora + 2 A(L) + R 2 H V
//! ```
//!
//! `N_base`: base projection weights per token (attention and MLP of every layer; a GEMM costs
//! 2 FLOPs per weight per token). `N_base_late`: the last layer's o_proj and MLP weights, which
//! run at the R scored positions only (`CausalLm::hidden_states_at`). The backward through a
//! frozen base computes activation gradients only (2 N_base, no weight gradients); adapters
//! get both (4 N_lora). `A(L)`:
//! causal attention scores and weighted sum, `2 * 2 * q_dim * (1 + 2 + .. + L)` per layer. The
//! LM head runs on the R response positions only, frozen. Norms, rotary, softmax and the
//! embedding lookup are left out (under 1% at these shapes). Recomputed activations and the
//! cached reference forward are not model FLOPs and are not counted.

use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::model::llama::layer_projections;
use crate::model::{AdapterSpec, ModelConfig};

/// What one pass of a step runs through: how many adapter blocks are active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassAdapters {
    /// The shared block alone (stage 1).
    SharedOnly,
    /// Every block, weighted per row.
    AllBlocks,
}

/// FLOPs of the forward and backward of one pass over one row.
pub fn row_pass_flops(
    config: &ModelConfig,
    spec: &AdapterSpec,
    adapters: PassAdapters,
    tokens: i64,
    response_tokens: i64,
) -> f64 {
    let layers = config.num_layers as f64;
    let shapes = layer_projections(config);
    let n_base: f64 = shapes
        .iter()
        .map(|&(_, out, inp, _)| (inp * out) as f64)
        .sum::<f64>()
        * layers;
    let rank = match adapters {
        PassAdapters::SharedOnly => spec.rank,
        PassAdapters::AllBlocks => spec.rank * spec.num_blocks(),
    } as f64;
    let n_lora: f64 = shapes
        .iter()
        .map(|&(_, out, inp, _)| rank * (inp + out) as f64)
        .sum::<f64>()
        * layers;
    // The last layer's o_proj and MLP (every projection after q, k, v) for one token.
    let late = &shapes[3..];
    let n_base_late: f64 = late
        .iter()
        .map(|&(_, out, inp, _)| (inp * out) as f64)
        .sum();
    let n_lora_late: f64 = late
        .iter()
        .map(|&(_, out, inp, _)| rank * (inp + out) as f64)
        .sum();
    let q_dim = (config.num_heads * config.head_dim) as f64;
    let (l, r) = (tokens as f64, response_tokens as f64);
    let t_base = l * n_base - (l - r) * n_base_late;
    let t_lora = l * n_lora - (l - r) * n_lora_late;
    let attention = 4.0 * q_dim * l * (l + 1.0) / 2.0 * layers;
    let head = 2.0 * (config.hidden_size * config.vocab_size) as f64 * r;
    let forward = 2.0 * t_base + 2.0 * t_lora + attention + head;
    let backward = 2.0 * t_base + 4.0 * t_lora + 2.0 * attention + head;
    forward + backward
}

/// The best of a few timings of an `n x n` matmul in `kind` on `device`, in FLOP/s: the dense
/// rate MFU is measured against (with the same threads as training on a CPU).
pub fn measure_matmul_rate(device: Device, kind: Kind, n: i64, repeats: usize) -> f64 {
    let _no_grad = tch::no_grad_guard();
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let _ = a.matmul(&b); // warm-up: kernels, thread pool
    sync();
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let started = Instant::now();
        let c = a.matmul(&b);
        sync();
        best = best.min(started.elapsed().as_secs_f64());
        drop(c);
    }
    2.0 * (n as f64).powi(3) / best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::AdapterKind;

    /// One layer, hidden 4, 2 heads of dim 2 (q_dim 4), 1 KV head (kv 2), MLP 8, vocab 10;
    /// adapters of rank 1 with a shared block and k = 2 (3 blocks).
    ///
    /// Hand count: N_base = 4*4 + 4*2 + 4*2 + 4*4 + 4*8 + 4*8 + 8*4 = 144 weights.
    /// Projection in + out: 8 + 6 + 6 + 8 + 12 + 12 + 12 = 64, so N_lora = 64 r:
    /// 64 (shared only) or 192 (all three blocks).
    /// L = 3 tokens, R = 2 response tokens: A = 4 * 4 * (1 + 2 + 3) = 96; head = 2*4*10*2 = 160.
    /// The last layer's o_proj and MLP run at the R tokens only: their base weights are
    /// 16 + 32 + 32 + 32 = 112 and their in + out 8 + 12 + 12 + 12 = 44, so T_base =
    /// 3 * 144 - 1 * 112 = 320 and T_lora = 3 * 64 - 44 = 148 (shared only) or
    /// 3 * 192 - 132 = 444 (all three blocks).
    /// Shared only: fwd = 640 + 296 + 96 + 160 = 1192, bwd = 640 + 592 + 192 + 160 = 1584:
    /// 2776. All blocks: fwd = 640 + 888 + 256 = 1784, bwd = 640 + 1776 + 352 = 2768: 4552.
    #[test]
    fn pass_flops_match_the_hand_count() {
        let config = ModelConfig::from_json(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#,
        )
        .unwrap();
        let spec = AdapterSpec {
            kind: AdapterKind::Lora,
            rank: 1,
            alpha: 2.0,
            num_dimensions: 2,
            shared: true,
        };
        assert_eq!(
            row_pass_flops(&config, &spec, PassAdapters::SharedOnly, 3, 2),
            2776.0
        );
        assert_eq!(
            row_pass_flops(&config, &spec, PassAdapters::AllBlocks, 3, 2),
            4552.0
        );
    }

    #[test]
    fn matmul_rate_is_positive_and_finite() {
        let rate = measure_matmul_rate(Device::Cpu, Kind::Float, 64, 2);
        assert!(rate.is_finite() && rate > 0.0);
    }
}
