//! The preference-conditioned multi-LoRA linear of METHOD.md section 2:
//!
//! ```text
//! out = W x + b + s * (B_0 A_0 x + sum_{i=1..k} w_i B_i A_i x),   s = alpha / r
//! ```
//!
//! with a frozen base `W`, a shared block `(A_0, B_0)` (psi) and one block per preference
//! dimension `(A_i, B_i)` (phi_i), and one weight vector `w` per row of the batch. The blocks
//! are computed stacked, not in a loop: `x A_cat^T` is one GEMM to `(k+1) r` features, each
//! row's rank blocks are scaled by `[1, w_1 .. w_k]`, and `B_cat` is one more GEMM. The DPO-Soup
//! variant has no shared block (k blocks; rank 16, alpha 32 in the paper).
//!
//! Adapter parameters live in their own `VarStore` in f32 (master weights) and are cast to the
//! activations' dtype in the forward, so a bf16 base trains f32 adapters.

use tch::{nn, Kind, Tensor};

/// Shape of the adapters attached to every projection.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// LoRA rank r of each block.
    pub rank: i64,
    /// LoRA alpha: the update is scaled by alpha / r.
    pub alpha: f64,
    /// Number of preference dimensions k.
    pub num_dimensions: i64,
    /// Whether a shared block h_0 exists (false for DPO-Soup).
    pub shared: bool,
}

impl AdapterSpec {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Blocks per projection: k, plus the shared one.
    pub fn num_blocks(&self) -> i64 {
        self.num_dimensions + i64::from(self.shared)
    }
}

/// What the adapters contribute to a forward pass.
#[derive(Debug, Clone, Copy)]
pub enum Conditioning<'a> {
    /// Adapters off: the base model, i.e. the reference policy.
    Reference,
    /// Only the shared block (w = 0); the dimension blocks are skipped, not multiplied by 0.
    SharedOnly,
    /// Shared block plus dimension blocks weighted per row: `weights` is [batch, k].
    Weighted(&'a Tensor),
}

/// How the blocks' GEMMs are laid out. `Stacked` is what training uses; `PerBlock` is the
/// textbook loop, one pair of GEMMs per block, kept to measure what stacking saves
/// (`modpo-trainer bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraGemms {
    #[default]
    Stacked,
    PerBlock,
}

/// One block group's parameters: A [blocks * r, in], B [out, blocks * r].
#[derive(Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// The adapter blocks of one projection.
#[derive(Debug)]
pub struct Adapter {
    spec: AdapterSpec,
    /// psi: A_0 [r, in], B_0 [out, r]; absent for DPO-Soup.
    pub shared: Option<LoraPair>,
    /// phi_1..phi_k stacked: A [k r, in], B [out, k r]; block i is rows / columns i r..(i+1) r.
    pub dimensions: LoraPair,
    pub gemms: LoraGemms,
}

/// PEFT's LoRA init: A ~ Kaiming-uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0, so a
/// fresh adapter leaves the model unchanged.
fn lora_pair(path: &nn::Path, name: &str, rows: i64, in_dim: i64, out_dim: i64) -> LoraPair {
    let bound = 1.0 / (in_dim as f64).sqrt();
    let a = path.var(
        &format!("{name}_a"),
        &[rows, in_dim],
        nn::Init::Uniform {
            lo: -bound,
            up: bound,
        },
    );
    let b = path.var(&format!("{name}_b"), &[out_dim, rows], nn::Init::Const(0.0));
    LoraPair { a, b }
}

impl Adapter {
    /// Creates trainable f32 parameters `{path}.shared_a`, `shared_b`, `dims_a`, `dims_b`.
    pub fn new(path: &nn::Path, spec: &AdapterSpec, in_dim: i64, out_dim: i64) -> Self {
        let r = spec.rank;
        Adapter {
            spec: spec.clone(),
            shared: spec
                .shared
                .then(|| lora_pair(path, "shared", r, in_dim, out_dim)),
            dimensions: lora_pair(path, "dims", spec.num_dimensions * r, in_dim, out_dim),
            gemms: LoraGemms::Stacked,
        }
    }

    /// `base + s * sum_j c_j B_j A_j x` (`base` alone when adapters are off). The shared-only
    /// and stacked forms accumulate their up-projection GEMM into `base` in place (`addmm_`,
    /// the scale folded into the small [b, t, r] side): no pass over the [b, t, out] update to
    /// scale it, add it or copy `base`.
    /// x: [b, t, in]; base: [b t, out], the frozen projection of x, fresh (not a view) and not
    /// needed by its own backward; returns [b t, out].
    pub fn add_to(&self, base: Tensor, x: &Tensor, conditioning: Conditioning) -> Tensor {
        let kind = x.kind();
        let scale = self.spec.scale();
        match (conditioning, &self.shared) {
            (Conditioning::Reference, _) => base,
            (Conditioning::SharedOnly, None) => {
                panic!("SharedOnly conditioning on an adapter without a shared block")
            }
            (Conditioning::SharedOnly, Some(shared)) => {
                let h = x.matmul(&shared.a.to_kind(kind).tr()) * scale; // [b, t, r]
                add_low_rank(base, &h, &shared.b.to_kind(kind))
            }
            (Conditioning::Weighted(weights), shared) if self.gemms == LoraGemms::PerBlock => {
                let r = self.spec.rank;
                let w = weights.to_kind(kind); // [b, k]
                let mut sum = shared.as_ref().map(|s| {
                    x.matmul(&s.a.to_kind(kind).tr())
                        .matmul(&up_projection(&s.b.to_kind(kind)))
                }); // [b, t, out]
                for i in 0..self.spec.num_dimensions {
                    let a_i = self.dimensions.a.narrow(0, i * r, r).to_kind(kind); // [r, in]
                    let b_i = self.dimensions.b.narrow(1, i * r, r).to_kind(kind); // [out, r]
                    let w_i = w.narrow(1, i, 1).unsqueeze(2); // [b, 1, 1]
                    let block = x.matmul(&a_i.tr()).matmul(&up_projection(&b_i)) * w_i;
                    sum = Some(match sum {
                        Some(s) => s + block,
                        None => block,
                    });
                }
                match sum {
                    Some(s) => {
                        let out = base.size()[1];
                        base + (s * scale).reshape([-1, out])
                    }
                    None => base,
                }
            }
            (Conditioning::Weighted(weights), shared) => {
                let (a_cat, b_cat) = self.stacked(kind);
                let h = x.matmul(&a_cat.tr()); // [b, t, blocks * r]
                let row_scale = (self.rank_scales(weights, shared.is_some()) * scale).to_kind(kind); // [b, blocks * r]
                add_low_rank(base, &(h * row_scale.unsqueeze(1)), &b_cat)
            }
        }
    }

    /// A_cat [blocks r, in] and B_cat [out, blocks r], shared block first.
    pub fn stacked(&self, kind: Kind) -> (Tensor, Tensor) {
        let d = &self.dimensions;
        match &self.shared {
            Some(s) => (
                Tensor::cat(&[&s.a, &d.a], 0).to_kind(kind),
                Tensor::cat(&[&s.b, &d.b], 1).to_kind(kind),
            ),
            None => (d.a.to_kind(kind), d.b.to_kind(kind)),
        }
    }

    /// weights [b, k] -> per-rank-feature scales [b, blocks r]: `[1, w_1 .. w_k]` (or
    /// `[w_1 .. w_k]` without a shared block), each repeated r times.
    fn rank_scales(&self, weights: &Tensor, with_shared: bool) -> Tensor {
        let b = weights.size()[0];
        let w = weights.to_kind(Kind::Float);
        let per_block = if with_shared {
            Tensor::cat(&[&Tensor::ones([b, 1], (Kind::Float, w.device())), &w], 1)
        } else {
            w
        }; // [b, blocks]
        per_block.repeat_interleave_self_int(self.spec.rank, 1, None)
    }

    /// The dense update `s * (B_0 A_0 + sum_i w_i B_i A_i)` [out, in] for one weight vector `w`
    /// (length k): what a merged model adds to `W`.
    pub fn delta_weight(&self, w: &[f64]) -> Tensor {
        let mut scales = Vec::with_capacity(self.spec.num_blocks() as usize);
        if self.shared.is_some() {
            scales.push(1.0);
        }
        scales.extend_from_slice(w);
        let r = self.spec.rank;
        let scales: Vec<f32> = scales
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s as f32, r as usize))
            .collect();
        let (a_cat, b_cat) = self.stacked(Kind::Float);
        let scales = Tensor::from_slice(&scales).to_device(a_cat.device()); // [blocks r]
        (b_cat * scales.unsqueeze(0)).matmul(&a_cat) * self.spec.scale()
    }
}

/// A frozen linear with optional adapters: the projection type of the decoder.
#[derive(Debug)]
pub struct ConditionedLinear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapter: Option<Adapter>,
}

impl ConditionedLinear {
    /// x: [b, t, in] -> [b, t, out]
    pub fn forward(&self, x: &Tensor, conditioning: Conditioning) -> Tensor {
        let Some(adapter) = &self.adapter else {
            return x.linear(&self.weight, self.bias.as_ref());
        };
        // The frozen projection as a fresh [rows, out] matrix, so the adapter's up-projection
        // can accumulate into it in place.
        let mut shape = x.size();
        let in_dim = shape[shape.len() - 1];
        let base = x
            .reshape([-1, in_dim])
            .linear(&self.weight, self.bias.as_ref()); // [rows, out]
        *shape.last_mut().expect("x has dimensions") = base.size()[1];
        adapter.add_to(base, x, conditioning).view(shape.as_slice())
    }
}

/// base [rows, out] += h [.., r] B^T (B: [out, r]; h's leading dimensions hold `rows`), as one
/// GEMM accumulating into base in place.
fn add_low_rank(mut base: Tensor, h: &Tensor, b: &Tensor) -> Tensor {
    let rank = h.size()[h.dim() - 1];
    let _ = base.addmm_(&h.reshape([-1, rank]), &up_projection(b));
    base
}

/// B [out, r] -> B^T [r, out] for the up-projection GEMM `h B^T`, as a contiguous copy (r x out
/// elements, next to nothing), not a transposed view of B: autograd picks its formulas by
/// layout, and with a contiguous B^T it computes B's gradient as h^T g [r, out] and h's as
/// g (B^T)^T. From the view it computes g^T h [out, r] and g B, which on the benchmark
/// machine's MKL took 3.3-3.9x as long at rank 8 (stage 1's shapes). At rank 24 (stage 3's)
/// the copy's form is the slower one, by 1.1-1.8x on those three GEMMs, under 2% of a step
/// (`bench/micro/lora_projection.py`).
fn up_projection(b: &Tensor) -> Tensor {
    b.tr().contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn random_adapter(vs: &VarStore, spec: &AdapterSpec, in_dim: i64, out_dim: i64) -> Adapter {
        let adapter = Adapter::new(&vs.root(), spec, in_dim, out_dim);
        tch::no_grad(|| {
            // B = 0 at init would make every comparison trivially equal.
            for pair in adapter.shared.iter().chain([&adapter.dimensions]) {
                pair.b
                    .shallow_clone()
                    .copy_(&(Tensor::randn(pair.b.size(), (Kind::Float, Device::Cpu)) * 0.5));
            }
        });
        adapter
    }

    /// The naive formula of METHOD.md: W x + s (B_0 A_0 x + sum_i w_i B_i A_i x), one block and
    /// one row at a time.
    fn naive(layer: &ConditionedLinear, spec: &AdapterSpec, x: &Tensor, w: &Tensor) -> Tensor {
        let adapter = layer.adapter.as_ref().unwrap();
        let r = spec.rank;
        let rows: Vec<Tensor> = (0..x.size()[0])
            .map(|row| {
                let xr = x.get(row); // [t, in]
                let mut out = xr.linear(&layer.weight, layer.bias.as_ref());
                if let Some(shared) = &adapter.shared {
                    out += xr.matmul(&shared.a.tr()).matmul(&shared.b.tr()) * spec.scale();
                }
                for i in 0..spec.num_dimensions {
                    let a_i = adapter.dimensions.a.narrow(0, i * r, r);
                    let b_i = adapter.dimensions.b.narrow(1, i * r, r);
                    let w_i = w.double_value(&[row, i]);
                    out += xr.matmul(&a_i.tr()).matmul(&b_i.tr()) * (w_i * spec.scale());
                }
                out
            })
            .collect();
        Tensor::stack(&rows, 0)
    }

    fn layer(vs: &VarStore, spec: &AdapterSpec) -> ConditionedLinear {
        ConditionedLinear {
            weight: Tensor::randn([24, 16], (Kind::Float, Device::Cpu)),
            bias: Some(Tensor::randn([24], (Kind::Float, Device::Cpu))),
            adapter: Some(random_adapter(vs, spec, 16, 24)),
        }
    }

    #[test]
    fn stacked_equals_naive_sum_for_mixed_rows() {
        tch::manual_seed(0);
        for shared in [true, false] {
            let spec = AdapterSpec {
                rank: 4,
                alpha: 8.0,
                num_dimensions: 3,
                shared,
            };
            let vs = VarStore::new(Device::Cpu);
            let layer = layer(&vs, &spec);
            let x = Tensor::randn([4, 5, 16], (Kind::Float, Device::Cpu));
            // Rows: a vertex, the centre, an interior point, and w = 0.
            let w = Tensor::from_slice(&[
                1.0f32,
                0.0,
                0.0,
                1. / 3.,
                1. / 3.,
                1. / 3.,
                0.2,
                0.5,
                0.3,
                0.0,
                0.0,
                0.0,
            ])
            .view([4, 3]);
            let stacked = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&w)));
            let expected = tch::no_grad(|| naive(&layer, &spec, &x, &w));
            let diff = (stacked - expected).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "shared={shared}: max abs diff {diff}");
        }
    }

    #[test]
    fn per_block_gemms_equal_stacked() {
        tch::manual_seed(3);
        for shared in [true, false] {
            let spec = AdapterSpec {
                rank: 3,
                alpha: 6.0,
                num_dimensions: 3,
                shared,
            };
            let vs = VarStore::new(Device::Cpu);
            let mut layer = layer(&vs, &spec);
            let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
            let w = Tensor::from_slice(&[0.2f32, 0.5, 0.3, 0.0, 1.0, 0.0]).view([2, 3]);
            let stacked = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&w)));
            layer.adapter.as_mut().unwrap().gemms = LoraGemms::PerBlock;
            let per_block = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&w)));
            let diff = (stacked - per_block).abs().max().double_value(&[]);
            assert!(diff <= 1e-5, "shared={shared}: max abs diff {diff}");
        }
    }

    #[test]
    fn shared_only_equals_zero_weights_and_reference_is_the_base() {
        tch::manual_seed(1);
        let spec = AdapterSpec {
            rank: 2,
            alpha: 16.0,
            num_dimensions: 2,
            shared: true,
        };
        let vs = VarStore::new(Device::Cpu);
        let layer = layer(&vs, &spec);
        let x = Tensor::randn([3, 4, 16], (Kind::Float, Device::Cpu));
        let zeros = Tensor::zeros([3, 2], (Kind::Float, Device::Cpu));
        let shared_only = layer.forward(&x, Conditioning::SharedOnly);
        let weighted = layer.forward(&x, Conditioning::Weighted(&zeros));
        assert!((&shared_only - weighted).abs().max().double_value(&[]) <= 1e-5);
        let base = x.linear(&layer.weight, layer.bias.as_ref());
        assert!(layer.forward(&x, Conditioning::Reference).equal(&base));
        assert!(
            !shared_only.allclose(&base, 1e-3, 1e-3, false),
            "the shared block contributes"
        );
    }

    #[test]
    fn delta_weight_is_the_merged_update() {
        tch::manual_seed(2);
        let spec = AdapterSpec {
            rank: 3,
            alpha: 6.0,
            num_dimensions: 2,
            shared: true,
        };
        let vs = VarStore::new(Device::Cpu);
        let layer = layer(&vs, &spec);
        let x = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
        let w = [0.3, 0.7];
        let rows = Tensor::from_slice(&[0.3f32, 0.7, 0.3, 0.7]).view([2, 2]);
        let adapted = layer.forward(&x, Conditioning::Weighted(&rows));
        let merged = x.linear(
            &(&layer.weight + layer.adapter.as_ref().unwrap().delta_weight(&w)),
            layer.bias.as_ref(),
        );
        assert!((adapted - merged).abs().max().double_value(&[]) <= 1e-5);
    }

    #[test]
    fn fresh_adapters_leave_the_model_unchanged() {
        let spec = AdapterSpec {
            rank: 8,
            alpha: 16.0,
            num_dimensions: 2,
            shared: true,
        };
        let vs = VarStore::new(Device::Cpu);
        let layer = ConditionedLinear {
            weight: Tensor::randn([8, 8], (Kind::Float, Device::Cpu)),
            bias: None,
            adapter: Some(Adapter::new(&vs.root(), &spec, 8, 8)),
        };
        let x = Tensor::randn([2, 3, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::from_slice(&[0.5f32, 0.5, 1.0, 0.0]).view([2, 2]);
        assert!(layer
            .forward(&x, Conditioning::Weighted(&w))
            .equal(&layer.forward(&x, Conditioning::Reference)));
        let a = &layer.adapter.as_ref().unwrap().dimensions.a;
        let bound = 1.0 / 8f64.sqrt();
        assert!(a.abs().max().double_value(&[]) <= bound && a.abs().max().double_value(&[]) > 0.0);
    }
}
