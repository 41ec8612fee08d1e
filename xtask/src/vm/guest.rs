//! The guest's root filesystem: static busybox and the init script, the host
//! tools the tests exec with their shared libraries, the kernel's modules, and
//! the agent and test binaries at the same absolute paths as on the host (the
//! tests find helper binaries through paths compiled into them).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use super::{cpio::Image, modules::Module, payload::Payload};

const INIT: &str = include_str!("init.sh");

/// Host programs the guest needs: busybox for the shell and basic commands;
/// iproute2's `ip` (`ip netns`, veth; busybox's has neither) and `ss`;
/// util-linux's `setpriv` and `unshare` as the tests call them; procps'
/// `sysctl` for `ip netns exec NS sysctl` (busybox's is the fallback); bpftool
/// to show that a refusal leaves no program loaded; bash, whose `-n` checks the
/// generated completion script.
const TOOLS: [(&str, bool); 8] = [
    ("busybox", true),
    ("bash", true),
    ("ip", true),
    ("ss", true),
    ("setpriv", true),
    ("unshare", true),
    ("sysctl", false),
    ("bpftool", false),
];

/// What the guest does after booting.
pub enum Plan<'a> {
    /// Run these test binaries (name, host path), with a libtest filter.
    Tests {
        binaries: &'a [(String, PathBuf)],
        filter: Option<&'a str>,
    },
    /// Show that `check` and `run` refuse on this kernel.
    Refusal,
}

/// Builds the image for one kernel at `out`.
pub fn build(
    out: &Path,
    root: &Path,
    payload: &Payload,
    modules: &[Module],
    plan: &Plan,
) -> Result<()> {
    let mut image = Image::default();
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp", "/root", "/var"] {
        image.dir(dir)?;
    }
    // The kernel opens /dev/console for init before anything is mounted.
    image.char_dev("/dev/console", 5, 1)?;
    image.symlink("/var/run", "/run")?;
    image.bytes("/init", INIT.as_bytes().to_vec(), 0o755)?;
    for (name, text) in ETC {
        image.bytes(format!("/etc/{name}"), text.as_bytes().to_vec(), 0o644)?;
    }

    let mut elves: Vec<PathBuf> = Vec::new();
    for (tool, required) in TOOLS {
        match host_tool(tool) {
            Some(path) => {
                let at = if tool == "busybox" {
                    PathBuf::from("/bin/busybox")
                } else {
                    Path::new("/usr/bin").join(tool)
                };
                image.host_file(&at, &path)?;
                elves.push(path);
            }
            None if required => bail!("{tool} not found on this machine (cargo xtask setup)"),
            None if tool == "bpftool" && matches!(plan, Plan::Refusal) => {
                bail!("bpftool not found on this machine: the refusal check needs it")
            }
            None => {}
        }
    }
    for path in payload.files() {
        image.host_file(path, path)?;
        elves.push(path.to_path_buf());
    }
    for lib in shared_libraries(&elves)? {
        image.host_file(&lib, &lib)?;
    }
    image.dir(root)?;

    let mut module_paths = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let at = format!("/vm/modules/{i:02}-{}.ko", m.name);
        image.bytes(&at, m.elf.clone(), 0o644)?;
        module_paths.push(at);
    }
    let mut vars = vec![
        ("ROOT", root.display().to_string()),
        ("REDIRECTOR_BIN", payload.agent.display().to_string()),
        ("MODULES", module_paths.join(" ")),
    ];
    match plan {
        Plan::Tests { binaries, filter } => {
            let tests: Vec<String> = binaries
                .iter()
                .map(|(name, path)| format!("{name}={}", path.display()))
                .collect();
            vars.push(("MODE", "tests".into()));
            vars.push(("TESTS", tests.join(" ")));
            vars.push(("FILTER", filter.unwrap_or_default().to_owned()));
        }
        Plan::Refusal => vars.push(("MODE", "refusal".into())),
    }
    let mut plan_text = shell_assignments(&vars)?;
    // The test binaries inherit these.
    let exports: Vec<(&str, String)> = payload
        .env
        .iter()
        .map(|(name, path)| (name.as_str(), path.display().to_string()))
        .collect();
    for line in shell_assignments(&exports)?.lines() {
        plan_text.push_str(&format!("export {line}\n"));
    }
    // Software emulation (TCG) runs everything about ten times slower: tests
    // that bound a latency stretch it (`redirector_tests::EMULATED_ENV`).
    plan_text.push_str(&format!("export {}=1\n", redirector_tests::EMULATED_ENV));
    image.bytes("/vm/plan", plan_text.into_bytes(), 0o644)?;
    image.write(out)
}

/// Files the guest's tools and tests expect in /etc: names for the users the
/// tests switch to, and a hostname (a test names /etc/hostname as a file that
/// is not a namespace).
const ETC: [(&str, &str); 4] = [
    ("hostname", "redirector-vm\n"),
    (
        "passwd",
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    ),
    ("group", "root:x:0:\nnogroup:x:65534:\n"),
    ("hosts", "127.0.0.1 localhost\n::1 localhost\n"),
];

fn host_tool(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Every shared library (and the dynamic loader) that `elves` load, at the
/// paths where the host's loader finds them; the guest's loader has no
/// ld.so.cache and searches the same default directories.
fn shared_libraries(elves: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for elf in elves {
        let out = Command::new("ldd")
            .arg(elf)
            .output()
            .with_context(|| format!("running ldd {}", elf.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            // A static binary (busybox-static): nothing to copy.
            if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
                || text.contains("statically linked")
            {
                continue;
            }
            bail!(
                "ldd {} failed: {}",
                elf.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        libs.extend(ldd_paths(&text));
    }
    Ok(libs)
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`: the absolute paths.
fn ldd_paths(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// `NAME='value'` lines for `. /vm/plan`, single quotes escaped.
fn shell_assignments(vars: &[(&str, String)]) -> Result<String> {
    let mut out = String::new();
    for (name, value) in vars {
        if value.contains('\n') {
            bail!("{name}: a value with a newline ({value:?}) cannot go into the guest's plan");
        }
        out.push_str(&format!("{name}='{}'\n", value.replace('\'', r"'\''")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_absolute_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f28)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f28)\n";
        assert_eq!(
            ldd_paths(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn plan_values_are_quoted_for_sh() {
        let s = shell_assignments(&[("FILTER", "it's".into()), ("MODE", "tests".into())])
            .expect("no newline");
        assert_eq!(s, "FILTER='it'\\''s'\nMODE='tests'\n");
        assert!(shell_assignments(&[("X", "a\nb".into())]).is_err());
    }
}
