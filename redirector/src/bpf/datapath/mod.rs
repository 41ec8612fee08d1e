//! Loads the kernel programs and keeps them attached.
//!
//! One "main" instance of the object owns the shared maps, the `sock_ops`
//! program (attached to each served live-store's pod cgroup, see `sockops`)
//! and the bind hooks that report new live-store sockets to the agent. Every served network namespace gets its own
//! `sk_lookup` instance whose only difference is the `NETNS_COOKIE` constant;
//! those instances reuse the main instance's maps through pins: the persistent
//! ones of `--pin`, or a private directory that exists only while an instance
//! loads.
//!
//! Programs are attached with BPF links held as fds. Without `--pin`, dropping
//! the `Datapath` closes them and everything detaches; with `--pin`, the links
//! are pinned too and outlive the process, and the next agent adopts them.
//!
//! Here the object and its loading; `serving` is a namespace served and
//! reconciled, `mptcp` the MPTCP switch of served namespaces, `pinned` the
//! pinned state taken over, swept and watched.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{CgroupSock, SkLookup},
    Ebpf, EbpfLoader,
};
use redirector_common::{
    flow_share, MptcpWas, NsPort, NsQuota, RedirectTarget, GLOBAL_FLOW_UPDATE_NS, GLOBAL_LOG_LEVEL,
    GLOBAL_NETNS_COOKIE, MAP_COUNTERS, MAP_FLOW_EVENTS, MAP_FLOW_SHARE, MAP_LISTENERS,
    MAP_LISTEN_EVENTS, MAP_LISTEN_MARKS, MAP_LISTEN_PORTS, MAP_MPTCP_WAS, MAP_NS_QUOTAS,
    MAP_REDIRECTS, MAP_WATCH_PORTS, PROG_BIND4, PROG_BIND6, PROG_SK_LOOKUP, PROG_SOCK_OPS,
    SHARED_MAPS,
};

use crate::{
    bpf::pins::{Link, PinLayout, PinWatch, BPFFS},
    bpf::registry::{Reason, Registry, Report},
    bpf::sockops::{Scope, SockOps},
    bpf::Redirect,
    sys,
    sys::cgroup,
    sys::{cgroup_ids::CgroupIndex, netns::Netns, sockdiag},
};

mod mptcp;
mod pinned;
mod serving;

/// The per-namespace switch Go's default MPTCP listeners depend on.
pub const MPTCP_SYSCTL: &str = "/proc/sys/net/mptcp/enabled";

/// The kernel object, built by build.rs from `redirector-ebpf`; empty in a build
/// without the `bpf-object` feature (the fixtures xtask and the tests link).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector.bpf.o"));

/// The embedded kernel object, or why there is none.
fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this build of redirector carries no kernel programs (built without its `bpf-object` feature): \
             build the agent with `cargo xtask build`"
        );
    }
    Ok(OBJECT)
}

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

/// One namespace being served.
pub struct Served {
    pub netns: Netns,
    pub redirects: Vec<Redirect>,
    /// Whether the link was adopted from a previous agent's pins.
    pub adopted: bool,
    pub link: Link,
    /// `net.mptcp.enabled` as it was before the agent turned it off, restored
    /// when the namespace stops being served.
    pub mptcp_was: Option<String>,
    /// The last reconcile pass over its listeners.
    pub report: Report,
    /// Where `sock_ops` runs for its listeners (pod scope), or why nowhere.
    pub sock_ops: SockOpsPlacement,
    /// `NsQuota::stopped` when the last reconcile pass started.
    pub stopped_seen: Option<u64>,
}

/// Why some of a namespace's listeners have no `sock_ops` (where it runs
/// is `SockOps::cgroups_of`), for `status`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SockOpsPlacement {
    /// Listeners whose connections get no flow records, and why.
    pub problems: Vec<String>,
}

pub struct Datapath {
    main: Ebpf,
    pins: Option<PinLayout>,
    /// Pinned state of another build this agent takes over (layout, its build).
    replaces: Option<(PinLayout, String)>,
    /// The cgroup v2 mount.
    pub cgroup: PathBuf,
    pub sock_ops: SockOps,
    cgroups: CgroupIndex,
    /// The bind hooks' links (they report new listeners), or why there are none.
    pub listen_events: std::result::Result<Vec<std::os::fd::OwnedFd>, String>,
    pub served: Vec<Served>,
    registry: Registry,
    keep_mptcp: bool,
    /// With `--pin`: repairs and reports changes to the pinned state.
    pin_watch: PinWatch,
}

/// Handles on shared maps for the tasks that read them while the datapath runs
/// (flow reader, metrics): separate fds on the same kernel maps.
pub struct MapHandles {
    pub flow_events: MapData,
    pub counters: MapData,
    pub listeners: MapData,
    pub listen_events: MapData,
}

impl Datapath {
    /// Loads (or, with `pins`, reopens) the shared maps, loads `sock_ops`
    /// (attached to the root at once in root scope, else per served pod), and
    /// attaches the bind hooks for bind() calls to `watch_ports`.
    pub fn load(
        flow_ring_bytes: u32,
        flow_update_interval: std::time::Duration,
        pins: Option<PinLayout>,
        keep_mptcp: bool,
        scope: Scope,
        watch_ports: &[u16],
    ) -> Result<Self> {
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
        let flow_update_ns = u64::try_from(flow_update_interval.as_nanos()).unwrap_or(u64::MAX);
        loader
            .map_max_entries(MAP_FLOW_EVENTS, flow_ring_bytes)
            .override_global(GLOBAL_LOG_LEVEL, &level, true)
            .override_global(GLOBAL_FLOW_UPDATE_NS, &flow_update_ns, true);
        let map_paths: Vec<(&str, PathBuf)> = match &pins {
            Some(layout) => SHARED_MAPS.iter().map(|m| (*m, layout.map(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut main = loader
            .load(object()?)
            .map_err(|e| kernel_error(e.into(), "loading the eBPF maps"))?;

        let prog: &mut aya::programs::SockOps = program(&mut main, PROG_SOCK_OPS)?.try_into()?;
        prog.load().map_err(|e| {
            kernel_error(
                e.into(),
                "loading the sock_ops program (BPF_PROG_TYPE_SOCK_OPS; `redirector check` probes what it needs)",
            )
        })?;
        let prog_fd = prog
            .fd()?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the sock_ops program fd")?;
        let sock_ops = SockOps::new(scope, prog_fd, prog.info()?.id(), &cgroup, pins.as_ref())
            .map_err(|e| kernel_error(e, "attaching sock_ops to the cgroup v2 root"))?;
        watch(&mut main, watch_ports)?;
        let listen_events = attach_bind_hooks(&mut main, &cgroup);
        let registry = with_map_pins(&main, pins.as_ref(), |path| {
            let open = |name: &str| {
                MapData::from_pin(path(name)).with_context(|| format!("reopening map {name}"))
            };
            Ok(Registry::new(open(MAP_LISTENERS)?, open(MAP_REDIRECTS)?)?
                .with_marks(open(MAP_LISTEN_MARKS)?))
        })?;
        Ok(Self {
            main,
            pins,
            replaces,
            cgroups: CgroupIndex::new(cgroup.clone()),
            cgroup,
            sock_ops,
            listen_events,
            served: Vec::new(),
            registry,
            keep_mptcp,
            pin_watch: PinWatch::default(),
        })
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
                listen_events: open(MAP_LISTEN_EVENTS)?,
            })
        })
    }
}

/// Loads and links the `sk_lookup` instances of `netns`, with one loader.
fn load_instances(
    netns: &[&Netns],
    paths: &[(&str, PathBuf)],
    pins: Option<&PinLayout>,
) -> Vec<Result<Link>> {
    let cookies: Vec<u64> = netns.iter().map(|n| n.cookie).collect();
    let level = kernel_log_level();
    let mut loader = EbpfLoader::new();
    for (name, p) in paths {
        loader.map_pin_path(name, p.as_path());
    }
    loader.override_global(GLOBAL_LOG_LEVEL, &level, true);
    netns
        .iter()
        .zip(&cookies)
        .map(|(ns, cookie)| {
            loader.override_global(GLOBAL_NETNS_COOKIE, cookie, true);
            let mut instance = loader
                .load(object()?)
                .map_err(|e| kernel_error(e.into(), "loading the sk_lookup instance"))?;
            let prog: &mut SkLookup = program(&mut instance, PROG_SK_LOOKUP)?.try_into()?;
            prog.load().map_err(|e| {
                kernel_error(
                    e.into(),
                    "loading the sk_lookup program (BPF_PROG_TYPE_SK_LOOKUP; `redirector check` probes what it needs)",
                )
            })?;
            let fd = sys::link_create(prog.fd()?.as_fd(), ns.file.as_fd(), sys::BPF_SK_LOOKUP)
                .map_err(|e| {
                    kernel_error(
                        e.into(),
                        &format!("attaching sk_lookup to {}", ns.path.display()),
                    )
                })?;
            // The link holds the program: the instance (and its fds) can go.
            let mut link = Link {
                fd,
                pin: None,
                prog_id: prog.info()?.id(),
            };
            if let Some(layout) = pins {
                link.pin(&layout.netns_link(ns.cookie))?;
            }
            Ok(link)
        })
        .collect()
}

/// A namespace ready to be served but for its `sk_lookup` link.
struct Prepared {
    netns: Netns,
    mptcp_was: Option<String>,
    report: Report,
    placement: SockOpsPlacement,
    adopted: Option<Link>,
}

/// Tells `redir_listen` which ports to report.
fn watch(main: &mut Ebpf, ports: &[u16]) -> Result<()> {
    let mut m: HashMap<_, u16, u8> = main
        .map_mut(MAP_WATCH_PORTS)
        .context("WATCH_PORTS map")?
        .try_into()?;
    for port in ports {
        m.insert(port, 1, 0)
            .context("adding to the WATCH_PORTS map")?;
    }
    Ok(())
}

/// Attaches the bind hooks to the cgroup v2 root, where they see every
/// bind() of the node (and nothing else). Not pinned: a successor agent
/// attaches its own. Without them the agent still works, finding new
/// listeners by scanning /proc every second.
fn attach_bind_hooks(
    main: &mut Ebpf,
    root: &Path,
) -> std::result::Result<Vec<std::os::fd::OwnedFd>, String> {
    let dir = fs::File::open(root).map_err(|e| format!("opening {}: {e}", root.display()))?;
    let mut links = Vec::new();
    for (name, attach) in [
        (PROG_BIND4, sys::BPF_CGROUP_INET4_POST_BIND),
        (PROG_BIND6, sys::BPF_CGROUP_INET6_POST_BIND),
    ] {
        let prog: &mut CgroupSock = program(main, name)
            .map_err(|e| e.to_string())?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load()
            .map_err(|e| format!("{:#}", kernel_error(e.into(), &format!("loading {name}"))))?;
        let fd = prog.fd().map_err(|e| e.to_string())?;
        let link = sys::link_create(fd.as_fd(), dir.as_fd(), attach).map_err(|e| {
            format!(
                "{:#}",
                kernel_error(e.into(), &format!("attaching {name} to {}", root.display()))
            )
        })?;
        links.push(link);
    }
    Ok(links)
}

/// Runs `f` with a path for each shared map: the persistent pins, or a private
/// pin directory that exists only for the call.
fn with_map_pins<R>(
    main: &Ebpf,
    pins: Option<&PinLayout>,
    f: impl FnOnce(&dyn Fn(&str) -> PathBuf) -> Result<R>,
) -> Result<R> {
    match pins {
        Some(layout) => f(&|name: &str| layout.map(name)),
        None => {
            let window = PinWindow::open(main)?;
            let dir = window.dir.clone();
            f(&move |name: &str| dir.join(name))
        }
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

#[cfg(all(test, feature = "bpf-object"))]
mod object_tests {
    use aya_obj::generated::bpf_insn;

    /// BPF instruction classes and operations (the kernel's
    /// Documentation/bpf/standardization/instruction-set.rst).
    const CLASS_LDX: u8 = 0x01;
    const CLASS_ALU: u8 = 0x04;
    const CLASS_JMP32: u8 = 0x06;
    const CLASS_ALU64: u8 = 0x07;
    const MODE_MEMSX: u8 = 0x80;
    const OP_DIV: u8 = 0x30;
    const OP_MOD: u8 = 0x90;
    const OP_MOV: u8 = 0xb0;
    const OP_END: u8 = 0xd0;
    const OP_JA: u8 = 0x00;

    /// What an instruction needs of the CPU version: the ones added in v4
    /// (Linux 6.6) are refused by the 6.1 verifier.
    fn v4_only(i: &bpf_insn) -> Option<&'static str> {
        let (class, op) = (i.code & 0x07, i.code & 0xf0);
        match class {
            CLASS_LDX if i.code & 0xe0 == MODE_MEMSX => Some("sign-extending load"),
            CLASS_ALU | CLASS_ALU64 if op == OP_MOV && i.off != 0 => Some("movsx"),
            CLASS_ALU | CLASS_ALU64 if (op == OP_DIV || op == OP_MOD) && i.off == 1 => {
                Some("signed division")
            }
            CLASS_ALU64 if op == OP_END => Some("bswap"),
            CLASS_JMP32 if op == OP_JA => Some("gotol"),
            _ => None,
        }
    }

    /// The embedded object is built for BPF CPU v3 (build.rs asks bpf-linker
    /// for it): nothing in it needs v4, which the oldest kernel we support
    /// (6.1) does not have, whatever the LLVM default becomes.
    #[test]
    fn the_kernel_object_uses_no_bpf_v4_instruction() {
        let object = aya_obj::Object::parse(super::object().expect("embedded object"))
            .expect("the embedded object parses");
        let mut checked = 0;
        for ((section, _), f) in &object.functions {
            for (n, insn) in f.instructions.iter().enumerate() {
                checked += 1;
                if let Some(what) = v4_only(insn) {
                    panic!(
                        "{} (section {section}) instruction {n}: {what} (code {:#04x}, off {}), a BPF v4 instruction",
                        f.name, insn.code, insn.off
                    );
                }
            }
        }
        assert!(checked > 1000, "only {checked} instructions found");
    }
}
