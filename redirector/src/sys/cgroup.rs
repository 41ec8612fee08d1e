//! Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a pure v2
//! host, `/sys/fs/cgroup/unified` on a hybrid one, elsewhere in a container
//! that mounts it itself.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};

/// The first cgroup2 mount in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2(&mountinfo).context(
        "no cgroup v2 (cgroup2) mount found in /proc/self/mountinfo: sock_ops needs one \
         (mount -t cgroup2 none /sys/fs/cgroup/unified, or mount the host's into the container)",
    )
}

/// mountinfo lines read `id parent major:minor root mountpoint options [optional...] - fstype source superopts`.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'),
            );
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_v2_mounts() {
        let hybrid = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                      27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure = "30 1 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2("22 1 0:5 / /proc rw - proc proc rw\n"), None);
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        let line = "26 25 0:24 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(line), Some(PathBuf::from("/mnt/my cgroup")));
    }
}
