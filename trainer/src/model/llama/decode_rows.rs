//! One decoding step for several sequences at once, each at its own position with its own KV
//! cache: the batch a server decodes when requests that arrived at different times (and with
//! different preference weights, one `w` per row) share the model.
//!
//! The projections, MLPs and adapters run on all rows together (the GEMMs that dominate a
//! decoding step); attention runs row by row against that row's own cache, with exactly the
//! shapes and mask [`CausalLm::forward_cached`] uses for one sequence. A row's result therefore
//! depends on no other row's content. It may still depend, in the last bits, on how many rows
//! the GEMMs see (BLAS picks kernels by shape), so a caller that wants a sequence's tokens to be
//! independent of the traffic keeps the row count fixed and marks unused rows inactive.

use tch::{Kind, Tensor};

use super::{Attention, CausalLm, KvCache};
use crate::model::adapter::{ConditionedLinear, Conditioning};
use crate::model::rotary::{apply_rotary, RopeTables};

/// One layer's cached keys and values ([1, nkv, t_past, d] each), as [`KvCache`] keeps them.
type LayerCache = Option<(Tensor, Tensor)>;

impl CausalLm {
    /// Decodes one token for each row: input_ids [m, 1] int64, row i's token following the
    /// `caches[i].len()` positions already in `caches[i]` (extended in place). Rows whose
    /// `active` is false are padding: they go through the projections but attend nothing, their
    /// caches stay as they are and their logits mean nothing. With `Conditioning::Weighted(w)`,
    /// w is [m, k], one weight vector per row. -> logits [m, vocab]
    pub fn decode_rows(
        &self,
        input_ids: &Tensor,
        caches: &mut [KvCache],
        active: &[bool],
        cond: Conditioning,
    ) -> Tensor {
        let m = input_ids.size()[0];
        assert_eq!(caches.len() as i64, m, "one cache per row");
        assert_eq!(active.len() as i64, m, "one active flag per row");
        let device = input_ids.device();
        let positions: Vec<i64> = caches.iter().map(|c| c.len).collect();
        let positions = Tensor::from_slice(&positions)
            .to_device(device)
            .view([m, 1]); // [m, 1]
        let rope = self.rotary.tables_at(&positions, self.kind); // [m, 1, 1, d]
        for cache in caches.iter_mut() {
            cache.layers.resize_with(self.layers.len(), || None);
        }
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // [m, 1, hidden]
        for (l, layer) in self.layers.iter().enumerate() {
            let mut rows: Vec<Option<&mut LayerCache>> = caches
                .iter_mut()
                .zip(active)
                .map(|(cache, &on)| on.then(|| &mut cache.layers[l]))
                .collect();
            let attn_in = layer.input_layernorm.forward(&x);
            let attn = layer.self_attn.attend_rows(
                &attn_in,
                &rope,
                &mut rows,
                self.config.sliding_window,
                cond,
            );
            x = &x + attn;
            let mlp_out = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x), cond);
            x += mlp_out;
        }
        for (cache, &on) in caches.iter_mut().zip(active) {
            if on {
                cache.len += 1;
            }
        }
        self.logits_from_hidden(&self.norm.forward(&x))
            .squeeze_dim(1) // [m, vocab]
    }
}

impl Attention {
    /// x: [m, 1, hidden], one new token per row; `caches[i]` is row i's cache for this layer
    /// (extended in place), None for a padding row (whose output is zero). -> [m, 1, hidden]
    fn attend_rows(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        caches: &mut [Option<&mut LayerCache>],
        sliding_window: Option<i64>,
        cond: Conditioning,
    ) -> Tensor {
        let m = x.size()[0];
        let heads = |proj: &ConditionedLinear, n: i64| {
            proj.forward(x, cond)
                .view([m, 1, n, self.head_dim])
                .transpose(1, 2)
        };
        let q = apply_rotary(&heads(&self.q_proj, self.num_heads), rope); // [m, nh, 1, d]
        let k = apply_rotary(&heads(&self.k_proj, self.num_kv_heads), rope); // [m, nkv, 1, d]
        let v = heads(&self.v_proj, self.num_kv_heads); // [m, nkv, 1, d]
        let rows: Vec<Tensor> = caches
            .iter_mut()
            .enumerate()
            .map(|(i, cache)| {
                let q_i = q.narrow(0, i as i64, 1); // [1, nh, 1, d]
                let Some(cache) = cache else {
                    return q_i.zeros_like();
                };
                let (mut k_i, mut v_i) = (k.narrow(0, i as i64, 1), v.narrow(0, i as i64, 1));
                if let Some((past_k, past_v)) = cache.as_ref() {
                    k_i = Tensor::cat(&[past_k, &k_i], 2); // [1, nkv, t_all, d]
                    v_i = Tensor::cat(&[past_v, &v_i], 2);
                }
                **cache = Some((k_i.shallow_clone(), v_i.shallow_clone()));
                let mask = last_query_mask(k_i.size()[2], sliding_window, q.device());
                self.scaled_attention(&q_i, k_i, v_i, &mask)
            })
            .collect();
        let attn = Tensor::cat(&rows, 0); // [m, nh, 1, d]
        let merged = attn
            .transpose(1, 2)
            .reshape([m, 1, self.num_heads * self.head_dim]);
        self.o_proj.forward(&merged, cond)
    }
}

/// The mask of one query at the last of `t_all` positions: [1, 1, 1, t_all] bool, true where it
/// may attend (every key, or, Mistral, those within the sliding window), as
/// [`CausalLm::forward_cached`] builds it for one new token.
fn last_query_mask(t_all: i64, sliding_window: Option<i64>, device: tch::Device) -> Tensor {
    let key = Tensor::arange(t_all, (Kind::Int64, device)); // [t_all]
    let allowed = match sliding_window {
        Some(window) => key.gt(t_all - 1 - window),
        None => key.ge(0),
    };
    allowed.view([1, 1, 1, t_all])
}
