//! What redirector does in each namespace, the other half of a verdict: read
//! from the pinned state (`check --tempo-ring`) or from the agent beside the
//! check (`run --tempo-ring`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData};
use redirector_common::{
    ListenerKey, NsPort, RedirectTarget, DEFAULT_ADVERTISE_PORT, DEFAULT_LISTEN_PORT,
    MAP_LISTENERS, MAP_REDIRECTS,
};

use super::local::NodeNetns;
use crate::{
    bpf::datapath::Datapath,
    bpf::pins::PinLayout,
    bpf::registry::{Registry, Snapshot, Unservable},
    bpf::Redirect,
};

/// What redirector does in one namespace, as the check sees it.
#[derive(Debug, Default)]
pub struct NsState {
    /// How it is served (for the report), or `None`: not served.
    pub served: Option<String>,
    /// The namespace's redirects (empty when not served).
    pub redirects: Vec<Redirect>,
    /// Its `LISTENERS` entries.
    pub registered: Vec<ListenerKey>,
    /// Its live-store listeners that are not registered, and why (the
    /// registry's reconcile pass).
    pub unservable: Vec<Unservable>,
}

/// Where the check learns what redirector does: pinned state or the agent.
pub trait Source {
    fn state(&mut self, ns: &NodeNetns) -> NsState;
    /// The redirects configured on this node (for namespaces not served) and
    /// what they are, for the report.
    fn configured(&self) -> (Vec<Redirect>, String);
}

/// The pinned state, read like `redirector status` reads it.
pub(super) struct Pinned {
    /// Pinned sk_lookup links still attached, by netns cookie: (link id, program id).
    links: HashMap<u64, (u32, u32)>,
    redirects: Vec<(u64, Redirect)>,
    registry: Option<(Registry, Snapshot)>,
}

impl Pinned {
    pub(super) fn read(layout: &PinLayout) -> Result<Self> {
        let mut pinned = Self {
            links: HashMap::new(),
            redirects: Vec::new(),
            registry: None,
        };
        if !layout.exists() {
            return Ok(pinned);
        }
        for p in layout.pinned_netns() {
            if let Some(info) = p.info.filter(|i| i.netns_ino != 0) {
                pinned.links.insert(p.cookie, (info.id, info.prog_id));
            }
        }
        let open = |name: &str| {
            MapData::from_pin(layout.map(name))
                .with_context(|| format!("opening pinned map {name}"))
        };
        let redirects: BpfHashMap<MapData, NsPort, RedirectTarget> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(open(MAP_REDIRECTS)?))
                .context("REDIRECTS map")?;
        pinned.redirects = redirects
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, t)| {
                (
                    k.netns_cookie,
                    Redirect {
                        advertise_port: k.port,
                        listen_port: t.listen_port,
                    },
                )
            })
            .collect();
        pinned
            .redirects
            .sort_by_key(|(c, r)| (*c, r.advertise_port));
        let registry = Registry::new(open(MAP_LISTENERS)?, open(MAP_REDIRECTS)?)?;
        let snapshot = registry.snapshot()?;
        pinned.registry = Some((registry, snapshot));
        Ok(pinned)
    }
}

impl Source for Pinned {
    fn state(&mut self, ns: &NodeNetns) -> NsState {
        let cookie = ns.netns.cookie;
        let Some((link, prog)) = self.links.get(&cookie).copied() else {
            return NsState::default();
        };
        let redirects: Vec<Redirect> = self
            .redirects
            .iter()
            .filter(|(c, _)| *c == cookie)
            .map(|(_, r)| *r)
            .collect();
        let mut state = NsState {
            served: Some(format!(
                "served (pinned sk_lookup link id {link}, program id {prog})"
            )),
            redirects,
            ..NsState::default()
        };
        if let Some((registry, snapshot)) = &mut self.registry {
            state.registered = snapshot.in_netns(cookie).map(|(k, _)| *k).collect();
            // Read-only: the checks the agent's reconcile pass makes, for the reasons.
            state.unservable = registry
                .inspect(&ns.netns, &state.redirects)
                .map(|r| r.unservable)
                .unwrap_or_default();
        }
        state
    }

    fn configured(&self) -> (Vec<Redirect>, String) {
        let mut all: Vec<Redirect> = self.redirects.iter().map(|(_, r)| *r).collect();
        all.sort_by_key(|r| (r.advertise_port, r.listen_port));
        all.dedup();
        if all.is_empty() {
            (
                vec![Redirect {
                    advertise_port: DEFAULT_ADVERTISE_PORT,
                    listen_port: DEFAULT_LISTEN_PORT,
                }],
                "no pinned redirects; redirector's defaults".to_owned(),
            )
        } else {
            (all, "the node's pinned redirects".to_owned())
        }
    }
}

/// What the agent serves, as the ring check running beside it sees it:
/// refreshed by the main loop, read by the check's thread.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    redirects: Vec<Redirect>,
    /// By netns cookie: its redirects, and its listeners the last reconcile
    /// pass could not register.
    served: HashMap<u64, (Vec<Redirect>, Vec<Unservable>)>,
}

impl AgentView {
    pub fn of(datapath: &Datapath, redirects: &[Redirect]) -> Self {
        Self {
            redirects: redirects.to_vec(),
            served: datapath
                .served
                .iter()
                .map(|s| {
                    (
                        s.netns.cookie,
                        (s.redirects.clone(), s.report.unservable.clone()),
                    )
                })
                .collect(),
        }
    }
}

pub(super) struct AgentSource {
    pub(super) view: AgentView,
    /// `LISTENERS` keys, read once per pass.
    pub(super) registered: Vec<ListenerKey>,
}

impl Source for AgentSource {
    fn state(&mut self, ns: &NodeNetns) -> NsState {
        let cookie = ns.netns.cookie;
        let Some((redirects, unservable)) = self.view.served.get(&cookie) else {
            return NsState::default();
        };
        NsState {
            served: Some("served by this agent".to_owned()),
            redirects: redirects.clone(),
            registered: self
                .registered
                .iter()
                .filter(|k| k.netns_cookie == cookie)
                .copied()
                .collect(),
            unservable: unservable.clone(),
        }
    }

    fn configured(&self) -> (Vec<Redirect>, String) {
        (
            self.view.redirects.clone(),
            "the agent's redirects".to_owned(),
        )
    }
}
