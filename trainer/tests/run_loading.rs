//! Loading a finished run, the one way `export`, `generate --run` and `eval` share: each
//! refuses a run whose base model changed with the same message, honours the run's chat
//! template, and checks `--weights` the same way.

mod support;

use std::path::Path;
use std::process::Output;

use support::{modpo, stderr};

fn succeed(args: &[&str]) -> Output {
    let out = modpo(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    out
}

/// The `error: ...` line of a failed command's stderr (the logs are on stderr too).
fn error_line(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let text = stderr(out);
    text.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line in {text}"))
        .to_string()
}

/// The run's chat template: ChatML, except that it refuses the prompt `PROBE`, so a command
/// that answers `PROBE` did not render through it.
const RUN_TEMPLATE: &str = "{% for m in messages %}{% if m.content == 'PROBE' %}\
{{ raise_exception('the run chat template was used') }}{% endif %}<|im_start|>{{ m.role }}\n\
{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\
{% endif %}";

/// Synthetic data, a tiny model and a curriculum run of one step per stage on them, in `dir`.
fn train_tiny_run(dir: &Path) {
    let s = |p: &str| dir.join(p).to_str().unwrap().to_string();
    succeed(&[
        "synth",
        "--scenario",
        "independent",
        "--out",
        &s("synth"),
        "--pairs",
        "200",
        "--eval-pairs",
        "40",
    ]);
    succeed(&["tiny-model", "--out", &s("model")]);
    let config = format!(
        "[model]\npath = \"model\"\ndevice = \"cpu\"\nchat_template = {template:?}\n\
         [data]\nformat = \"generic\"\ndimensions = [\"polite\", \"formal\"]\n\
         train_file = \"synth/train.jsonl\"\neval_file = \"synth/eval.jsonl\"\n\
         max_length = 128\nglobal_batch = 8\nmicro_batch = 4\n\
         [method]\nname = \"curriculum\"\n[train]\noutput_dir = \"run\"\nmax_steps = 1\n",
        template = RUN_TEMPLATE
    );
    std::fs::write(dir.join("run.toml"), config).unwrap();
    succeed(&["train", "--config", &s("run.toml")]);
}

#[test]
fn a_run_is_loaded_one_way_by_export_generate_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    train_tiny_run(tmp.path());
    let run = tmp.path().join("run");
    let run = run.to_str().unwrap();
    let never = tmp.path().join("never");
    let never = never.to_str().unwrap();
    let export =
        |weights: &str| modpo(&["export", "--run", run, "--weights", weights, "--out", never]);
    let generate = |weights: &str, prompt: &str| {
        modpo(&[
            "generate",
            "--run",
            run,
            "--weights",
            weights,
            "--prompt",
            prompt,
            "--max-new-tokens",
            "4",
        ])
    };

    succeed(&[
        "generate",
        "--run",
        run,
        "--weights",
        "0.3,0.7",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "4",
    ]);
    // generate --run renders through the run's chat template, not the model's own.
    let line = error_line(&generate("0.3,0.7", "PROBE"));
    assert!(line.contains("the run chat template was used"), "{line}");

    refuses_weights_off_the_simplex(&export, &generate);
    assert!(!Path::new(never).exists());

    // Replace the base model's weights: every command refuses the run with one message.
    let other = tmp.path().join("model-7");
    succeed(&[
        "tiny-model",
        "--out",
        other.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    std::fs::copy(
        other.join("model.safetensors"),
        tmp.path().join("model/model.safetensors"),
    )
    .unwrap();
    let eval_out = tmp.path().join("eval");
    let refusals = [
        error_line(&export("0.3,0.7")),
        error_line(&generate("0.3,0.7", "hello")),
        error_line(&modpo(&[
            "eval",
            "--run",
            run,
            "--out",
            eval_out.to_str().unwrap(),
        ])),
    ];
    let adapters = format!("{run}/adapters.safetensors");
    let messages: Vec<&str> = refusals
        .iter()
        .map(|line| {
            let start = line
                .find(&adapters)
                .unwrap_or_else(|| panic!("names {adapters}: {line}"));
            &line[start..]
        })
        .collect();
    assert!(
        messages[0].contains("was trained on a different model than")
            && messages[0].contains("(fingerprints "),
        "{}",
        messages[0]
    );
    assert_eq!(messages[0], messages[1], "export and generate");
    assert_eq!(messages[0], messages[2], "export and eval");
    assert!(!Path::new(never).exists() && !eval_out.join("results.json").exists());

    // A run without its final adapters (training unfinished) is named as such.
    std::fs::remove_file(&adapters).unwrap();
    let line = error_line(&export("0.5,0.5"));
    assert!(
        line.contains(&format!("{run} has no final adapters")),
        "{line}"
    );
}

/// `--weights` off the simplex (the run has k = 2: polite, formal), of the wrong length, not
/// finite or not numbers: one message for `export` and `generate --run`, naming the flag, the
/// vector and the entry (or the sum) that is wrong.
fn refuses_weights_off_the_simplex(
    export: &dyn Fn(&str) -> Output,
    generate: &dyn Fn(&str, &str) -> Output,
) {
    let simplex = "is not on the simplex: the weights sum to";
    let finite = "not a finite number";
    for (weights, message) in [
        (
            "0.5,0.75",
            format!("--weights 0.5,0.75 {simplex} 1.25, not 1 (tolerance 1e-6)"),
        ),
        (
            "0.25,0.5",
            format!("--weights 0.25,0.5 {simplex} 0.75, not 1 (tolerance 1e-6)"),
        ),
        (
            "0.25,0.25,0.5",
            "--weights 0.25,0.25,0.5: 3 weights, but the run has k = 2 dimensions \
             (polite, formal)"
                .into(),
        ),
        (
            "1",
            "--weights 1: 1 weight, but the run has k = 2 dimensions (polite, formal)".into(),
        ),
        (
            "1.25,-0.25",
            "--weights 1.25,-0.25: the weight of `formal` is -0.25, but weights must be \
             non-negative"
                .into(),
        ),
        (
            "nan,1",
            format!("--weights NaN,1: the weight of `polite` is NaN, {finite}"),
        ),
        (
            "0,inf",
            format!("--weights 0,inf: the weight of `formal` is inf, {finite}"),
        ),
        (
            "-inf,1",
            format!("--weights -inf,1: the weight of `polite` is -inf, {finite}"),
        ),
        // A literal beyond an f64 is read as the infinity it stands for.
        (
            "1e999,0",
            format!("--weights inf,0: the weight of `polite` is inf, {finite}"),
        ),
    ] {
        let (exported, generated) = (
            error_line(&export(weights)),
            error_line(&generate(weights, "hi")),
        );
        assert_eq!(exported, format!("error: {message}"), "{weights}");
        assert_eq!(exported, generated, "{weights}");
    }
    let (exported, generated) = (
        error_line(&export("a,b")),
        error_line(&generate("a,b", "hi")),
    );
    assert!(
        exported.contains("--weights") && exported.contains("weight `a` is not a number"),
        "{exported}"
    );
    assert_eq!(exported, generated);
}

#[test]
fn a_directory_that_is_not_a_run_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let out = tmp.path().join("out");
    for args in [
        vec![
            "export",
            "--run",
            dir,
            "--weights",
            "0.5,0.5",
            "--out",
            out.to_str().unwrap(),
        ],
        vec![
            "generate",
            "--run",
            dir,
            "--weights",
            "0.5,0.5",
            "--prompt",
            "hi",
        ],
        vec!["eval", "--run", dir],
    ] {
        let line = error_line(&modpo(&args));
        assert!(
            line.contains(&format!("{dir} is not a run directory"))
                && line.contains("resolved_config.json"),
            "{args:?}: {line}"
        );
    }
}
