//! Boots a kernel with the guest image under QEMU's TCG (KVM hangs on these
//! machines: no nested virtualization), streams the serial console to a log
//! file and the terminal, enforces a deadline, and parses the guest's marker
//! lines into a [`Report`].

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::emulator::Emulator;

/// Prefix of the lines the guest's init writes for the host (see init.sh).
const MARK: &str = "@@redirector-vm@@ ";

pub struct Boot<'a> {
    pub emulator: &'a Emulator,
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub log: &'a Path,
    /// Put before each console line echoed to the terminal.
    pub label: &'a str,
    pub timeout: Duration,
}

/// Runs the guest to its end (or the deadline) and returns what it reported.
pub fn run(boot: &Boot) -> Result<Report> {
    let mut cmd = Command::new(&boot.emulator.binary);
    for dir in &boot.emulator.data_dirs {
        cmd.arg("-L").arg(dir);
    }
    let mut child = cmd
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "2048"])
        // No default devices (VGA, NIC and its option ROM): a faster boot,
        // and the serial port is the only console.
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(boot.vmlinuz)
        .arg("-initrd")
        .arg(boot.initramfs)
        // panic=-1 turns a guest panic into a reboot, which -no-reboot turns
        // into QEMU exiting: a broken guest ends the run instead of hanging.
        .args([
            "-append",
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=4",
        ])
        // stdin is not the terminal, so QEMU leaves the terminal's mode alone.
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", boot.emulator.binary.display()))?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            if tx.send(clean(&buf)).is_err() {
                break;
            }
            buf.clear();
        }
    });

    let mut log =
        File::create(boot.log).with_context(|| format!("creating {}", boot.log.display()))?;
    let start = Instant::now();
    let deadline = start + boot.timeout;
    let mut report = Report::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}").context("writing the console log")?;
                if !line.starts_with(MARK) && report.booted.is_some() {
                    println!("{} {line}", boot.label);
                }
                report.line(&line, start.elapsed());
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                report.timed_out = true;
                // The guest is stuck: nothing more worth waiting for.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("waiting for qemu")?;
    let _ = reader.join();
    report.wall = start.elapsed();
    report.qemu_failed = !report.timed_out && !status.success();
    Ok(report)
}

/// One console line as text: no CR, no terminal escape sequences.
fn clean(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: ESC [ parameters, then one final byte in @..~.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' | '\n' => {}
            c => out.push(c),
        }
    }
    out
}

/// What one guest reported: markers parsed, console lines kept per block.
#[derive(Default, Debug)]
pub struct Report {
    /// Host time from QEMU's start to the guest's `booted` marker.
    pub booted: Option<Duration>,
    pub blocks: Vec<Block>,
    /// (programs, pins) left after a refusal, from each `leftover` marker.
    pub leftovers: Vec<(String, String)>,
    pub error: Option<String>,
    pub done: bool,
    pub timed_out: bool,
    pub qemu_failed: bool,
    pub wall: Duration,
    /// The last console lines, for a guest that stopped early.
    pub tail: Vec<String>,
}

/// The console output between `begin NAME` and `end NAME RC`.
#[derive(Debug, Default)]
pub struct Block {
    pub name: String,
    /// None: the guest never reported the end.
    pub rc: Option<i32>,
    /// Guest uptime at begin and end, in seconds.
    pub start: f64,
    pub end: Option<f64>,
    pub lines: Vec<String>,
}

impl Block {
    pub fn secs(&self) -> Option<f64> {
        self.end.map(|e| e - self.start)
    }

    /// libtest's counts: (passed, failed, ignored) from `test result:`.
    pub fn counts(&self) -> Option<(u32, u32, u32)> {
        let line = self.lines.iter().find(|l| l.starts_with("test result: "))?;
        let count = |what: &str| {
            line.split(';')
                .find_map(|part| {
                    part.trim()
                        .trim_start_matches(|c: char| !c.is_ascii_digit())
                        .strip_suffix(what)
                })
                .and_then(|n| n.trim().parse().ok())
        };
        Some((count(" passed")?, count(" failed")?, count(" ignored")?))
    }

    /// Names of the tests libtest reported as failed.
    pub fn failures(&self) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("test ")?.strip_suffix(" ... FAILED"))
            .map(str::to_owned)
            .collect()
    }
}

impl Report {
    fn line(&mut self, line: &str, elapsed: Duration) {
        self.tail.push(line.to_owned());
        if self.tail.len() > 40 {
            self.tail.remove(0);
        }
        let Some(marker) = line.strip_prefix(MARK) else {
            if let Some(b) = self.blocks.last_mut().filter(|b| b.rc.is_none()) {
                b.lines.push(line.to_owned());
            }
            return;
        };
        let words: Vec<&str> = marker.split_whitespace().collect();
        let secs = |i: usize| words.get(i).and_then(|w| w.parse::<f64>().ok());
        match words.as_slice() {
            ["booted", ..] => self.booted = Some(elapsed),
            ["begin", name, ..] => self.blocks.push(Block {
                name: (*name).to_owned(),
                start: secs(2).unwrap_or_default(),
                ..Block::default()
            }),
            ["end", name, rc, ..] => {
                if let Some(b) = self.blocks.iter_mut().rev().find(|b| b.name == *name) {
                    b.rc = rc.parse().ok();
                    b.end = secs(3);
                }
            }
            ["leftover", progs, pins] => self
                .leftovers
                .push(((*progs).to_owned(), (*pins).to_owned())),
            ["error", ..] => self.error = Some(words[1..].join(" ")),
            ["done", ..] => self.done = true,
            _ => {}
        }
    }

    pub fn block(&self, name: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lines: &[&str]) -> Report {
        let mut r = Report::default();
        for l in lines {
            r.line(l, Duration::from_secs(2));
        }
        r
    }

    #[test]
    fn markers_and_libtest_output_make_blocks() {
        let r = feed(&[
            "[    0.000000] Linux version 6.1",
            "@@redirector-vm@@ booted 1.88",
            "@@redirector-vm@@ begin datapath 1.90",
            "running 2 tests",
            "test a ... ok",
            "test b ... FAILED",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s",
            "@@redirector-vm@@ end datapath 101 12.40",
            "@@redirector-vm@@ leftover 0 0",
            "@@redirector-vm@@ done 12.5",
        ]);
        assert_eq!(r.booted, Some(Duration::from_secs(2)));
        assert!(r.done);
        let b = r.block("datapath").expect("block");
        assert_eq!(b.rc, Some(101));
        assert_eq!(b.counts(), Some((1, 1, 0)));
        assert_eq!(b.failures(), ["b"]);
        assert!((b.secs().expect("ended") - 10.5).abs() < 1e-9);
        assert_eq!(r.leftovers, [("0".to_owned(), "0".to_owned())]);
    }

    #[test]
    fn a_block_without_end_has_no_status() {
        let r = feed(&["@@redirector-vm@@ begin flows 3.0", "running 5 tests"]);
        let b = r.block("flows").expect("block");
        assert_eq!(b.rc, None);
        assert_eq!(b.counts(), None);
        assert!(!r.done);
    }

    #[test]
    fn console_lines_lose_escapes_and_carriage_returns() {
        assert_eq!(clean(b"\x1bc\x1b[?7l\x1b[2J@@x\r\n"), "@@x");
        assert_eq!(clean(b"\x1b[2m2026\x1b[0m INFO\r\n"), "2026 INFO");
    }
}
