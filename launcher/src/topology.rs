//! Who am I: [`Topology`] (rank, local rank and world size of this process), read from the
//! environment that Open MPI (`mpirun`), MPICH/PMI or SLURM (`srun`) set up. A process started
//! alone is rank 0 of 1 and needs no launcher.

use std::collections::HashMap;

/// Where the topology was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// Started alone.
    Single,
    /// Open MPI's `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// MPICH / Intel MPI / any PMI launcher (`PMI_RANK`, `PMI_SIZE`).
    Pmi,
    /// SLURM's `srun` (`SLURM_PROCID`, `SLURM_LOCALID`, `SLURM_NTASKS`).
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Topology {
    pub rank: usize,
    /// Rank among the processes of this node: selects the GPU.
    pub local_rank: usize,
    pub world_size: usize,
    pub launcher: Launcher,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("environment variable {name}={value:?} is not a non-negative integer")]
    NotAnInteger { name: &'static str, value: String },
    #[error("{launcher:?} environment says rank {rank} of world size {world_size}")]
    RankOutOfRange {
        launcher: Launcher,
        rank: usize,
        world_size: usize,
    },
}

impl Topology {
    /// A process on its own.
    pub fn single() -> Self {
        Topology {
            rank: 0,
            local_rank: 0,
            world_size: 1,
            launcher: Launcher::Single,
        }
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Self, TopologyError> {
        Self::from_vars(&std::env::vars().collect())
    }

    /// Reads the given variables. Open MPI wins over PMI and SLURM: `mpirun` inside an
    /// `sbatch` allocation sets its own variables while the allocation's SLURM ones remain.
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Self, TopologyError> {
        let get = |name: &'static str| -> Result<Option<usize>, TopologyError> {
            match vars.get(name) {
                None => Ok(None),
                Some(value) => {
                    value
                        .trim()
                        .parse()
                        .map(Some)
                        .map_err(|_| TopologyError::NotAnInteger {
                            name,
                            value: value.clone(),
                        })
                }
            }
        };
        let candidates: [(Launcher, &'static str, &'static str, &'static str); 3] = [
            (
                Launcher::OpenMpi,
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_SIZE",
            ),
            (Launcher::Pmi, "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
            (
                Launcher::Slurm,
                "SLURM_PROCID",
                "SLURM_LOCALID",
                "SLURM_NTASKS",
            ),
        ];
        for (launcher, rank_var, local_var, size_var) in candidates {
            let (Some(rank), Some(world_size)) = (get(rank_var)?, get(size_var)?) else {
                continue;
            };
            if rank >= world_size {
                return Err(TopologyError::RankOutOfRange {
                    launcher,
                    rank,
                    world_size,
                });
            }
            // Without a local rank, assume one process per node.
            let local_rank = get(local_var)?.unwrap_or(0);
            return Ok(Topology {
                rank,
                local_rank,
                world_size,
                launcher,
            });
        }
        Ok(Self::single())
    }

    /// Rank 0 alone prints progress and writes files.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn alone_is_rank_zero_of_one() {
        assert_eq!(Topology::from_vars(&vars(&[])).unwrap(), Topology::single());
    }

    #[test]
    fn open_mpi_wins_over_slurm_allocation() {
        let t = Topology::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
        ]))
        .unwrap();
        assert_eq!(
            (t.rank, t.local_rank, t.world_size, t.launcher),
            (5, 1, 8, Launcher::OpenMpi)
        );
    }

    #[test]
    fn slurm_srun() {
        let t = Topology::from_vars(&vars(&[
            ("SLURM_PROCID", "9"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "16"),
        ]))
        .unwrap();
        assert_eq!(
            (t.rank, t.local_rank, t.world_size, t.launcher),
            (9, 1, 16, Launcher::Slurm)
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err = Topology::from_vars(&vars(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable PMI_RANK=\"x\" is not a non-negative integer"
        );
        let err = Topology::from_vars(&vars(&[("PMI_RANK", "2"), ("PMI_SIZE", "2")])).unwrap_err();
        assert!(matches!(
            err,
            TopologyError::RankOutOfRange {
                rank: 2,
                world_size: 2,
                ..
            }
        ));
    }
}
