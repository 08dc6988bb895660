//! [`Bucket`]: a list of tensors grouped by dtype, each group flattened into one contiguous
//! buffer, and the copy back. Collectives reduce a bucket with one call instead of one call
//! per tensor (the grouped all-reduce of llm.c and of PyTorch DDP's gradient buckets).

use tch::{Device, Kind, Tensor};

use crate::CollectiveError;

/// The tensors of one dtype, flattened and concatenated in list order.
pub(crate) struct Bucket {
    pub kind: Kind,
    /// Positions of this bucket's tensors in the caller's list, in list order.
    members: Vec<usize>,
    /// [sum of the members' numel], contiguous, on the members' device, dtype `kind`.
    pub flat: Tensor,
}

impl Bucket {
    /// Checks that every tensor is defined and on `device`, then groups them by dtype (buckets in
    /// order of each dtype's first appearance) and flattens each group into a fresh buffer.
    pub fn group(
        tensors: &[Tensor],
        device: Device,
        backend: &'static str,
    ) -> Result<Vec<Bucket>, CollectiveError> {
        let mut groups: Vec<(Kind, Vec<usize>)> = Vec::new();
        for (index, tensor) in tensors.iter().enumerate() {
            if !tensor.defined() {
                return Err(CollectiveError::Undefined { index });
            }
            if tensor.device() != device {
                return Err(CollectiveError::WrongDevice {
                    index,
                    found: tensor.device(),
                    expected: device,
                    backend,
                });
            }
            let kind = tensor.kind();
            match groups.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, members)) => members.push(index),
                None => groups.push((kind, vec![index])),
            }
        }
        tch::no_grad(|| {
            groups
                .into_iter()
                .map(|(kind, members)| {
                    let parts = members
                        .iter()
                        .map(|&i| tensors[i].f_reshape([-1]))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(CollectiveError::torch("flattening tensors into a bucket"))?;
                    // [sum of numel]. A lone contiguous tensor (an optimizer's flat gradient
                    // buffer) is its own bucket: reshape is a view of it, so the collective
                    // works in place with no copy. Otherwise cat allocates a new buffer.
                    let flat = match parts.as_slice() {
                        [only] if tensors[members[0]].is_contiguous() => only.shallow_clone(),
                        _ => Tensor::f_cat(&parts, 0)
                            .map_err(CollectiveError::torch("concatenating a bucket"))?,
                    };
                    Ok(Bucket {
                        kind,
                        members,
                        flat,
                    })
                })
                .collect()
        })
    }

    /// Number of elements in the bucket.
    pub fn numel(&self) -> usize {
        self.flat.numel()
    }

    /// Position in the caller's list of the bucket's first tensor (names it in errors).
    pub fn first_member(&self) -> usize {
        self.members[0]
    }

    /// Copies `values` ([numel], cast to each member's dtype and device as needed) back into
    /// the members, in place. Nothing is copied where `values` is already the member's memory
    /// (a lone contiguous member reduced in place).
    pub fn scatter(&self, values: &Tensor, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        tch::no_grad(|| {
            let mut offset = 0i64;
            for &index in &self.members {
                let target = &mut tensors[index];
                let numel = target.numel() as i64;
                if self.members.len() == 1
                    && values.data_ptr() == target.data_ptr()
                    && values.kind() == target.kind()
                    && values.device() == target.device()
                {
                    return Ok(());
                }
                let part = values
                    .f_narrow(0, offset, numel)
                    .and_then(|p| p.f_view(target.size().as_slice()))
                    .map_err(CollectiveError::torch("cutting a bucket back into tensors"))?;
                target
                    .f_copy_(&part)
                    .map_err(CollectiveError::torch("copying a bucket back into tensors"))?;
                offset += numel;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mixed dtypes and shapes, a non-contiguous view and a 0-dim scalar.
    fn mixed() -> Vec<Tensor> {
        vec![
            Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]),
            Tensor::from_slice(&[10.0f64, 20.0]),
            Tensor::from_slice(&[7.0f32, 8.0, 9.0, 10.0])
                .view([2, 2])
                .tr(),
            Tensor::from(0.5f64),
            Tensor::from_slice(&[11.0f32]).view([1, 1, 1]),
            Tensor::from_slice(&[1.5f32, -2.5]).to_kind(Kind::BFloat16),
        ]
    }

    #[test]
    fn groups_by_dtype_in_first_appearance_order() {
        let tensors = mixed();
        let buckets = Bucket::group(&tensors, Device::Cpu, "test").unwrap();
        let kinds: Vec<Kind> = buckets.iter().map(|b| b.kind).collect();
        assert_eq!(kinds, [Kind::Float, Kind::Double, Kind::BFloat16]);
        assert_eq!(buckets[0].members, [0, 2, 4]);
        // The transposed [2, 2] view flattens in its logical (row-major) order: 7, 9, 8, 10.
        let flat = Vec::<f32>::try_from(&buckets[0].flat).unwrap();
        assert_eq!(flat, [1., 2., 3., 4., 5., 6., 7., 9., 8., 10., 11.]);
        assert_eq!(
            Vec::<f64>::try_from(&buckets[1].flat).unwrap(),
            [10., 20., 0.5]
        );
        assert_eq!(buckets[2].numel(), 2);
        assert_eq!(buckets[2].first_member(), 5);
    }

    #[test]
    fn scatter_round_trips_into_the_original_storage() {
        let originals = mixed();
        let mut tensors: Vec<Tensor> = originals.iter().map(|t| t.shallow_clone()).collect();
        let buckets = Bucket::group(&tensors, Device::Cpu, "test").unwrap();
        // Write back a transformed buffer: every element times 3 (exact in bf16 for these).
        for bucket in &buckets {
            let tripled = &bucket.flat * 3.0;
            bucket.scatter(&tripled, &mut tensors).unwrap();
        }
        let expected = mixed();
        for (i, (shallow, original)) in tensors.iter().zip(&originals).enumerate() {
            assert_eq!(shallow.size(), expected[i].size(), "tensor {i} shape");
            assert_eq!(shallow.kind(), expected[i].kind(), "tensor {i} dtype");
            // The shallow clones share storage with the originals, which must see the change.
            assert!(
                original.equal(&(&expected[i] * 3.0)),
                "tensor {i}: {original:?}"
            );
        }
    }

    /// An optimizer's flat gradient buffer, alone in its dtype, is reduced where it lies: the
    /// bucket is a view of it (writing the bucket writes the tensor) and scattering the bucket
    /// back onto it copies nothing.
    #[test]
    fn a_lone_contiguous_tensor_is_its_own_bucket() {
        let buffer = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let mut tensors = vec![buffer.shallow_clone(), Tensor::from_slice(&[4.0f64])];
        let buckets = Bucket::group(&tensors, Device::Cpu, "test").unwrap();
        assert_eq!(buckets[0].flat.data_ptr(), buffer.data_ptr());
        let _ = buckets[0].flat.shallow_clone().g_mul_scalar_(2.0);
        buckets[0].scatter(&buckets[0].flat, &mut tensors).unwrap();
        assert_eq!(Vec::<f32>::try_from(&buffer).unwrap(), [2.0, 4.0, 6.0]);
        // A lone non-contiguous tensor is still copied into a fresh buffer.
        let transposed = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([2, 2])
            .tr();
        let buckets = Bucket::group(&[transposed.shallow_clone()], Device::Cpu, "test").unwrap();
        assert_ne!(buckets[0].flat.data_ptr(), transposed.data_ptr());
    }

    #[test]
    fn scatter_casts_to_the_members_dtype() {
        let mut tensors = vec![Tensor::zeros([3], (Kind::BFloat16, Device::Cpu))];
        let bucket = Bucket::group(&tensors, Device::Cpu, "test").unwrap();
        let values = Tensor::from_slice(&[1.0f32, 2.0, 0.25]);
        bucket[0].scatter(&values, &mut tensors).unwrap();
        assert_eq!(tensors[0].kind(), Kind::BFloat16);
        assert_eq!(
            Vec::<f32>::try_from(&tensors[0].to_kind(Kind::Float)).unwrap(),
            [1.0, 2.0, 0.25]
        );
    }

    #[test]
    fn parameters_that_require_grad_are_written_in_place() {
        let param = Tensor::zeros([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mut tensors = vec![param.shallow_clone()];
        let bucket = Bucket::group(&tensors, Device::Cpu, "test").unwrap();
        bucket[0]
            .scatter(&Tensor::from_slice(&[4.0f32, 5.0]), &mut tensors)
            .unwrap();
        assert_eq!(Vec::<f32>::try_from(&param.detach()).unwrap(), [4.0, 5.0]);
        assert!(param.requires_grad());
    }

    #[test]
    fn undefined_and_misplaced_tensors_are_named() {
        let tensors = vec![Tensor::from_slice(&[1.0f32]), Tensor::new()];
        let err = Bucket::group(&tensors, Device::Cpu, "test").err().unwrap();
        assert!(
            matches!(err, CollectiveError::Undefined { index: 1 }),
            "{err}"
        );

        let tensors = vec![Tensor::from_slice(&[1.0f32])];
        let err = Bucket::group(&tensors, Device::Cuda(0), "nccl")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "tensor 0 is on Cpu, but the nccl collective works on Cuda(0)"
        );
    }

    #[test]
    fn an_empty_list_makes_no_bucket() {
        assert!(Bucket::group(&[], Device::Cpu, "test").unwrap().is_empty());
    }
}
