//! The goals of issue 19 measured again in alternating pairs (`--pairs N`).
//!
//! On a shared two-core host one run's ratio of two servers moves by 10–30 % from run to
//! run (the bare server alone has moved from 63 to 178 µs a handshake minutes apart),
//! so a goal of "≤ 1.0×" met or missed by one run says little. Each extra pair runs the
//! goal scenarios that the run includes (idle, fan-out at the largest size, unicast,
//! stream) once on herald and once on the bare server, one right after the other,
//! scenario by scenario, and the servers take turns going first. The report judges
//! each goal on the median of the pairs' ratios (the main run counting as the first
//! pair) and lists every ratio, "—" for a pair where a scenario failed. Beside each
//! median it gives the interval that holds the true median with probability at least
//! 95 % ([`median_interval`]), so a verdict these pairs cannot tell from its bound reads
//! as such; `bench pool` does the same over the pairs of several runs.
//!
//! When the run includes `bare-history` (the bare relay keeping what herald's contract
//! keeps of every message), each pair also measures it on unicast and the stream: last
//! when herald goes first, first when the bare server does, so it is next to each of
//! them in turn and herald and bare stay next to each other. That gives what the
//! retention costs the bare relay, and herald against it ([`Against`]).
//!
//! The main run's pair is not quite like the others: its fan-out figures are the
//! largest round of a sweep (after the smaller rounds, on the same process), and
//! each server runs its whole sweep before the next starts; an extra pair measures the
//! largest size alone, in a fresh process.

use serde::{Deserialize, Serialize};

use crate::scenarios::{self, Ctx, Pace};
use crate::servers::Kind;
use crate::{Plan, Results, Scenario};

/// One server's goal figures in one pair; 0 where a scenario failed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct GoalFigures {
    pub rss_per_socket: f64,
    pub cpu_us_per_handshake: f64,
    pub fanout_cpu_us_per_delivery: f64,
    pub fanout_p99_us: f64,
    pub unicast_cpu_us_per_delivery: f64,
    pub stream_cpu_us_per_frame: f64,
}

/// Herald's and the bare server's figures, measured one right after the other.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GoalPair {
    pub herald_first: bool,
    pub herald: GoalFigures,
    pub bare: GoalFigures,
    /// The bare relay with the contract's retention (unicast and the stream only);
    /// absent when the pair did not measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bare_history: Option<GoalFigures>,
}

/// Which ratio of a pair: herald against the bare relay (the goals), or either against
/// the bare relay with the contract's retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Against {
    /// herald / bare: the goals.
    Bare,
    /// herald / bare-history.
    BareHistory,
    /// bare-history / bare: what the retention costs the bare relay.
    RetentionCost,
}

/// Which figure of [`GoalFigures`] a goal is about.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    Rss,
    Handshake,
    FanoutCpu,
    FanoutP99,
    Unicast,
    Stream,
}

impl GoalFigures {
    pub fn get(&self, goal: Goal) -> f64 {
        match goal {
            Goal::Rss => self.rss_per_socket,
            Goal::Handshake => self.cpu_us_per_handshake,
            Goal::FanoutCpu => self.fanout_cpu_us_per_delivery,
            Goal::FanoutP99 => self.fanout_p99_us,
            Goal::Unicast => self.unicast_cpu_us_per_delivery,
            Goal::Stream => self.stream_cpu_us_per_frame,
        }
    }

    /// `server`'s figures in the main run: its fan-out figures at the largest size
    /// herald was measured at.
    #[allow(clippy::cast_precision_loss)]
    pub fn of_main_run(results: &Results, server: &str) -> Self {
        let mut figures = Self::default();
        if let Some(idle) = results.idle.iter().find(|idle| idle.server == server) {
            figures.rss_per_socket = idle.rss_per_socket;
            figures.cpu_us_per_handshake = idle.cpu_us_per_handshake;
        }
        let largest = results
            .fanout
            .iter()
            .filter(|fanout| fanout.server == "herald")
            .flat_map(|fanout| &fanout.rounds)
            .map(|round| round.subscribers)
            .max();
        if let Some(round) = results
            .fanout
            .iter()
            .filter(|fanout| fanout.server == server)
            .flat_map(|fanout| &fanout.rounds)
            .find(|round| Some(round.subscribers) == largest)
        {
            figures.fanout_cpu_us_per_delivery = round.cpu_us_per_delivery;
            figures.fanout_p99_us = round.p99_us as f64;
        }
        if let Some(unicast) = results.unicast.iter().find(|round| round.server == server) {
            figures.unicast_cpu_us_per_delivery = unicast.cpu_us_per_delivery;
        }
        if let Some(stream) = results.stream.iter().find(|stream| stream.server == server) {
            figures.stream_cpu_us_per_frame = stream.cpu_us_per_frame;
        }
        figures
    }
}

/// herald / bare for `goal` in each pair, the main run's first, then the extra pairs
/// in order; `None` where a scenario failed on either server.
pub fn ratios(results: &Results, goal: Goal) -> Vec<Option<f64>> {
    ratios_against(results, goal, Against::Bare)
}

/// [`ratios`], of the servers `against` names; `None` also where a pair did not measure
/// the bare relay with retention.
pub fn ratios_against(results: &Results, goal: Goal, against: Against) -> Vec<Option<f64>> {
    let main = GoalPair {
        herald_first: false,
        herald: GoalFigures::of_main_run(results, "herald"),
        bare: GoalFigures::of_main_run(results, "bare"),
        bare_history: Some(GoalFigures::of_main_run(results, "bare-history")),
    };
    std::iter::once(&main)
        .chain(&results.pairs)
        .map(|pair| {
            let history = pair.bare_history.unwrap_or_default();
            let (over, under) = match against {
                Against::Bare => (pair.herald, pair.bare),
                Against::BareHistory => (pair.herald, history),
                Against::RetentionCost => (history, pair.bare),
            };
            let (o, u) = (over.get(goal), under.get(goal));
            (o > 0.0 && u > 0.0).then(|| o / u)
        })
        .collect()
}

/// The measured `values`, sorted.
fn measured(values: &[Option<f64>]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    sorted
}

/// The median of the measured `values` (the mean of the middle two for an even count).
pub fn median(values: &[Option<f64>]) -> Option<f64> {
    let sorted = measured(values);
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// A distribution-free interval for the median of the measured `values`, holding it with
/// probability at least `confidence`: the k-th smallest and the k-th largest value, k
/// from [`interval_rank`]. `None` when there are too few values for any such k (fewer
/// than 6 at 0.95). It assumes nothing of how the ratios are spread, only that they are
/// independent draws of one distribution: pairs measured alike, on the same code and
/// host.
pub fn median_interval(values: &[Option<f64>], confidence: f64) -> Option<(f64, f64)> {
    let sorted = measured(values);
    let n = sorted.len();
    interval_rank(n, confidence).map(|k| (sorted[k - 1], sorted[n - k]))
}

/// The k of [`median_interval`] for n values: the largest for which fewer than k of n
/// values fall below the median with probability at most (1 − `confidence`) / 2 (each
/// value falls below it with probability ½, so the count is binomial). For n = 9 at 0.95
/// that is 2, the 2nd and the 8th (96.1 %); `None` when not even k = 1 qualifies.
#[allow(clippy::cast_precision_loss)]
pub fn interval_rank(n: usize, confidence: f64) -> Option<usize> {
    let tail = (1.0 - confidence) / 2.0;
    // P(B ≤ j) for B ~ Binomial(n, ½), term by term; each term's logarithm, since ½ⁿ
    // itself is 0 in floating point from n = 1075.
    let mut ln_term = -(n as f64) * std::f64::consts::LN_2;
    let mut below = 0.0;
    let mut k = 0;
    for j in 0..n / 2 {
        below += ln_term.exp();
        if below > tail {
            break;
        }
        k = j + 1;
        ln_term += ((n - j) as f64 / (j + 1) as f64).ln();
    }
    (k > 0).then_some(k)
}

/// Runs one extra pair. A scenario that fails leaves its figures at 0 (that pair does
/// not count for the goal) and is recorded in `errors`.
#[allow(clippy::cast_precision_loss)]
pub async fn run(
    ctx: &Ctx,
    plan: &Plan,
    scenarios: &[Scenario],
    herald_first: bool,
    with_history: bool,
    errors: &mut Vec<String>,
) -> GoalPair {
    let order = if herald_first {
        [Kind::Herald, Kind::Bare]
    } else {
        [Kind::Bare, Kind::Herald]
    };
    let largest = plan.fanout_sizes.iter().copied().max().unwrap_or(0);
    let pace = Pace {
        deliveries_per_s: plan.fanout_deliveries_per_s,
        seconds: plan.fanout_round_seconds,
        min_events: 10,
    };
    // The bare relay with retention, on unicast and the stream only.
    let retention_order: Vec<Kind> = match (with_history, herald_first) {
        (false, _) => order.to_vec(),
        (true, true) => vec![Kind::Herald, Kind::Bare, Kind::BareHistory],
        (true, false) => vec![Kind::BareHistory, Kind::Bare, Kind::Herald],
    };
    let mut pair = GoalPair {
        herald_first,
        ..GoalPair::default()
    };
    let mut failed = |what: &str, kind: Kind, err: anyhow::Error| {
        eprintln!("!! pair: {what} on {}: {err:#}", kind.label());
        errors.push(format!("pair ({what} on {}): {err:#}", kind.label()));
    };
    if scenarios.contains(&Scenario::Idle) {
        for kind in order {
            eprintln!("== pair: idle on {}", kind.label());
            match scenarios::idle(ctx, kind, plan.idle_sockets).await {
                Ok(idle) => {
                    let figures = figures_of(&mut pair, kind);
                    figures.rss_per_socket = idle.rss_per_socket;
                    figures.cpu_us_per_handshake = idle.cpu_us_per_handshake;
                }
                Err(err) => failed("idle", kind, err),
            }
        }
    }
    if scenarios.contains(&Scenario::Fanout) && largest > 0 {
        for kind in order {
            eprintln!("== pair: fanout to {largest} on {}", kind.label());
            match scenarios::fanout(ctx, kind, &[largest], pace).await {
                Ok(fanout) => {
                    if let Some(round) = fanout.rounds.iter().max_by_key(|round| round.subscribers) {
                        let figures = figures_of(&mut pair, kind);
                        figures.fanout_cpu_us_per_delivery = round.cpu_us_per_delivery;
                        figures.fanout_p99_us = round.p99_us as f64;
                    }
                }
                Err(err) => failed("fanout", kind, err),
            }
        }
    }
    if scenarios.contains(&Scenario::Unicast) {
        for &kind in &retention_order {
            eprintln!("== pair: unicast on {}", kind.label());
            match scenarios::unicast(
                ctx,
                kind,
                plan.unicast_users,
                plan.unicast_rate,
                plan.unicast_seconds,
            )
            .await
            {
                Ok(round) => {
                    figures_of(&mut pair, kind).unicast_cpu_us_per_delivery = round.cpu_us_per_delivery
                }
                Err(err) => failed("unicast", kind, err),
            }
        }
    }
    if scenarios.contains(&Scenario::Stream) {
        for &kind in &retention_order {
            eprintln!("== pair: stream on {}", kind.label());
            match scenarios::stream(ctx, kind, plan.stream_tasks, plan.stream_words).await {
                Ok(stream) => figures_of(&mut pair, kind).stream_cpu_us_per_frame = stream.cpu_us_per_frame,
                Err(err) => failed("stream", kind, err),
            }
        }
    }
    pair
}

fn figures_of(pair: &mut GoalPair, kind: Kind) -> &mut GoalFigures {
    match kind {
        Kind::Herald => &mut pair.herald,
        Kind::BareHistory => pair.bare_history.get_or_insert_with(GoalFigures::default),
        _ => &mut pair.bare,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[None]), None);
        assert_eq!(median(&[Some(1.2)]), Some(1.2));
        assert_eq!(median(&[Some(1.3), Some(0.9), Some(1.0)]), Some(1.0));
        assert_eq!(
            median(&[Some(1.0), Some(0.8), None, Some(1.2), Some(0.9)]),
            Some(0.95)
        );
    }

    #[test]
    fn the_median_interval_takes_the_order_statistics_the_binomial_allows() {
        let values = |n: usize| (1..=n).map(|i| Some(i as f64)).collect::<Vec<_>>();
        // Fewer than 6 values cannot hold the median with 95 %: even the extremes miss
        // it with probability 2/32 at n = 5.
        assert_eq!(median_interval(&values(5), 0.95), None);
        // n = 6: the extremes, 1 − 2/64 = 96.9 %.
        assert_eq!(median_interval(&values(6), 0.95), Some((1.0, 6.0)));
        // n = 9: P(B ≤ 1) = 10/512 ≤ 2.5 % < P(B ≤ 2) = 46/512, so the 2nd and 8th.
        assert_eq!(median_interval(&values(9), 0.95), Some((2.0, 8.0)));
        // n = 15: P(B ≤ 3) = 576/32768 ≤ 2.5 % < P(B ≤ 4), so the 4th and 12th.
        assert_eq!(median_interval(&values(15), 0.95), Some((4.0, 12.0)));
        // Unsorted, with a pair that did not count.
        let mixed = [
            Some(1.3),
            None,
            Some(0.9),
            Some(1.1),
            Some(1.0),
            Some(1.2),
            Some(0.8),
        ];
        assert_eq!(median_interval(&mixed, 0.95), Some((0.8, 1.3)));
        assert_eq!(median_interval(&[], 0.95), None);
        // n = 2,000, where ½ⁿ is 0 in floating point: the normal approximation puts k at
        // 1,000 − 1.96 × √500 ≈ 956.
        let (low, high) = median_interval(&values(2000), 0.95).unwrap();
        assert!((950.0..=960.0).contains(&low), "{low}");
        assert_eq!(high, 2001.0 - low);
    }

    #[test]
    fn a_pair_without_both_figures_does_not_count() {
        let mut results = Results::default();
        results.pairs.push(GoalPair {
            herald_first: false,
            herald: GoalFigures {
                stream_cpu_us_per_frame: 12.0,
                ..GoalFigures::default()
            },
            bare: GoalFigures {
                stream_cpu_us_per_frame: 10.0,
                unicast_cpu_us_per_delivery: 50.0,
                ..GoalFigures::default()
            },
            bare_history: None,
        });
        // The main run measured nothing here; the pair measured the stream on both.
        assert_eq!(ratios(&results, Goal::Stream), vec![None, Some(1.2)]);
        assert_eq!(ratios(&results, Goal::Unicast), vec![None, None]);
        // Nor did it measure the bare relay with retention.
        assert_eq!(
            ratios_against(&results, Goal::Stream, Against::BareHistory),
            vec![None, None]
        );
    }

    #[test]
    fn the_bare_relay_with_retention_is_paired_with_both() {
        let mut results = Results::default();
        results.pairs.push(GoalPair {
            herald_first: true,
            herald: GoalFigures {
                stream_cpu_us_per_frame: 12.0,
                ..GoalFigures::default()
            },
            bare: GoalFigures {
                stream_cpu_us_per_frame: 10.0,
                ..GoalFigures::default()
            },
            bare_history: Some(GoalFigures {
                stream_cpu_us_per_frame: 11.0,
                ..GoalFigures::default()
            }),
        });
        let of = |against| ratios_against(&results, Goal::Stream, against)[1];
        assert_eq!(of(Against::Bare), Some(1.2));
        assert_eq!(of(Against::BareHistory), Some(12.0 / 11.0));
        assert_eq!(of(Against::RetentionCost), Some(1.1));
    }
}
