//! Paths: opened confined to a root (a pod's filesystem), and bpffs told
//! from other filesystems.

use std::{
    io,
    os::fd::{BorrowedFd, OwnedFd},
    path::Path,
};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// bpffs' `statfs` magic (a 32-bit value, as every filesystem magic is).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Opens `path` as an `O_PATH` descriptor, resolved with `dir` as the root
/// (`openat2` with RESOLVE_IN_ROOT and RESOLVE_NO_MAGICLINKS, Linux 5.6): `..`
/// and absolute symlinks stay under `dir`, and /proc magic links are refused,
/// so a path a pod controls never leads out of the pod's filesystem. `O_PATH`
/// opens nothing: no FIFO, device or lock can block or react to it.
/// A path with a NUL byte is EINVAL.
pub fn open_path_in_root(dir: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat2(
        dir,
        path,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(path)?;
    // `f_type` is a long on most targets, u32 on s390x: its low 32 bits.
    Ok(st.f_type as u32 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use std::{
        fs::{self, File},
        os::{fd::AsFd, unix::fs::MetadataExt},
    };

    use super::*;

    /// RESOLVE_IN_ROOT keeps `/` at the root given; RESOLVE_NO_MAGICLINKS
    /// refuses /proc's magic links (ELOOP); a NUL in the path is EINVAL.
    #[test]
    fn open_path_in_root_refuses_magic_links_and_nul() {
        let root = File::open("/").expect("root");
        let etc = open_path_in_root(root.as_fd(), Path::new("/etc")).expect("etc");
        assert_eq!(
            File::from(etc).metadata().expect("stat").ino(),
            fs::metadata("/etc").expect("stat").ino()
        );
        let e = open_path_in_root(root.as_fd(), Path::new("/proc/self/exe")).expect_err("magic");
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = open_path_in_root(root.as_fd(), Path::new("/etc\0x")).expect_err("nul");
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn bpffs_is_told_by_its_magic() {
        assert!(!is_bpffs(Path::new("/proc")).expect("statfs"));
        let e = is_bpffs(Path::new("/nonexistent/redirector")).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            for line in mounts
                .lines()
                .filter(|l| l.split(' ').nth(2) == Some("bpf"))
            {
                let at = line.split(' ').nth(1).expect("mount point");
                assert!(is_bpffs(Path::new(at)).expect("statfs"), "{at}");
            }
        }
    }
}
