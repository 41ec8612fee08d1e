//! A root filesystem image in the kernel's initramfs format: an uncompressed
//! "newc" cpio archive (see the kernel's
//! Documentation/driver-api/early-userspace/buffer-format.rst). Uncompressed,
//! because decompressing under TCG costs more boot time than reading the larger
//! file costs QEMU.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{self, BufWriter, Read, Write},
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Context, Result};

enum Entry {
    Dir,
    /// Contents from a host file (read when the archive is written).
    HostFile {
        source: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink(String),
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// Paths inside the image, each absolute (`/usr/bin/ip`); parent directories
/// are added as needed.
#[derive(Default)]
pub struct Image {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Image {
    pub fn dir(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.insert(path.as_ref(), Entry::Dir)
    }

    /// Copies host file `source` (symlinks followed) to `path`, executable.
    pub fn host_file(&mut self, path: impl AsRef<Path>, source: &Path) -> Result<()> {
        let source = source.to_path_buf();
        self.insert(
            path.as_ref(),
            Entry::HostFile {
                source,
                mode: 0o755,
            },
        )
    }

    pub fn bytes(&mut self, path: impl AsRef<Path>, data: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(path.as_ref(), Entry::Bytes { data, mode })
    }

    pub fn symlink(&mut self, path: impl AsRef<Path>, target: &str) -> Result<()> {
        self.insert(path.as_ref(), Entry::Symlink(target.to_owned()))
    }

    pub fn char_dev(&mut self, path: impl AsRef<Path>, major: u32, minor: u32) -> Result<()> {
        self.insert(path.as_ref(), Entry::CharDev { major, minor })
    }

    fn insert(&mut self, path: &Path, entry: Entry) -> Result<()> {
        let rel = relative(path)?;
        for parent in rel.ancestors().skip(1) {
            if parent.as_os_str().is_empty() {
                break;
            }
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_path_buf(), Entry::Dir);
                }
                Some(Entry::Dir) => {}
                Some(_) => bail!("{} is not a directory in the image", parent.display()),
            }
        }
        match (self.entries.get(&rel), &entry) {
            (Some(Entry::Dir), Entry::Dir) | (None, _) => {}
            // The same host file twice (a library two binaries need) is fine.
            (Some(Entry::HostFile { source: a, .. }), Entry::HostFile { source: b, .. })
                if a == b => {}
            _ => bail!("{} added twice to the image", path.display()),
        }
        self.entries.insert(rel, entry);
        Ok(())
    }

    pub fn write(&self, to: &Path) -> Result<()> {
        let file = File::create(to).with_context(|| format!("creating {}", to.display()))?;
        let mut out = Writer::new(BufWriter::new(file));
        // BTreeMap order puts every directory before its contents.
        for (path, entry) in &self.entries {
            let name = path.to_string_lossy();
            match entry {
                Entry::Dir => out.entry(&name, 0o040755, 0, &mut io::empty())?,
                Entry::Bytes { data, mode } => {
                    out.entry(&name, 0o100000 | mode, data.len() as u64, &mut &data[..])?
                }
                Entry::HostFile { source, mode } => {
                    let mut f = File::open(source)
                        .with_context(|| format!("opening {}", source.display()))?;
                    let len = f.metadata()?.len();
                    out.entry(&name, 0o100000 | mode, len, &mut f)
                        .with_context(|| format!("adding {}", source.display()))?
                }
                Entry::Symlink(target) => {
                    out.entry(&name, 0o120777, target.len() as u64, &mut target.as_bytes())?
                }
                Entry::CharDev { major, minor } => {
                    out.rdev = (*major, *minor);
                    out.entry(&name, 0o020600, 0, &mut io::empty())?;
                    out.rdev = (0, 0);
                }
            }
        }
        out.finish()
            .with_context(|| format!("writing {}", to.display()))
    }
}

/// `/usr/bin/ip` -> `usr/bin/ip`; rejects `..` and relative paths.
fn relative(path: &Path) -> Result<PathBuf> {
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(p) => rel.push(p),
            _ => bail!("{}: image paths are absolute and plain", path.display()),
        }
    }
    if !path.is_absolute() || rel.as_os_str().is_empty() {
        bail!("{}: image paths are absolute and plain", path.display());
    }
    Ok(rel)
}

struct Writer<W: Write> {
    out: W,
    written: u64,
    ino: u32,
    rdev: (u32, u32),
}

impl<W: Write> Writer<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            ino: 0,
            rdev: (0, 0),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, size: u64, data: &mut dyn Read) -> Result<()> {
        let Ok(filesize) = u32::try_from(size) else {
            bail!("{name}: {size} bytes is too large for a cpio entry");
        };
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so equal inputs give equal images
            filesize,
            0,
            0,
            self.rdev.0,
            self.rdev.1,
            name.len() as u32 + 1,
            0, // check (only for the "070702" variant)
        ];
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        let copied = io::copy(&mut Read::take(data, size), &mut self.out)?;
        if copied != size {
            bail!("{name}: expected {size} bytes, read {copied}");
        }
        self.written += copied;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Header+name and data each end on a 4-byte boundary.
    fn pad(&mut self) -> Result<()> {
        let n = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..n as usize])
    }

    fn finish(mut self) -> Result<()> {
        self.entry("TRAILER!!!", 0, 0, &mut io::empty())?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_archive_lists_parents_first_and_pads() {
        let dir = std::env::temp_dir().join(format!("xtask-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let mut image = Image::default();
        image
            .bytes("/etc/hostname", b"vm\n".to_vec(), 0o644)
            .expect("file");
        image.symlink("/var/run", "/run").expect("symlink");
        image.char_dev("/dev/console", 5, 1).expect("dev");
        assert!(image.bytes("/etc", Vec::new(), 0o644).is_err());
        assert!(image.dir("relative").is_err());
        let path = dir.join("t.cpio");
        image.write(&path).expect("write");
        let data = std::fs::read(&path).expect("read");
        std::fs::remove_dir_all(&dir).expect("cleanup");
        assert_eq!(data.len() % 4, 0);
        let text = String::from_utf8_lossy(&data);
        let names: Vec<usize> = [
            "dev\0",
            "dev/console\0",
            "etc\0",
            "etc/hostname\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap_or_else(|| panic!("{n:?} missing")))
        .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert!(data.starts_with(b"070701"));
        assert!(text.contains("vm\n"));
    }
}
