//! `redirector check`: can this node run the agent? Each probe says what it
//! found and, when it fails, what to change. Probes only read state, except the
//! program-type probes, which load (and at once close) a two-instruction program.

use std::{ffi::CStr, path::Path};

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, is_program_supported, BpfHelper},
};

// A probe's verdict is a line of the PASS/FAIL table, in text and JSON alike.
use super::table::Row as Check;
use crate::{
    bpf::pins::{BPFFS, PIN_ROOT as PIN_DIR},
    commands::Output,
};
/// Kernel BTF, exposed by CONFIG_DEBUG_INFO_BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
pub use crate::bpf::probe::MIN_KERNEL;

/// `redirector check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// `table` for people, `json` for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The live-store ring page of any Tempo component that serves it
    /// (distributor, querier): http://HOST:3200/live-store/ring. Plain http only.
    // No environment variable: the agent's REDIRECTOR_TEMPO_RING must not
    // turn a plain `check` in its pod into a ring check.
    #[arg(long, value_name = "URL")]
    pub tempo_ring: Option<crate::ring::RingUrl>,
}

/// `redirector check`: this node's checks, or with --tempo-ring the ring's
/// live-stores on this node; exit 3 (1 for a ring that cannot be read) when
/// one fails.
pub fn main(args: CheckArgs) -> anyhow::Result<()> {
    use crate::error::Fatal;
    if let Some(url) = args.tempo_ring {
        crate::sys::require_capabilities()?;
        let report = crate::ring::check(&url)?;
        print!("{}", super::ring::render(&report, args.output));
        return if report.ok {
            Ok(())
        } else {
            Err(Fatal::Environment(
                "some live-stores of this node are not redirected (see above)".into(),
            )
            .into())
        };
    }
    let checks = run_checks();
    match args.output {
        Output::Table => print!("{}", render_table(&checks)),
        Output::Json => println!("{}", render_json(&checks)),
    }
    if all_passed(&checks) {
        Ok(())
    } else {
        Err(Fatal::Environment("some checks failed (see above)".into()).into())
    }
}

/// Runs every probe, in the order an operator would fix things.
pub fn run_checks() -> Vec<Check> {
    vec![
        check_privileges(),
        check_kernel(),
        check_btf(),
        check_sk_lookup(),
        check_sock_ops(),
        check_cgroup2(),
        check_bpffs(),
        check_pinned_state(),
    ]
}

/// Whether every check passed: the exit status of `redirector check`.
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok)
}

/// One line per check: `PASS name  detail`, or `FAIL name  detail; fix: ...`.
pub use super::table::render as render_table;

/// The checks as a JSON array, for `--output json`.
pub fn render_json(checks: &[Check]) -> String {
    // Serializing plain strings and bools cannot fail; an empty array is still valid JSON.
    serde_json::to_string_pretty(checks).unwrap_or_else(|_| "[]".into())
}

fn check_privileges() -> Check {
    const NAME: &str = "privileges";
    let euid = rustix::process::geteuid().as_raw();
    let who = if euid == 0 {
        "running as root".to_string()
    } else {
        format!("running as uid {euid}")
    };
    match crate::sys::missing_capabilities() {
        Ok(missing) if missing.is_empty() => Check::pass(
            NAME,
            format!(
                "{who}; effective {}",
                crate::sys::REQUIRED_CAPABILITIES
                    .iter()
                    .map(|(_, name, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Ok(missing) => {
            let list: Vec<String> = missing
                .iter()
                .map(|(name, why)| format!("{name} to {why}"))
                .collect();
            let k8s: Vec<&str> = missing
                .iter()
                .map(|(name, _)| name.trim_start_matches("CAP_"))
                .collect();
            Check::fail(
                NAME,
                format!("{who}; missing effective {}", list.join(", ")),
                format!(
                    "run as root, or grant the capabilities (Kubernetes: securityContext.capabilities.add: [{}])",
                    k8s.join(", ")
                ),
            )
        }
        Err(e) => Check::fail(
            NAME,
            format!("{who}; cannot read capabilities (capget): {e}"),
            "allow capget(2) in the pod's seccomp profile (RuntimeDefault allows it)",
        ),
    }
}

fn check_kernel() -> Check {
    const NAME: &str = "kernel";
    let release = match kernel_release() {
        Ok(r) => r,
        Err(e) => return Check::fail(NAME, format!("uname failed: {e}"), min_kernel_fix()),
    };
    kernel_verdict(&release)
}

fn min_kernel_fix() -> String {
    format!("run on Linux >= {}.{}", MIN_KERNEL.0, MIN_KERNEL.1)
}

/// The kernel check on a `uname -r` string, apart from the syscall so it is testable.
fn kernel_verdict(release: &str) -> Check {
    const NAME: &str = "kernel";
    let Some(version) = parse_kernel_version(release) else {
        return Check::fail(
            NAME,
            format!("cannot read a version from release `{release}`"),
            min_kernel_fix(),
        );
    };
    let features = crate::bpf::probe::FEATURES.iter();
    let needs: Vec<String> = features
        .clone()
        .map(|f| format!("{} {}.{}", f.name, f.since.0, f.since.1))
        .collect();
    let missing: Vec<String> = features
        .filter(|f| version < f.since)
        .map(|f| format!("{} (needs {}.{})", f.name, f.since.0, f.since.1))
        .collect();
    if missing.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{release} >= {}.{} ({})",
                MIN_KERNEL.0,
                MIN_KERNEL.1,
                needs.join(", ")
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!("{release} lacks {}", missing.join(", ")),
            format!(
                "upgrade the node's kernel to {}.{} or newer",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )
    }
}

/// `(major, minor)` from a release such as `6.18.0-1-amd64`, `5.15.0-101-generic`
/// or `6.1`; distribution suffixes after the numbers are ignored.
pub fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_release() -> std::io::Result<String> {
    // SAFETY: zeroed utsname is a valid out-buffer for uname(2).
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid out-pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel NUL-terminates release within its fixed-size array.
    let release = unsafe { CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

fn check_btf() -> Check {
    const NAME: &str = "btf";
    if Path::new(VMLINUX_BTF).exists() {
        Check::pass(NAME, format!("{VMLINUX_BTF} present"))
    } else {
        Check::fail(
            NAME,
            format!(
                "{VMLINUX_BTF} missing: the kernel was built without CONFIG_DEBUG_INFO_BTF, so eBPF \
                 objects cannot be matched against the kernel's types"
            ),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's 5.15+ kernel is)",
        )
    }
}

fn check_sk_lookup() -> Check {
    probe_program(
        "sk_lookup",
        ProgramType::SkLookup,
        BpfHelper::BPF_FUNC_sk_assign,
        "bpf_sk_assign",
        "steers connections on the advertised port to the listener; needs Linux >= 5.9 \
         with CONFIG_BPF_SYSCALL and CONFIG_NET",
    )
}

fn check_sock_ops() -> Check {
    probe_program(
        "sock_ops",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_netns_cookie,
        "bpf_get_netns_cookie",
        "registers live-store listeners as they start; needs CONFIG_CGROUP_BPF and bpf_get_netns_cookie in sock_ops (Linux 5.15)",
    )
}

/// Loads a trivial program of `ty`, then one calling `helper`, the way libbpf's
/// feature probes do: a kernel too old or built without the feature refuses them.
fn probe_program(
    name: &'static str,
    ty: ProgramType,
    helper: BpfHelper,
    helper_name: &str,
    role: &str,
) -> Check {
    let fix_privileges =
        "run `redirector check` with CAP_BPF (or as root): probing loads a tiny program";
    match is_program_supported(ty) {
        Ok(true) => {}
        Ok(false) => {
            return Check::fail(
                name,
                format!("the kernel refuses {name} programs"),
                format!("use a kernel that supports them: {role}"),
            )
        }
        Err(e) => {
            return Check::fail(
                name,
                format!("could not probe {name} support: {}", error_chain(&e)),
                fix_privileges,
            )
        }
    }
    match is_helper_supported(ty, helper) {
        Ok(true) => Check::pass(name, format!("{name} programs and {helper_name} supported")),
        Ok(false) => Check::fail(
            name,
            format!("{name} programs load but {helper_name} is not available to them"),
            format!("use a newer kernel: {role}"),
        ),
        Err(e) => Check::fail(
            name,
            format!(
                "{name} programs supported; could not probe {helper_name}: {}",
                error_chain(&e)
            ),
            fix_privileges,
        ),
    }
}

/// aya's errors keep the errno in their source; an operator needs to see it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn check_cgroup2() -> Check {
    const NAME: &str = "cgroup2";
    match crate::sys::cgroup::cgroup2_mount() {
        Ok(path) => Check::pass(
            NAME,
            format!(
                "cgroup v2 mounted at {} (sock_ops attaches to each served live-store's pod \
                 cgroup under it; to its root only with --sock-ops-cgroup root)",
                path.display()
            ),
        ),
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}"),
            "mount cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified), or in a container \
             mount the host's cgroup v2 root",
        ),
    }
}

fn check_bpffs() -> Check {
    const NAME: &str = "bpffs";
    let fix = format!(
        "mount -t bpf bpf {BPFFS} (in Kubernetes: a hostPath volume for {BPFFS} with \
         mountPropagation: Bidirectional)"
    );
    match crate::sys::is_bpffs(Path::new(BPFFS)) {
        Ok(true) => Check::pass(NAME, format!("bpffs mounted at {BPFFS}")),
        Ok(false) => Check::fail(
            NAME,
            format!("{BPFFS} exists but is not a bpffs mount"),
            fix,
        ),
        Err(e) => Check::fail(NAME, format!("{BPFFS}: {e}"), fix),
    }
}

/// Informational: pinned state is neither required nor wrong, but an operator
/// debugging "why does traffic still redirect" wants to know it is there.
fn check_pinned_state() -> Check {
    const NAME: &str = "pinned state";
    let detail = match std::fs::read_dir(PIN_DIR) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            if names.is_empty() {
                format!("{PIN_DIR} present and empty")
            } else {
                format!(
                    "{PIN_DIR} present ({} entries: {}): a pinned agent's redirects are active",
                    names.len(),
                    names.join(", ")
                )
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            format!("{PIN_DIR} absent: no pinned agent state")
        }
        Err(e) => format!("{PIN_DIR}: {e}"),
    };
    Check::pass(NAME, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-101-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("6.1"), Some((6, 1)));
        assert_eq!(parse_kernel_version("5.10.209+"), Some((5, 10)));
        assert_eq!(
            parse_kernel_version("4.19.0-26-cloud-amd64\n"),
            Some((4, 19))
        );
        assert_eq!(parse_kernel_version("6"), None);
        assert_eq!(parse_kernel_version("linux"), None);
        assert_eq!(parse_kernel_version(""), None);
    }

    #[test]
    fn kernel_verdicts_name_the_missing_features() {
        let ok = kernel_verdict("6.18.0-1-amd64");
        assert!(ok.ok, "{ok:?}");
        assert!(ok.detail.contains(">= 5.15"), "{ok:?}");
        assert!(ok.detail.contains("sk_lookup programs 5.9"), "{ok:?}");
        assert!(kernel_verdict("5.15.0-101-generic").ok);

        let old = kernel_verdict("5.10.0-28-amd64");
        assert!(!old.ok);
        assert!(
            old.detail.contains("SO_NETNS_COOKIE (needs 5.14)"),
            "{old:?}"
        );
        assert!(
            old.detail
                .contains("bpf_get_netns_cookie in sock_ops programs (needs 5.15)"),
            "{old:?}"
        );
        assert!(!old.detail.contains("sk_lookup"), "{old:?}");
        assert!(old.fix.as_deref().unwrap_or_default().contains("5.15"));

        let older = kernel_verdict("4.19.0");
        assert!(
            older.detail.contains("sk_lookup programs (needs 5.9)"),
            "{older:?}"
        );
        assert!(
            older.detail.contains("pidfd_getfd (needs 5.6)"),
            "{older:?}"
        );

        assert!(!kernel_verdict("weird").ok);
    }

    fn sample() -> Vec<Check> {
        vec![
            Check::pass("kernel", "6.18.0 >= 5.15"),
            Check::fail(
                "bpffs",
                "/sys/fs/bpf exists but is not a bpffs mount",
                "mount -t bpf bpf /sys/fs/bpf",
            ),
            Check::pass("pinned state", "absent"),
        ]
    }

    #[test]
    fn table_has_one_line_per_check_with_fix_on_fail() {
        let table = render_table(&sample());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "PASS  kernel        6.18.0 >= 5.15",
                "FAIL  bpffs         /sys/fs/bpf exists but is not a bpffs mount; fix: mount -t bpf bpf /sys/fs/bpf",
                "PASS  pinned state  absent",
            ]
        );
        assert_eq!(render_table(&[]), "");
        assert!(!all_passed(&sample()));
        assert!(all_passed(&sample()[..1]));
        assert!(all_passed(&[]));
    }

    #[test]
    fn json_output() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr[0]["name"], "kernel");
        assert_eq!(arr[0]["ok"], true);
        assert!(arr[0].get("fix").is_none());
        assert_eq!(arr[1]["ok"], false);
        assert_eq!(arr[1]["fix"], "mount -t bpf bpf /sys/fs/bpf");
    }

    /// Touches the real system (loads two-instruction probe programs), so only on demand:
    /// `cargo test --release -p redirector check:: -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn probes_this_machine() {
        let checks = run_checks();
        print!("{}", render_table(&checks));
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "privileges",
                "kernel",
                "btf",
                "sk_lookup",
                "sock_ops",
                "cgroup2",
                "bpffs",
                "pinned state"
            ]
        );
        assert!(checks.iter().all(|c| c.ok || c.fix.is_some()));
    }
}
