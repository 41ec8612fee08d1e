//! How long and how often each mode measures, and the workloads it runs.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{
    workloads::{Kind, Spec, Workload},
    BenchArgs,
};

/// How long and how often: the only difference between the modes.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub repeats: usize,
    pub slot_secs: f64,
    pub open_loop_rates: Vec<u64>,
    pub saturation_inflight: usize,
    pub bpf_repeat: u32,
    /// The bystander workload: rounds per agent state (stopped, running)
    /// and the length of each.
    pub bystander_rounds: usize,
    pub bystander_slot_secs: f64,
}

impl Plan {
    pub fn for_args(a: &BenchArgs) -> Self {
        let mut p = if a.smoke {
            Plan {
                mode: "smoke",
                repeats: 1,
                slot_secs: 0.1,
                open_loop_rates: vec![500],
                saturation_inflight: 8,
                bpf_repeat: 10_000,
                // Once each: proves the workload runs, no ratio is judged.
                bystander_rounds: 1,
                bystander_slot_secs: 0.1,
            }
        } else if a.quick {
            Plan {
                mode: "quick",
                repeats: 2,
                slot_secs: 0.2,
                open_loop_rates: vec![2000],
                saturation_inflight: 32,
                bpf_repeat: 1_000_000,
                bystander_rounds: 3,
                bystander_slot_secs: 0.3,
            }
        } else {
            Plan {
                mode: "full",
                // Many short rounds rather than a few long ones: on a shared
                // machine a median over more rounds shrugs off bursts of
                // other tenants' work.
                repeats: 9,
                slot_secs: 0.8,
                open_loop_rates: vec![2000, 8000],
                saturation_inflight: 32,
                bpf_repeat: 1_000_000,
                // A ratio near 1.00 is the claim: longer slots than the
                // paths' and enough rounds for a median.
                bystander_rounds: 7,
                bystander_slot_secs: 1.0,
            }
        };
        if let Some(r) = a.repeats {
            p.repeats = r.max(1);
        }
        p
    }

    /// Where the report goes: `--out`, else docs/bench for a full run (the
    /// README shows it), target/bench/<mode> for the others.
    pub fn out_dir(&self, root: &Path, args: &BenchArgs) -> PathBuf {
        args.out.clone().unwrap_or_else(|| {
            if self.mode == "full" {
                root.join("docs/bench")
            } else {
                root.join("target/bench").join(self.mode)
            }
        })
    }

    pub fn workloads(&self) -> Vec<Workload> {
        let w = |name: String, kind, what: String, spec| Workload {
            name,
            kind,
            what,
            spec,
        };
        let mut v = vec![
            w(
                "rr-64B".into(),
                Kind::Rr,
                "ping-pong 64 B on one persistent connection".into(),
                Spec::Rr { size: 64 },
            ),
            w(
                "rr-1KiB".into(),
                Kind::Rr,
                "ping-pong 1 KiB on one persistent connection".into(),
                Spec::Rr { size: 1024 },
            ),
            w(
                "crr".into(),
                Kind::Crr,
                "connect, 64 B request/response, close; one client thread".into(),
                Spec::Crr,
            ),
        ];
        for &rate in &self.open_loop_rates {
            for conns in [1, 16] {
                v.push(w(
                    format!("grpc-unary-{conns}c-{rate}rps"),
                    Kind::Open,
                    format!("gRPC unary, open loop at {rate} req/s over {conns} connection(s)"),
                    Spec::Open { conns, rate },
                ));
            }
        }
        for conns in [1, 16] {
            v.push(w(
                format!("grpc-sat-{conns}c"),
                Kind::Saturation,
                format!(
                    "gRPC unary, closed loop, {} in flight over {conns} connection(s)",
                    self.saturation_inflight
                ),
                Spec::Saturation {
                    conns,
                    inflight: self.saturation_inflight,
                },
            ));
        }
        v.push(w(
            "bulk-stream".into(),
            Kind::Bulk,
            "gRPC server-streaming, 64 x 64 KiB messages per call, one connection".into(),
            Spec::Bulk,
        ));
        v
    }
}
