//! Every method through the binary on the tiny model and the PKU-SafeRLHF sample: the
//! curriculum, Panacea as the paper ran it (AdaLoRA), Panacea on LoRA and DPO-Soup train end
//! to end, and `eval` compares the four runs in one table.

mod support;

use support::{assert_success, modpo, pku_sample, stderr, tiny_model, TrainToml};

const METHODS: [&str; 4] = ["curriculum", "panacea", "panacea-lora", "dpo-soup"];

#[test]
fn four_methods_train_and_eval_compares_them_in_one_table() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"), 0);
    let held_out = pku_sample().with_file_name("pku_saferlhf_test_sample.jsonl");
    let mut runs = Vec::new();
    for method in METHODS {
        let toml = TrainToml {
            method: method.into(),
            output_dir: method.into(),
            max_steps: 6,
            ..TrainToml::default()
        };
        let text = toml.text().replace(
            "eval_fraction = 0.0\n",
            &format!("eval_file = \"{}\"\n", held_out.display()),
        );
        let config = tmp.path().join(format!("{method}.toml"));
        std::fs::write(&config, text).unwrap();
        assert_success(&modpo(&["train", "--config", config.to_str().unwrap()]));
        runs.push(tmp.path().join(method));
    }

    let out_dir = tmp.path().join("eval");
    let mut args = vec!["eval".to_string()];
    for run in &runs {
        args.extend(["--run".to_string(), run.display().to_string()]);
    }
    args.extend(["--out".to_string(), out_dir.display().to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = modpo(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The summary printed: a row per method, in run order.
    let printed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|word| METHODS.contains(word))
        .collect();
    assert_eq!(printed, METHODS, "{stdout}");
    // The per-setting table of results.md has one column per run, headed by its method.
    let markdown = std::fs::read_to_string(out_dir.join("results.md")).unwrap();
    let header = markdown
        .lines()
        .find(|l| l.starts_with("| dimensions |"))
        .unwrap_or_else(|| panic!("no per-setting table in:\n{markdown}"));
    let columns: Vec<&str> = header.split('|').map(str::trim).collect();
    assert_eq!(&columns[4..8], &METHODS, "{header}");
}
