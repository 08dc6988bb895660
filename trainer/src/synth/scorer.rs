//! The synthetic scenarios' scorer for generated answers (`eval --generate --scenario`): the
//! very rule that labelled the data ([`super::score`]), so the fronts it gives are exact.

use anyhow::{bail, Result};

use super::{score, score_floor, Scenario};
use crate::eval::generation::{Answer, Scorer};

/// The exact rule of a scenario over the first `dimensions.len()` dimensions.
pub struct ScenarioScorer {
    pub scenario: Scenario,
    dimensions: Vec<String>,
}

impl ScenarioScorer {
    /// The scenario's rule for runs on `dimensions`, refused when they are not the scenario's
    /// first dimensions (the runs were not trained on its data).
    pub fn new(scenario: Scenario, dimensions: &[String]) -> Result<ScenarioScorer> {
        let names = scenario.dimension_names();
        let k = dimensions.len();
        if k > names.len() || names[..k] != *dimensions {
            bail!(
                "--scenario {}: the runs' dimensions [{}] are not the scenario's first {k} ([{}])",
                scenario.name(),
                dimensions.join(", "),
                names[..k.min(names.len())].join(", ")
            );
        }
        Ok(ScenarioScorer {
            scenario,
            dimensions: dimensions.to_vec(),
        })
    }
}

impl Scorer for ScenarioScorer {
    fn dimensions(&self) -> &[String] {
        &self.dimensions
    }

    fn reference_point(&self) -> Vec<f64> {
        score_floor(self.scenario, self.dimensions.len())
    }

    fn description(&self) -> String {
        format!(
            "the exact rule of the synthetic scenario `{}` (the code that labelled the data); \
             reference point: the lowest score a response of its data can have",
            self.scenario.name()
        )
    }

    fn score(&self, _prompt_ids: &[u32], answers: &[Answer]) -> Result<Vec<Vec<f64>>> {
        let k = self.dimensions.len();
        Ok(answers
            .iter()
            .map(|a| score(self.scenario, &a.text, k))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_scores_only_runs_on_its_dimensions() {
        let dims = ["harmless".to_string(), "helpful".to_string()];
        let scorer = ScenarioScorer::new(Scenario::EasyHard, &dims).unwrap();
        // The data's rule: "weapon" makes harmless 0; helpful counts its group's words.
        let answers = [Answer {
            ids: vec![],
            text: "first weapon steps guide".into(),
        }];
        assert_eq!(scorer.score(&[], &answers).unwrap(), vec![vec![0.0, 2.0]]);
        assert_eq!(scorer.reference_point(), vec![0.0, 0.0]);
        let interference = ScenarioScorer::new(
            Scenario::Interference,
            &["candid".to_string(), "tactful".to_string()],
        )
        .unwrap();
        assert_eq!(interference.reference_point(), vec![-2.0, -2.0]);
        let err = ScenarioScorer::new(Scenario::Independent, &dims)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("independent") && err.contains("harmless"),
            "{err}"
        );
    }
}
