//! Evaluation on a hand-built case: a tiny model, five hand-written held-out conflict pairs
//! (plus one agree pair that must be ignored), adapters set by hand.
//!
//! The labels at the five weights of the grid are derived by hand below, from `d = s_a - s_b`
//! and `w . d` (`a`: y_a better, `b`: y_b better, `-`: tie, not counted):
//!
//! ```text
//! pair  s_a    s_b    d        w=(1,0)  (.75,.25)        (.5,.5)        (.25,.75)        (0,1)
//! P0    (2,0)  (0,1)  (2,-1)   a  2     a 1.5-.25=1.25   a 1-.5=.5      b .5-.75=-.25    b -1
//! P1    (1,0)  (0,1)  (1,-1)   a  1     a .5             - 0            b -.5            b -1
//! P2    (0,1)  (1,0)  (-1,1)   b        b                -              a                a
//! P3    (0,3)  (1,0)  (-1,3)   b -1     - -.75+.75=0     a -.5+1.5=1    a 2              a 3
//! P4    (3,0)  (0,3)  (3,-3)   a        a                - 0            b                b
//! ```
//!
//! so 5, 4, 2, 5 and 5 pairs count at the five weights. P2 is P1 with the scores swapped and
//! the same responses: the same margin, the opposite label, so exactly one of P1 and P2 is
//! right wherever they count. The margins themselves come from a second, independent path:
//! the merged model of `export::write_merged_model` (the soup of full weights `W + delta(w)`)
//! run as a plain model without adapters, pair by pair, minus the base model's log-probs. The
//! expected accuracy at each w is then counted from those margins' signs and the table above.
//! This is run for the DPO-Soup adapter layout (no shared block: the soup of full models) and
//! for the layout with a shared block (curriculum, Panacea), through the same `evaluate`.

use std::path::Path;

use modpo_tests::write_tiny_model;
use modpo_trainer::data::{self, DataConfig, PreferenceData};
use modpo_trainer::eval::{self, conflict_pairs, paper_settings, Batching, Bootstrap};
use modpo_trainer::export;
use modpo_trainer::model::{load_model, AdapterKind, AdapterSpec, LoadedModel};
use modpo_trainer::reference;
use modpo_trainer::tokenizer::ChatTokenizer;
use tch::{Device, Kind, Tensor};

const BETA: f64 = 0.5;

/// Held while a test draws from torch's global generator (the tiny model's weights, the
/// adapters' initialisation, the hand-set adapters): the tests of this file run on parallel
/// threads, and another test's draws between a `manual_seed` and its `randn` would change the
/// values, and with them whether every margin is far enough from 0 to compare signs.
static GLOBAL_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn drawing_alone<T>(draw: impl FnOnce() -> T) -> T {
    let _alone = GLOBAL_GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    draw()
}

/// Hand-derived labels (rows: w = (1,0), (.75,.25), (.5,.5), (.25,.75), (0,1); columns P0..P4).
const LABELS: [[char; 5]; 5] = [
    ['a', 'a', 'b', 'b', 'a'],
    ['a', 'a', 'b', '-', 'a'],
    ['a', '-', '-', 'a', '-'],
    ['b', 'b', 'a', 'a', 'b'],
    ['b', 'b', 'a', 'a', 'b'],
];

fn line(prompt: &str, a: &str, b: &str, sa: [f64; 2], sb: [f64; 2]) -> String {
    serde_json::json!({"prompt": prompt, "response_a": a, "response_b": b, "scores_a": sa, "scores_b": sb})
        .to_string()
        + "\n"
}

fn load_data(dir: &Path, tokenizer: &ChatTokenizer) -> PreferenceData {
    let train = [
        line("Name a colour.", "Blue.", "Seven.", [2.0, 1.0], [0.0, 0.0]),
        line(
            "Count to two.",
            "One, two.",
            "Two, one.",
            [1.0, 0.0],
            [0.0, 1.0],
        ),
    ]
    .concat();
    let eval = [
        line(
            "What is 2 + 2?",
            "It is 4.",
            "Maybe 5, I think.",
            [2.0, 0.0],
            [0.0, 1.0],
        ),
        line(
            "Say hi.",
            "Hi there!",
            "Hello, how are you today?",
            [1.0, 0.0],
            [0.0, 1.0],
        ),
        line(
            "Say hi.",
            "Hi there!",
            "Hello, how are you today?",
            [0.0, 1.0],
            [1.0, 0.0],
        ),
        line(
            "Spell cat.",
            "C-A-T, that is cat.",
            "k",
            [0.0, 3.0],
            [1.0, 0.0],
        ),
        line(
            "Pick a number.",
            "Three",
            "Nine hundred and ninety",
            [3.0, 0.0],
            [0.0, 3.0],
        ),
        line(
            "An agree pair.",
            "Good answer.",
            "Bad.",
            [2.0, 2.0],
            [1.0, 1.0],
        ),
    ]
    .concat();
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    std::fs::write(dir.join("eval.jsonl"), eval).unwrap();
    let config: DataConfig = toml::from_str(&format!(
        "format = \"generic\"\ndimensions = [\"x\", \"y\"]\ntrain_file = \"{}\"\neval_file = \"{}\"\n\
         max_length = 96\nglobal_batch = 2\nmicro_batch = 2\n",
        dir.join("train.jsonl").display(),
        dir.join("eval.jsonl").display()
    ))
    .unwrap();
    data::load(&config, tokenizer).unwrap()
}

/// Sets every adapter tensor by hand: deterministic draws, large enough that the margins are
/// far from 0 (so the sign comparison between the two paths is robust).
fn set_adapters(loaded: &LoadedModel, seed: i64) {
    tch::manual_seed(seed);
    tch::no_grad(|| {
        for (_, mut t) in loaded.adapters.variables() {
            t.copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.3));
        }
    });
}

/// Margins at `w` through the merged model, pair by pair (no padding, no replication):
/// `beta (u_a - u_b)`, and with per-token rewards `beta (u_a / |y_a| - u_b / |y_b|)`.
fn merged_margins(
    loaded: &LoadedModel,
    model_dir: &Path,
    out: &Path,
    w: &[f64],
    data: &PreferenceData,
    pad: u32,
) -> (Vec<f64>, Vec<f64>) {
    export::write_merged_model(&loaded.model, &loaded.base, w, model_dir, out).unwrap();
    let merged = load_model(out, None, Device::Cpu, Kind::Float).unwrap();
    let policy = reference::compute(&merged.model, &data.eval.pairs, 1, pad, Device::Cpu);
    let base = reference::compute(&loaded.model, &data.eval.pairs, 1, pad, Device::Cpu);
    conflict_pairs(&data.eval)
        .iter()
        .map(|p| {
            let u_a = f64::from(policy.response_a[p.id]) - f64::from(base.response_a[p.id]);
            let u_b = f64::from(policy.response_b[p.id]) - f64::from(base.response_b[p.id]);
            let (length_a, length_b) =
                (p.response_a_ids.len() as f64, p.response_b_ids.len() as f64);
            (BETA * (u_a - u_b), BETA * (u_a / length_a - u_b / length_b))
        })
        .unzip()
}

/// Small forwards (one weight vector at a time, 2 pairs) and one large forward (every weight
/// vector of all five pairs): they must give the same margins.
fn narrow_and_wide(pad: u32) -> (Batching, Batching) {
    let narrow = Batching {
        micro_batch: 2,
        rows_per_forward: 1,
        pad_token_id: pad,
        device: Device::Cpu,
    };
    let wide = Batching {
        micro_batch: 5,
        rows_per_forward: 100,
        ..narrow
    };
    (narrow, wide)
}

fn hand_built_case(shared: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    drawing_alone(|| write_tiny_model(&model_dir, 3));
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir, None).unwrap();
    let data = load_data(tmp.path(), &tokenizer);
    let pairs = conflict_pairs(&data.eval);
    assert_eq!(pairs.len(), 5, "the agree pair is not evaluated");
    assert_eq!(data.eval.pairs.len(), 6);
    let pad = tokenizer.pad_token_id();

    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared,
    };
    let loaded = drawing_alone(|| {
        let loaded = load_model(&model_dir, Some(&spec), Device::Cpu, Kind::Float).unwrap();
        set_adapters(&loaded, if shared { 11 } else { 12 });
        loaded
    });
    let reference = reference::compute(&loaded.model, &data.eval.pairs, 4, pad, Device::Cpu);
    let settings = paper_settings(2);
    assert_eq!(settings.len(), 5);
    let (narrow, wide) = narrow_and_wide(pad);
    let bootstrap = Bootstrap::default();
    let evaluation = eval::evaluate(
        &loaded.model,
        &pairs,
        &reference,
        &settings,
        eval::ImplicitReward::summed(BETA),
        &wide,
        &bootstrap,
    );
    let again = eval::evaluate(
        &loaded.model,
        &pairs,
        &reference,
        &settings,
        eval::ImplicitReward::summed(BETA),
        &narrow,
        &bootstrap,
    );

    let mut per_token_expected = Vec::new();
    let expected_counted = [5, 4, 2, 5, 5];
    for (s, setting) in settings.iter().enumerate() {
        let out = tmp.path().join(format!("merged-{s}"));
        let (expected, expected_per_token) =
            merged_margins(&loaded, &model_dir, &out, &setting.weights, &data, pad);
        per_token_expected.push(expected_per_token);
        for (p, (&got, &want)) in evaluation.margins[s].iter().zip(&expected).enumerate() {
            assert!(
                want.abs() > 1e-3,
                "w {:?} P{p}: margin {want} too close to 0 for a robust sign",
                setting.weights
            );
            assert!(
                (got - want).abs() <= 1e-4 + 1e-4 * want.abs(),
                "shared={shared} w {:?} P{p}: evaluated margin {got}, merged model {want}",
                setting.weights
            );
            let other = again.margins[s][p];
            assert!(
                (got - other).abs() <= 1e-5 + 1e-5 * got.abs(),
                "batching changes the margin: {got} vs {other}"
            );
        }
        // The expected accuracy: count by hand from the table and the merged margins' signs.
        let mut correct = 0;
        let mut counted = 0;
        for (p, &m) in expected.iter().enumerate() {
            match LABELS[s][p] {
                '-' => {}
                label => {
                    counted += 1;
                    correct += usize::from((m > 0.0) == (label == 'a'));
                }
            }
        }
        assert_eq!(counted, expected_counted[s]);
        let result = &evaluation.results[s].accuracy;
        assert_eq!(
            (result.counted, result.correct, result.ties),
            (counted, correct, 5 - counted),
            "shared={shared} w {:?}",
            setting.weights
        );
        assert_eq!(result.accuracy, Some(correct as f64 / counted as f64));
        let [low, high] = result.interval.unwrap();
        assert!(low <= result.accuracy.unwrap() && result.accuracy.unwrap() <= high);
        // P1 and P2: same responses, swapped scores: exactly one is right where they count.
        let (o1, o2) = (evaluation.outcomes[s][1], evaluation.outcomes[s][2]);
        match (o1, o2) {
            (None, None) => assert_eq!(setting.weights, vec![0.5, 0.5]),
            (Some(a), Some(b)) => assert_ne!(a, b, "w {:?}", setting.weights),
            other => panic!("P1 and P2 tie together or not at all: {other:?}"),
        }
    }
    let per_token = eval::ImplicitReward {
        beta: BETA,
        per_token: true,
    };
    let got = eval::evaluate(
        &loaded.model,
        &pairs,
        &reference,
        &settings,
        per_token,
        &wide,
        &bootstrap,
    );
    assert_per_token_margins(&got.margins, &per_token_expected);
}

/// Per-token margins (`ImplicitReward { per_token: true }`) equal the merged model's, pair by
/// pair: `beta (u_a / |y_a| - u_b / |y_b|)`.
fn assert_per_token_margins(got: &[Vec<f64>], expected: &[Vec<f64>]) {
    for (got, expected) in got.iter().zip(expected) {
        for (got, want) in got.iter().zip(expected) {
            assert!(
                (got - want).abs() <= 1e-5 + 1e-4 * want.abs(),
                "per-token margin {got}, merged model {want}"
            );
        }
    }
}

#[test]
fn soup_adapters_match_the_merged_soup_and_hand_counted_accuracy() {
    hand_built_case(false);
}

#[test]
fn shared_block_adapters_match_the_merged_model_and_hand_counted_accuracy() {
    hand_built_case(true);
}

/// With the adapters as initialised (B = 0) the adapter adds exactly 0, so the policy at any
/// w is the reference model. Computing the reference in the same layout as the evaluation
/// (the five conflict pairs in one micro-batch, sorted by length) gives bit-identical
/// log-probs, every margin is exactly 0, and a margin of 0 predicts y_b. The accuracy is then
/// the share of counted pairs labelled `b` in the table: 2/5, 1/4, 0/2, 3/5 and 3/5.
#[test]
fn zero_margins_predict_b() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("model");
    drawing_alone(|| write_tiny_model(&model_dir, 4));
    let tokenizer = ChatTokenizer::from_model_dir(&model_dir, None).unwrap();
    let data = load_data(tmp.path(), &tokenizer);
    let pairs = conflict_pairs(&data.eval);
    // The conflict pairs are ids 0..5 (the agree pair is the last line), as `compute` needs.
    assert!(pairs.iter().enumerate().all(|(i, p)| p.id == i));
    let owned: Vec<_> = pairs.iter().map(|p| (*p).clone()).collect();
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 4,
        alpha: 8.0,
        num_dimensions: 2,
        shared: false,
    };
    let loaded =
        drawing_alone(|| load_model(&model_dir, Some(&spec), Device::Cpu, Kind::Float).unwrap());
    let pad = tokenizer.pad_token_id();
    let reference = reference::compute(&loaded.model, &owned, 5, pad, Device::Cpu);
    let batching = Batching {
        micro_batch: 5,
        rows_per_forward: 5,
        pad_token_id: pad,
        device: Device::Cpu,
    };
    let settings = paper_settings(2);
    let evaluation = eval::evaluate(
        &loaded.model,
        &pairs,
        &reference,
        &settings,
        eval::ImplicitReward::summed(BETA),
        &batching,
        &Bootstrap::default(),
    );
    let expected = [(2, 5), (1, 4), (0, 2), (3, 5), (3, 5)];
    for (s, &(correct, counted)) in expected.iter().enumerate() {
        let margins = &evaluation.margins[s];
        assert!(
            margins.iter().all(|&m| m == 0.0),
            "fresh adapters: margins {margins:?}"
        );
        let a = &evaluation.results[s].accuracy;
        assert_eq!(
            (a.correct, a.counted),
            (correct, counted),
            "w {:?}",
            settings[s].weights
        );
    }
}
