//! A topology whose agents write a flow log, and the records read back.

use std::path::PathBuf;

use crate::{Agent, Netns, Topology};

/// A querier namespace `q` and a live-store namespace `l` joined as in a [`Topology`],
/// and the flow log of the agents it starts for `l`; the log goes on drop.
pub struct FlowSetup {
    pub q: Netns,
    pub l: Netns,
    pub log: PathBuf,
}

impl FlowSetup {
    // Not `Default`: it creates namespaces, which is no default value.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let Topology { q, l } = Topology::new();
        let log = std::env::temp_dir().join(format!("{}.flows", l.name));
        let _ = std::fs::remove_file(&log);
        Self { q, l, log }
    }

    /// An agent serving `l` that writes its flow records to `log`.
    pub fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec![
            "--netns".to_owned(),
            self.l.path().display().to_string(),
            "--flow-log".to_owned(),
            self.log.display().to_string(),
            "--metrics-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&refs).expect("agent starts")
    }

    /// The flow log's records (written with `--flow-format json`).
    pub fn json_records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("flow log")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }
}

impl Drop for FlowSetup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}
