//! The command line: subcommands listed, and bad input ends in a clear message on stderr and
//! a non-zero exit, with nothing already written overwritten.

mod support;

use std::path::Path;

use support::{modpo, pku_sample, stderr};

/// The tiny model `modpo-trainer tiny-model --out DIR` writes (seed 0).
fn tiny_model(dir: &Path) {
    support::tiny_model(dir, 0);
}

fn write_config(dir: &Path, train_file: &str, extra_train: &str) -> String {
    let path = dir.join("run.toml");
    let text = format!(
        "[model]\npath = \"model\"\n[data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{train_file}\"\n\
         max_length = 64\nglobal_batch = 8\nmicro_batch = 4\n[method]\nname = \"curriculum\"\n\
         [train]\noutput_dir = \"run\"\nmax_steps = 1\n{extra_train}"
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn help_lists_the_subcommands() {
    let out = modpo(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["info", "data", "train", "export", "tiny-model"] {
        assert!(text.contains(command), "--help lists `{command}`:\n{text}");
    }
}

#[test]
fn info_prints_the_model_and_refuses_a_directory_without_config() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    tiny_model(&model);
    let out = modpo(&["info", "--model", model.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        text.contains("Llama") && text.contains("parameters") && text.contains("<|im_start|>user"),
        "{text}"
    );
    std::fs::remove_file(model.join("config.json")).unwrap();
    let out = modpo(&["info", "--model", model.to_str().unwrap()]);
    assert!(
        !out.status.success() && stderr(&out).contains("config.json not found"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn malformed_data_line_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"));
    let lines: Vec<String> = std::fs::read_to_string(pku_sample())
        .unwrap()
        .lines()
        .take(5)
        .map(String::from)
        .collect();
    let broken = format!("{}\n{}\n{{\"prompt\": oops\n", lines[0], lines[1]);
    std::fs::write(tmp.path().join("broken.jsonl"), broken).unwrap();
    let config = write_config(tmp.path(), "broken.jsonl", "");
    let out = modpo(&["data", "inspect", "--config", &config]);
    let err = stderr(&out);
    assert!(!out.status.success(), "malformed data must fail");
    assert!(
        err.contains("broken.jsonl") && err.contains('3'),
        "names the file and line 3: {err}"
    );
}

#[test]
fn unknown_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"));
    let config = write_config(
        tmp.path(),
        pku_sample().to_str().unwrap(),
        "learning_rat = 1e-4\n",
    );
    let out = modpo(&["train", "--config", &config]);
    assert!(
        !out.status.success() && stderr(&out).contains("learning_rat"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn train_then_export_and_refuse_bad_weights_or_existing_output() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model(&tmp.path().join("model"));
    let config = write_config(tmp.path(), pku_sample().to_str().unwrap(), "");
    let out = modpo(&["train", "--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A second run into the same directory is refused: nothing of the first is overwritten.
    let metrics = std::fs::read(tmp.path().join("run/metrics.jsonl")).unwrap();
    let again = modpo(&["train", "--config", &config]);
    assert!(
        !again.status.success() && stderr(&again).contains("already holds a run"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        std::fs::read(tmp.path().join("run/metrics.jsonl")).unwrap(),
        metrics
    );

    let run = tmp.path().join("run");
    let export = |weights: &str, out: &Path| {
        modpo(&[
            "export",
            "--run",
            run.to_str().unwrap(),
            "--weights",
            weights,
            "--out",
            out.to_str().unwrap(),
        ])
    };
    let good = tmp.path().join("peft");
    let out = export("0.3,0.7", &good);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        good.join("adapter_config.json").is_file()
            && good.join("adapter_model.safetensors").is_file()
    );

    for (weights, message) in [
        ("0.5,0.6", "not on the simplex"),
        ("0.2,0.3,0.5", "k = 2"),
        ("1.2,-0.2", "non-negative"),
        ("a,b", "not a number"),
    ] {
        let out = export(weights, &tmp.path().join("never"));
        assert!(
            !out.status.success() && stderr(&out).contains(message),
            "{weights}: {}",
            stderr(&out)
        );
        assert!(!tmp.path().join("never").exists());
    }
    let before = std::fs::read(good.join("adapter_model.safetensors")).unwrap();
    let out = export("0.5,0.5", &good);
    assert!(
        !out.status.success() && stderr(&out).contains("not empty"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(good.join("adapter_model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn device_and_dtype_are_spelled_the_same_in_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["export", "--run", dir, "--weights", "0.5,0.5", "--out", dir],
        &["eval", "--run", dir],
        &["generate", "--model", dir, "--prompt", "hi"],
        &["bench"],
    ];
    for command in commands {
        for (flag, values) in [
            ("--device", "auto, cpu, cuda"),
            ("--dtype", "auto, f32, bf16"),
        ] {
            if command[0] == "bench" && flag == "--dtype" {
                continue; // the preset decides the benchmark's dtype
            }
            let mut args = command.to_vec();
            args.extend([flag, "gpu"]);
            let out = modpo(&args);
            let err = stderr(&out);
            assert!(
                !out.status.success() && err.contains(&format!("possible values: {values}")),
                "{args:?}: {err}"
            );
        }
    }
}
