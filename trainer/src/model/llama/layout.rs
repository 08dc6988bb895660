//! Where the tokens of a batch sit, and how attention is computed over them without building a
//! `[b, 1, t, t]` mask where it need not be: right-padded rows and rows of a shared prefix with
//! two continuations go through SDPA's causal kernels (flash and memory-efficient on CUDA, the
//! CPU flash kernel skipping masked blocks), with grouped-query heads unexpanded. Only a
//! Mistral sliding window shorter than the rows still needs the explicit mask.

use tch::{Kind, Tensor};

use super::{Attention, CausalLm};
use crate::model::rotary::RopeTables;

/// Where the tokens of a batch sit: which keys each query may attend, and the rotary angles
/// of each token's position. Built by [`CausalLm::padded_layout`],
/// [`CausalLm::shared_prefix_layout`] or [`CausalLm::segmented_layout`].
#[derive(Debug)]
pub struct TokenLayout {
    pub attention: AttentionPattern,
    pub rope: RopeTables,
}

/// Which keys each query attends.
#[derive(Debug)]
pub enum AttentionPattern {
    /// Each row one right-padded sequence from position 0, no longer than any sliding window:
    /// causal attention alone is exact for every real token, since padding keys come after
    /// all of them (padding queries attend padding too; their outputs are never used).
    Causal,
    /// Rows `[prefix | a | b | padding]`, no longer than any sliding window. Causal attention
    /// over the first `a_end` tokens of the rows (the longest prefix + a) is exact for the
    /// prefix and `a`; `b`'s queries attend over the rows `[prefix | b]`, gathered by `b_view`
    /// ([b, t2] int64, positions in the row), and `merge` ([b, t] int64) takes each token's
    /// output from the first attention (index < a_end) or from the second (a_end + position
    /// in the view). Neither computes `b` attending to `a`, nor `b`'s queries over the row.
    SharedPrefix {
        a_end: i64,
        b_view: Tensor,
        merge: Tensor,
    },
    /// [b, 1, t, t_all] bool, true where query i may attend key j: any other case.
    Masked(Tensor),
}

/// Rows of a shared prefix and two continuations, as [`CausalLm::shared_prefix_layout`]
/// takes them; every tensor int64 on the model's device.
#[derive(Debug)]
pub struct SharedPrefixRows {
    /// [b, t]: 0 on the prefix, 1 on the first continuation, 2 on the second, -1 on padding.
    pub segments: Tensor,
    /// [b, t]: each token's position, restarting after the prefix for the second continuation.
    pub positions: Tensor,
    /// The longest prefix + first continuation of the rows, and [b, t2] and [b, t]: as in
    /// [`AttentionPattern::SharedPrefix`].
    pub a_end: i64,
    pub b_view: Tensor,
    pub merge: Tensor,
}

impl SharedPrefixRows {
    /// The same rows repeated `copies` times along the batch.
    pub fn repeated(&self, copies: i64) -> SharedPrefixRows {
        let repeat = |x: &Tensor| x.repeat([copies, 1]);
        SharedPrefixRows {
            segments: repeat(&self.segments),
            positions: repeat(&self.positions),
            a_end: self.a_end,
            b_view: repeat(&self.b_view),
            merge: repeat(&self.merge),
        }
    }
}

impl CausalLm {
    /// Whether Mistral's sliding window cuts rows of `t` tokens (then only a mask is exact).
    fn window_binds(&self, t: i64) -> bool {
        self.config.sliding_window.is_some_and(|window| t > window)
    }

    /// The layout of right-padded rows, each one sequence from position 0.
    /// attention_mask: [b, t], 1 for tokens and 0 for right padding.
    pub fn padded_layout(&self, attention_mask: &Tensor) -> TokenLayout {
        let t = attention_mask.size()[1];
        TokenLayout {
            attention: match self.window_binds(t) {
                true => AttentionPattern::Masked(self.attention_mask(attention_mask)),
                false => AttentionPattern::Causal,
            },
            rope: self.rotary.tables(0, t, self.kind),
        }
    }

    /// The layout of rows `[prefix | a | b | padding]` where `b` follows the prefix as if `a`
    /// were not there (see [`AttentionPattern::SharedPrefix`]).
    pub fn shared_prefix_layout(&self, rows: &SharedPrefixRows) -> TokenLayout {
        if self.window_binds(rows.segments.size()[1]) {
            return self.segmented_layout(&rows.segments, &rows.positions);
        }
        TokenLayout {
            attention: AttentionPattern::SharedPrefix {
                a_end: rows.a_end,
                b_view: rows.b_view.shallow_clone(),
                merge: rows.merge.shallow_clone(),
            },
            rope: self.rotary.tables_at(&rows.positions, self.kind),
        }
    }

    /// The layout of rows that hold several sequences sharing a prefix, as an explicit mask:
    /// `segments` [b, t] int64 is 0 on the shared prefix, 1, 2, .. on the continuations that
    /// follow it one after another, and -1 on right padding; `positions` [b, t] int64 restart
    /// after the prefix for each continuation. Query i may attend key j <= i when j is in the
    /// prefix or in i's own continuation (and, Mistral, within the sliding window of
    /// positions), so each continuation sees exactly what it would see as its own row after
    /// the prefix.
    pub fn segmented_layout(&self, segments: &Tensor, positions: &Tensor) -> TokenLayout {
        let (b, t) = (segments.size()[0], segments.size()[1]);
        let index = Tensor::arange(t, (Kind::Int64, segments.device()));
        let causal = index.view([1, t]).le_tensor(&index.view([t, 1])); // [t, t]
        let query_segment = segments.view([b, t, 1]);
        let key_segment = segments.view([b, 1, t]);
        let visible = key_segment
            .eq(0)
            .logical_or(&key_segment.eq_tensor(&query_segment))
            .logical_and(&key_segment.ge(0)); // [b, t, t]
        let mut allowed = visible.logical_and(&causal.unsqueeze(0));
        if let Some(window) = self.config.sliding_window {
            let distance = positions.view([b, t, 1]) - positions.view([b, 1, t]);
            allowed = allowed.logical_and(&distance.lt(window));
        }
        TokenLayout {
            attention: AttentionPattern::Masked(allowed.unsqueeze(1)), // [b, 1, t, t]
            rope: self.rotary.tables_at(positions, self.kind),
        }
    }

    /// The explicit mask of right-padded rows: [b, 1, t, t] bool, true where query i may
    /// attend key j: j <= i (causal), key j is not padding, and (Mistral) i - j <
    /// sliding_window. attention_mask: [b, t], 1 for tokens and 0 for right padding.
    pub fn attention_mask(&self, attention_mask: &Tensor) -> Tensor {
        let (b, t) = (attention_mask.size()[0], attention_mask.size()[1]);
        let device = attention_mask.device();
        let query = Tensor::arange(t, (Kind::Int64, device)).view([t, 1]);
        let key = Tensor::arange(t, (Kind::Int64, device)).view([1, t]);
        let mut allowed = key.le_tensor(&query); // [t, t]
        if let Some(window) = self.config.sliding_window {
            allowed = allowed.logical_and(&(&query - &key).lt(window));
        }
        let keys_valid = attention_mask.ne(0).view([b, 1, 1, t]);
        allowed.view([1, 1, t, t]).logical_and(&keys_valid)
    }
}

/// Positions `index` ([b, n] int64) of each row of x ([b, heads, t, d]) -> [b, heads, n, d].
fn gather_positions(x: &Tensor, index: &Tensor) -> Tensor {
    let (b, heads, d) = (x.size()[0], x.size()[1], x.size()[3]);
    let n = index.size()[1];
    let index = index.view([b, 1, n, 1]).expand([b, heads, n, d], false);
    x.gather(2, &index, false)
}

impl Attention {
    /// q: [b, nh, t, d]; k, v: [b, nkv, t_all, d] -> [b, nh, t, d], as `pattern` says.
    pub(super) fn attend_with(
        &self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        pattern: &AttentionPattern,
    ) -> Tensor {
        let gqa = self.num_heads != self.num_kv_heads;
        // Grouped-query heads stay unexpanded: SDPA's causal kernels take the grouping.
        let causal = |q: &Tensor, k: &Tensor, v: &Tensor| {
            Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, gqa)
        };
        match pattern {
            AttentionPattern::Masked(mask) => self.scaled_attention(q, k, v, mask),
            AttentionPattern::Causal => causal(q, &k, &v),
            AttentionPattern::SharedPrefix {
                a_end,
                b_view,
                merge,
            } => {
                let first = |x: &Tensor| x.narrow(2, 0, *a_end);
                // [b, nh, a_end, d]: exact on the prefix and a
                let row = causal(&first(q), &first(&k), &first(&v));
                let second = causal(
                    &gather_positions(q, b_view),
                    &gather_positions(&k, b_view),
                    &gather_positions(&v, b_view),
                ); // [b, nh, t2, d]: exact on b
                gather_positions(&Tensor::cat(&[row, second], 2), merge) // [b, nh, t, d]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;
    use crate::model::{load_model, Conditioning, LoadedModel};

    /// The tiny random model (4 query heads, 2 key/value heads), as Mistral with a sliding
    /// window of `window` when given.
    fn tiny(dir: &std::path::Path, window: Option<i64>) -> LoadedModel {
        crate::model::tiny::write_tiny_model(dir, &Default::default(), 7).unwrap();
        if let Some(window) = window {
            let path = dir.join("config.json");
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            config["model_type"] = "mistral".into();
            config["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            config["sliding_window"] = window.into();
            std::fs::write(&path, config.to_string()).unwrap();
        }
        load_model(dir, None, Device::Cpu, Kind::Float).unwrap()
    }

    fn hidden(model: &CausalLm, ids: &Tensor, layout: &TokenLayout) -> Tensor {
        model.hidden_states_in(ids, layout, Conditioning::Reference)
    }

    /// Largest difference over the tokens where `real` ([b, t] bool) is set.
    fn max_diff_on(a: &Tensor, b: &Tensor, real: &Tensor) -> f64 {
        let diff = (a - b).abs().amax([2], false); // [b, t]
        f64::try_from(diff.masked_select(real).max()).unwrap()
    }

    /// Right-padded rows of 9, 5 and 7 tokens: the causal kernel without a mask gives the
    /// explicit mask's hidden states on every real token.
    #[test]
    fn causal_rows_equal_the_masked_forward() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = tiny(dir.path(), None);
        let model = &loaded.model;
        tch::manual_seed(1);
        let ids = Tensor::randint(250, [3, 9], (Kind::Int64, Device::Cpu));
        let lengths = Tensor::from_slice(&[9i64, 5, 7]).view([3, 1]);
        let attention_mask = Tensor::arange(9, (Kind::Int64, Device::Cpu))
            .view([1, 9])
            .lt_tensor(&lengths)
            .to_kind(Kind::Int64); // [3, 9]
        let layout = model.padded_layout(&attention_mask);
        assert!(matches!(layout.attention, AttentionPattern::Causal));
        let masked = TokenLayout {
            attention: AttentionPattern::Masked(model.attention_mask(&attention_mask)),
            rope: model.rotary.tables(0, 9, Kind::Float),
        };
        let real = attention_mask.ne(0);
        let diff = max_diff_on(
            &hidden(model, &ids, &layout),
            &hidden(model, &ids, &masked),
            &real,
        );
        assert!(diff <= 1e-5, "causal differs from masked by {diff}");
    }

    /// Rows `[prefix | a | b]` with (prefix, a, b) lengths (3, 2, 4), (2, 4, 1) and (4, 1, 2),
    /// t = 9, t2 = 7, a_end = 6: two causal attentions and the merge give the segment mask's
    /// hidden states on every real token. The indices are built as `logps::BatchTensors` builds
    /// them.
    #[test]
    fn shared_prefix_rows_equal_the_segment_mask() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = tiny(dir.path(), None);
        let model = &loaded.model;
        let shapes = [(3usize, 2usize, 4usize), (2, 4, 1), (4, 1, 2)];
        let (t, t2, a_end) = (9usize, 7usize, 6usize);
        let mut segments = vec![-1i64; 3 * t];
        let mut positions = vec![0i64; 3 * t];
        let mut b_view = vec![0i64; 3 * t2];
        let mut merge: Vec<i64> = (0..3).flat_map(|_| 0..t as i64).collect();
        for (j, &(p, a, b)) in shapes.iter().enumerate() {
            for i in 0..p + a + b {
                let (segment, position) = match i {
                    i if i < p => (0, i),
                    i if i < p + a => (1, i),
                    i => (2, i - a),
                };
                segments[j * t + i] = segment;
                positions[j * t + i] = position as i64;
                if segment != 1 {
                    b_view[j * t2 + position] = i as i64;
                }
                if segment == 2 {
                    merge[j * t + i] = (a_end + position) as i64;
                }
            }
        }
        let tensor = |v: &[i64], n: usize| Tensor::from_slice(v).view([3, n as i64]);
        let rows = SharedPrefixRows {
            segments: tensor(&segments, t),
            positions: tensor(&positions, t),
            a_end: a_end as i64,
            b_view: tensor(&b_view, t2),
            merge: tensor(&merge, t),
        };
        tch::manual_seed(2);
        let ids = Tensor::randint(250, [3, t as i64], (Kind::Int64, Device::Cpu));
        let layout = model.shared_prefix_layout(&rows);
        assert!(matches!(
            layout.attention,
            AttentionPattern::SharedPrefix { .. }
        ));
        let masked = model.segmented_layout(&rows.segments, &rows.positions);
        let real = rows.segments.ge(0);
        let diff = max_diff_on(
            &hidden(model, &ids, &layout),
            &hidden(model, &ids, &masked),
            &real,
        );
        assert!(
            diff <= 1e-5,
            "shared prefix differs from the mask by {diff}"
        );
    }

    /// A sliding window shorter than the rows keeps the explicit mask; one as long does not.
    #[test]
    fn a_binding_sliding_window_keeps_the_mask() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = tiny(dir.path(), Some(4));
        let model = &loaded.model;
        let long = Tensor::ones([2, 5], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            model.padded_layout(&long).attention,
            AttentionPattern::Masked(_)
        ));
        let short = Tensor::ones([2, 4], (Kind::Int64, Device::Cpu));
        assert!(matches!(
            model.padded_layout(&short).attention,
            AttentionPattern::Causal
        ));
    }
}
