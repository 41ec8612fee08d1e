//! nftables: a nat prerouting rule redirects the advertised port to the
//! live-store's. The nat table exists only during its slot: any nat table
//! makes conntrack track every flow of the namespace, which would tax the
//! other paths.

use std::{fs, process::Command};

use anyhow::{bail, Context, Result};

use super::{need, Env, PathUnderTest, Proof, Running};
use crate::bench::topology::{ADVERTISE_PORT, LISTEN_PORT};

pub const NAME: &str = "nftables";

const NAT_TABLE: &str = "rdb_nat";

pub struct Nftables;

impl PathUnderTest for Nftables {
    fn name(&self) -> &'static str {
        NAME
    }

    fn what(&self) -> String {
        format!("nat prerouting `redirect to :{LISTEN_PORT}` (conntrack on)")
    }

    fn available(&self, _agent: &std::path::Path) -> std::result::Result<(), String> {
        need("nft", "nft not installed")
    }

    fn start(&self, env: &Env) -> Result<Box<dyn Running>> {
        let ns = &env.topo.l.name;
        if nft(ns, &["list", "tables"])?.contains("nat") {
            bail!("a nat table already exists in {ns}");
        }
        let rules = env.work.join("nat.nft");
        fs::write(
            &rules,
            format!(
                "table ip {NAT_TABLE} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport {ADVERTISE_PORT} counter redirect to :{LISTEN_PORT}
    }}
}}
"
            ),
        )?;
        let path = rules.to_string_lossy().into_owned();
        // Owned before it exists, so a failure below still deletes it.
        let table = NatTable {
            ns_name: ns.clone(),
            deleted: false,
        };
        nft(ns, &["-f", &path])?;
        Ok(Box::new(table))
    }

    fn required(&self) -> bool {
        true
    }
}

fn nft(ns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .output()
        .context("running nft")?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nat table, deleted on stop or drop.
struct NatTable {
    ns_name: String,
    deleted: bool,
}

impl NatTable {
    fn remove(&mut self) -> Result<()> {
        if !self.deleted {
            nft(&self.ns_name, &["delete", "table", "ip", NAT_TABLE])?;
            self.deleted = true;
            if nft(&self.ns_name, &["list", "tables"])?.contains("nat") {
                bail!("nat table still present after delete");
            }
        }
        Ok(())
    }
}

impl Running for NatTable {
    fn stop(mut self: Box<Self>) -> Result<Proof> {
        let listing = nft(&self.ns_name, &["list", "table", "ip", NAT_TABLE]);
        self.remove()?;
        let n = parse_nft_packets(&listing?).unwrap_or(0);
        Ok(Proof::new(
            NAME,
            n,
            format!("redirect rule counter: {n} packets"),
        ))
    }
}

impl Drop for NatTable {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

fn parse_nft_packets(listing: &str) -> Option<u64> {
    let mut words = listing.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next().and_then(|n| n.parse().ok());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_rule_counter() {
        let nft = format!(
            "table ip rdb_nat {{\n chain prerouting {{\n tcp dport {ADVERTISE_PORT} counter packets 12 bytes 720 redirect to :{LISTEN_PORT}\n }}\n}}"
        );
        assert_eq!(parse_nft_packets(&nft), Some(12));
    }
}
