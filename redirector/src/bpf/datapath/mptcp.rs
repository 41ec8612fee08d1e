//! The MPTCP switch of served namespaces: Go listens with MPTCP by default,
//! which the kernel cannot redirect, so it is off while a namespace is served
//! and given back after (recorded in a pinned map across restarts).

use super::*;

impl Datapath {
    /// Gives the namespaces back the MPTCP setting they had (an agent that
    /// exits without --pin stops serving them all).
    pub fn restore_namespaces(&mut self) {
        for s in &self.served {
            restore_mptcp(&s.netns, s.mptcp_was.as_deref());
        }
        let cookies: Vec<u64> = self.served.iter().map(|s| s.netns.cookie).collect();
        if let Some(mut m) = self.mptcp_ledger() {
            for cookie in cookies {
                let _ = m.remove(&cookie);
            }
        }
    }

    /// Turns MPTCP off in `netns` and says what it was. The setting before the
    /// first agent changed it is kept in `MPTCP_WAS` (pinned with `--pin`): an
    /// agent that adopts the namespace finds 0 there, and must give back what
    /// the namespace had, not that.
    pub(super) fn disable_mptcp(&mut self, netns: &Netns) -> Option<String> {
        let recorded = self
            .mptcp_ledger()
            .and_then(|m| m.get(&netns.cookie, 0).ok());
        let now = disable_mptcp(netns);
        match recorded {
            Some(r) => Some(r.enabled.to_string()),
            None => {
                let enabled = now.as_deref().and_then(|v| v.parse::<u64>().ok());
                if let (Some(enabled), Some(mut m)) = (enabled, self.mptcp_ledger()) {
                    let entry = MptcpWas {
                        netns_inode: netns.inode(),
                        enabled,
                    };
                    if let Err(e) = m.insert(netns.cookie, entry, 0) {
                        tracing::warn!(
                            "recording net.mptcp.enabled of {netns} in {MAP_MPTCP_WAS}: {e}"
                        );
                    }
                }
                now
            }
        }
    }

    pub(super) fn restore_mptcp(&mut self, netns: &Netns, was: Option<&str>) {
        restore_mptcp(netns, was);
        if let Some(mut m) = self.mptcp_ledger() {
            let _ = m.remove(&netns.cookie);
        }
    }

    pub(super) fn mptcp_ledger(&mut self) -> Option<HashMap<&mut MapData, u64, MptcpWas>> {
        self.main.map_mut(MAP_MPTCP_WAS)?.try_into().ok()
    }
}

/// Turns MPTCP off in `netns` so that a live-store started from now on listens
/// with plain TCP: Go >= 1.24 opens MPTCP listeners by default and falls back
/// to TCP when the namespace refuses MPTCP sockets, and socket maps cannot hold
/// an MPTCP listener. Queriers dial plain TCP, so nothing is lost. Returns the
/// previous value if it was changed.
pub(super) fn disable_mptcp(netns: &Netns) -> Option<String> {
    match sys::netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL) {
        Ok(Some(old)) if old != "0" => {
            match sys::set_netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL, "0") {
                Ok(()) => {
                    tracing::info!(
                        "set net.mptcp.enabled=0 in {netns} (was {old}; --keep-mptcp leaves it)"
                    );
                    Some(old)
                }
                Err(e) => {
                    tracing::warn!("cannot set net.mptcp.enabled=0 in {netns}: {e}");
                    None
                }
            }
        }
        // Already off, or a kernel without MPTCP.
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("cannot read net.mptcp.enabled in {netns}: {e}");
            None
        }
    }
}

pub(super) fn restore_mptcp(netns: &Netns, was: Option<&str>) {
    if let Some(old) = was {
        // The namespace may be gone already: nothing to restore then.
        if sys::set_netns_sysctl(netns.file.as_fd(), MPTCP_SYSCTL, old).is_ok() {
            tracing::info!("restored net.mptcp.enabled={old} in {netns}");
        }
    }
}
