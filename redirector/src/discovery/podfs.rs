//! Reading what a process in another pod controls: its command line and files
//! in its own filesystem. Every one of these may be hostile: a FIFO or device
//! where a config file should be, a symlink to a host path, a file of
//! gigabytes, a command line of megabytes. So:
//!
//! - paths resolve inside the process's root (`/proc/PID/root`), never ours;
//! - only regular files are opened (checked on an `O_PATH` descriptor, which
//!   opens nothing), non-blocking, and read up to a small cap;
//! - callers run this on the inspector's threads (see `inspector`), never on
//!   the agent's loop, since a FUSE or NFS file can still block a read.
//!
//! Not procfs's readers: its `cmdline()` reads the whole file, and it has no
//! way to open a path inside another root non-blocking and capped.

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    os::{
        fd::AsFd,
        unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use crate::sys;
pub use crate::sys::proc::{comm, sanitize};

/// The most of a pod's config file that is read: Tempo's files are a few KiB.
pub const FILE_CAP: u64 = 256 * 1024;
/// The most of a command line that is read (Linux allows megabytes).
pub const CMDLINE_CAP: u64 = 64 * 1024;

/// Why a file in a pod was not read.
#[derive(Debug)]
pub enum PodFileError {
    /// Not a regular file: a FIFO, socket, device or directory.
    NotRegular(&'static str),
    /// Larger than [`FILE_CAP`].
    TooLarge(u64),
    /// A relative path, and the process's working directory is not under its
    /// root (a chroot without chdir): nothing sane to resolve against.
    CwdOutsideRoot,
    Io(io::Error),
}

impl fmt::Display for PodFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRegular(kind) => write!(f, "not a regular file ({kind}): not read"),
            Self::TooLarge(n) => write!(f, "{n} bytes, more than the {FILE_CAP} read: not read"),
            Self::CwdOutsideRoot => write!(
                f,
                "relative, and the process's working directory is outside its root"
            ),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<io::Error> for PodFileError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// The command line of process `pid`, its arguments split at NUL, at most
/// [`CMDLINE_CAP`] bytes of it.
pub fn cmdline(pid: i32) -> io::Result<Vec<String>> {
    let mut raw = Vec::new();
    File::open(format!("/proc/{pid}/cmdline"))?
        .take(CMDLINE_CAP)
        .read_to_end(&mut raw)?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Reads `path` as process `pid` would see it (relative to its working
/// directory, resolved inside its root), if it is a regular file of at most
/// [`FILE_CAP`] bytes.
pub fn read(pid: i32, path: &str) -> Result<String, PodFileError> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let root = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(proc.join("root"))?;
    let inside = if Path::new(path).is_absolute() {
        PathBuf::from(path)
    } else {
        cwd_in_root(&proc)?.join(path)
    };
    let handle = sys::open_path_in_root(root.as_fd(), &inside)?;
    let handle = File::from(handle);
    let meta = handle.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(PodFileError::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_dir() {
            "a directory"
        } else {
            "not a file"
        }));
    }
    if meta.size() > FILE_CAP {
        return Err(PodFileError::TooLarge(meta.size()));
    }
    // Reopened through our own descriptor: the very file checked above, no
    // second resolution a pod could race with a swap.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&handle)
        ))?;
    let mut text = String::new();
    // A file that grew since the check is cut at the cap, not read whole.
    file.take(FILE_CAP)
        .read_to_string(&mut text)
        .map_err(PodFileError::Io)?;
    Ok(text)
}

/// The process's working directory as a path inside its root.
fn cwd_in_root(proc: &Path) -> Result<PathBuf, PodFileError> {
    let root = std::fs::read_link(proc.join("root"))?;
    let cwd = std::fs::read_link(proc.join("cwd"))?;
    let inside = cwd
        .strip_prefix(&root)
        .map_err(|_| PodFileError::CwdOutsideRoot)?;
    Ok(Path::new("/").join(inside))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_escapes_control_characters_and_caps_length() {
        assert_eq!(sanitize("live-store", 64), "live-store");
        assert_eq!(sanitize("a\x1b[31mb\nc", 64), "a\\u{1b}[31mb\\nc");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }

    /// A pod's FIFO, symlink out of its root, oversized file: none is read,
    /// and none blocks (a FIFO open without a writer would).
    #[test]
    fn reads_only_small_regular_files_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("podfs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).expect("dir");
        std::fs::write(dir.join("etc/conf.yaml"), "target: live-store\n").expect("write");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            dir.join("fifo"),
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .expect("mkfifo");
        std::os::unix::fs::symlink("/etc/hostname", dir.join("escape")).expect("symlink");
        std::os::unix::fs::symlink("../../../../etc/conf.yaml", dir.join("dotdot"))
            .expect("symlink");
        std::fs::write(dir.join("big"), vec![b'#'; FILE_CAP as usize + 1]).expect("write");

        let root = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&dir)
            .expect("root");
        let open = |p: &str| sys::open_path_in_root(root.as_fd(), Path::new(p));
        // `..` and absolute targets stay inside: /etc/hostname of the host is
        // not reachable, the pod's own /etc/conf.yaml is.
        assert!(open("/escape").is_err(), "absolute symlink left the root");
        let dotdot = File::from(open("/dotdot").expect("dotdot resolves inside"));
        let conf = File::from(open("/etc/conf.yaml").expect("conf"));
        assert_eq!(
            dotdot.metadata().expect("stat").ino(),
            conf.metadata().expect("stat").ino()
        );

        // The same through this process's own root.
        let me = std::process::id() as i32;
        let at = |p: &str| dir.join(p).display().to_string();
        assert_eq!(
            read(me, &at("etc/conf.yaml")).expect("conf"),
            "target: live-store\n"
        );
        assert!(matches!(
            read(me, &at("fifo")),
            Err(PodFileError::NotRegular("a FIFO"))
        ));
        assert!(matches!(
            read(me, &at("big")),
            Err(PodFileError::TooLarge(_))
        ));
        assert!(matches!(
            read(me, &at("etc")),
            Err(PodFileError::NotRegular(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
