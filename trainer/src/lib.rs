//! modpo-trainer: controllable multi-objective preference optimisation of causal LMs.
//!
//! Data flows one way: `config` -> `data` (tokenized pairs with score vectors) -> method (a plan
//! of stages and passes) -> train loop -> checkpoint / eval. The `model` knows nothing of DPO,
//! stages or ranks; rank topology lives in the `modpo-launcher` crate.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod crash_point;
pub mod data;
pub mod eval;
pub mod export;
pub mod invalid_key;
pub mod logps;
pub mod loss;
pub mod method;
pub mod model;
pub mod optim;
pub mod paths;
pub mod plan;
pub mod rank_allocation;
pub mod reference;
pub mod reward_model;
pub mod saved_run;
pub mod serve;
pub mod step;
pub mod synth;
pub mod tokenizer;
pub mod train;
