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
//! The AdaLoRA kind (Panacea as the paper ran it, METHOD.md section 5) has the same layout with
//! AdaLoRA's SVD form in each block, exactly as PEFT computes it: `A = Q` (PEFT `lora_A`),
//! singular values `lambda` (`lora_E`), `B = P` (`lora_B`), and block j adds
//! `c_j P_j ((Q_j * lambda_j) x) alpha / (r + 1e-5)`. The rank allocator (`rank_allocation.rs`)
//! zeroes the lambdas of the triplets it drops and records which it keeps.
//!
//! Adapter parameters live in their own `VarStore` in f32 (master weights) and are cast to the
//! activations' dtype in the forward, so a bf16 base trains f32 adapters.

use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// The low-rank form of every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// LoRA: `(alpha / r) B A x`; A Kaiming-uniform, B = 0.
    #[default]
    Lora,
    /// AdaLoRA's SVD form: `(alpha / (r + 1e-5)) P ((Q * lambda) x)`; lambda = 0 and P, Q
    /// normal with std 0.02, as PEFT initialises them. `r` is the initial rank (PEFT `init_r`).
    AdaLora,
}

/// Shape of the adapters attached to every projection.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub kind: AdapterKind,
    /// Rank r of each block (for AdaLoRA the initial rank, before rank allocation).
    pub rank: i64,
    /// LoRA alpha: the update is scaled by alpha / r (alpha / (r + 1e-5) for AdaLoRA).
    pub alpha: f64,
    /// Number of preference dimensions k.
    pub num_dimensions: i64,
    /// Whether a shared block h_0 exists (false for DPO-Soup).
    pub shared: bool,
}

impl AdapterSpec {
    pub fn scale(&self) -> f64 {
        match self.kind {
            AdapterKind::Lora => self.alpha / self.rank as f64,
            // PEFT divides by `ranknum + 1e-5`, ranknum being the initial rank.
            AdapterKind::AdaLora => self.alpha / (self.rank as f64 + 1e-5),
        }
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
    /// `w = 1_i` for every row (the per-dimension passes): the shared block and dimension
    /// block `i` only; the k - 1 blocks whose weight is 0 in every row are skipped, not
    /// multiplied by 0. Equal to `Weighted` with 1_i rows up to the GEMMs' summation order.
    Dimension(i64),
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

/// One block group's parameters: A [blocks * r, in], B [out, blocks * r], and for AdaLoRA the
/// singular values.
#[derive(Debug)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
    pub singular: Option<SingularValues>,
}

/// AdaLoRA's per-triplet parts of a block group.
#[derive(Debug)]
pub struct SingularValues {
    /// lambda [blocks * r], trained (PEFT `lora_E`, stored there as [r, 1]).
    pub values: Tensor,
    /// [blocks * r], 1.0 for a triplet the rank allocator keeps and 0.0 for one it dropped (its
    /// lambda is 0); not trained, saved with the adapters.
    pub kept: Tensor,
}

impl LoraPair {
    /// The down-projection as the forward uses it: A, or for AdaLoRA `Q * lambda` (each row
    /// scaled by its singular value, PEFT's `lora_A * lora_E`): [rows, in]
    pub fn down(&self) -> Tensor {
        match &self.singular {
            None => self.a.shallow_clone(),
            Some(s) => &self.a * s.values.unsqueeze(1),
        }
    }

    /// Which rows are kept: [rows] of 1.0 / 0.0 (all ones for LoRA).
    pub fn kept(&self) -> Tensor {
        match &self.singular {
            None => Tensor::ones([self.a.size()[0]], (Kind::Float, self.a.device())),
            Some(s) => s.kept.shallow_clone(),
        }
    }
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

/// PEFT's init, so a fresh adapter leaves the model unchanged. LoRA: A ~ Kaiming-uniform
/// (a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0. AdaLoRA: Q, P ~ N(0, 0.02), lambda = 0.
fn lora_pair(
    path: &nn::Path,
    name: &str,
    kind: AdapterKind,
    rows: i64,
    in_dim: i64,
    out_dim: i64,
) -> LoraPair {
    match kind {
        AdapterKind::Lora => {
            let bound = 1.0 / (in_dim as f64).sqrt();
            let uniform = nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            LoraPair {
                a: path.var(&format!("{name}_a"), &[rows, in_dim], uniform),
                b: path.var(&format!("{name}_b"), &[out_dim, rows], nn::Init::Const(0.0)),
                singular: None,
            }
        }
        AdapterKind::AdaLora => {
            let normal = nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            };
            LoraPair {
                a: path.var(&format!("{name}_a"), &[rows, in_dim], normal),
                b: path.var(&format!("{name}_b"), &[out_dim, rows], normal),
                singular: Some(SingularValues {
                    values: path.var(&format!("{name}_e"), &[rows], nn::Init::Const(0.0)),
                    kept: path.ones_no_train(&format!("{name}_kept"), &[rows]),
                }),
            }
        }
    }
}

impl Adapter {
    /// Creates trainable f32 parameters `{path}.shared_a`, `shared_b`, `dims_a`, `dims_b`, and
    /// for AdaLoRA `shared_e`, `dims_e` (lambda) and the untrained `shared_kept`, `dims_kept`.
    pub fn new(path: &nn::Path, spec: &AdapterSpec, in_dim: i64, out_dim: i64) -> Self {
        let (r, kind) = (spec.rank, spec.kind);
        let dimension_rows = spec.num_dimensions * r;
        Adapter {
            spec: spec.clone(),
            shared: spec
                .shared
                .then(|| lora_pair(path, "shared", kind, r, in_dim, out_dim)),
            dimensions: lora_pair(path, "dims", kind, dimension_rows, in_dim, out_dim),
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
                let h = x.matmul(&shared.down().to_kind(kind).tr()) * scale; // [b, t, r]
                add_low_rank(base, &h, &shared.b.to_kind(kind))
            }
            (Conditioning::Dimension(i), shared) if self.gemms == LoraGemms::PerBlock => {
                let r = self.spec.rank;
                let down = self.dimensions.down().narrow(0, i * r, r);
                let up = self.dimensions.b.narrow(1, i * r, r);
                let mut pairs = vec![(down, up)];
                if let Some(s) = shared {
                    pairs.insert(0, (s.down(), s.b.shallow_clone()));
                }
                let mut sum = base;
                for (a_j, b_j) in pairs {
                    let h = x.matmul(&a_j.to_kind(kind).tr()) * scale; // [b, t, r]
                    sum = add_low_rank(sum, &h, &b_j.to_kind(kind));
                }
                sum
            }
            (Conditioning::Dimension(i), _) => {
                let (a_used, b_used) = self.blocks_of_dimension(i, kind);
                let h = x.matmul(&a_used.tr()) * scale; // [b, t, used blocks * r]
                add_low_rank(base, &h, &b_used)
            }
            (Conditioning::Weighted(weights), shared) if self.gemms == LoraGemms::PerBlock => {
                let r = self.spec.rank;
                let w = weights.to_kind(kind); // [b, k]
                let mut sum = shared.as_ref().map(|s| {
                    x.matmul(&s.down().to_kind(kind).tr())
                        .matmul(&up_projection(&s.b.to_kind(kind)))
                }); // [b, t, out]
                let dimensions_down = self.dimensions.down();
                for i in 0..self.spec.num_dimensions {
                    let a_i = dimensions_down.narrow(0, i * r, r).to_kind(kind); // [r, in]
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

    /// A_cat [blocks r, in] and B_cat [out, blocks r], shared block first; for AdaLoRA A_cat
    /// is `Q * lambda` ([`LoraPair::down`]).
    pub fn stacked(&self, kind: Kind) -> (Tensor, Tensor) {
        let d = &self.dimensions;
        match &self.shared {
            Some(s) => (
                Tensor::cat(&[s.down(), d.down()], 0).to_kind(kind),
                Tensor::cat(&[&s.b, &d.b], 1).to_kind(kind),
            ),
            None => (d.down().to_kind(kind), d.b.to_kind(kind)),
        }
    }

    /// The blocks a `w = 1_i` pass uses, stacked as [`Adapter::stacked`] stacks all of them:
    /// A [(shared + 1) r, in] and B [out, (shared + 1) r], shared block first.
    fn blocks_of_dimension(&self, i: i64, kind: Kind) -> (Tensor, Tensor) {
        let r = self.spec.rank;
        assert!(
            (0..self.spec.num_dimensions).contains(&i),
            "dimension {i} of an adapter with {} dimensions",
            self.spec.num_dimensions
        );
        let d = &self.dimensions;
        let a_i = d.down().narrow(0, i * r, r); // [r, in]
        let b_i = d.b.narrow(1, i * r, r); // [out, r]
        match &self.shared {
            Some(s) => (
                Tensor::cat(&[s.down(), a_i], 0).to_kind(kind),
                Tensor::cat(&[&s.b, &b_i], 1).to_kind(kind),
            ),
            None => (a_i.to_kind(kind), b_i.to_kind(kind)),
        }
    }

    /// Which rank features of [`Adapter::stacked`] are kept: [blocks r] of 1.0 / 0.0.
    pub fn stacked_kept(&self) -> Tensor {
        let d = self.dimensions.kept();
        match &self.shared {
            Some(s) => Tensor::cat(&[s.kept(), d], 0),
            None => d,
        }
    }

    /// The block groups: the shared one (if any), then the dimension blocks.
    pub fn groups(&self) -> impl Iterator<Item = (&'static str, &LoraPair)> {
        let shared = self.shared.as_ref().map(|s| ("shared", s));
        shared.into_iter().chain([("dims", &self.dimensions)])
    }

    /// AdaLoRA's orthogonality terms of this projection, as PEFT sums them: for each block j,
    /// `||Q_j Q_j^T - I||_F` and `||P_j^T P_j - I||_F`. Returns their sum (a scalar) and how
    /// many matrices that is.
    pub fn orthogonality_terms(&self) -> (Tensor, i64) {
        let r = self.spec.rank;
        let mut total = Tensor::zeros([], (Kind::Float, self.dimensions.a.device()));
        let mut count = 0;
        for (_, group) in self.groups() {
            let blocks = group.a.size()[0] / r;
            if blocks == 0 {
                continue;
            }
            let in_dim = group.a.size()[1];
            let q = group.a.view([blocks, r, in_dim]); // [blocks, r, in]
            let p = group.b.view([-1, blocks, r]).permute([1, 0, 2]); // [blocks, out, r]
            let identity = Tensor::eye(r, (Kind::Float, q.device())).unsqueeze(0);
            for gram in [q.bmm(&q.transpose(1, 2)), p.transpose(1, 2).bmm(&p)] {
                // [blocks, r, r] -> one Frobenius norm per block
                let norms = (gram - &identity)
                    .square()
                    .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float)
                    .sqrt();
                total += norms.sum(Kind::Float);
                count += blocks;
            }
        }
        (total, count)
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
mod tests;
