//! The Llama 3 / Mistral decoder, in the layout of Hugging Face's `modeling_llama.py` and
//! `modeling_mistral.py`: every module sits at the `VarStore` path that is its key in the HF
//! checkpoint (`model.layers.{i}.self_attn.q_proj.weight`, ...), so loading is one loop over
//! keys. Attention is `scaled_dot_product_attention`, through its causal kernels where the
//! layout allows and with an explicit boolean mask otherwise (`llama/layout.rs`).

use tch::{nn, Device, Kind, Tensor};

use super::adapter::{Adapter, AdapterSpec, ConditionedLinear, Conditioning, LoraGemms};
use super::hf_config::ModelConfig;
use super::rotary::{apply_rotary, RopeTables, Rotary};

mod decode_rows;
mod layout;

pub use layout::{AttentionPattern, SharedPrefixRows, TokenLayout};

/// The seven projections of a decoder layer: `(key, out, in, bias)`, in checkpoint order.
pub fn layer_projections(config: &ModelConfig) -> [(&'static str, i64, i64, bool); 7] {
    let c = config;
    let (h, q, kv, ffn) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    [
        ("self_attn.q_proj", q, h, c.attention_bias),
        ("self_attn.k_proj", kv, h, c.attention_bias),
        ("self_attn.v_proj", kv, h, c.attention_bias),
        ("self_attn.o_proj", h, q, c.attention_bias),
        ("mlp.gate_proj", ffn, h, c.mlp_bias),
        ("mlp.up_proj", ffn, h, c.mlp_bias),
        ("mlp.down_proj", h, ffn, c.mlp_bias),
    ]
}

/// Every parameter of the decoder with its shape, in checkpoint key order.
pub fn parameter_shapes(config: &ModelConfig) -> Vec<(String, Vec<i64>)> {
    let c = config;
    let h = c.hidden_size;
    let mut shapes = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let mut push = |name: &str, shape: Vec<i64>| shapes.push((format!("{p}.{name}"), shape));
        push("input_layernorm.weight", vec![h]);
        for (name, out, inp, bias) in layer_projections(c) {
            push(&format!("{name}.weight"), vec![out, inp]);
            if bias {
                push(&format!("{name}.bias"), vec![out]);
            }
        }
        push("post_attention_layernorm.weight", vec![h]);
    }
    shapes.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    shapes
}

/// A frozen (base) parameter, created uninitialised: the loader fills it from the checkpoint.
fn frozen(path: &nn::Path, name: &str, shape: &[i64], kind: Kind) -> Tensor {
    path.add(name, Tensor::empty(shape, (kind, path.device())), false)
}

/// Where a module's base weights and (if any) adapters are created.
#[derive(Clone)]
struct Paths<'a> {
    base: nn::Path<'a>,
    adapter: Option<(nn::Path<'a>, &'a AdapterSpec)>,
}

impl<'a> Paths<'a> {
    fn sub(&self, name: &str) -> Paths<'a> {
        Paths {
            base: &self.base / name,
            adapter: self.adapter.as_ref().map(|(p, spec)| (p / name, *spec)),
        }
    }

    /// A frozen projection [out, in] with adapters when the model has them.
    fn projection(&self, in_dim: i64, out_dim: i64, bias: bool, kind: Kind) -> ConditionedLinear {
        ConditionedLinear {
            weight: frozen(&self.base, "weight", &[out_dim, in_dim], kind),
            bias: bias.then(|| frozen(&self.base, "bias", &[out_dim], kind)),
            adapter: self
                .adapter
                .as_ref()
                .map(|(path, spec)| Adapter::new(path, spec, in_dim, out_dim)),
        }
    }
}

/// RMSNorm as in HF: normalise in f32, cast back, then scale.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(path: nn::Path, dim: i64, eps: f64, kind: Kind) -> Self {
        RmsNorm {
            weight: frozen(&path, "weight", &[dim], kind),
            eps,
        }
    }

    /// libtorch's fused `rms_norm` (one kernel each way instead of five element-wise passes);
    /// below f32 the weight is applied after the cast back, as HF does.
    fn forward(&self, x: &Tensor) -> Tensor {
        let dim = [self.weight.size()[0]];
        if x.kind() == Kind::Float {
            return x.rms_norm(dim, Some(&self.weight), self.eps);
        }
        let normed = x
            .to_kind(Kind::Float)
            .rms_norm(dim, None::<&Tensor>, self.eps);
        normed.to_kind(x.kind()) * &self.weight
    }
}

#[derive(Debug)]
struct Attention {
    q_proj: ConditionedLinear,
    k_proj: ConditionedLinear,
    v_proj: ConditionedLinear,
    o_proj: ConditionedLinear,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    fn new(paths: &Paths, c: &ModelConfig, kind: Kind) -> Self {
        let (h, q, kv, bias) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
            c.attention_bias,
        );
        Attention {
            q_proj: paths.sub("q_proj").projection(h, q, bias, kind),
            k_proj: paths.sub("k_proj").projection(h, kv, bias, kind),
            v_proj: paths.sub("v_proj").projection(h, kv, bias, kind),
            o_proj: paths.sub("o_proj").projection(q, h, bias, kind),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    /// x: [b, t, hidden] -> [b, t, hidden], each query attending the keys `attention` says
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        attention: &AttentionPattern,
        cond: Conditioning,
    ) -> Tensor {
        self.attend(x, rope, attention, cond, None, true)
    }

    /// Incremental decoding: x: [1, t_new, hidden] at positions after the `cache`'s, whose keys
    /// and values ([1, nkv, t_past, d]) are extended in place; mask: [1, 1, t_new, t_all] bool.
    fn forward_cached(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        mask: &Tensor,
        cond: Conditioning,
        cache: &mut Option<(Tensor, Tensor)>,
    ) -> Tensor {
        let attention = AttentionPattern::Masked(mask.shallow_clone());
        self.attend(x, rope, &attention, cond, Some(cache), true)
    }

    /// Attention over this call's keys and values, preceded by the cached ones when a cache
    /// is given (which is then extended); through o_proj when `project`, else the merged heads
    /// [b, t, heads x d].
    fn attend(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        attention: &AttentionPattern,
        cond: Conditioning,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        project: bool,
    ) -> Tensor {
        let (b, t) = (x.size()[0], x.size()[1]);
        let heads = |proj: &ConditionedLinear, n: i64| {
            proj.forward(x, cond)
                .view([b, t, n, self.head_dim])
                .transpose(1, 2)
        };
        let q = apply_rotary(&heads(&self.q_proj, self.num_heads), rope); // [b, nh, t, d]
        let mut k = apply_rotary(&heads(&self.k_proj, self.num_kv_heads), rope); // [b, nkv, t, d]
        let mut v = heads(&self.v_proj, self.num_kv_heads); // [b, nkv, t, d]
        if let Some(cache) = cache {
            if let Some((past_k, past_v)) = cache.as_ref() {
                k = Tensor::cat(&[past_k, &k], 2); // [b, nkv, t_all, d]
                v = Tensor::cat(&[past_v, &v], 2);
            }
            *cache = Some((k.shallow_clone(), v.shallow_clone()));
        }
        let attn = self.attend_with(&q, k, v, attention); // [b, nh, t, d]
        let merged = attn
            .transpose(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        match project {
            true => self.o_proj.forward(&merged, cond),
            false => merged,
        }
    }

    /// q: [b, nh, t, d]; k, v: [b, nkv, t_all, d]; mask: [b, 1, t, t_all] -> [b, nh, t, d]
    fn scaled_attention(&self, q: &Tensor, k: Tensor, v: Tensor, mask: &Tensor) -> Tensor {
        let (b, t_all) = (k.size()[0], k.size()[2]);
        // Grouped-query attention: each key/value head serves `group` consecutive query heads
        // (HF `repeat_kv`). On CPU the flash kernel takes the grouping (`enable_gqa`) and a
        // mask, so keys and values are never copied per query head. On CUDA the kernels that
        // take a padding mask do not take the grouping (only math, which builds [b, nh, t, t]
        // scores), so there they are expanded.
        let group = self.num_heads / self.num_kv_heads;
        let native_gqa = q.device() == Device::Cpu;
        let expand = |x: Tensor| -> Tensor {
            if group == 1 || native_gqa {
                return x;
            }
            x.unsqueeze(2)
                .expand([b, self.num_kv_heads, group, t_all, self.head_dim], false)
                .reshape([b, self.num_heads, t_all, self.head_dim])
        };
        Tensor::scaled_dot_product_attention(
            q,
            &expand(k),
            &expand(v),
            Some(mask),
            0.0,
            false,
            None,
            native_gqa && group > 1,
        )
    }
}

/// Keys and values of every layer for incremental decoding ([`CausalLm::forward_cached`]).
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: i64,
}

impl KvCache {
    /// Positions already in the cache.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug)]
struct Mlp {
    gate_proj: ConditionedLinear,
    up_proj: ConditionedLinear,
    down_proj: ConditionedLinear,
}

impl Mlp {
    fn new(paths: &Paths, c: &ModelConfig, kind: Kind) -> Self {
        let (h, ffn, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Mlp {
            gate_proj: paths.sub("gate_proj").projection(h, ffn, bias, kind),
            up_proj: paths.sub("up_proj").projection(h, ffn, bias, kind),
            down_proj: paths.sub("down_proj").projection(ffn, h, bias, kind),
        }
    }

    /// SwiGLU: down(silu(gate(x)) * up(x))
    fn forward(&self, x: &Tensor, cond: Conditioning) -> Tensor {
        let gated = self.gate_proj.forward(x, cond).silu() * self.up_proj.forward(x, cond);
        self.down_proj.forward(&gated, cond)
    }
}

#[derive(Debug)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn new(paths: &Paths, c: &ModelConfig, kind: Kind) -> Self {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        DecoderLayer {
            input_layernorm: RmsNorm::new(&paths.base / "input_layernorm", h, eps, kind),
            self_attn: Attention::new(&paths.sub("self_attn"), c, kind),
            post_attention_layernorm: RmsNorm::new(
                &paths.base / "post_attention_layernorm",
                h,
                eps,
                kind,
            ),
            mlp: Mlp::new(&paths.sub("mlp"), c, kind),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        attention: &AttentionPattern,
        cond: Conditioning,
    ) -> Tensor {
        let attn_in = self.input_layernorm.forward(x);
        let x = x + self.self_attn.forward(&attn_in, rope, attention, cond);
        let mlp_out = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x), cond);
        x + mlp_out
    }

    /// The layer's output at `positions` only ([N] flat indices into `[b * t]`) -> [N, hidden].
    /// Every position's keys and values are still computed (the kept positions attend them);
    /// o_proj, the residual and the MLP run only where the output is read.
    fn forward_at(
        &self,
        x: &Tensor,
        rope: &RopeTables,
        attention: &AttentionPattern,
        cond: Conditioning,
        positions: &Tensor,
    ) -> Tensor {
        let (t, hidden) = (x.size()[1], x.size()[2]);
        let attn_in = self.input_layernorm.forward(x);
        // [b, t, heads x d]
        let merged = self
            .self_attn
            .attend(&attn_in, rope, attention, cond, None, false);
        // Each kept position as a row of one token, with its row's weights: [N, 1, ..].
        let at = |y: &Tensor| {
            let width = y.size()[2];
            y.reshape([-1, width])
                .index_select(0, positions)
                .unsqueeze(1)
        };
        let row_weights;
        let cond = match cond {
            Conditioning::Weighted(w) => {
                row_weights = w.index_select(0, &positions.floor_divide_scalar(t)); // [N, k]
                Conditioning::Weighted(&row_weights)
            }
            other => other,
        };
        let x = at(x) + self.self_attn.o_proj.forward(&at(&merged), cond); // [N, 1, hidden]
        let mlp_out = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x), cond);
        (x + mlp_out).view([-1, hidden])
    }
}

/// A causal language model: decoder plus LM head (tied to the embeddings or not), with
/// optional preference-conditioned adapters on every attention and MLP projection. The LM
/// head and embeddings carry no adapter.
#[derive(Debug)]
pub struct CausalLm {
    config: ModelConfig,
    kind: Kind,
    adapter_spec: Option<AdapterSpec>,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Option<Tensor>,
    rotary: Rotary,
}

/// Names of the seven projections of a layer, relative to `model.layers.{i}`.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl CausalLm {
    /// Creates the (uninitialised, frozen) base parameters under `base` (fill them with
    /// [`super::load::load_weights`]) and, when `adapters` is given, freshly initialised
    /// adapters at the same module paths under the adapter store's root.
    pub fn new(
        base: &nn::Path,
        adapters: Option<(&nn::Path, &AdapterSpec)>,
        config: &ModelConfig,
        kind: Kind,
    ) -> Self {
        let root = Paths {
            base: base.clone(),
            adapter: adapters.map(|(p, s)| (p.clone(), s)),
        };
        let model = root.sub("model");
        let layers = model.sub("layers");
        let (h, vocab) = (config.hidden_size, config.vocab_size);
        CausalLm {
            config: config.clone(),
            kind,
            adapter_spec: adapters.map(|(_, spec)| spec.clone()),
            embed_tokens: frozen(&(&model.base / "embed_tokens"), "weight", &[vocab, h], kind),
            layers: (0..config.num_layers)
                .map(|i| DecoderLayer::new(&layers.sub(&i.to_string()), config, kind))
                .collect(),
            norm: RmsNorm::new(&model.base / "norm", h, config.rms_norm_eps, kind),
            lm_head: (!config.tie_word_embeddings)
                .then(|| frozen(&(base / "lm_head"), "weight", &[vocab, h], kind)),
            rotary: Rotary::new(config, base.device()),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device of the weights.
    pub fn embedding_device(&self) -> tch::Device {
        self.embed_tokens.device()
    }

    /// Floating-point type of weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn adapter_spec(&self) -> Option<&AdapterSpec> {
        self.adapter_spec.as_ref()
    }

    /// AdaLoRA's orthogonality regulariser as PEFT's `AdaLoraModel.forward` computes it: the
    /// mean, over the Q and the P of every module of every projection, of `||Q Q^T - I||_F`
    /// and `||P^T P - I||_F` (a scalar f32 tensor that carries gradient).
    pub fn orthogonality_penalty(&self) -> Tensor {
        let mut total = Tensor::zeros([], (Kind::Float, self.embedding_device()));
        let mut count = 0;
        for (_, projection) in self.projections() {
            if let Some(adapter) = &projection.adapter {
                let (sum, matrices) = adapter.orthogonality_terms();
                total += sum.to_device(self.embedding_device());
                count += matrices;
            }
        }
        total / count.max(1) as f64
    }

    /// Switches every adapter between stacked and per-block GEMMs (same result).
    pub fn set_lora_gemms(&mut self, gemms: LoraGemms) {
        for layer in &mut self.layers {
            let (attn, mlp) = (&mut layer.self_attn, &mut layer.mlp);
            for projection in [
                &mut attn.q_proj,
                &mut attn.k_proj,
                &mut attn.v_proj,
                &mut attn.o_proj,
                &mut mlp.gate_proj,
                &mut mlp.up_proj,
                &mut mlp.down_proj,
            ] {
                if let Some(adapter) = projection.adapter.as_mut() {
                    adapter.gemms = gemms;
                }
            }
        }
    }

    /// Every adapted projection with its HF module name (`model.layers.3.mlp.up_proj`).
    pub fn projections(&self) -> Vec<(String, &ConditionedLinear)> {
        let mut all = Vec::with_capacity(self.layers.len() * PROJECTIONS.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let (attn, mlp) = (&layer.self_attn, &layer.mlp);
            let modules = [
                &attn.q_proj,
                &attn.k_proj,
                &attn.v_proj,
                &attn.o_proj,
                &mlp.gate_proj,
                &mlp.up_proj,
                &mlp.down_proj,
            ];
            for (name, module) in PROJECTIONS.iter().zip(modules) {
                all.push((format!("model.layers.{i}.{name}"), module));
            }
        }
        all
    }

    /// input_ids: [b, t] int64; attention_mask: [b, t] (1 token, 0 right padding)
    /// -> final hidden states [b, t, hidden]
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cond: Conditioning,
    ) -> Tensor {
        self.hidden_states_in(input_ids, &self.padded_layout(attention_mask), cond)
    }

    /// input_ids: [b, t] int64 laid out as `layout` says -> final hidden states [b, t, hidden]
    pub fn hidden_states_in(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cond: Conditioning,
    ) -> Tensor {
        self.norm
            .forward(&self.early_layers(input_ids, layout, cond, &self.layers))
    }

    /// The final hidden states at `positions` only ([N] flat indices into `[b * t]`, e.g. the
    /// positions that predict a scored token) -> [N, hidden]: [`Self::hidden_states_in`]
    /// followed by `reshape([-1, hidden]).index_select(0, positions)`, except that the last
    /// layer runs o_proj, the residual, the MLP and the final norm at those positions only.
    pub fn hidden_states_at(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cond: Conditioning,
        positions: &Tensor,
    ) -> Tensor {
        let (last, early) = self.layers.split_last().expect("a decoder has layers");
        let x = self.early_layers(input_ids, layout, cond, early); // [b, t, hidden]
        let kept = last.forward_at(&x, &layout.rope, &layout.attention, cond, positions);
        self.norm.forward(&kept)
    }

    /// Embedding and `layers` (the first of the decoder) -> [b, t, hidden].
    fn early_layers(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cond: Conditioning,
        layers: &[DecoderLayer],
    ) -> Tensor {
        if let Conditioning::Weighted(w) = cond {
            assert_eq!(
                w.size()[0],
                input_ids.size()[0],
                "one weight vector per row"
            );
        }
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // [b, t, hidden]
        for layer in layers {
            x = layer.forward(&x, &layout.rope, &layout.attention, cond);
        }
        x
    }

    /// Forward and backward of `head(hidden_states_at(.., positions))` with per-decoder-block
    /// activation recomputation, for sequences and models whose activations do not fit: the
    /// decoder up to its last layer runs without autograd keeping only each block's input
    /// [b, t, hidden]; the last layer at `positions`, the final norm and `head` (the LM head and
    /// a loss) run with autograd and are backpropagated; then each earlier block, last to
    /// first, is run again with autograd from its saved input and backpropagated with the
    /// gradient arriving from above. Gradients accumulate in the adapters' `.grad` exactly as
    /// `head(hidden_states_at(..)).0.backward()` would leave them, for one extra forward
    /// through the decoder. `head` returns the scalar to backpropagate and anything else the
    /// caller wants back.
    pub fn backward_recomputing<R>(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cond: Conditioning,
        positions: &Tensor,
        head: impl FnOnce(&Tensor) -> (Tensor, R),
    ) -> R {
        let (attention, rope) = (&layout.attention, &layout.rope);
        let (last, early) = self.layers.split_last().expect("a decoder has layers");
        let mut block_inputs = Vec::with_capacity(early.len());
        let top = tch::no_grad(|| {
            let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // [b, t, hidden]
            for layer in early {
                block_inputs.push(x.shallow_clone());
                x = layer.forward(&x, rope, attention, cond);
            }
            x
        });
        let top = top.set_requires_grad(true); // the last layer's input
        let kept = last.forward_at(&top, rope, attention, cond, positions); // [N, hidden]
        let (loss, out) = head(&self.norm.forward(&kept));
        loss.backward();
        let mut grad = top.grad(); // d loss / d output of the block below: [b, t, hidden]
        for (layer, input) in early.iter().zip(block_inputs).rev() {
            let x = input.set_requires_grad(true);
            let y = layer.forward(&x, rope, attention, cond);
            // sum(y * g) has gradient g with respect to y: a vector-Jacobian product.
            (y * &grad).sum(Kind::Float).backward();
            grad = x.grad();
        }
        out
    }

    /// hidden: [.., hidden] -> logits [.., vocab]
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Tensor {
        hidden.linear::<&Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    /// Incremental decoding of one unpadded sequence: input_ids [1, t_new] follow the
    /// `cache.len()` positions already in `cache` (extended in place) -> logits [1, t_new, vocab].
    /// Same result as [`Self::forward`] on the whole sequence (tested in gguf_generate.rs).
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        cond: Conditioning,
    ) -> Tensor {
        let (offset, t) = (cache.len, input_ids.size()[1]);
        let device = input_ids.device();
        let query = Tensor::arange_start(offset, offset + t, (Kind::Int64, device)).view([t, 1]);
        let key = Tensor::arange(offset + t, (Kind::Int64, device)).view([1, offset + t]);
        let mut allowed = key.le_tensor(&query); // [t, t_all]
        if let Some(window) = self.config.sliding_window {
            allowed = allowed.logical_and(&(&query - &key).lt(window));
        }
        let mask = allowed.view([1, 1, t, offset + t]);
        let rope = self.rotary.tables(offset, t, self.kind);
        cache.layers.resize_with(self.layers.len(), || None);
        let mut x = Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false); // [1, t, hidden]
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let attn_in = layer.input_layernorm.forward(&x);
            x = &x
                + layer
                    .self_attn
                    .forward_cached(&attn_in, &rope, &mask, cond, kv);
            let mlp_out = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&x), cond);
            x += mlp_out;
        }
        cache.len += t;
        self.logits_from_hidden(&self.norm.forward(&x))
    }

    /// input_ids, attention_mask: [b, t] -> logits [b, t, vocab]
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        cond: Conditioning,
    ) -> Tensor {
        self.logits_from_hidden(&self.hidden_states(input_ids, attention_mask, cond))
    }
}
