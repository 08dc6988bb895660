//! The adapter forward against its naive formula and PEFT's, for both kinds.
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
            kind: AdapterKind::Lora,
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
            kind: AdapterKind::Lora,
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
        kind: AdapterKind::Lora,
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
        kind: AdapterKind::Lora,
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
        kind: AdapterKind::Lora,
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

fn ada_layer(vs: &VarStore, k: i64) -> (ConditionedLinear, AdapterSpec) {
    let spec = AdapterSpec {
        kind: AdapterKind::AdaLora,
        rank: 3,
        alpha: 512.0,
        num_dimensions: k,
        shared: true,
    };
    let adapter = Adapter::new(&vs.root(), &spec, 16, 24);
    tch::no_grad(|| {
        // lambda = 0 at init would make every block vanish.
        for (_, group) in adapter.groups() {
            let values = &group.singular.as_ref().unwrap().values;
            let noise = Tensor::randn(values.size(), (Kind::Float, Device::Cpu)) * 0.05;
            values.shallow_clone().copy_(&noise);
        }
    });
    let layer = ConditionedLinear {
        weight: Tensor::randn([24, 16], (Kind::Float, Device::Cpu)),
        bias: None,
        adapter: Some(adapter),
    };
    (layer, spec)
}

/// PEFT's SVDLinear forward for block j alone, in PEFT's own order:
/// `(x @ (lora_A * lora_E).T @ lora_B.T) * scaling / (ranknum + 1e-5)`.
fn peft_block(group: &LoraPair, j: i64, r: i64, alpha: f64, x: &Tensor) -> Tensor {
    let q = group.a.narrow(0, j * r, r); // [r, in]
    let e = group
        .singular
        .as_ref()
        .unwrap()
        .values
        .narrow(0, j * r, r)
        .unsqueeze(1);
    let p = group.b.narrow(1, j * r, r); // [out, r]
    x.matmul(&(q * e).tr()).matmul(&p.tr()) * alpha / (r as f64 + 1e-5)
}

#[test]
fn adalora_at_a_vertex_is_the_shared_module_plus_module_i() {
    tch::manual_seed(4);
    let vs = VarStore::new(Device::Cpu);
    let (layer, spec) = ada_layer(&vs, 3);
    let adapter = layer.adapter.as_ref().unwrap();
    let shared = adapter.shared.as_ref().unwrap();
    let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
    let base = x.linear(&layer.weight, None::<Tensor>);
    for i in 0..3 {
        let mut w = vec![0f32; 6];
        w[i as usize] = 1.0;
        w[3 + i as usize] = 1.0;
        let w = Tensor::from_slice(&w).view([2, 3]);
        let ours = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&w)));
        let expected = &base
            + peft_block(shared, 0, spec.rank, spec.alpha, &x)
            + peft_block(&adapter.dimensions, i, spec.rank, spec.alpha, &x);
        let diff = (&ours - expected).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "w = 1_{i}: max abs diff {diff}");
        assert!(
            (&ours - &base).abs().max().double_value(&[]) > 1e-2,
            "blocks matter"
        );
    }
    // The shared block alone (w = 0), and the interior point by per-block GEMMs.
    let shared_only = layer.forward(&x, Conditioning::SharedOnly);
    let expected = &base + peft_block(shared, 0, spec.rank, spec.alpha, &x);
    assert!((shared_only - expected).abs().max().double_value(&[]) <= 1e-5);
}

#[test]
fn adalora_merged_update_and_per_block_gemms_agree_with_the_stacked_forward() {
    tch::manual_seed(5);
    let vs = VarStore::new(Device::Cpu);
    let (mut layer, _) = ada_layer(&vs, 2);
    let x = Tensor::randn([2, 4, 16], (Kind::Float, Device::Cpu));
    let rows = Tensor::from_slice(&[0.3f32, 0.7, 0.3, 0.7]).view([2, 2]);
    let stacked = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&rows)));
    let delta = layer.adapter.as_ref().unwrap().delta_weight(&[0.3, 0.7]);
    let merged = x.linear(&(&layer.weight + delta), None::<Tensor>);
    assert!((&stacked - merged).abs().max().double_value(&[]) <= 1e-4);
    layer.adapter.as_mut().unwrap().gemms = LoraGemms::PerBlock;
    let per_block = tch::no_grad(|| layer.forward(&x, Conditioning::Weighted(&rows)));
    assert!((stacked - per_block).abs().max().double_value(&[]) <= 1e-5);
}

#[test]
fn fresh_adalora_is_peft_initialised_and_leaves_the_model_unchanged() {
    tch::manual_seed(6);
    let vs = VarStore::new(Device::Cpu);
    let spec = AdapterSpec {
        kind: AdapterKind::AdaLora,
        rank: 12,
        alpha: 512.0,
        num_dimensions: 2,
        shared: true,
    };
    let layer = ConditionedLinear {
        weight: Tensor::randn([64, 64], (Kind::Float, Device::Cpu)),
        bias: None,
        adapter: Some(Adapter::new(&vs.root(), &spec, 64, 64)),
    };
    let adapter = layer.adapter.as_ref().unwrap();
    let q = &adapter.dimensions.a; // [24, 64]: 1536 draws of N(0, 0.02)
    let std = q.std(true).double_value(&[]);
    assert!((std - 0.02).abs() < 0.002, "std of Q {std}");
    let singular = adapter.dimensions.singular.as_ref().unwrap();
    assert_eq!(
        singular.values.abs().sum(Kind::Float).double_value(&[]),
        0.0
    );
    assert_eq!(singular.kept.sum(Kind::Float).double_value(&[]), 24.0);
    let x = Tensor::randn([2, 3, 64], (Kind::Float, Device::Cpu));
    let w = Tensor::from_slice(&[0.5f32, 0.5, 1.0, 0.0]).view([2, 2]);
    assert!(layer
        .forward(&x, Conditioning::Weighted(&w))
        .equal(&layer.forward(&x, Conditioning::Reference)));
}

/// PEFT's penalty terms, one matrix at a time: `torch.norm(A A^T - I)` for each module's
/// A and `torch.norm(B^T B - I)` for each module's B.
#[test]
fn orthogonality_terms_are_one_norm_per_module_and_matrix() {
    tch::manual_seed(7);
    let vs = VarStore::new(Device::Cpu);
    let (layer, spec) = ada_layer(&vs, 2);
    let adapter = layer.adapter.as_ref().unwrap();
    let (total, count) = adapter.orthogonality_terms();
    let r = spec.rank;
    let mut expected = 0.0;
    for (_, group) in adapter.groups() {
        for j in 0..group.a.size()[0] / r {
            let q = group.a.narrow(0, j * r, r);
            let p = group.b.narrow(1, j * r, r);
            let eye = Tensor::eye(r, (Kind::Float, Device::Cpu));
            expected += (q.matmul(&q.tr()) - &eye).norm().double_value(&[]);
            expected += (p.tr().matmul(&p) - &eye).norm().double_value(&[]);
        }
    }
    assert_eq!(count, 6, "3 modules x (Q, P)");
    assert!((total.double_value(&[]) - expected).abs() < 1e-5);
}

/// The adapter's parameters and their gradients after a backward of `sum(out * g)`.
fn output_and_grads(layer: &ConditionedLinear, x: &Tensor, cond: Conditioning) -> Vec<Tensor> {
    let adapter = layer.adapter.as_ref().unwrap();
    let params: Vec<Tensor> = adapter
        .groups()
        .flat_map(|(_, g)| {
            let mut p = vec![g.a.shallow_clone(), g.b.shallow_clone()];
            p.extend(g.singular.as_ref().map(|s| s.values.shallow_clone()));
            p
        })
        .collect();
    let out = layer.forward(x, cond); // [b, t, out]
    let g = Tensor::linspace(-1.0, 1.0, out.numel() as i64, (Kind::Float, Device::Cpu));
    let loss = (&out * g.view(out.size().as_slice())).sum(Kind::Float);
    let mut all = vec![out.detach()];
    all.extend(Tensor::run_backward(&[loss], &params, false, false));
    all
}

/// A w = 1_i pass with the zero-weight blocks skipped computes what the weighted forward
/// computes at 1_i, value and gradient (the skipped blocks' gradients are exact zeros), for
/// LoRA with and without the shared block, AdaLoRA, and the per-block GEMMs.
#[test]
fn a_dimension_pass_equals_weighted_at_the_vertex() {
    tch::manual_seed(5);
    let lora = |shared| AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 3,
        alpha: 6.0,
        num_dimensions: 3,
        shared,
    };
    let mut layers = Vec::new();
    for shared in [true, false] {
        let vs = VarStore::new(Device::Cpu);
        layers.push((layer(&vs, &lora(shared)), vs));
    }
    let vs = VarStore::new(Device::Cpu);
    layers.push((ada_layer(&vs, 3).0, vs));
    let x = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
    for (mut layer, _vs) in layers {
        for gemms in [LoraGemms::Stacked, LoraGemms::PerBlock] {
            layer.adapter.as_mut().unwrap().gemms = gemms;
            for i in 0..3 {
                let w = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
                let _ = w.narrow(1, i, 1).fill_(1.0);
                let skipped = output_and_grads(&layer, &x, Conditioning::Dimension(i));
                let weighted = output_and_grads(&layer, &x, Conditioning::Weighted(&w));
                for (j, (s, w)) in skipped.iter().zip(&weighted).enumerate() {
                    let diff = (s - w).abs().max().double_value(&[]);
                    assert!(
                        diff <= 1e-5,
                        "{gemms:?}, 1_{i}, tensor {j}: max abs diff {diff}"
                    );
                }
            }
        }
    }
}
