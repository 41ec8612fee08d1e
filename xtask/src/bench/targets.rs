//! The targets, each written once: which workloads, which figure,
//! compared with what, and the goal, which both prints itself and does the
//! check.

use serde::Serialize;

use super::{
    metric::Metric,
    paths,
    report::{find, SummaryRow},
    stats::ratio,
    workloads::{Kind, Workload},
};

/// A limit on a ratio.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    Above(f64),
}

impl Goal {
    pub fn met(self, v: f64) -> bool {
        match self {
            Goal::AtMost(l) => v <= l,
            Goal::AtLeast(l) => v >= l,
            Goal::Above(l) => v > l,
        }
    }

    /// `<= 1.02x`, with `decimals` places.
    pub fn text(self, decimals: usize) -> String {
        let (op, l) = match self {
            Goal::AtMost(l) => ("<=", l),
            Goal::AtLeast(l) => (">=", l),
            Goal::Above(l) => (">", l),
        };
        format!("{op} {l:.decimals$}x")
    }
}

/// What redirector's median is compared with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Versus {
    /// redirector / direct.
    Direct,
    /// redirector / that path.
    Path(&'static str),
    /// redirector / the best userspace proxy.
    BestProxy,
    /// the best userspace proxy / redirector (for latencies: how many times
    /// slower the best proxy is).
    BestProxyOver,
}

impl Versus {
    /// Goals against a baseline are a few percent, printed to the hundredth;
    /// goals against a proxy are multiples, printed to the tenth.
    fn decimals(self) -> usize {
        match self {
            Versus::Direct | Versus::Path(_) => 2,
            Versus::BestProxy | Versus::BestProxyOver => 1,
        }
    }
}

/// One figure checked against its goal, on every workload the target covers.
#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// The row's name; `{workload}` and `{metric}` are filled in.
    pub title: &'static str,
    pub metric: Metric,
    pub goal: Goal,
}

/// One of the targets.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// The kinds of workload it is checked on.
    pub kinds: &'static [Kind],
    pub versus: Versus,
    /// Checked in turn on each workload, so a workload's checks stay together.
    pub checks: &'static [Check],
}

const fn check(title: &'static str, metric: Metric, goal: Goal) -> Check {
    Check {
        title,
        metric,
        goal,
    }
}

/// The targets, in the report's order.
pub const TARGETS: &[Target] = &[
    Target {
        kinds: &[Kind::Rr],
        versus: Versus::Direct,
        checks: &[
            check(
                "{workload} {metric}: redirector vs direct",
                Metric::P50Us,
                Goal::AtMost(1.02),
            ),
            check(
                "{workload} {metric}: redirector vs direct",
                Metric::P99Us,
                Goal::AtMost(1.05),
            ),
        ],
    },
    Target {
        kinds: &[Kind::Bulk],
        versus: Versus::Direct,
        checks: &[
            check(
                "bulk MiB/s: redirector vs direct",
                Metric::MibPerS,
                Goal::AtLeast(0.98),
            ),
            check(
                "bulk CPU s/GiB (whole machine): redirector vs direct (same, within 5%)",
                Metric::CpuSPerGib,
                Goal::AtMost(1.05),
            ),
            check(
                "bulk CPU s/GiB (bench cgroup): redirector vs direct (same, within 5%)",
                Metric::OwnCpuSPerGib,
                Goal::AtMost(1.05),
            ),
        ],
    },
    Target {
        kinds: &[Kind::Crr],
        versus: Versus::Direct,
        checks: &[check(
            "CRR conn/s: redirector vs direct",
            Metric::ConnPerS,
            Goal::AtLeast(0.97),
        )],
    },
    Target {
        kinds: &[Kind::Crr],
        versus: Versus::Path(paths::NFTABLES),
        checks: &[check(
            "CRR conn/s: redirector vs nftables redirect",
            Metric::ConnPerS,
            Goal::Above(1.0),
        )],
    },
    // Against the best userspace proxy at equal offered load: the fixed-load
    // workloads (RR ping-pong and open-loop gRPC).
    Target {
        kinds: &[Kind::Rr, Kind::Open],
        versus: Versus::BestProxyOver,
        checks: &[
            check(
                "{workload} {metric}: best proxy / redirector",
                Metric::P50Us,
                Goal::AtLeast(1.3),
            ),
            check(
                "{workload} {metric}: best proxy / redirector",
                Metric::P99Us,
                Goal::AtLeast(2.0),
            ),
        ],
    },
    Target {
        kinds: &[Kind::Crr],
        versus: Versus::BestProxy,
        checks: &[check(
            "CRR conn/s: redirector / best proxy",
            Metric::ConnPerS,
            Goal::AtLeast(1.8),
        )],
    },
    Target {
        kinds: &[Kind::Bulk],
        versus: Versus::BestProxy,
        checks: &[
            check(
                "bulk CPU s/GiB (whole machine): redirector / best proxy",
                Metric::CpuSPerGib,
                Goal::AtMost(0.5),
            ),
            check(
                "bulk CPU s/GiB (bench cgroup): redirector / best proxy",
                Metric::OwnCpuSPerGib,
                Goal::AtMost(0.5),
            ),
        ],
    },
];

/// One target checked on one workload, as reported.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Outcome {
    pub target: String,
    pub goal: String,
    pub value: Option<f64>,
    pub met: Option<bool>,
    pub detail: String,
}

/// The best userspace proxy's median for a metric (by the metric's own
/// direction).
fn best_proxy(rows: &[SummaryRow], workload: &str, metric: Metric) -> Option<(String, f64)> {
    paths::proxies()
        .filter_map(|p| find(rows, p, workload, metric).map(|r| (p.to_string(), r.stat.median)))
        .reduce(|a, b| {
            let b_better = if metric.lower_is_better() {
                b.1 < a.1
            } else {
                b.1 > a.1
            };
            if b_better {
                b
            } else {
                a
            }
        })
}

/// Every target on every workload it covers, against the medians.
pub fn check_all(rows: &[SummaryRow], workloads: &[Workload]) -> Vec<Outcome> {
    let mut out = Vec::new();
    for t in TARGETS {
        for w in workloads.iter().filter(|w| t.kinds.contains(&w.kind)) {
            for c in t.checks {
                out.push(outcome(rows, &w.name, t.versus, c));
            }
        }
    }
    out
}

fn outcome(rows: &[SummaryRow], workload: &str, versus: Versus, c: &Check) -> Outcome {
    let median = |path: &str| find(rows, path, workload, c.metric).map(|r| r.stat.median);
    let mine = median(paths::REDIRECTOR);
    let pct = |r: f64| format!("{:+.1}%", (r - 1.0) * 100.0);
    let (value, detail) = match versus {
        Versus::Direct | Versus::Path(_) => {
            let other = match versus {
                Versus::Path(p) => p,
                _ => paths::DIRECT,
            };
            let r = mine.zip(median(other)).and_then(|(m, o)| ratio(m, o));
            (
                r,
                r.map(|v| format!("{} vs {other}", pct(v)))
                    .unwrap_or_default(),
            )
        }
        Versus::BestProxy | Versus::BestProxyOver => {
            let best = best_proxy(rows, workload, c.metric);
            let r = best.as_ref().zip(mine).and_then(|((_, b), m)| {
                if versus == Versus::BestProxy {
                    ratio(m, *b)
                } else {
                    ratio(*b, m)
                }
            });
            (
                r,
                best.map(|(p, _)| format!("best proxy: {p}"))
                    .unwrap_or_default(),
            )
        }
    };
    Outcome {
        target: c
            .title
            .replace("{workload}", workload)
            .replace("{metric}", c.metric.name()),
        goal: c.goal.text(versus.decimals()),
        value,
        met: value.map(|v| c.goal.met(v)),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_print_what_they_check() {
        assert_eq!(Goal::AtMost(1.02).text(2), "<= 1.02x");
        assert_eq!(Goal::Above(1.0).text(2), "> 1.00x");
        assert_eq!(Goal::AtLeast(2.0).text(1), ">= 2.0x");
        assert!(Goal::AtMost(1.02).met(1.02));
        assert!(!Goal::Above(1.0).met(1.0));
        assert!(Goal::AtLeast(1.3).met(1.3));
    }
}
