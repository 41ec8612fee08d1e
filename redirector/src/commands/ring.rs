//! `redirector check --tempo-ring URL` on the terminal: the ring module's
//! report as a PASS/FAIL table for people, or as JSON for scripts.

use std::fmt::Write as _;

use serde::Serialize;

use super::table::{self, Row};
use crate::{
    commands::Output,
    ring::{LiveStore, Report},
};

pub fn render(report: &Report, output: Output) -> String {
    match output {
        Output::Table => render_table(report),
        Output::Json => render_json(report) + "\n",
    }
}

/// The ring's summary, then three lines per live-store of this node.
fn render_table(report: &Report) -> String {
    let mut rows = vec![summary_row(report)];
    for l in &report.live_stores {
        rows.extend(checks(l));
    }
    table::render(&rows)
}

/// A live-store's checks, each named after it: the ids tell the lines of
/// several live-stores apart.
fn checks(l: &LiveStore) -> Vec<Row> {
    l.checks
        .iter()
        .map(|f| Row {
            name: format!("{} {}", l.id, f.aspect.label()),
            ok: f.ok,
            detail: f.detail.clone(),
            fix: f.fix.clone(),
        })
        .collect()
}

fn summary_row(report: &Report) -> Row {
    let mut detail = format!(
        "{}: {} live-store(s) in the ring, {} on this node, {} on other nodes (not checked here)",
        report.url, report.shards, report.on_this_node, report.elsewhere
    );
    if !report.not_ip.is_empty() {
        let _ = write!(
            detail,
            "; {} with a hostname instead of an IP, not placed: {}",
            report.not_ip.len(),
            report.not_ip.join(", ")
        );
    }
    Row::pass("ring", detail)
}

/// The report's own fields, then its live-stores, each with its checks as
/// the table names them: the JSON and the table agree on names.
#[derive(Serialize)]
struct ReportJson<'a> {
    #[serde(flatten)]
    report: &'a Report,
    live_stores: Vec<LiveStoreJson<'a>>,
}

#[derive(Serialize)]
struct LiveStoreJson<'a> {
    #[serde(flatten)]
    live_store: &'a LiveStore,
    checks: Vec<Row>,
}

fn render_json(report: &Report) -> String {
    let json = ReportJson {
        report,
        live_stores: report
            .live_stores
            .iter()
            .map(|live_store| LiveStoreJson {
                live_store,
                checks: checks(live_store),
            })
            .collect(),
    };
    // Plain strings, numbers and bools: serializing cannot fail.
    serde_json::to_string_pretty(&json).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{Aspect, Finding, Outcome};

    fn sample() -> Report {
        let row = |aspect: Aspect, ok: bool, fix: Option<&str>| Finding {
            aspect,
            ok,
            detail: format!("ls-0 {} detail", aspect.label()),
            fix: fix.map(str::to_owned),
        };
        Report {
            url: "http://tempo:3200/live-store/ring".into(),
            ok: false,
            shards: 3,
            on_this_node: 1,
            elsewhere: 2,
            not_ip: Vec::new(),
            live_stores: vec![LiveStore {
                id: "ls-0".into(),
                state: "ACTIVE".into(),
                zone: String::new(),
                address: "10.0.1.5:9095".into(),
                netns: "/proc/7/ns/net".into(),
                netns_inode: 4026532000,
                netns_cookie: 4099,
                served: true,
                advertised_port: 9095,
                advertise_ports: vec![12345],
                listen_port: 9095,
                listener_registered: true,
                result: Outcome::WrongPort,
                checks: vec![
                    row(Aspect::Served, true, None),
                    row(Aspect::Port, false, Some("set it")),
                    row(Aspect::Listener, true, None),
                ],
            }],
        }
    }

    #[test]
    fn table_and_json() {
        let table = render_table(&sample());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "PASS  ring           http://tempo:3200/live-store/ring: 3 live-store(s) in the ring, 1 on this node, 2 on other nodes (not checked here)",
                "PASS  ls-0 served    ls-0 served detail",
                "FAIL  ls-0 port      ls-0 port detail; fix: set it",
                "PASS  ls-0 listener  ls-0 listener detail",
            ]
        );
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["elsewhere"], 2);
        assert_eq!(v["live_stores"][0]["result"], "wrong_port");
        assert_eq!(v["live_stores"][0]["checks"][1]["fix"], "set it");
        assert!(v["live_stores"][0]["checks"][0].get("fix").is_none());
        let counts = sample().counts();
        assert_eq!(counts.len(), 4);
        assert_eq!(counts[&Outcome::WrongPort], 1);
        assert_eq!(counts[&Outcome::Ok], 0);
    }
}
