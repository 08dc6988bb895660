use super::*;

/// A checkpoint of one 2x3 adapter in `<dir>/checkpoints`, and its directory.
fn write_one(dir: &Path) -> PathBuf {
    let adapters = VarStore::new(tch::Device::Cpu);
    let _ = adapters.root().zeros("a", &[2, 3]);
    let spec = AdapterSpec {
        kind: AdapterKind::Lora,
        rank: 1,
        alpha: 2.0,
        num_dimensions: 1,
        shared: true,
    };
    let meta = AdapterMeta::new(Path::new("model"), "fp", &["x".to_string()], &spec);
    let state = TrainerState {
        version: CHECKPOINT_VERSION,
        stage: 1,
        stage_name: "general".into(),
        step: 3,
        stage_finished: true,
        epoch: 0,
        pairs_into_epoch: 0,
        optimizer_params: vec![],
        optimizer_steps: 3,
        model_fingerprint: "fp".into(),
        data_fingerprint: "data".into(),
        dimensions: vec!["x".into()],
        config: serde_json::json!({}),
        world_size: 1,
    };
    write_checkpoint(&dir.join("checkpoints"), &adapters, &meta, &[], &state).unwrap()
}

#[test]
fn a_damaged_checkpoint_is_corrupt_and_an_absent_one_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_one(tmp.path());
    assert_eq!(verify_checkpoint(&dir).unwrap().step, 3);

    let adapters = dir.join(ADAPTERS_FILE);
    let bytes = std::fs::read(&adapters).unwrap();
    std::fs::write(&adapters, &bytes[..bytes.len() - 1]).unwrap();
    match verify_checkpoint(&dir) {
        Err(CheckpointError::Corrupt { path }) => assert_eq!(path, adapters),
        other => panic!("expected Corrupt, got {other:?}"),
    }

    let list = dir.join(CHECKSUMS_FILE);
    let text = std::fs::read_to_string(&list).unwrap();
    std::fs::write(&list, &text[..text.len() / 2]).unwrap();
    let err = verify_checkpoint(&dir).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Unparsable { path, expected: "checksum list", .. } if *path == list),
        "{err:?}"
    );

    let checkpoints = tmp.path().join("checkpoints");
    match stage_final_checkpoint(&checkpoints, 2) {
        Err(CheckpointError::Missing { stage: 2, dir }) => {
            assert_eq!(dir, checkpoints.join("stage-2-final"))
        }
        other => panic!("expected Missing, got {other:?}"),
    }
}

#[test]
fn adapters_of_another_shape_are_incompatible() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_one(tmp.path());
    let other = VarStore::new(tch::Device::Cpu);
    let _ = other.root().zeros("a", &[3, 2]);
    let err = load_adapters(&dir.join(ADAPTERS_FILE), &other).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::Incompatible { .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .ends_with("adapters.safetensors: adapter `a` is F32 [2, 3], expected F32 [3, 2]"),
        "{err}"
    );
}
