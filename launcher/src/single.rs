//! [`Single`]: the collective of a job with one process. The mean, broadcast and reductions
//! over one rank are the identity, so nothing is communicated.

use std::io::Write;

use tch::Tensor;

use crate::{Collective, CollectiveError, Op};

/// World size 1: every collective returns its input.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Single {
    /// Still rejects undefined tensors, so that a trainer bug that would break a multi-rank
    /// run shows up on one rank too.
    fn check_defined(tensors: &[Tensor]) -> Result<(), CollectiveError> {
        match tensors.iter().position(|t| !t.defined()) {
            Some(index) => Err(CollectiveError::Undefined { index }),
            None => Ok(()),
        }
    }
}

impl Collective for Single {
    fn name(&self) -> &'static str {
        "single"
    }

    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        Self::check_defined(tensors)
    }

    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        Self::check_defined(tensors)
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn all_reduce_f64(&self, _values: &mut [f64], _op: Op) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        let _ = std::io::stderr().flush();
        std::process::exit(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_collective_is_the_identity() {
        let single = Single;
        assert_eq!(
            (single.rank(), single.world_size(), single.name()),
            (0, 1, "single")
        );
        let a = Tensor::from_slice(&[1.0f32, -2.0, 3.5]).view([3, 1]);
        let b = Tensor::from_slice(&[0.25f64]);
        let mut tensors = vec![a.copy(), b.copy()];
        single.all_reduce_mean(&mut tensors).unwrap();
        single.broadcast(&mut tensors).unwrap();
        single.barrier().unwrap();
        assert!(tensors[0].equal(&a) && tensors[1].equal(&b));
        for op in [Op::Sum, Op::Mean, Op::Max] {
            let mut values = [1.5, -3.0, 0.0];
            single.all_reduce_f64(&mut values, op).unwrap();
            assert_eq!(values, [1.5, -3.0, 0.0], "{op:?}");
        }
    }

    #[test]
    fn undefined_tensors_are_rejected() {
        let mut tensors = vec![Tensor::from_slice(&[1.0f32]), Tensor::new()];
        let err = Single.all_reduce_mean(&mut tensors).unwrap_err();
        assert!(matches!(err, CollectiveError::Undefined { index: 1 }));
    }
}
