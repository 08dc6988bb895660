//! The arithmetic of a generation front, free of tensors: the Pareto front of points scored
//! on two dimensions, the hypervolume they dominate above a reference point, and how well
//! scores follow `w` (Spearman's rank correlation, and the share of grid steps whose score
//! moves the way the weight moves).

/// Indices of the points that no other point dominates, by increasing first coordinate. A
/// point dominates another when it is at least as high on both coordinates and higher on
/// one; of two equal points the first is kept.
pub fn pareto_front(points: &[[f64; 2]]) -> Vec<usize> {
    let dominates = |a: [f64; 2], b: [f64; 2]| a[0] >= b[0] && a[1] >= b[1] && a != b;
    let mut front: Vec<usize> = (0..points.len())
        .filter(|&i| {
            let p = points[i];
            !points.iter().any(|&q| dominates(q, p)) && !points[..i].contains(&p)
        })
        .collect();
    front.sort_by(|&a, &b| points[a][0].total_cmp(&points[b][0]));
    front
}

/// The area dominated by `points` and dominating `reference`: the union of the rectangles
/// `[r_0, x_0] x [r_1, x_1]` over the points above the reference on both coordinates (a point
/// that is not adds nothing). Swept by decreasing x: each point adds the strip between the
/// highest y seen so far and its own y, of width `x - r_0`.
pub fn hypervolume_2d(points: &[[f64; 2]], reference: [f64; 2]) -> f64 {
    let mut above: Vec<[f64; 2]> = points
        .iter()
        .copied()
        .filter(|p| p[0] > reference[0] && p[1] > reference[1])
        .collect();
    above.sort_by(|a, b| b[0].total_cmp(&a[0]));
    let mut highest = reference[1];
    let mut area = 0.0;
    for [x, y] in above {
        if y > highest {
            area += (x - reference[0]) * (y - highest);
            highest = y;
        }
    }
    area
}

/// Ranks 1..=n of `values`, ties sharing the mean of the ranks they span (what
/// `scipy.stats.rankdata` does by default).
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && values[order[end]] == values[order[start]] {
            end += 1;
        }
        // Positions start..end (0-based) hold ranks start + 1 ..= end; their mean:
        let rank = (start + 1 + end) as f64 / 2.0;
        order[start..end].iter().for_each(|&i| ranks[i] = rank);
        start = end;
    }
    ranks
}

/// Spearman's rank correlation: the Pearson correlation of the average ranks (as
/// `scipy.stats.spearmanr`). `None` when either side is constant (the correlation is
/// undefined) or there are fewer than two values.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    assert_eq!(x.len(), y.len(), "one y per x");
    if x.len() < 2 {
        return None;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Of the steps between consecutive points of a line through the grid (`weights` the weight
/// of one dimension along it, `scores` that dimension's score), how many move the score the
/// way the weight moves (both up or both down; a score that does not move counts as not
/// following), and how many steps there are. Steps where the weight does not move are not
/// counted.
pub fn moves_with_weight(weights: &[f64], scores: &[f64]) -> (usize, usize) {
    assert_eq!(weights.len(), scores.len(), "one score per weight");
    let mut following = 0;
    let mut steps = 0;
    for i in 1..weights.len() {
        let dw = weights[i] - weights[i - 1];
        if dw == 0.0 {
            continue;
        }
        steps += 1;
        let ds = scores[i] - scores[i - 1];
        if ds != 0.0 && (ds > 0.0) == (dw > 0.0) {
            following += 1;
        }
    }
    (following, steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A staircase (1, 3), (2, 2), (3, 1) above the reference (0, 0): sweeping x in unit
    /// slabs, heights 3, 2, 1, so the area is 3 + 2 + 1 = 6. Above (0.5, 0.5): slabs
    /// [0.5, 1] x 2.5 + [1, 2] x 1.5 + [2, 3] x 0.5 = 1.25 + 1.5 + 0.5 = 3.25. The dominated
    /// (1, 1), the duplicate (2, 2) and (4, 0.2), below the reference's y, change neither.
    #[test]
    fn hypervolume_of_a_staircase_is_its_area() {
        let stairs = [[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]];
        assert_eq!(hypervolume_2d(&stairs, [0.0, 0.0]), 6.0);
        assert_eq!(hypervolume_2d(&stairs, [0.5, 0.5]), 3.25);
        let extra = [
            [1.0, 1.0],
            [2.0, 2.0],
            [4.0, 0.2],
            [3.0, 1.0],
            [1.0, 3.0],
            [2.0, 2.0],
        ];
        assert_eq!(hypervolume_2d(&extra, [0.5, 0.5]), 3.25);
        // (4, 0.2) is above (0, 0): it adds the strip [3, 4] x [0, 0.2] = 0.2.
        assert!((hypervolume_2d(&extra, [0.0, 0.0]) - 6.2).abs() < 1e-12);
        assert_eq!(hypervolume_2d(&[], [0.0, 0.0]), 0.0);
        assert_eq!(hypervolume_2d(&[[-1.0, 5.0]], [0.0, 0.0]), 0.0);
        // One point: its rectangle.
        assert_eq!(hypervolume_2d(&[[2.0, 3.0]], [1.0, 1.0]), 2.0);
    }

    #[test]
    fn the_front_drops_dominated_and_repeated_points() {
        let points = [[1.0, 1.0], [3.0, 1.0], [2.0, 2.0], [1.0, 3.0], [2.0, 2.0]];
        // (1, 1) is dominated by every other; the second (2, 2) repeats the first.
        assert_eq!(pareto_front(&points), vec![3, 2, 1]);
        assert_eq!(pareto_front(&[[1.0, 1.0], [1.0, 2.0]]), vec![1]);
    }

    /// w = (0, .25, .5, .75, 1) has ranks 1..5; scores (1, 3, 2, 5, 4) have ranks
    /// (1, 3, 2, 5, 4), differences (0, 1, -1, 1, -1), sum of squares 4, so
    /// rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8. With ties, scores (1, 2, 2, 3, 3) have average
    /// ranks (1, 2.5, 2.5, 4.5, 4.5); centred ranks (-2, -1, 0, 1, 2) and
    /// (-2, -.5, -.5, 1.5, 1.5) give sum xy = 9, sum xx = 10, sum yy = 9, so
    /// rho = 9 / sqrt(90) = 3 / sqrt(10) (scipy.stats.spearmanr gives 0.9486832980505138).
    #[test]
    fn spearman_matches_hand_computed_correlations() {
        let w = [0.0, 0.25, 0.5, 0.75, 1.0];
        assert!((spearman(&w, &[1.0, 3.0, 2.0, 5.0, 4.0]).unwrap() - 0.8).abs() < 1e-12);
        let tied = spearman(&w, &[1.0, 2.0, 2.0, 3.0, 3.0]).unwrap();
        assert!((tied - 3.0 / 10f64.sqrt()).abs() < 1e-12, "{tied}");
        assert!((tied - 0.9486832980505138).abs() < 1e-12);
        // Reversed order: -1; a constant side: undefined.
        assert_eq!(spearman(&w, &[5.0, 4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(spearman(&w, &[2.0; 5]), None);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(average_ranks(&[3.0, 1.0, 3.0]), vec![2.5, 1.0, 2.5]);
    }

    #[test]
    fn steps_follow_the_weight_only_when_the_score_moves_with_it() {
        // Weight up four times: score up, flat, down, up -> 2 of 4 steps follow.
        let w = [0.0, 0.25, 0.5, 0.75, 1.0];
        assert_eq!(moves_with_weight(&w, &[0.0, 1.0, 1.0, 0.5, 2.0]), (2, 4));
        // Weight down: a falling score follows; a repeated weight is no step.
        assert_eq!(
            moves_with_weight(&[1.0, 0.5, 0.5, 0.0], &[3.0, 2.0, 9.0, 1.0]),
            (2, 2)
        );
    }
}
