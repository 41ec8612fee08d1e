//! Every figure the bench reports, named once: its name in `results.json` and
//! the tables, which way is better, and which workloads report and show it.

use serde::{Serialize, Serializer};

use super::workloads::Kind;

/// One figure of a workload run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Metric {
    P50Us,
    P90Us,
    P99Us,
    P999Us,
    MaxUs,
    ReqPerS,
    ConnPerS,
    /// Whole-machine CPU (/proc/stat) per request or connection.
    CpuUsPerReq,
    CpuUsPerConn,
    /// The bench cgroup's CPU per request or connection.
    OwnCpuUsPerReq,
    OwnCpuUsPerConn,
    MibPerS,
    CpuSPerGib,
    OwnCpuSPerGib,
    Errors,
    /// Other tenants' CPU during the slot, in cores.
    ForeignCpuCores,
}

impl Metric {
    /// The name in `results.json` and the Markdown tables.
    pub const fn name(self) -> &'static str {
        match self {
            Metric::P50Us => "p50_us",
            Metric::P90Us => "p90_us",
            Metric::P99Us => "p99_us",
            Metric::P999Us => "p99.9_us",
            Metric::MaxUs => "max_us",
            Metric::ReqPerS => "req_per_s",
            Metric::ConnPerS => "conn_per_s",
            Metric::CpuUsPerReq => "cpu_us_per_req",
            Metric::CpuUsPerConn => "cpu_us_per_conn",
            Metric::OwnCpuUsPerReq => "own_cpu_us_per_req",
            Metric::OwnCpuUsPerConn => "own_cpu_us_per_conn",
            Metric::MibPerS => "mib_per_s",
            Metric::CpuSPerGib => "cpu_s_per_gib",
            Metric::OwnCpuSPerGib => "own_cpu_s_per_gib",
            Metric::Errors => "errors",
            Metric::ForeignCpuCores => "foreign_cpu_cores",
        }
    }

    /// Latency and cost: lower is better; rates: higher is better.
    pub const fn lower_is_better(self) -> bool {
        !matches!(self, Metric::ReqPerS | Metric::ConnPerS | Metric::MibPerS)
    }
}

impl Kind {
    /// The figures a workload of this kind reports in `results.json` (each
    /// also reports [`Metric::Errors`] and, with a bench cgroup,
    /// [`Metric::ForeignCpuCores`]).
    pub const fn reported(self) -> &'static [Metric] {
        use Metric::*;
        match self {
            Kind::Rr | Kind::Open => &[
                P50Us,
                P99Us,
                P90Us,
                P999Us,
                MaxUs,
                ReqPerS,
                CpuUsPerReq,
                OwnCpuUsPerReq,
            ],
            Kind::Crr => &[
                P50Us,
                P99Us,
                P90Us,
                P999Us,
                MaxUs,
                ConnPerS,
                CpuUsPerConn,
                OwnCpuUsPerConn,
            ],
            // Closed loop: the tail of a saturated queue says little.
            Kind::Saturation => &[P50Us, P99Us, ReqPerS, CpuUsPerReq, OwnCpuUsPerReq],
            Kind::Bulk => &[MibPerS, CpuSPerGib, OwnCpuSPerGib],
        }
    }

    /// The figures in the Markdown tables, in their order.
    pub const fn shown(self) -> &'static [Metric] {
        use Metric::*;
        match self {
            Kind::Rr | Kind::Open => &[
                P50Us,
                P90Us,
                P99Us,
                P999Us,
                MaxUs,
                CpuUsPerReq,
                OwnCpuUsPerReq,
            ],
            Kind::Crr => &[
                ConnPerS,
                P50Us,
                P99Us,
                P999Us,
                CpuUsPerConn,
                OwnCpuUsPerConn,
            ],
            Kind::Saturation => &[ReqPerS, P50Us, P99Us, CpuUsPerReq, OwnCpuUsPerReq],
            Kind::Bulk => &[MibPerS, CpuSPerGib, OwnCpuSPerGib],
        }
    }
}

/// Serialised by name, so `results.json` keeps its string keys.
impl Serialize for Metric {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Ordered by name: `results.json` lists figures (and summary rows)
/// alphabetically, as it did when they were strings.
impl Ord for Metric {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name().cmp(other.name())
    }
}

impl PartialOrd for Metric {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_figures_are_reported() {
        for kind in [
            Kind::Rr,
            Kind::Crr,
            Kind::Open,
            Kind::Saturation,
            Kind::Bulk,
        ] {
            for m in kind.shown() {
                assert!(kind.reported().contains(m), "{kind:?} shows {m} unreported");
            }
        }
    }

    #[test]
    fn serialises_as_its_name() {
        let map: std::collections::BTreeMap<Metric, f64> =
            [(Metric::P999Us, 1.0), (Metric::CpuSPerGib, 2.0)].into();
        assert_eq!(
            serde_json::to_string(&map).ok().as_deref(),
            Some(r#"{"cpu_s_per_gib":2.0,"p99.9_us":1.0}"#)
        );
    }
}
