//! The pod sandbox locator (`discovery::kube::sandbox`) on this machine's real
//! cgroup v2 hierarchy: pod cgroups made as kubelet makes them, processes
//! moved into container cgroups as a runtime moves them, each in a network
//! namespace of its own as a pod sandbox is. Needs root. Every test works in
//! a private kubepods root of its own (`<mount>/redirector-test-kubepods-*`),
//! so no kubelet's cgroups are ever touched, and removes it whatever happens.

use std::{
    fs, io,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use redirector::discovery::kube::sandbox::{Locator, LocatorEvent, Sandbox};
use redirector_tests::latency_bound;

#[derive(Clone, Copy, Debug)]
enum Driver {
    Systemd,
    Cgroupfs,
}

#[derive(Clone, Copy, Debug)]
enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

const QOS: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];

static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique() -> usize {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A UID of the API's shape, unique to this run.
fn new_uid() -> String {
    format!(
        "{:08x}-7e57-4000-8000-{:012x}",
        std::process::id(),
        unique()
    )
}

/// The event bound the brief sets: 100 ms on hardware.
fn bound() -> Duration {
    latency_bound(Duration::from_millis(100))
}

/// A private kubepods root and the processes put below it. Dropping it (also
/// while a failed assertion unwinds) kills the processes, then removes the
/// cgroups, leaves before parents.
struct Kubepods {
    mount: PathBuf,
    top: PathBuf,
    root: PathBuf,
    driver: Driver,
    procs: Vec<Child>,
}

impl Kubepods {
    fn new(driver: Driver) -> Self {
        // SAFETY: geteuid cannot fail.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the kube_sandbox tests make cgroups: run them as root"
        );
        let mount = redirector::sys::cgroup::cgroup2_mount().expect("a cgroup2 mount");
        let top = mount.join(format!(
            "redirector-test-kubepods-{}-{}",
            std::process::id(),
            unique()
        ));
        let root = top.join(match driver {
            Driver::Systemd => "kubepods.slice",
            Driver::Cgroupfs => "kubepods",
        });
        let k = Self {
            mount,
            top,
            root,
            driver,
            procs: Vec::new(),
        };
        fs::create_dir_all(&k.root).expect("making the private kubepods root");
        k
    }

    fn locator(&self) -> Locator {
        Locator::new(&self.mount, Some(&self.root)).expect("a locator")
    }

    /// Kubelet's names, spelled out here rather than taken from the module.
    fn qos_dir(&self, qos: Qos) -> PathBuf {
        match (self.driver, qos) {
            (_, Qos::Guaranteed) => self.root.clone(),
            (Driver::Systemd, Qos::Burstable) => self.root.join("kubepods-burstable.slice"),
            (Driver::Systemd, Qos::BestEffort) => self.root.join("kubepods-besteffort.slice"),
            (Driver::Cgroupfs, Qos::Burstable) => self.root.join("burstable"),
            (Driver::Cgroupfs, Qos::BestEffort) => self.root.join("besteffort"),
        }
    }

    fn pod_dir(&self, qos: Qos, uid: &str) -> PathBuf {
        let name = match (self.driver, qos) {
            (Driver::Systemd, Qos::Guaranteed) => {
                format!("kubepods-pod{}.slice", uid.replace('-', "_"))
            }
            (Driver::Systemd, Qos::Burstable) => {
                format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_"))
            }
            (Driver::Systemd, Qos::BestEffort) => {
                format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_"))
            }
            (Driver::Cgroupfs, _) => format!("pod{uid}"),
        };
        self.qos_dir(qos).join(name)
    }

    /// Makes the pod cgroup (and its QoS directory if need be).
    fn make_pod(&self, qos: Qos, uid: &str) -> PathBuf {
        let dir = self.pod_dir(qos, uid);
        fs::create_dir_all(&dir).expect("making a pod cgroup");
        dir
    }

    /// Makes a container cgroup in `pod`, named as containerd names it.
    fn make_container(&self, pod: &Path) -> PathBuf {
        let id = format!("{:064x}", unique() as u128 * 0x9e37_79b9_7f4a_7c15);
        let dir = pod.join(match self.driver {
            Driver::Systemd => format!("cri-containerd-{id}.scope"),
            Driver::Cgroupfs => id,
        });
        fs::create_dir(&dir).expect("making a container cgroup");
        dir
    }

    /// Starts a process in a network namespace of its own (as a sandbox is),
    /// not yet in any of our cgroups: its pid and namespace inode.
    fn spawn_sandbox(&mut self) -> (i32, u64) {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: unshare(2) only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // spawn() returns once exec succeeded: the namespace is in place.
        let child = cmd.spawn().expect("starting a sandbox stand-in");
        let pid = child.id() as i32;
        self.procs.push(child);
        (pid, netns_of(pid))
    }

    /// Starts a process left in this test's (the node's) network namespace,
    /// as a runtime's helper is before it enters the pod's.
    fn spawn_in_node_netns(&mut self) -> i32 {
        let child = Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("starting a process");
        let pid = child.id() as i32;
        self.procs.push(child);
        pid
    }

    fn kill(&mut self, pid: i32) {
        if let Some(at) = self.procs.iter().position(|c| c.id() as i32 == pid) {
            let mut child = self.procs.remove(at);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Kubepods {
    fn drop(&mut self) {
        for child in &mut self.procs {
            let _ = child.kill();
        }
        for child in &mut self.procs {
            let _ = child.wait();
        }
        let mut dirs = Vec::new();
        let mut stack = vec![self.top.clone()];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(dir);
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            if let Err(e) = fs::remove_dir(&dir) {
                eprintln!("cleanup: removing {}: {e}", dir.display());
            }
        }
    }
}

/// Moves `pid` into cgroup `dir`, as a runtime does.
fn move_into(dir: &Path, pid: i32) {
    fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("moving a process");
}

fn netns_of(pid: i32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("a process's netns")
        .ino()
}

fn inode(dir: &Path) -> u64 {
    fs::metadata(dir).expect("a cgroup").ino()
}

/// The next event within `within`, with the time it took.
async fn event_within(locator: &mut Locator, within: Duration) -> (LocatorEvent, Duration) {
    let t0 = Instant::now();
    match tokio::time::timeout(within, locator.next()).await {
        Ok(event) => (event, t0.elapsed()),
        Err(_) => panic!("no locator event within {within:?}"),
    }
}

async fn no_event_for(locator: &mut Locator, quiet: Duration) {
    if let Ok(event) = tokio::time::timeout(quiet, locator.next()).await {
        panic!("unexpected {event:?}");
    }
}

fn ready(uid: &str, pod: &Path) -> LocatorEvent {
    LocatorEvent::CgroupReady {
        pod_uid: uid.to_owned(),
        cgroup: pod.to_owned(),
        cgroup_id: inode(pod),
    }
}

fn found(uid: &str, pod: &Path, (pid, netns_ino): (i32, u64)) -> LocatorEvent {
    LocatorEvent::Found(Sandbox {
        pod_uid: uid.to_owned(),
        cgroup: pod.to_owned(),
        cgroup_id: inode(pod),
        pid,
        netns_ino,
    })
}

/// Wanted first, then the QoS directory, the pod cgroup, a container cgroup
/// and its process, each reported within the bound.
#[tokio::test]
async fn reported_as_soon_as_cgroup_and_process_exist() {
    let mut k = Kubepods::new(Driver::Systemd);
    let mut locator = k.locator();
    let uid = new_uid();
    locator.want(&uid).expect("want");
    no_event_for(&mut locator, Duration::from_millis(20)).await;

    let t0 = Instant::now();
    let pod = k.make_pod(Qos::Burstable, &uid);
    let (event, _) = event_within(&mut locator, bound()).await;
    let ready_latency = t0.elapsed();
    assert_eq!(event, ready(&uid, &pod));

    // A container cgroup without a process yet is nothing to report.
    let container = k.make_container(&pod);
    no_event_for(&mut locator, Duration::from_millis(20)).await;

    let sandbox = k.spawn_sandbox();
    let t1 = Instant::now();
    move_into(&container, sandbox.0);
    // The write itself takes milliseconds (the kernel's cgroup migration
    // waits for an RCU grace period): both are shown.
    let write = t1.elapsed();
    let (event, after_write) = event_within(&mut locator, bound()).await;
    let found_latency = t1.elapsed();
    assert_eq!(event, found(&uid, &pod, sandbox));
    println!(
        "latency: CgroupReady {ready_latency:?} after mkdir; Found {found_latency:?} after \
         the write to cgroup.procs began ({write:?} in the write, {after_write:?} after it) \
         (bound {:?})",
        bound()
    );
    no_event_for(&mut locator, Duration::from_millis(20)).await;
}

/// A pod whose cgroup and sandbox exist before `want`: both reported at once.
#[tokio::test]
async fn a_pod_already_running_is_reported_at_once() {
    let mut k = Kubepods::new(Driver::Systemd);
    let uid = new_uid();
    let pod = k.make_pod(Qos::BestEffort, &uid);
    let container = k.make_container(&pod);
    let sandbox = k.spawn_sandbox();
    move_into(&container, sandbox.0);
    let mut locator = k.locator();

    let t0 = Instant::now();
    locator.want(&uid).expect("want");
    let (first, _) = event_within(&mut locator, bound()).await;
    let (second, _) = event_within(&mut locator, bound()).await;
    let latency = t0.elapsed();
    assert_eq!(first, ready(&uid, &pod));
    assert_eq!(second, found(&uid, &pod, sandbox));
    println!("latency: want to Found for a running pod {latency:?}");
}

/// Processes killed, container cgroup then pod cgroup removed: `Gone`, and
/// nothing before it.
#[tokio::test]
async fn a_removed_pod_is_gone() {
    let mut k = Kubepods::new(Driver::Systemd);
    let uid = new_uid();
    let mut locator = k.locator();
    locator.want(&uid).expect("want");
    let pod = k.make_pod(Qos::Guaranteed, &uid);
    let container = k.make_container(&pod);
    let sandbox = k.spawn_sandbox();
    move_into(&container, sandbox.0);
    assert_eq!(
        event_within(&mut locator, bound()).await.0,
        ready(&uid, &pod)
    );
    assert_eq!(
        event_within(&mut locator, bound()).await.0,
        found(&uid, &pod, sandbox)
    );

    k.kill(sandbox.0);
    fs::remove_dir(&container).expect("removing the container cgroup");
    let t0 = Instant::now();
    fs::remove_dir(&pod).expect("removing the pod cgroup");
    let (event, _) = event_within(&mut locator, bound()).await;
    let latency = t0.elapsed();
    assert_eq!(event, LocatorEvent::Gone { pod_uid: uid });
    println!("latency: Gone {latency:?} after the pod cgroup's rmdir");
    no_event_for(&mut locator, Duration::from_millis(20)).await;
}

/// Both kubelet cgroup drivers' names (systemd's with underscores), in every
/// QoS class; the QoS directories are made after the locator starts.
#[tokio::test]
async fn both_drivers_in_every_qos_class() {
    for driver in [Driver::Systemd, Driver::Cgroupfs] {
        let mut k = Kubepods::new(driver);
        let mut locator = k.locator();
        let uids: Vec<String> = QOS.iter().map(|_| new_uid()).collect();
        for uid in &uids {
            locator.want(uid).expect("want");
        }
        for (qos, uid) in QOS.into_iter().zip(&uids) {
            let pod = k.make_pod(qos, uid);
            assert_eq!(
                event_within(&mut locator, bound()).await.0,
                ready(uid, &pod),
                "{driver:?} {qos:?}"
            );
            let container = k.make_container(&pod);
            let sandbox = k.spawn_sandbox();
            move_into(&container, sandbox.0);
            assert_eq!(
                event_within(&mut locator, bound()).await.0,
                found(uid, &pod, sandbox),
                "{driver:?} {qos:?}"
            );
            println!("{driver:?} {qos:?}: {}", pod.display());
        }
    }
}

/// A runtime's first process in a container cgroup is still in the node's
/// namespace (runc's parent); the sandbox is the process that entered the
/// pod's, reported when the helper exits.
#[tokio::test]
async fn a_process_still_in_the_node_namespace_is_not_the_sandbox() {
    let mut k = Kubepods::new(Driver::Systemd);
    let uid = new_uid();
    let mut locator = k.locator();
    locator.want(&uid).expect("want");
    let pod = k.make_pod(Qos::Burstable, &uid);
    assert_eq!(
        event_within(&mut locator, bound()).await.0,
        ready(&uid, &pod)
    );
    let container = k.make_container(&pod);
    let helper = k.spawn_in_node_netns();
    move_into(&container, helper);
    no_event_for(&mut locator, Duration::from_millis(150)).await;

    let sandbox = k.spawn_sandbox();
    move_into(&container, sandbox.0);
    let t0 = Instant::now();
    k.kill(helper);
    let (event, _) = event_within(&mut locator, bound()).await;
    let latency = t0.elapsed();
    assert_eq!(event, found(&uid, &pod, sandbox));
    println!("latency: Found {latency:?} after the node-namespace helper exited");
}

/// 200 pods wanted, then made in a burst while the kernel's event queue is
/// full: the overflow is noticed and every pod is found.
#[tokio::test]
async fn two_hundred_pods_in_a_burst_none_missed() {
    const PODS: usize = 200;
    let mut k = Kubepods::new(Driver::Systemd);
    // Made before the locator, so that it is watched from the start.
    let qos = k.qos_dir(Qos::Burstable);
    fs::create_dir(&qos).expect("making the QoS directory");
    let mut locator = k.locator();
    let uids: Vec<String> = (0..PODS).map(|_| new_uid()).collect();
    for uid in &uids {
        locator.want(uid).expect("want");
    }

    // Fill the queue (nothing reads it meanwhile) so that the pods' own
    // events are lost and only IN_Q_OVERFLOW tells of them.
    let queue: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    let overflow = queue <= 100_000;
    if overflow {
        let churn = qos.join("churn");
        for _ in 0..queue / 2 + 64 {
            fs::create_dir(&churn).expect("churn mkdir");
            fs::remove_dir(&churn).expect("churn rmdir");
        }
    } else {
        println!("max_queued_events {queue}: too large to fill here; burst without an overflow");
    }

    let t0 = Instant::now();
    let mut expected = std::collections::HashMap::new();
    for uid in &uids {
        let pod = k.make_pod(Qos::Burstable, uid);
        let container = k.make_container(&pod);
        let sandbox = k.spawn_sandbox();
        move_into(&container, sandbox.0);
        expected.insert(uid.clone(), found(uid, &pod, sandbox));
    }
    let made = t0.elapsed();

    let t1 = Instant::now();
    let deadline = t1 + Duration::from_secs(30);
    let mut ready = std::collections::HashSet::new();
    let mut seen = std::collections::HashMap::new();
    while seen.len() < PODS {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, locator.next()).await {
            Ok(event) => event,
            Err(_) => panic!(
                "{} of {PODS} pods found after 30 s; missing: {:?}",
                seen.len(),
                uids.iter()
                    .filter(|u| !seen.contains_key(*u))
                    .collect::<Vec<_>>()
            ),
        };
        match event {
            LocatorEvent::CgroupReady { pod_uid, .. } => {
                assert!(ready.insert(pod_uid.clone()), "{pod_uid} ready twice");
            }
            LocatorEvent::Found(ref sandbox) => {
                let uid = sandbox.pod_uid.clone();
                assert!(ready.contains(&uid), "{uid} found before ready");
                assert_eq!(Some(&event), expected.get(&uid));
                assert!(seen.insert(uid.clone(), event).is_none(), "{uid} twice");
            }
            LocatorEvent::Gone { pod_uid } => panic!("{pod_uid} gone"),
        }
    }
    if overflow {
        assert!(locator.overflows() >= 1, "the queue never overflowed");
    }
    println!(
        "{PODS} pods made in {made:?}; all found {:?} after ({} overflow(s))",
        t1.elapsed(),
        locator.overflows()
    );
    no_event_for(&mut locator, Duration::from_millis(20)).await;
}
