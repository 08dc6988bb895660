//! `modpo-collective-check`: runs every collective on rank-dependent tensors and compares the
//! results with means worked out by hand, so a broken all-reduce, broadcast, metric reduction
//! or barrier fails loudly. Launched by the launcher's tests under `mpirun -np 2` (CPU, MPI),
//! and by `tools/gpu_nccl_check.sh` with `--nccl-single` on a GPU machine.
//!
//! `--fail-rank R --fail-how ...` makes rank R fail after the first all-reduce while the
//! others go on to the next one: the job must then end at once with a non-zero status.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use modpo_launcher::{
    cuda_ordinal, init, run_or_abort, Collective, CollectiveChoice, CollectiveError, Nccl, Op,
};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum FailHow {
    /// Return an error through `run_or_abort`.
    Error,
    /// Panic inside `run_or_abort`.
    Panic,
    /// Panic outside `run_or_abort`: the collective's drop must abort the job.
    PanicUnguarded,
    /// SIGKILL this rank.
    Kill,
}

#[derive(Debug, Parser)]
#[command(about = "Check the collectives of modpo-launcher on rank-dependent tensors")]
struct Args {
    /// Collective to set up (as the trainer's `--collective`).
    #[arg(long, default_value = "auto")]
    collective: CollectiveChoice,
    /// Put the tensors on this rank's GPU instead of the CPU.
    #[arg(long)]
    cuda: bool,
    /// NCCL with this process alone (world size 1, no MPI); skips without a CUDA device.
    #[arg(long, conflicts_with_all = ["collective", "cuda"])]
    nccl_single: bool,
    /// Rank that fails after the first all-reduce.
    #[arg(long, requires = "fail_how")]
    fail_rank: Option<usize>,
    #[arg(long, requires = "fail_rank")]
    fail_how: Option<FailHow>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let setup = || -> Result<(Box<dyn Collective>, Device)> {
        if args.nccl_single {
            let ordinal = cuda_ordinal(0)?;
            return Ok((Box::new(Nccl::single(ordinal)?), Device::Cuda(ordinal)));
        }
        let (topology, collective) = init(args.collective, args.cuda)?;
        let device = match args.cuda {
            true => Device::Cuda(cuda_ordinal(topology.local_rank)?),
            false => Device::Cpu,
        };
        Ok((collective, device))
    };
    if args.nccl_single && !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return ExitCode::SUCCESS;
    }
    let (collective, device) = match setup() {
        Ok(set_up) => set_up,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    let coll = collective.as_ref();
    if args.fail_how == Some(FailHow::PanicUnguarded) {
        // No run_or_abort: the panic unwinds through `collective`.
        check_all(coll, device, &args).expect("checks");
    } else {
        run_or_abort(coll, || check_all(coll, device, &args));
    }
    println!("rank {}: all checks passed", coll.rank());
    ExitCode::SUCCESS
}

fn check_all(coll: &dyn Collective, device: Device, args: &Args) -> Result<()> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let say = |what: &str| println!("rank {rank}/{world} [{}]: {what} ok", coll.name());
    check_all_reduce_mean(coll, device).context("all_reduce_mean")?;
    say("all_reduce_mean (f32, f64, bf16; mixed shapes; one call per dtype)");
    if args.fail_rank == Some(rank) {
        inject_failure(rank, args.fail_how.expect("clap requires --fail-how"))?;
    }
    check_all_reduce_mean(coll, device).context("second all_reduce_mean")?;
    check_broadcast(coll, device).context("broadcast")?;
    say("broadcast from rank 0");
    check_metrics(coll).context("all_reduce_f64")?;
    say("all_reduce_f64 (sum, mean, max)");
    check_barrier(coll).context("barrier")?;
    say("barrier");
    check_rejections(coll, device).context("rejections")?;
    say("rejection of unsupported tensors");
    if coll.name() == "nccl" && world == 1 {
        println!(
            "nccl single-rank: NCCL {}, all-reduced gradients equal the local ones: yes",
            Nccl::version()?
        );
    }
    Ok(())
}

fn inject_failure(rank: usize, how: FailHow) -> Result<()> {
    eprintln!("rank {rank}: injecting failure {how:?}");
    match how {
        FailHow::Error => bail!("injected failure on rank {rank}"),
        FailHow::Panic | FailHow::PanicUnguarded => panic!("injected panic on rank {rank}"),
        FailHow::Kill => {
            let pid = std::process::id().to_string();
            std::process::Command::new("kill")
                .args(["-KILL", &pid])
                .status()
                .context("running kill")?;
            std::thread::sleep(Duration::from_secs(60));
            bail!("rank {rank} survived SIGKILL")
        }
    }
}

/// Fails unless `got` equals `expected` within `tol` (both read as f64 on the CPU).
fn expect_close(name: &str, got: &Tensor, expected: &Tensor, tol: f64) -> Result<()> {
    ensure!(
        got.size() == expected.size(),
        "{name}: shape {:?}, expected {:?}",
        got.size(),
        expected.size()
    );
    let diff = (got.to_device(Device::Cpu).to_kind(Kind::Double) - expected.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    ensure!(
        diff <= tol,
        "{name}: max |difference| {diff} > {tol}\n got {got}\n expected {expected}"
    );
    Ok(())
}

/// Each rank r holds values that depend on r; the mean over ranks 0..W is written in closed
/// form (sum of r = W(W-1)/2, sum of (r+1) = W(W+1)/2, sum of r^2 = (W-1)W(2W-1)/6).
fn check_all_reduce_mean(coll: &dyn Collective, device: Device) -> Result<()> {
    let r = coll.rank() as f64;
    let w = coll.world_size() as f64;
    let base6 = Tensor::arange(6, (Kind::Double, Device::Cpu)); // [6]: 0..6
    let base4 = Tensor::from_slice(&[0.5f64, 1.0, 1.5, 2.0]); // [4]
    let base5 = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0]); // [5]
    let on = |t: Tensor, kind: Kind| t.to_kind(kind).to_device(device);
    let originals = vec![
        on(&base6 * (r + 1.0), Kind::Float).view([2, 3]), // a: [2, 3] f32
        on(&base4 + 10.0 * r, Kind::Double),              // b: [4] f64
        // c: [3, 2] f32, a non-contiguous (transposed) view
        on(&base6 * (r * r), Kind::Float).view([2, 3]).tr(),
        on(&base5 + 2.0 * r, Kind::BFloat16), // d: [5] bf16, small integers: exact
        on(Tensor::from(r), Kind::Double),    // e: [] f64
        on(&base4 * (-r), Kind::Float),       // f: [4] f32, joins a's bucket
    ];
    // The gradients as the trainer holds them: shallow clones sharing storage.
    let mut tensors: Vec<Tensor> = originals.iter().map(|t| t.shallow_clone()).collect();
    coll.all_reduce_mean(&mut tensors)?;
    let mean_r = (w - 1.0) / 2.0;
    let mean_r_plus_1 = (w + 1.0) / 2.0;
    let mean_r_squared = (w - 1.0) * (2.0 * w - 1.0) / 6.0;
    let expected = [
        (&base6 * mean_r_plus_1).view([2, 3]),
        &base4 + 10.0 * mean_r,
        (&base6 * mean_r_squared).view([2, 3]).tr(),
        &base5 + 2.0 * mean_r,
        Tensor::from(mean_r),
        &base4 * (-mean_r),
    ];
    for (i, ((got, original), want)) in tensors.iter().zip(&originals).zip(&expected).enumerate() {
        let name = format!("tensor {}", ["a", "b", "c", "d", "e", "f"][i]);
        ensure!(
            got.kind() == original.kind(),
            "{name}: dtype changed to {:?}",
            got.kind()
        );
        expect_close(&name, original, want, 1e-5)?;
    }
    Ok(())
}

/// Every rank draws different random tensors; after the broadcast all hold rank 0's draw.
fn check_broadcast(coll: &dyn Collective, device: Device) -> Result<()> {
    let draw = |seed: usize| {
        tch::manual_seed(1000 + seed as i64);
        vec![
            Tensor::randn([3, 4], (Kind::Float, Device::Cpu)),
            Tensor::randn([7], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16),
            Tensor::randn([2, 2], (Kind::Double, Device::Cpu)),
        ]
    };
    let mine: Vec<Tensor> = draw(coll.rank())
        .into_iter()
        .map(|t| t.to_device(device))
        .collect();
    let rank0 = draw(0);
    if coll.rank() != 0 {
        ensure!(
            !mine[0].to_device(Device::Cpu).equal(&rank0[0]),
            "draws should differ"
        );
    }
    let mut tensors: Vec<Tensor> = mine.iter().map(|t| t.shallow_clone()).collect();
    coll.broadcast(&mut tensors)?;
    for (i, (got, want)) in mine.iter().zip(&rank0).enumerate() {
        ensure!(
            got.to_device(Device::Cpu).equal(want),
            "tensor {i} differs from rank 0's:\n got {got}\n want {want}"
        );
    }
    Ok(())
}

fn check_metrics(coll: &dyn Collective) -> Result<()> {
    let r = coll.rank() as f64;
    let w = coll.world_size() as f64;
    let local = [r, 1.0, 2.0 * r + 0.5];
    let sum = [w * (w - 1.0) / 2.0, w, w * (w - 1.0) + 0.5 * w];
    let cases = [
        (Op::Sum, sum),
        (Op::Mean, sum.map(|s| s / w)),
        (Op::Max, [w - 1.0, 1.0, 2.0 * (w - 1.0) + 0.5]),
    ];
    for (op, expected) in cases {
        let mut values = local;
        coll.all_reduce_f64(&mut values, op)?;
        let close = values
            .iter()
            .zip(&expected)
            .all(|(v, e)| (v - e).abs() <= 1e-12 * e.abs().max(1.0));
        ensure!(close, "{op:?}: got {values:?}, expected {expected:?}");
    }
    Ok(())
}

/// Rank 0 arrives 500 ms late: no rank may leave the barrier before rank 0 entered it.
/// Compared in wall-clock time (rank 0's entry shared by a max-reduction), so a rank that is
/// itself slow to reach the barrier cannot fail the check.
fn check_barrier(coll: &dyn Collective) -> Result<()> {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64()
    };
    let mut entered = [0.0];
    if coll.rank() == 0 {
        std::thread::sleep(Duration::from_millis(500));
        entered[0] = now();
    }
    coll.barrier()?;
    let left = now();
    coll.all_reduce_f64(&mut entered, Op::Max)?;
    // 50 ms of slack for clocks of different nodes.
    ensure!(
        left >= entered[0] - 0.05,
        "left the barrier {:.3} s before rank 0 entered it",
        entered[0] - left
    );
    Ok(())
}

/// Unsupported input is refused with an error on every rank, before any communication.
fn check_rejections(coll: &dyn Collective, device: Device) -> Result<()> {
    let mut ints = vec![Tensor::from_slice(&[1i64, 2]).to_device(device)];
    match coll.all_reduce_mean(&mut ints) {
        Err(CollectiveError::UnsupportedKind { index: 0, .. }) => {}
        // One rank averages anything: nothing to refuse.
        Ok(()) if coll.world_size() == 1 && coll.name() == "single" => {}
        other => bail!("an i64 tensor gave {other:?}"),
    }
    let mut undefined = vec![
        Tensor::from_slice(&[1.0f32]).to_device(device),
        Tensor::new(),
    ];
    match coll.all_reduce_mean(&mut undefined) {
        Err(CollectiveError::Undefined { index: 1 }) => Ok(()),
        other => bail!("an undefined tensor gave {other:?}"),
    }
}
