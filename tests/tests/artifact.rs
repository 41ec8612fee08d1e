//! The release artifact is what the README promises: one static binary,
//! stripped, with its GNU build id. Reads the ELF file `REDIRECTOR_BIN` names
//! (`cargo xtask test` sets it to what `cargo xtask build` built); nothing is
//! run or loaded.

use std::path::PathBuf;

/// The agent binary, or None (with a note) when no artifact was named: a
/// plain `cargo test` builds no release artifact.
fn artifact() -> Option<PathBuf> {
    match std::env::var_os("REDIRECTOR_BIN") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            println!(
                "note: REDIRECTOR_BIN is unset, the release artifact was not checked \
                 (`cargo xtask test` builds it and sets it)"
            );
            None
        }
    }
}

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_SYMTAB: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const NT_GNU_BUILD_ID: u32 = 3;

/// What the checks need from a 64-bit little-endian ELF file.
struct Elf {
    data: Vec<u8>,
}

struct Segment {
    kind: u32,
    offset: usize,
    size: usize,
}

impl Elf {
    fn read(path: &PathBuf) -> Elf {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&data[..4], b"\x7fELF", "{} is not ELF", path.display());
        assert_eq!(data[4], 2, "not a 64-bit ELF file");
        assert_eq!(data[5], 1, "not a little-endian ELF file");
        Elf { data }
    }

    fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.data[at..at + 2].try_into().expect("2 bytes"))
    }

    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.data[at..at + 8].try_into().expect("8 bytes"))
    }

    fn segments(&self) -> Vec<Segment> {
        let (off, size, count) = (self.u64(0x20) as usize, self.u16(0x36), self.u16(0x38));
        (0..count as usize)
            .map(|i| {
                let p = off + i * size as usize;
                Segment {
                    kind: self.u32(p),
                    offset: self.u64(p + 8) as usize,
                    size: self.u64(p + 0x20) as usize,
                }
            })
            .collect()
    }

    /// (type, name) of every section.
    fn sections(&self) -> Vec<(u32, String)> {
        let (off, size, count) = (self.u64(0x28) as usize, self.u16(0x3a), self.u16(0x3c));
        let header = |i: usize| off + i * size as usize;
        let names = header(self.u16(0x3e) as usize);
        let names_at = self.u64(names + 0x18) as usize;
        (0..count as usize)
            .map(|i| {
                let h = header(i);
                let start = names_at + self.u32(h) as usize;
                let len = self.data[start..].iter().position(|&b| b == 0).unwrap_or(0);
                let name = String::from_utf8_lossy(&self.data[start..start + len]).into_owned();
                (self.u32(h + 4), name)
            })
            .collect()
    }

    /// The `DT_NEEDED` entries' count: the shared libraries it asks for.
    fn needed(&self, dynamic: &Segment) -> usize {
        (0..dynamic.size / 16)
            .map(|i| self.u64(dynamic.offset + i * 16))
            .take_while(|&tag| tag != DT_NULL)
            .filter(|&tag| tag == DT_NEEDED)
            .count()
    }

    /// The GNU build id from the notes, as hex.
    fn build_id(&self) -> Option<String> {
        for note in self.segments().iter().filter(|s| s.kind == PT_NOTE) {
            let mut at = note.offset;
            while at + 12 <= note.offset + note.size {
                let (namesz, descsz, kind) = (
                    self.u32(at) as usize,
                    self.u32(at + 4) as usize,
                    self.u32(at + 8),
                );
                let name = at + 12;
                let desc = name + namesz.next_multiple_of(4);
                if kind == NT_GNU_BUILD_ID && self.data[name..name + namesz] == *b"GNU\0" {
                    let id = &self.data[desc..desc + descsz];
                    return Some(id.iter().map(|b| format!("{b:02x}")).collect());
                }
                at = desc + descsz.next_multiple_of(4);
            }
        }
        None
    }
}

#[test]
fn the_agent_is_static_stripped_and_has_a_build_id() {
    let Some(path) = artifact() else { return };
    if let Ok(out) = std::process::Command::new("file").arg(&path).output() {
        println!(
            "$ file {}\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let elf = Elf::read(&path);
    let segments = elf.segments();
    assert!(
        !segments.iter().any(|s| s.kind == PT_INTERP),
        "{} asks for a dynamic loader (PT_INTERP): not statically linked",
        path.display()
    );
    // A static-pie binary has a dynamic section for its own relocations, but
    // names no shared library.
    for dynamic in segments.iter().filter(|s| s.kind == PT_DYNAMIC) {
        assert_eq!(
            elf.needed(dynamic),
            0,
            "{} needs shared libraries (DT_NEEDED)",
            path.display()
        );
    }
    let sections = elf.sections();
    assert!(
        !sections
            .iter()
            .any(|(kind, name)| *kind == SHT_SYMTAB || name == ".symtab"),
        "{} is not stripped: it has a symbol table",
        path.display()
    );
    assert!(
        !sections.iter().any(|(_, name)| name.starts_with(".debug")),
        "{} carries debug sections",
        path.display()
    );
    let id = elf
        .build_id()
        .unwrap_or_else(|| panic!("{} has no GNU build id (NT_GNU_BUILD_ID)", path.display()));
    assert!(id.len() >= 16, "build id {id}");
    println!(
        "{}: static, stripped, build id {id}, {} bytes",
        path.display(),
        elf.data.len()
    );
}
