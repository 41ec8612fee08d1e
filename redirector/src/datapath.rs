//! Loads the kernel programs and keeps them attached.
//!
//! One "main" instance of the object owns the shared maps and the `sock_ops`
//! program on the cgroup v2 root. Every served network namespace gets its own
//! `sk_lookup` instance whose only difference is the `NETNS_COOKIE` constant;
//! those instances reuse the main instance's maps, handed over through pins
//! that exist only while the instance loads.
//!
//! Dropping a `Datapath` detaches everything: aya's links detach on drop, and
//! the maps go when their last fd closes.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{CgroupAttachMode, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use redirector_common::{
    ListenerKey, NsPort, GLOBAL_NETNS_COOKIE, MAP_COUNTERS, MAP_FLOW_EVENTS, MAP_LISTENERS,
    MAP_LISTEN_PORTS, MAP_REDIRECTS, PROG_SK_LOOKUP, PROG_SOCK_OPS, SHARED_MAPS,
};

use crate::{cgroup, listeners, netns::Netns, sys};

/// The kernel object, built by build.rs from `redirector-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector.bpf.o"));

/// Where bpffs must be mounted (the pins that hand maps to new instances live there).
pub const BPFFS: &str = "/sys/fs/bpf";

/// Connections to `advertise_port` go to the listener on `listen_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub advertise_port: u16,
    pub listen_port: u16,
}

/// What `serve` did in one namespace, for the operator.
pub struct Served {
    pub netns: Netns,
    /// Kernel id of this namespace's sk_lookup program (readiness checks).
    pub prog_id: u32,
    pub redirects: Vec<Redirect>,
    pub existing_listeners: usize,
    _instance: Ebpf,
}

pub struct Datapath {
    main: Ebpf,
    pub cgroup: PathBuf,
    pub sock_ops_id: u32,
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
    /// Loads the shared maps and attaches `sock_ops` to the cgroup v2 root.
    pub fn load(flow_ring_bytes: u32) -> Result<Self> {
        require_bpffs()?;
        let cgroup = cgroup::cgroup2_mount()?;
        let mut main = EbpfLoader::new()
            .map_max_entries(MAP_FLOW_EVENTS, flow_ring_bytes)
            .load(OBJECT)
            .map_err(|e| kernel_error(e.into(), "loading the eBPF maps"))?;
        let prog: &mut SockOps = program(&mut main, PROG_SOCK_OPS)?.try_into()?;
        prog.load().map_err(|e| {
            kernel_error(
                e.into(),
                "loading the sock_ops program (BPF_PROG_TYPE_SOCK_OPS, Linux >= 5.15)",
            )
        })?;
        let cgroup_dir = fs::File::open(&cgroup)
            .with_context(|| format!("opening cgroup v2 root {}", cgroup.display()))?;
        // On kernels with BPF links (all we support) aya attaches through a link,
        // which the kernel always adds in multi-attach mode: other tools' programs
        // on the root cgroup keep running. Link creation rejects any mode flag.
        prog.attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(|e| {
                kernel_error(
                    e.into(),
                    &format!("attaching sock_ops to cgroup {}", cgroup.display()),
                )
            })?;
        let sock_ops_id = prog.info()?.id();
        Ok(Self {
            main,
            cgroup,
            sock_ops_id,
            served: Vec::new(),
        })
    }

    /// New fds on the maps that tasks read while the datapath runs.
    pub fn map_handles(&self) -> Result<MapHandles> {
        let pins = PinWindow::open(&self.main)?;
        let open = |name: &str| -> Result<MapData> {
            let path = pins.path(name)?;
            MapData::from_pin(path).with_context(|| format!("reopening map {name}"))
        };
        Ok(MapHandles {
            flow_events: open(MAP_FLOW_EVENTS)?,
            counters: open(MAP_COUNTERS)?,
            listeners: open(MAP_LISTENERS)?,
        })
    }

    /// Starts redirecting in `netns`: registers the redirects, the listeners that
    /// already exist, then attaches `sk_lookup`. On error nothing stays behind.
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
            let (instance, prog_id) = self.attach_sk_lookup(&netns)?;
            Ok((existing, instance, prog_id))
        });
        match result {
            Ok((existing_listeners, instance, prog_id)) => {
                self.served.push(Served {
                    netns,
                    prog_id,
                    redirects: redirects.to_vec(),
                    existing_listeners,
                    _instance: instance,
                });
                Ok(self.served.last().expect("just pushed"))
            }
            Err(e) => {
                self.clear_redirects(cookie, redirects);
                Err(e)
            }
        }
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

    fn attach_sk_lookup(&mut self, netns: &Netns) -> Result<(Ebpf, u32)> {
        let pins = PinWindow::open(&self.main)?;
        let mut loader = EbpfLoader::new();
        for (name, path) in &pins.paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut instance = loader
            .override_global(GLOBAL_NETNS_COOKIE, &netns.cookie, true)
            .load(OBJECT)
            .map_err(|e| kernel_error(e.into(), "loading the sk_lookup instance"))?;
        drop(pins);
        let prog: &mut SkLookup = program(&mut instance, PROG_SK_LOOKUP)?.try_into()?;
        prog.load().map_err(|e| {
            kernel_error(
                e.into(),
                "loading the sk_lookup program (BPF_PROG_TYPE_SK_LOOKUP, Linux >= 5.9)",
            )
        })?;
        prog.attach(netns.file.as_fd()).map_err(|e| {
            kernel_error(
                e.into(),
                &format!("attaching sk_lookup to {}", netns.path.display()),
            )
        })?;
        let id = prog.info()?.id();
        Ok((instance, id))
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
        let verdict = log.lines().map(str::trim).find(|l| {
            !l.is_empty() && !l.starts_with(|c: char| c.is_ascii_digit() || c == 'R' || c == '(')
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
/// directory private to this process.
struct PinWindow {
    dir: PathBuf,
    paths: Vec<(&'static str, PathBuf)>,
}

impl PinWindow {
    fn open(main: &Ebpf) -> Result<Self> {
        let dir = Path::new(BPFFS).join(format!("redirector-load-{}", std::process::id()));
        // bpffs rejects names with dots. A leftover from a crashed run of a
        // process with our pid is stale.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut window = Self {
            dir,
            paths: Vec::new(),
        };
        for name in SHARED_MAPS {
            let path = window.dir.join(name);
            main.map(name)
                .with_context(|| format!("map {name} missing from the embedded object"))?
                .pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
            window.paths.push((name, path));
        }
        Ok(window)
    }
}

impl PinWindow {
    fn path(&self, name: &str) -> Result<&Path> {
        self.paths
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.as_path())
            .with_context(|| format!("map {name} is not shared"))
    }
}

impl Drop for PinWindow {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            tracing::warn!("removing {}: {e}", self.dir.display());
        }
    }
}
