//! `modpo-trainer plan`: a table per stage and the chosen setting; exit status 1 with a clear
//! message when a stage fits in no setting.

mod support;

use support::{modpo, pku_sample, stderr};

/// A curriculum config on the tiny model (written under `dir`), 64 tokens per sequence.
fn config(dir: &std::path::Path) -> String {
    support::tiny_model(&dir.join("model"), 0);
    let path = dir.join("run.toml");
    let text = format!(
        "[model]\npath = \"model\"\n[data]\nformat = \"pku-saferlhf\"\ntrain_file = \"{}\"\n\
         max_length = 64\nglobal_batch = 8\nmicro_batch = 4\n[method]\nname = \"curriculum\"\n\
         [train]\noutput_dir = \"run\"\n",
        pku_sample().display()
    );
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn plan_prints_every_stage_and_fails_when_nothing_fits() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let out = modpo(&[
        "plan",
        "--config",
        &config,
        "--device",
        "cpu",
        "--gpu-memory",
        "2",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", stderr(&out));
    for line in [
        "stage 1 (general)",
        "stage 3 (conditioned)",
        "saved per layer, kept",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert_eq!(
        text.matches("chosen (fastest that fits)").count(),
        3,
        "{text}"
    );
    // Llama-3-8B's bf16 weights alone are 15 GiB.
    let args = ["--architecture", "llama3-8b", "--gpu-memory", "10"];
    let out = modpo(&[&["plan", "--config", &config][..], &args[..]].concat());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("NOTHING FITS")
            && stderr(&out).contains("fits in no setting within 10.00 GiB"),
        "{}",
        stderr(&out)
    );
}

/// `[train] plan_memory_gib`: each stage logs the setting the planner chose and trains with
/// it; a budget below the CPU runtime alone stops the run with a message naming the key.
#[test]
fn train_runs_each_stage_with_the_planned_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}max_steps = 1\nplan_memory_gib = 2\n"),
    )
    .unwrap();
    let out = modpo(&["train", "--config", &config]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).matches("memory plan").count(),
        3,
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let small = text.replace("plan_memory_gib = 2", "plan_memory_gib = 0.1");
    std::fs::write(
        &config,
        small.replace("output_dir = \"run\"", "output_dir = \"run2\""),
    )
    .unwrap();
    let out = modpo(&["train", "--config", &config]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no setting fits train.plan_memory_gib = 0.1 GiB"),
        "{}",
        stderr(&out)
    );
}
