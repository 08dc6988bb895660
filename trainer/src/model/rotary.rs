//! Rotary position embeddings as Hugging Face computes them (`modeling_rope_utils.py`: default,
//! linear and Llama 3.1 scaling; `apply_rotary_pos_emb` with the rotate-half convention).

use tch::{Device, Kind, Tensor};

use super::hf_config::{ModelConfig, RopeScaling};

/// Rotary position embedding tables (HF's rotate-half convention).
#[derive(Debug)]
pub struct Rotary {
    /// [head_dim / 2], f32
    inv_freq: Tensor,
}

impl Rotary {
    pub fn new(config: &ModelConfig, device: Device) -> Self {
        let half = config.head_dim / 2;
        let dim = config.head_dim as f64;
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / dim))
            .collect();
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_context,
            } => {
                // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the
                // band in between interpolated (transformers `_compute_llama3_parameters`).
                let low_freq_wavelen = old_context / low_freq_factor;
                let high_freq_wavelen = old_context / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_freq_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_freq_wavelen {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        Rotary {
            inv_freq: Tensor::from_slice(&inv_freq).to_device(device),
        }
    }

    /// cos and sin for positions `offset..offset + len`, each [len, head_dim], in `kind`.
    pub fn tables(&self, offset: i64, len: i64, kind: Kind) -> RopeTables {
        let positions =
            Tensor::arange_start(offset, offset + len, (Kind::Float, self.inv_freq.device()));
        let freqs = positions.outer(&self.inv_freq); // [len, head_dim / 2]
        let angles = Tensor::cat(&[&freqs, &freqs], -1); // [len, head_dim]
        RopeTables {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }

    /// cos and sin for each row's own positions ([b, t] int64), each [b, 1, t, head_dim]
    /// (broadcast over heads), in `kind`.
    pub fn tables_at(&self, positions: &Tensor, kind: Kind) -> RopeTables {
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // [b, t, head_dim / 2]
        let angles = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1); // [b, 1, t, head_dim]
        RopeTables {
            cos: angles.cos().to_kind(kind),
            sin: angles.sin().to_kind(kind),
        }
    }
}

/// cos and sin of the rotary angles, each [t, head_dim] (or [b, 1, t, head_dim]).
#[derive(Debug)]
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// x: [b, heads, t, d] rotated by the tables' angles (HF `apply_rotary_pos_emb`).
pub fn apply_rotary(x: &Tensor, rope: &RopeTables) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
    x * &rope.cos + rotated * &rope.sin
}
