//! Loads the kernel programs and keeps them attached.
//!
//! One "main" instance of the object owns the shared maps and the `sock_ops`
//! program on the cgroup v2 root. Every served network namespace gets its own
//! `sk_lookup` instance whose only difference is the `NETNS_COOKIE` constant;
//! those instances reuse the main instance's maps through pins: the persistent
//! ones of `--pin`, or a private directory that exists only while an instance
//! loads.
//!
//! Programs are attached with BPF links held as fds. Without `--pin`, dropping
//! the `Datapath` closes them and everything detaches; with `--pin`, the links
//! are pinned too and outlive the process, and the next agent adopts them.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use redirector_common::{
    ListenerKey, NsPort, GLOBAL_LOG_LEVEL, GLOBAL_NETNS_COOKIE, MAP_COUNTERS, MAP_FLOW_EVENTS,
    MAP_LISTENERS, MAP_LISTEN_PORTS, MAP_REDIRECTS, PROG_SK_LOOKUP, PROG_SOCK_OPS, SHARED_MAPS,
};

use crate::{
    cgroup, listeners,
    netns::Netns,
    pins::{Link, PinLayout},
    sys,
};

/// The kernel object, built by build.rs from `redirector-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector.bpf.o"));

/// Where bpffs must be mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Identifies the embedded kernel object (FNV-1a): pinned state is only
/// adopted by an agent with the same programs and map layouts.
pub fn build_id() -> String {
    let hash = OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// aya-log level for the kernel programs: their debug messages are only
/// produced (and paid for) when this process logs at debug level.
fn kernel_log_level() -> u8 {
    match tracing::level_filters::LevelFilter::current() {
        tracing::level_filters::LevelFilter::TRACE => aya_log_common_level::TRACE,
        tracing::level_filters::LevelFilter::DEBUG => aya_log_common_level::DEBUG,
        _ => aya_log_common_level::OFF,
    }
}

/// `aya_log_common::Level` values (that crate is not a direct dependency).
mod aya_log_common_level {
    pub const OFF: u8 = 0;
    pub const DEBUG: u8 = 4;
    pub const TRACE: u8 = 5;
}

/// Connections to `advertise_port` go to the listener on `listen_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub advertise_port: u16,
    pub listen_port: u16,
}

/// One namespace being served.
pub struct Served {
    pub netns: Netns,
    pub redirects: Vec<Redirect>,
    pub existing_listeners: usize,
    /// Whether the link was adopted from a previous agent's pins.
    pub adopted: bool,
    pub link: Link,
}

pub struct Datapath {
    main: Ebpf,
    pins: Option<PinLayout>,
    /// Pinned state of another build this agent takes over (layout, its build).
    replaces: Option<(PinLayout, String)>,
    pub cgroup: PathBuf,
    pub sock_ops: Link,
    pub sock_ops_adopted: bool,
    pub served: Vec<Served>,
}

/// Handles on shared maps for the tasks that read them while the datapath runs
/// (flow reader, metrics): separate fds on the same kernel maps.
pub struct MapHandles {
    pub flow_events: MapData,
    pub counters: MapData,
    pub listeners: MapData,
}

impl Datapath {
    /// Loads (or, with `pins`, reopens) the shared maps and attaches (or adopts)
    /// `sock_ops` on the cgroup v2 root.
    pub fn load(flow_ring_bytes: u32, pins: Option<PinLayout>) -> Result<Self> {
        require_bpffs()?;
        let cgroup = cgroup::cgroup2_mount()?;
        let mut pins = pins;
        let mut replaces = None;
        if let Some(layout) = pins.take() {
            let build = build_id();
            match layout.pinned_build().filter(|old| *old != build) {
                // Different programs or map layouts: nothing can be shared. Run
                // unpinned next to the old programs until `persist` swaps them.
                Some(old) => replaces = Some((layout, old)),
                None => {
                    layout.prepare(&build)?;
                    pins = Some(layout);
                }
            }
        }
        let mut loader = EbpfLoader::new();
        let level = kernel_log_level();
        loader
            .map_max_entries(MAP_FLOW_EVENTS, flow_ring_bytes)
            .override_global(GLOBAL_LOG_LEVEL, &level, true);
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(layout) => SHARED_MAPS.iter().map(|m| (*m, layout.map(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut main = loader
            .load(OBJECT)
            .map_err(|e| kernel_error(e.into(), "loading the eBPF maps"))?;

        let adopted = pins.as_ref().and_then(|l| Link::adopt(&l.sock_ops_link()));
        let sock_ops_adopted = adopted.is_some();
        let sock_ops = match adopted {
            Some(link) => link,
            None => {
                let prog: &mut SockOps = program(&mut main, PROG_SOCK_OPS)?.try_into()?;
                prog.load().map_err(|e| {
                    kernel_error(
                        e.into(),
                        "loading the sock_ops program (BPF_PROG_TYPE_SOCK_OPS, Linux >= 5.15)",
                    )
                })?;
                let cgroup_dir = fs::File::open(&cgroup)
                    .with_context(|| format!("opening cgroup v2 root {}", cgroup.display()))?;
                let fd = sys::link_create(
                    prog.fd()?.as_fd(),
                    cgroup_dir.as_fd(),
                    sys::BPF_CGROUP_SOCK_OPS,
                )
                .map_err(|e| {
                    kernel_error(
                        e.into(),
                        &format!("attaching sock_ops to cgroup {}", cgroup.display()),
                    )
                })?;
                let mut link = Link {
                    fd,
                    pin: None,
                    prog_id: prog.info()?.id(),
                };
                if let Some(layout) = &pins {
                    link.pin(&layout.sock_ops_link())?;
                }
                link
            }
        };
        Ok(Self {
            main,
            pins,
            replaces,
            cgroup,
            sock_ops,
            sock_ops_adopted,
            served: Vec::new(),
        })
    }

    /// With `--pin` over another build's state: the old build's id, until
    /// `persist` replaces it.
    pub fn replaces(&self) -> Option<&str> {
        self.replaces.as_ref().map(|(_, old)| old.as_str())
    }

    /// Finishes an upgrade: our programs already run next to the old build's,
    /// so removing the old pins (which detaches its programs) leaves no gap;
    /// then our links and maps are pinned in their place.
    pub fn persist(&mut self) -> Result<Vec<String>> {
        let Some((layout, _)) = self.replaces.take() else {
            return Ok(Vec::new());
        };
        let removed = layout.remove_all()?;
        layout.prepare(&build_id())?;
        for name in SHARED_MAPS {
            let path = layout.map(name);
            self.main
                .map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        self.sock_ops.pin(&layout.sock_ops_link())?;
        for s in &mut self.served {
            s.link.pin(&layout.netns_link(s.netns.cookie))?;
        }
        self.pins = Some(layout);
        Ok(removed)
    }

    /// Runs `f` with a path for each shared map: the persistent pins, or a
    /// private pin directory that exists only for the call.
    fn with_map_pins<R>(&self, f: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Result<R>) -> Result<R> {
        match &self.pins {
            Some(layout) => f(&|name: &str| layout.map(name)),
            None => {
                let window = PinWindow::open(&self.main)?;
                let dir = window.dir.clone();
                f(&move |name: &str| dir.join(name))
            }
        }
    }

    /// New fds on the maps that tasks read while the datapath runs.
    pub fn map_handles(&self) -> Result<MapHandles> {
        self.with_map_pins(|path| {
            let open = |name: &str| {
                MapData::from_pin(path(name)).with_context(|| format!("reopening map {name}"))
            };
            Ok(MapHandles {
                flow_events: open(MAP_FLOW_EVENTS)?,
                counters: open(MAP_COUNTERS)?,
                listeners: open(MAP_LISTENERS)?,
            })
        })
    }

    /// Starts redirecting in `netns`: registers the redirects, the listeners that
    /// already exist, then attaches (or adopts) `sk_lookup`. On error nothing
    /// stays behind.
    pub fn serve(&mut self, netns: Netns, redirects: &[Redirect]) -> Result<&Served> {
        let cookie = netns.cookie;
        if self.served.iter().any(|s| s.netns.cookie == cookie) {
            bail!("network namespace {} is listed twice", netns.path.display());
        }
        let result = self.set_redirects(cookie, redirects).and_then(|()| {
            let mut existing = 0;
            for r in redirects {
                existing += self.register_existing(&netns, r.listen_port)?;
            }
            let adopted = self
                .pins
                .as_ref()
                .and_then(|l| Link::adopt(&l.netns_link(cookie)));
            match adopted {
                Some(link) => Ok((existing, link, true)),
                None => Ok((existing, self.attach_sk_lookup(&netns)?, false)),
            }
        });
        match result {
            Ok((existing_listeners, link, adopted)) => {
                self.served.push(Served {
                    netns,
                    redirects: redirects.to_vec(),
                    existing_listeners,
                    adopted,
                    link,
                });
                Ok(self.served.last().expect("just pushed"))
            }
            Err(e) => {
                self.clear_redirects(cookie, redirects);
                Err(e)
            }
        }
    }

    /// Stops redirecting in the namespace with `cookie`: detaches its program
    /// (and its pin) and forgets its redirects.
    pub fn unserve(&mut self, cookie: u64) -> Option<Netns> {
        let pos = self.served.iter().position(|s| s.netns.cookie == cookie)?;
        let served = self.served.remove(pos);
        self.clear_redirects(cookie, &served.redirects);
        served.link.remove();
        Some(served.netns)
    }

    /// With `--pin`: removes what a previous agent pinned for namespaces this
    /// agent does not serve (gone, or no longer configured), links and map
    /// entries alike. Returns what was removed.
    pub fn sweep_unserved(&mut self) -> Result<Vec<String>> {
        let Some(layout) = self.pins.clone() else {
            return Ok(Vec::new());
        };
        let served: Vec<u64> = self.served.iter().map(|s| s.netns.cookie).collect();
        let mut removed = Vec::new();
        for pinned in layout.pinned_netns() {
            if !served.contains(&pinned.cookie) {
                let path = layout.netns_link(pinned.cookie);
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
                removed.push(format!("link {}", path.display()));
            }
        }
        for map in [MAP_REDIRECTS, MAP_LISTEN_PORTS] {
            let mut m: HashMap<_, NsPort, u16> =
                self.main.map_mut(map).context("redirect map")?.try_into()?;
            let stale: Vec<NsPort> = m
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !served.contains(&k.netns_cookie))
                .collect();
            for key in stale {
                let _ = m.remove(&key);
                removed.push(format!(
                    "{map} entry for netns cookie {} port {}",
                    key.netns_cookie, key.port
                ));
            }
        }
        Ok(removed)
    }

    fn set_redirects(&mut self, cookie: u64, redirects: &[Redirect]) -> Result<()> {
        let [redirect_map, listen_map] = self
            .main
            .maps_disjoint_mut([MAP_REDIRECTS, MAP_LISTEN_PORTS]);
        let mut redirect_map: HashMap<_, NsPort, u16> =
            redirect_map.context("REDIRECTS map")?.try_into()?;
        let mut listen_map: HashMap<_, NsPort, u16> =
            listen_map.context("LISTEN_PORTS map")?.try_into()?;
        for r in redirects {
            redirect_map
                .insert(NsPort::new(cookie, r.advertise_port), r.listen_port, 0)
                .context("adding to the REDIRECTS map")?;
            listen_map
                .insert(NsPort::new(cookie, r.listen_port), r.advertise_port, 0)
                .context("adding to the LISTEN_PORTS map")?;
        }
        Ok(())
    }

    fn clear_redirects(&mut self, cookie: u64, redirects: &[Redirect]) {
        for (map, port) in redirects.iter().flat_map(|r| {
            [
                (MAP_REDIRECTS, r.advertise_port),
                (MAP_LISTEN_PORTS, r.listen_port),
            ]
        }) {
            if let Some(Ok(mut m)) = self
                .main
                .map_mut(map)
                .map(HashMap::<_, NsPort, u16>::try_from)
            {
                // Missing entries are fine: we are undoing a partial setup.
                let _ = m.remove(&NsPort::new(cookie, port));
            }
        }
    }

    /// Puts listeners that existed before the agent into `LISTENERS`.
    fn register_existing(&mut self, netns: &Netns, port: u16) -> Result<usize> {
        let found = listeners::find_existing(netns, port).with_context(|| {
            format!(
                "looking for listeners on port {port} in {}",
                netns.path.display()
            )
        })?;
        let mut map: SockHash<_, ListenerKey> = self
            .main
            .map_mut(MAP_LISTENERS)
            .context("LISTENERS map")?
            .try_into()?;
        for l in &found {
            map.insert(
                ListenerKey::new(netns.cookie, port, l.family),
                l.socket.as_raw_fd(),
                0,
            )
            .with_context(|| {
                format!(
                    "registering listening socket inode {} of pid {}",
                    l.inode, l.pid
                )
            })?;
            tracing::info!(port, pid = l.pid, inode = l.inode, netns = %netns.path.display(), "registered existing listener");
        }
        Ok(found.len())
    }

    fn attach_sk_lookup(&mut self, netns: &Netns) -> Result<Link> {
        let mut instance = self.with_map_pins(|path| {
            let mut loader = EbpfLoader::new();
            let paths: Vec<(&str, PathBuf)> = SHARED_MAPS.iter().map(|m| (*m, path(m))).collect();
            for (name, p) in &paths {
                loader.map_pin_path(name, p.as_path());
            }
            let level = kernel_log_level();
            loader
                .override_global(GLOBAL_NETNS_COOKIE, &netns.cookie, true)
                .override_global(GLOBAL_LOG_LEVEL, &level, true)
                .load(OBJECT)
                .map_err(|e| kernel_error(e.into(), "loading the sk_lookup instance"))
        })?;
        let prog: &mut SkLookup = program(&mut instance, PROG_SK_LOOKUP)?.try_into()?;
        prog.load().map_err(|e| {
            kernel_error(
                e.into(),
                "loading the sk_lookup program (BPF_PROG_TYPE_SK_LOOKUP, Linux >= 5.9)",
            )
        })?;
        let fd = sys::link_create(prog.fd()?.as_fd(), netns.file.as_fd(), sys::BPF_SK_LOOKUP)
            .map_err(|e| {
                kernel_error(
                    e.into(),
                    &format!("attaching sk_lookup to {}", netns.path.display()),
                )
            })?;
        // The link holds the program: the instance (and its fds) can go.
        let mut link = Link {
            fd,
            pin: None,
            prog_id: prog.info()?.id(),
        };
        if let Some(layout) = &self.pins {
            link.pin(&layout.netns_link(netns.cookie))?;
        }
        Ok(link)
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the embedded object"))
}

fn require_bpffs() -> Result<()> {
    let path = Path::new(BPFFS);
    match sys::is_bpffs(path) {
        Ok(true) => Ok(()),
        Ok(false) => bail!("bpffs is not mounted at {BPFFS}: run `mount -t bpf bpf {BPFFS}` (a DaemonSet mounts the host's)"),
        Err(e) => bail!("cannot inspect {BPFFS} ({e}): mount bpffs there with `mount -t bpf bpf {BPFFS}`"),
    }
}

/// Turns permission and support errors from the kernel into messages that name
/// the capability or feature, keeping the original error as the cause. A
/// verifier log goes to the debug log, not into the one-line error.
fn kernel_error(err: anyhow::Error, what: &str) -> anyhow::Error {
    let text = format!("{err:#}");
    if let Some((_, log)) = text.split_once("Verifier output:") {
        tracing::debug!("verifier log for {what}:{log}");
        // The reason is the last line before the verifier's statistics.
        let verdict = log.lines().map(str::trim).rev().find(|l| {
            !l.is_empty()
                && !["verification time", "stack depth", "processed", ":"]
                    .iter()
                    .any(|p| l.starts_with(p))
        });
        return anyhow!(
            "{what}: the kernel verifier rejected the program ({}); RUST_LOG=debug shows its log",
            verdict.unwrap_or("no reason given")
        );
    }
    let errno = err.chain().find_map(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|e| e.raw_os_error())
    });
    let hint = match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (permission denied: needs CAP_BPF and CAP_NET_ADMIN, or root)"
        }
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
            " (the kernel does not support this)"
        }
        _ => "",
    };
    err.context(format!("{what}{hint}"))
}

/// Kernel-internal `ENOTSUPP`, which BPF syscalls can leak to userspace.
const ENOTSUPP: i32 = 524;

/// Pins of the shared maps that live only while a new instance loads, in a
/// directory private to this process (without `--pin`).
struct PinWindow {
    dir: PathBuf,
}

impl PinWindow {
    fn open(main: &Ebpf) -> Result<Self> {
        // bpffs rejects names with dots. A leftover from a crashed run of a
        // process with our pid is stale.
        let dir = Path::new(BPFFS).join(format!("redirector-load-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let window = Self { dir };
        for name in SHARED_MAPS {
            let path = window.dir.join(name);
            main.map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        Ok(window)
    }
}

impl Drop for PinWindow {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}
