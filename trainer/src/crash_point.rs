//! Named points where a crash test can have this process killed with SIGKILL.
//!
//! A `kill -9` at a random moment rarely lands inside a checkpoint write or between two files
//! of one; these points let the crash test (`tools/crash_test.sh`, `trainer/tests/crash.rs`)
//! aim there. With `MODPO_CRASH_AT=<point>:<n>` (or `<point>:<n>@<rank>`) the n-th time this
//! process (of that rank, default 0) passes `<point>` it sends itself SIGKILL: nothing is
//! flushed or cleaned up, so what is left on disk is exactly what a `kill -9` at that instant
//! leaves. Without the variable (every real run) a point costs one read of a parsed-once
//! setting.
//!
//! The points, in the order a run passes them: `data-loaded`, `reference-chunk-tmp-written`
//! (a chunk's temporary file is complete, not yet renamed), `reference-chunk-written`, `step`
//! (after an optimizer step, before its checkpoint), `checkpoint-adapters-written` (the
//! temporary checkpoint directory holds the adapters only), `checkpoint-files-written` (every
//! file, not yet renamed into place), `checkpoint-renamed` (in place, `latest` not yet
//! updated), `checkpoint-written`, `stage-done` (a stage's final checkpoint is written, the
//! next stage has not started), `final-adapters-written`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Every point a run passes; `MODPO_CRASH_AT` must name one of them.
pub const POINTS: [&str; 10] = [
    "data-loaded",
    "reference-chunk-tmp-written",
    "reference-chunk-written",
    "step",
    "checkpoint-adapters-written",
    "checkpoint-files-written",
    "checkpoint-renamed",
    "checkpoint-written",
    "stage-done",
    "final-adapters-written",
];

/// The parsed `MODPO_CRASH_AT`: the point, which pass of it kills, and how often it was passed.
#[derive(Debug)]
struct Target {
    point: String,
    nth: usize,
    passed: AtomicUsize,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let spec = std::env::var("MODPO_CRASH_AT").ok()?;
            match parse(&spec, this_rank()) {
                Ok(target) => target,
                Err(why) => panic!("MODPO_CRASH_AT={spec}: {why}"),
            }
        })
        .as_ref()
}

fn this_rank() -> usize {
    modpo_launcher::Topology::from_env()
        .map(|t| t.rank)
        .unwrap_or(0)
}

/// `<point>:<n>[@<rank>]`: a target for this rank, or `None` when it names another rank.
fn parse(spec: &str, rank: usize) -> Result<Option<Target>, String> {
    let (spec, on_rank) = match spec.split_once('@') {
        Some((spec, r)) => (
            spec,
            r.parse::<usize>().map_err(|_| "bad rank".to_string())?,
        ),
        None => (spec, 0),
    };
    let (point, nth) = spec
        .split_once(':')
        .ok_or("expected <point>:<n>[@<rank>]")?;
    if !POINTS.contains(&point) {
        return Err(format!(
            "unknown point `{point}` (known: {})",
            POINTS.join(", ")
        ));
    }
    let nth: usize = nth.parse().map_err(|_| format!("`{nth}` is not a count"))?;
    if nth == 0 {
        return Err("the count starts at 1".into());
    }
    Ok((on_rank == rank).then(|| Target {
        point: point.to_string(),
        nth,
        passed: AtomicUsize::new(0),
    }))
}

/// Marks that the process passes `point`; kills it there when `MODPO_CRASH_AT` says so.
pub fn reached(point: &'static str) {
    debug_assert!(POINTS.contains(&point), "unlisted crash point {point}");
    let Some(target) = target() else {
        return;
    };
    if target.point == point && target.passed.fetch_add(1, Ordering::SeqCst) + 1 == target.nth {
        eprintln!("crash point {point} (pass {}): SIGKILL", target.nth);
        // SIGKILL cannot be caught: this call does not return.
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
        unreachable!("SIGKILL did not end the process");
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let target = parse("step:3", 0).unwrap().unwrap();
        assert_eq!((target.point.as_str(), target.nth), ("step", 3));
        assert!(parse("step:3@1", 0).unwrap().is_none(), "another rank's");
        assert!(parse("step:3@1", 1).unwrap().is_some());
        assert!(parse("stepp:1", 0)
            .unwrap_err()
            .starts_with("unknown point `stepp`"));
        assert_eq!(parse("step:0", 0).err().unwrap(), "the count starts at 1");
        assert_eq!(
            parse("step", 0).err().unwrap(),
            "expected <point>:<n>[@<rank>]"
        );
    }
}
