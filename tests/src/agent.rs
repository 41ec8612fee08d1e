//! The real agent binary: started as a child process and stopped with SIGTERM
//! (or run to completion as a command), its log lines read as they come.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{http_get, metric};

/// Path of the agent binary `cargo xtask test` built.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("REDIRECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/redirector"
            ))
        })
}

/// The real agent, started with `redirector run ARGS` and stopped with SIGTERM.
/// The one launcher for the tests and the bench (`cargo xtask bench`).
pub struct Agent {
    child: Child,
    /// Where it writes what it serves and why (`redirector status` reads it).
    state_file: PathBuf,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The threads reading stdout and stderr: they end once the agent has
    /// exited and its last line is in.
    readers: Vec<JoinHandle<()>>,
}

/// How [`Agent::launch`] runs the agent; the default is what [`Agent::start`]
/// does.
#[derive(Clone, Debug, Default)]
pub struct AgentOptions {
    /// The agent binary [default: [`agent_bin`]].
    pub bin: Option<PathBuf>,
    /// A program that execs the agent (see [`Agent::start_wrapped`]).
    pub wrapper: Vec<String>,
    /// `redirector run` arguments.
    pub args: Vec<String>,
    /// Namespaces to serve, one `--netns` each (paths need not be UTF-8).
    pub netns: Vec<PathBuf>,
    /// A directory that gets a copy of every line printed, stdout in
    /// `agent.log` and stderr in `agent.stderr.log` (appended), so a failed
    /// run can be read afterwards.
    pub log_dir: Option<PathBuf>,
    /// SIGTERM the agent when the thread that started it exits. The bench sets
    /// it so that no agent outlives a killed harness; tests leave it off, as
    /// they may start an agent on a helper thread and keep it after.
    pub die_with_parent: bool,
    /// How long to wait for `ready` [default: 20 s]. The bench's scale mode
    /// starts an agent that discovers a thousand namespaces before it is
    /// ready.
    pub ready_within: Option<Duration>,
}

fn collect(
    stream: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<String>>>,
    mut copy: Option<std::fs::File>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(f) = copy.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            into.lock().expect("lock").push(line);
        }
    })
}

impl Agent {
    /// Waits (up to 3 s) until the agent reports at least `n` registered
    /// listeners. A listener in a cgroup that already has `sock_ops` (a
    /// live-store restarting in its pod) is registered in the kernel at
    /// listen(); the first one of a pod is registered by the agent from its
    /// bind event, milliseconds later: tests that connect right after a
    /// first listen() wait for it, as a querier waits for the ring.
    pub fn wait_registered(&self, n: u64) {
        let url = self.metrics_url("/metrics");
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let (code, body) = http_get(&url);
            if code == 200 && metric(&body, "redirector_listeners_registered") >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} listener(s) registered after 3 s: {:?}",
                self.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The agent's state file (what it serves and why).
    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Starts the agent and waits until it prints its `ready` line.
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_wrapped(&[], args)
    }

    /// Like [`Agent::start`], with the agent run by `wrapper` (a program that
    /// execs it, such as `nsenter -t PID -m --` to start it in another mount
    /// namespace): the child is then still the agent itself.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Self> {
        Self::launch(&AgentOptions {
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..AgentOptions::default()
        })
    }

    /// Starts the agent as `opts` says and waits until it prints its `ready`
    /// line.
    pub fn launch(opts: &AgentOptions) -> Result<Self> {
        let bin = opts.bin.clone().unwrap_or_else(agent_bin);
        let mut cmd = match opts.wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("run").args(&opts.args);
        for ns in &opts.netns {
            cmd.arg("--netns").arg(ns);
        }
        // A free port of its own, so tests never collide on the default 9464.
        if !opts.args.iter().any(|a| a == "--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        if opts.die_with_parent {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl(2) is async-signal-safe; nothing else runs between
            // fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        let copy = |name: &str| -> Result<Option<std::fs::File>> {
            let Some(dir) = &opts.log_dir else {
                return Ok(None);
            };
            let path = dir.join(name);
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("open {}", path.display()))?;
            Ok(Some(file))
        };
        let (stdout_copy, stderr_copy) = (copy("agent.log")?, copy("agent.stderr.log")?);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(
                child.stdout.take().context("stdout")?,
                stdout.clone(),
                stdout_copy,
            ),
            collect(
                child.stderr.take().context("stderr")?,
                stderr.clone(),
                stderr_copy,
            ),
        ];
        let socket = opts
            .args
            .iter()
            .position(|a| a == "--flows-socket")
            .and_then(|i| opts.args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(redirector::flows::sub::DEFAULT_FLOWS_SOCKET));
        let mut agent = Self {
            state_file: redirector::config::settings::state_file(&socket),
            child,
            stdout,
            stderr,
            readers,
        };
        let within = opts.ready_within.unwrap_or(Duration::from_secs(20));
        let deadline = Instant::now() + within;
        loop {
            if agent.status().iter().any(|l| l.starts_with("ready")) {
                return Ok(agent);
            }
            if let Some(status) = agent.child.try_wait()? {
                thread::sleep(Duration::from_millis(50));
                bail!(
                    "agent exited with {status} before ready; stderr: {}",
                    agent.stderr().join("\n")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready after {within:?}; stderr: {}",
                    agent.stderr().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ADDR/path` of the agent's HTTP endpoint, from the address it printed.
    pub fn metrics_url(&self, path: &str) -> String {
        let line = self
            .status()
            .into_iter()
            .find(|l| l.starts_with("metrics on http://"))
            .expect("agent prints its metrics address");
        let addr = line
            .trim_start_matches("metrics on http://")
            .split('/')
            .next()
            .expect("addr")
            .to_owned();
        format!("{addr}{path}")
    }

    /// What it wrote on stdout: flow records only (without --flow-log).
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// What the agent says about itself (`attached ...`, `ready: ...`, the exit
    /// summary): the messages of its log lines on stderr, without the
    /// `TIME LEVEL target: ` of the text format (see [`log_message`]).
    pub fn status(&self) -> Vec<String> {
        self.stderr()
            .iter()
            .map(|l| log_message(l).to_owned())
            .collect()
    }

    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lock").clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (no cleanup of any kind), wait for exit, and return everything
    /// printed.
    pub fn kill(mut self) -> Result<Stopped> {
        self.child.kill()?;
        let status = self.child.wait()?;
        self.drain();
        Ok(Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// SIGTERM, wait for exit, and return the exit status and everything printed.
    pub fn stop(mut self) -> Result<Stopped> {
        let status = self.terminate()?;
        self.drain();
        Ok(Stopped {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        })
    }

    /// Waits (at most 2 s) until the reader threads have read the exited
    /// agent's last lines, its exit summary among them. Bounded: a process the
    /// agent started could hold the pipes open.
    fn drain(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        bail!("agent ignored SIGTERM for 10 s and was killed")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.terminate();
    }
}

pub struct Stopped {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Stopped {
    /// A kernel counter from the agent's exit summary (`counters: name=value ...`).
    pub fn counter(&self, name: &str) -> u64 {
        let line = self
            .counters()
            .unwrap_or_else(|| panic!("no counters line in agent output {:?}", self.stderr));
        counter_in(line, name).unwrap_or_else(|| panic!("no counter {name} in {line:?}"))
    }

    /// The agent's exit summary line, the one with `counters:`.
    pub fn counters(&self) -> Option<&str> {
        self.stderr
            .iter()
            .find(|l| l.contains("counters:"))
            .map(String::as_str)
    }
}

/// The message of one line of the agent's text log (`2025-01-01T00:00:00.000000Z
/// INFO redirector::commands::run: ready: ...` gives `ready: ...`); any other
/// line as it is.
pub fn log_message(line: &str) -> &str {
    let mut words = line.split_whitespace();
    let (Some(time), Some(level)) = (words.next(), words.next()) else {
        return line;
    };
    if !time.ends_with('Z') || !["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level) {
        return line;
    }
    let Some(at) = line.find(level) else {
        return line;
    };
    match line[at + level.len()..].trim_start().split_once(": ") {
        Some((target, message)) if !target.contains(' ') => message,
        _ => line,
    }
}

/// `name=N` from the agent's exit summary line.
pub fn counter_in(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// `redirector ARGS` to completion: (exit code, stdout, stderr).
pub fn redirector(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run redirector");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Removes pinned state (`redirector detach`) at the start and end of a test,
/// even when it fails.
pub struct PinCleanup;

impl PinCleanup {
    // Not `Default`: it changes the machine's state.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        redirector(&["detach"]);
        Self
    }
}

impl Drop for PinCleanup {
    fn drop(&mut self) {
        redirector(&["detach"]);
    }
}
