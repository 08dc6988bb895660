use super::*;

/// A model small enough to work by hand: hidden 8, 2 heads of 4 (Q = 8), 1 key/value head
/// (KV = 4), MLP 16, vocabulary 10, 2 layers.
fn small() -> ModelDims {
    ModelDims {
        hidden: 8,
        q_dim: 8,
        kv_dim: 4,
        ffn: 16,
        vocab: 10,
        layers: 2,
        heads: 2,
        base_params: 1000,
    }
}

/// f32 (s = 4), stacked rank rt = 3, 2 right-padded rows of T = 5 tokens, N = 6 scored.
///
/// Per token and layer: the two norms' inputs and 1/rms 2 (4 * 8 + 4) = 72; the two normed
/// inputs the adapters keep 2 * 8 * 4 = 64; seven `(x A^T) * scale` 7 * 3 * 4 = 84; the MLP's
/// gate, silu, up and product 4 * 16 * 4 = 256; q and the attention output 2 * 8 * 4 = 64, k and
/// v 2 * 4 * 4 = 32, logsumexp 2 heads * 4 = 8. In all 580 bytes; 10 tokens: 5800 per layer.
///
/// The last layer, at all 10 tokens: its first norm 36, the normed input 32, q, k and v's
/// `(x A^T) * scale` 36, the attention's 104: 208 a token, 2080. At the 6 scored positions:
/// the second norm 36, the normed MLP input 32, the selected attention output o_proj keeps 32,
/// four `(x A^T) * scale` 48, the MLP's 256: 404 a position, 2424. The last layer: 4504.
///
/// Head: chunk min(6, 2^26 / 10) = 6 rows, 6 * 10 * 12 = 720. Final norm at the scored rows
/// 6 (32 + 4) = 216, its output and d log p / d h 2 * 6 * 8 * 4 = 384: 1320 with the chunk.
/// Forward peak 5800 + 4504 + 1320 = 11624. Backward of the last layer: the saved 10304, the
/// head's final-norm input and d log p / d h 216 + 192 = 408, the MLP's gradients at the
/// scored rows 6 * 3 * 16 * 4 = 1152 and the residual's at every token 10 * 3 * 8 * 4 = 960:
/// 12824, the peak. Of the layer below: 5800 + 408 + 10 (3 * 16 + 3 * 8) 4 = 9088.
///
/// Recomputed: block inputs 2 * 320 = 640, plus the larger of the last layer with the head
/// (4504 + max(1320, 408 + 2112 + the input's gradient 320) = 7344) and one block rebuilt
/// with its backward and the two [R, T, H] gradients (5800 + 2880 + 640 = 9320): 9960.
#[test]
fn layer_formula_by_hand() {
    let rows = Rows {
        rows: 2,
        seq_len: 5,
        b_view_len: 0,
        a_end: 0,
        scored: 6,
    };
    let kept = activations(&small(), rows, 4, 3, false);
    assert_eq!(kept.per_layer, 5800);
    assert_eq!(kept.lm_head, 720);
    assert_eq!(kept.per_layer_recomputed, 320);
    assert_eq!(kept.peak, 12824);
    assert_eq!(activations(&small(), rows, 4, 3, true).peak, 9960);
}

/// Pairs (prompt, a, b) = (2, 3, 1) and (1, 2, 2). Shared rows: 2 rows of max(6, 5) = 6
/// tokens, b's views max(3, 3) = 3, the first attention over max(5, 3) = 5, 4 + 4 = 8 scored;
/// a row per response: 4 rows of max(5, 3) = 5. The shared layout adds per layer, per row,
/// b's q, k, v and output plus logsumexp over T2 = 3 tokens (3 ((3 * 8 + 2 * 4) 4 + 8) = 408),
/// the concatenation over T1 = 5 (5 * 8 * 4 = 160) and the merged heads over T (6 * 8 * 4 =
/// 192), less the first output and logsumexp at the one token past T1 (8 * 4 + 2 * 4 = 40):
/// 2 rows * 720 = 1440 on top of 12 tokens * 580.
#[test]
fn shared_rows_by_hand() {
    let pairs = [(2, 3, 1), (1, 2, 2)];
    let shared = Rows::of_pairs(&pairs, true);
    assert_eq!(
        shared,
        Rows {
            rows: 2,
            seq_len: 6,
            b_view_len: 3,
            a_end: 5,
            scored: 8
        }
    );
    let per_response = Rows::of_pairs(&pairs, false);
    assert_eq!((per_response.rows, per_response.seq_len), (4, 5));
    let a = activations(&small(), shared, 4, 3, false);
    assert_eq!(a.per_layer, 12 * 580 + 1440);
}

fn load(target: Target) -> StageLoad {
    StageLoad {
        dims: small(),
        dtype_bytes: 4,
        dtype_name: "Float".into(),
        adapter_params: 100,
        trainable_params: 50,
        rank_allocator: false,
        pass_rank: 3,
        single_pass_rank: 3,
        passes: 3,
        longest_pair: (1, 999, 999),
        shared_prompt: true,
        rank_batch: 4,
        world_size: 1,
        target,
    }
}

fn setting(micro_batch: usize, batch_passes: bool, recompute: bool) -> Setting {
    Setting {
        micro_batch,
        batch_passes,
        recompute,
    }
}

/// On a GPU the fastest setting is the fewest forwards without recomputation: micro-batch 4
/// batched when everything fits; with a budget of exactly micro-batch 2 batched, that one
/// (micro-batch 4 one by one fits too, but takes three forwards to its one).
#[test]
fn the_chooser_takes_the_fastest_that_fits() {
    let gpu = load(Target::Cuda);
    let all = gpu.choose(u64::MAX).unwrap();
    assert_eq!(all.setting, setting(4, true, false));
    let budget = gpu.predict(setting(2, true, false)).total;
    assert!(gpu.predict(setting(4, false, false)).total <= budget);
    assert_eq!(gpu.choose(budget).unwrap().setting, setting(2, true, false));
    // On a CPU batching saves no time: the same micro-batch one pass at a time, for less.
    let cpu = load(Target::Cpu);
    assert_eq!(
        cpu.choose(u64::MAX).unwrap().setting,
        setting(4, false, false)
    );
}

/// Below the smallest peak nothing fits: the error carries the smallest setting.
#[test]
fn nothing_fits_is_an_error() {
    let gpu = load(Target::Cuda);
    let smallest = gpu.choose(1).unwrap_err();
    assert_eq!(smallest.setting, setting(1, false, true));
    assert!(gpu.choose(smallest.total - 1).is_err());
    assert!(gpu.choose(smallest.total).is_ok());
}
