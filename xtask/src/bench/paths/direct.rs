//! direct: the querier dials the live-store's own port, no path in between;
//! the physical limit every other path is measured against.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use anyhow::Result;

use super::{Env, PathUnderTest, Proof, Running};
use crate::bench::topology::LISTEN_PORT;

pub const NAME: &str = "direct";

pub struct Direct;

impl PathUnderTest for Direct {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("querier dials {LISTEN_PORT} itself: the physical limit")
    }

    fn available(&self, _agent: &std::path::Path) -> std::result::Result<(), String> {
        Ok(())
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let accepts = env.live_store_accepts.clone();
        Ok(Box::new(Started {
            before: accepts.load(Ordering::Relaxed),
            accepts,
        }))
    }

    fn port(&self) -> u16 {
        LISTEN_PORT
    }

    fn required(&self) -> bool {
        true
    }
}

/// Nothing runs: the live-store stand-in's own accept counter is the proof.
struct Started {
    accepts: Arc<AtomicU64>,
    before: u64,
}

impl Running for Started {
    fn stop(self: Box<Self>) -> Result<Proof> {
        let n = self.accepts.load(Ordering::Relaxed) - self.before;
        Ok(Proof::new(
            NAME,
            n,
            format!("live-store accepted {n} connections on {LISTEN_PORT}"),
        ))
    }
}
