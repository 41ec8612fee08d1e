//! Kernel modules the guest loads itself (the cloud kernels build these as
//! modules): found in the unpacked package, with their dependencies first,
//! decompressed on the host so that busybox `insmod` needs no decompressor and
//! no modules.dep.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

/// What the integration tests need from the kernel beyond the core: veth pairs
/// between namespaces, and sock_diag for TCP (the agent finds existing
/// listeners with it). A node's kernel autoloads these through modprobe; the
/// guest has no modprobe and loads them at boot.
pub const WANTED: [&str; 3] = ["veth", "inet_diag", "tcp_diag"];

/// Loaded where the kernel has them: sock_diag for MPTCP (`ss --mptcp` in the
/// tests; kernels without MPTCP have no such module).
pub const OPTIONAL: [&str; 1] = ["mptcp_diag"];

/// A module ready for `insmod`, in load order.
pub struct Module {
    pub name: String,
    pub elf: Vec<u8>,
}

/// `wanted`, the `optional` modules this kernel has, and everything they
/// depend on, dependencies before dependents.
pub fn resolve(tree: &Path, wanted: &[&str], optional: &[&str]) -> Result<Vec<Module>> {
    let index = index(tree)?;
    let mut ordered: Vec<Module> = Vec::new();
    let present = optional
        .iter()
        .filter(|name| index.contains_key(&canonical(name)));
    for name in wanted.iter().chain(present) {
        visit(&index, &canonical(name), &mut ordered, &mut Vec::new())?;
    }
    Ok(ordered)
}

fn visit(
    index: &HashMap<String, PathBuf>,
    name: &str,
    ordered: &mut Vec<Module>,
    path: &mut Vec<String>,
) -> Result<()> {
    if ordered.iter().any(|m| m.name == name) {
        return Ok(());
    }
    if path.iter().any(|p| p == name) {
        bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
    }
    let file = index
        .get(name)
        .with_context(|| format!("module {name} is not in this kernel package (built in?)"))?;
    let elf = read_decompressed(file)?;
    path.push(name.to_owned());
    for dep in depends(&elf).with_context(|| format!("reading {}", file.display()))? {
        visit(index, &canonical(&dep), ordered, path)?;
    }
    path.pop();
    ordered.push(Module {
        name: name.to_owned(),
        elf,
    });
    Ok(())
}

/// Module names use `_` and `-` interchangeably; the kernel reports `_`.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name -> file, over the whole `lib/modules/RELEASE` tree.
fn index(tree: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut index = HashMap::new();
    let mut dirs = vec![tree.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let file = path.file_name().and_then(|f| f.to_str()).unwrap_or("");
            let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .find_map(|ext| file.strip_suffix(ext));
            if let Some(stem) = stem {
                index.insert(canonical(stem), path);
            }
        }
    }
    Ok(index)
}

fn read_decompressed(file: &Path) -> Result<Vec<u8>> {
    let name = file.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return fs::read(file).with_context(|| format!("reading {}", file.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(file)
        .output()
        .with_context(|| format!("running {tool} -dc {}", file.display()))?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` section (what `modinfo -F
/// depends` prints), read from the ELF section headers.
fn depends(elf: &[u8]) -> Result<Vec<String>> {
    let modinfo = section(elf, ".modinfo")?.context("no .modinfo section")?;
    Ok(modinfo
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"depends="))
        .map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default())
}

/// The contents of the section called `name` of a little-endian ELF64 file.
fn section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    let bytes = |at: usize, n: usize| {
        elf.get(at..at + n)
            .context("truncated ELF file (offset out of range)")
    };
    let u16_at =
        |at: usize| -> Result<usize> { Ok(u16::from_le_bytes(bytes(at, 2)?.try_into()?) as usize) };
    let u32_at =
        |at: usize| -> Result<usize> { Ok(u32::from_le_bytes(bytes(at, 4)?.try_into()?) as usize) };
    let u64_at = |at: usize| -> Result<usize> {
        Ok(usize::try_from(u64::from_le_bytes(
            bytes(at, 8)?.try_into()?,
        ))?)
    };
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB (every x86-64 module).
    if bytes(0, 6)? != b"\x7fELF\x02\x01" {
        bail!("not a little-endian ELF64 file");
    }
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |i: usize| shoff + i * shentsize;
    let names_at = u64_at(header(shstrndx) + 0x18)?;
    for i in 0..shnum {
        let h = header(i);
        let name_at = names_at + u32_at(h)?;
        let rest = elf.get(name_at..).context("section name out of range")?;
        let this = rest.split(|b| *b == 0).next().unwrap_or_default();
        if this == name.as_bytes() {
            let (offset, size) = (u64_at(h + 0x18)?, u64_at(h + 0x20)?);
            return Ok(Some(bytes(offset, size)?));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a NUL section, .shstrtab and .modinfo.
    fn elf_with_modinfo(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let strtab_at = elf.len();
        elf.extend_from_slice(shstrtab);
        let modinfo_at = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        let mut header = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        header(0, 0, 0);
        header(1, strtab_at, shstrtab.len());
        header(11, modinfo_at, modinfo.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn depends_reads_the_modinfo_section() {
        let elf = elf_with_modinfo(b"license=GPL\0depends=inet_diag,foo\0name=tcp_diag\0");
        assert_eq!(depends(&elf).expect("parse"), ["inet_diag", "foo"]);
        let elf = elf_with_modinfo(b"license=GPL\0depends=\0name=veth\0");
        assert!(depends(&elf).expect("parse").is_empty());
        assert!(depends(b"not an elf").is_err());
    }
}
