//! A real Kubernetes API server (kube-apiserver + etcd) on loopback, for
//! tests that must see what a cluster really answers (RBAC, selectors, watch
//! semantics) rather than what a stand-in believes it answers.
//!
//! This file only needs std, anyhow and libc, and the `openssl` and `curl`
//! programs: no `crate::` item, so the integration tests can include it as it
//! is (`#[path = ".../xtask/src/kube/server.rs"] mod kube_server;`) without
//! depending on xtask. The binaries are built by `kube::ensure_binaries`
//! (`cargo xtask kube-api` does it once); this file only finds them.

use std::{
    fs,
    io::{self, Read, Seek, SeekFrom},
    net::{Ipv4Addr, TcpListener},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Where the pieces live under the workspace root, shared with the builder.
pub const KUBE_DIR: &str = "target/kube";

/// The two programs a running API server needs.
#[derive(Debug, Clone)]
pub struct KubeBinaries {
    pub kube_apiserver: PathBuf,
    pub etcd: PathBuf,
}

impl KubeBinaries {
    /// Where `ensure_binaries` puts them; they may not exist yet.
    pub fn cached(root: &Path) -> Self {
        let kube = root.join(KUBE_DIR);
        Self {
            kube_apiserver: kube.join("bin/kube-apiserver"),
            // Debian's package tree as it is, extracted (not installed: an
            // installed etcd-server starts a system service).
            etcd: kube.join("etcd/usr/bin/etcd"),
        }
    }
}

/// How long each process gets to become ready. etcd takes < 1 s and the API
/// server 3-4 s on an idle machine; the margins are for a loaded CI host.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(10);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a process gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Free ports are picked by binding port 0 and closing it again, so someone
/// else can take one before our process binds it: we try again that often.
const PORT_ATTEMPTS: usize = 3;
/// The cluster's issuer and audience for ServiceAccount tokens (what a
/// kubeadm cluster uses; tests ask TokenRequest for this audience).
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A running etcd + kube-apiserver pair on 127.0.0.1, with RBAC on and an
/// admin token (group system:masters). Dropping it stops both processes and
/// removes its work directory (certificates, etcd data, logs). The API server
/// alone can be stopped and started again on its port, etcd and its data
/// staying (`stop_apiserver`, `restart_apiserver`): what a client sees when
/// the control plane restarts.
///
/// The processes are in process groups of their own (a Ctrl-C in the terminal
/// reaches only us, so we stop them in order: API server, then etcd) and get
/// SIGKILL when the *thread* that started them exits (PR_SET_PDEATHSIG), so a
/// crashed or killed xtask or test binary never leaves them behind. A server
/// shared by several tests must therefore be started from a thread that lives
/// as long as it is used.
pub struct ApiServer {
    work_dir: PathBuf,
    url: String,
    etcd_url: String,
    ca: PathBuf,
    admin_token: String,
    // Options so that a half-started server (an error in `start`) is cleaned
    // up by the same Drop as a running one.
    etcd: Option<Child>,
    apiserver: Option<Child>,
    // What `restart_apiserver` needs to start the same server again.
    apiserver_bin: PathBuf,
    apiserver_args: Vec<String>,
    port: u16,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver with the binaries `ensure_binaries`
    /// built under `root`, with certificates, keys and data in `work_dir`
    /// (created; must not exist or be empty, since Drop removes it).
    pub fn start(root: &Path, work_dir: &Path) -> Result<Self> {
        Self::start_with(&built_binaries(root)?, work_dir)
    }

    /// Like `start`, with binaries from elsewhere.
    pub fn start_with(bins: &KubeBinaries, work_dir: &Path) -> Result<Self> {
        Self::launch(bins, work_dir, &[])
    }

    fn launch(bins: &KubeBinaries, work_dir: &Path, apiserver_args: &[&str]) -> Result<Self> {
        prepare_work_dir(work_dir)?;
        let mut server = Self {
            work_dir: work_dir.to_path_buf(),
            url: String::new(),
            etcd_url: String::new(),
            ca: work_dir.join("ca.crt"),
            admin_token: random_hex(16)?,
            etcd: None,
            apiserver: None,
            apiserver_bin: bins.kube_apiserver.clone(),
            apiserver_args: apiserver_args.iter().map(|a| a.to_string()).collect(),
            port: 0,
        };
        // From here on, an error drops `server`: whatever started is stopped
        // and work_dir removed, the logs being quoted in the error first.
        make_certificates(work_dir)?;
        write_private(
            &work_dir.join("tokens.csv"),
            // token,user,uid,"groups": system:masters is what RBAC's
            // cluster-admin binding names, so the admin may do anything.
            &format!("{},admin,admin,system:masters\n", server.admin_token),
        )?;
        // curl reads the header from this file, so that the token is not in
        // its argv, which every local user can read in /proc.
        write_private(
            &work_dir.join("admin-auth-header"),
            &format!("Authorization: Bearer {}\n", server.admin_token),
        )?;
        server.start_etcd(&bins.etcd)?;
        server.start_apiserver()?;
        Ok(server)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA that signed the server's certificate (SAN IP:127.0.0.1).
    pub fn ca_path(&self) -> &Path {
        &self.ca
    }

    /// A bearer token of user `admin` in group system:masters.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// etcd's client URL (plain HTTP on loopback), for a test that wants to
    /// look under the API server.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// Certificates, etcd data and the two logs (`etcd.log`,
    /// `kube-apiserver.log`); removed on Drop.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Writes a kubeconfig for the admin (mode 0600: it holds the token).
    /// It names the CA file in work_dir, so it is valid while `self` lives.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: redirector-test\n  \
               cluster:\n    \
                 server: {server}\n    \
                 certificate-authority: {ca}\n\
             users:\n\
             - name: admin\n  \
               user:\n    \
                 token: {token}\n\
             contexts:\n\
             - name: redirector-test\n  \
               context:\n    \
                 cluster: redirector-test\n    \
                 user: admin\n\
             current-context: redirector-test\n",
            server = yaml_string(&self.url),
            ca = yaml_string(&self.ca.to_string_lossy()),
            token = yaml_string(&self.admin_token),
        );
        write_private(path, &config)
    }

    /// An error if etcd or the API server has exited (they should not before
    /// Drop), quoting the log of the one that did.
    pub fn check_running(&mut self) -> Result<()> {
        for (child, name) in [
            (&mut self.etcd, "etcd"),
            (&mut self.apiserver, "kube-apiserver"),
        ] {
            if let Some(c) = child {
                if let Some(status) = c
                    .try_wait()
                    .with_context(|| format!("waiting for {name}"))?
                {
                    bail!(
                        "{name} exited ({status}); its log:\n{}",
                        log_tail(&self.work_dir.join(format!("{name}.log")))
                    );
                }
            }
        }
        Ok(())
    }

    fn start_etcd(&mut self, etcd: &Path) -> Result<()> {
        let log = self.work_dir.join("etcd.log");
        for attempt in 1..=PORT_ATTEMPTS {
            let (client, peer) = (free_port()?, free_port()?);
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let data = self.work_dir.join("etcd-data");
            // A failed attempt may have initialised it with the old ports.
            let _ = fs::remove_dir_all(&data);
            let mut cmd = Command::new(etcd);
            cmd.arg("--name=redirector-test")
                .arg(format!("--data-dir={}", data.display()))
                // Every URL explicit: etcd's defaults listen on the well-known
                // ports 2379/2380, which a real etcd on the host may hold.
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={peer_url}"))
                .arg(format!("--initial-advertise-peer-urls={peer_url}"))
                .arg(format!("--initial-cluster=redirector-test={peer_url}"))
                .args(["--logger=zap", "--log-outputs=stderr", "--log-level=warn"]);
            self.etcd = Some(spawn(&mut cmd, &log, "etcd")?);
            let ready = self.wait_ready("etcd", ETCD_READY_TIMEOUT, || {
                curl(&["--max-time", "1", &format!("{client_url}/health")])
                    .is_some_and(|body| body.contains(r#""health":"true""#))
            });
            match ready {
                Ok(()) => {
                    self.etcd_url = client_url;
                    return Ok(());
                }
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&log) => {
                    eprintln!("xtask: etcd: a port was taken meanwhile, trying others ({e:#})");
                    stop(&mut self.etcd, "etcd");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn start_apiserver(&mut self) -> Result<()> {
        let log = self.work_dir.join("kube-apiserver.log");
        for attempt in 1..=PORT_ATTEMPTS {
            let port = free_port()?;
            self.spawn_apiserver(port)?;
            match self.wait_apiserver_ready(port) {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) if attempt < PORT_ATTEMPTS && port_taken(&log) => {
                    eprintln!("xtask: kube-apiserver: its port was taken meanwhile, trying another ({e:#})");
                    stop(&mut self.apiserver, "kube-apiserver");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }

    fn spawn_apiserver(&mut self, port: u16) -> Result<()> {
        let dir = self.work_dir.clone();
        let log = dir.join("kube-apiserver.log");
        let mut cmd = Command::new(&self.apiserver_bin);
        cmd.current_dir(&dir)
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={port}"))
            // 1.20 still has the unauthenticated HTTP port; keep it shut.
            .arg("--insecure-port=0")
            // Otherwise it writes self-signed certs to /var/run/kubernetes.
            .arg(format!(
                "--cert-dir={}",
                dir.join("apiserver-certs").display()
            ))
            .arg(format!(
                "--tls-cert-file={}",
                dir.join("server.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                dir.join("server.key").display()
            ))
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            // The ServiceAccount admission plugin insists on a `default`
            // ServiceAccount in a Pod's namespace, which only the
            // controller manager (not run here) creates.
            .arg("--disable-admission-plugins=ServiceAccount")
            // TokenRequest (what a projected ServiceAccount token is)
            // needs an issuer and a signing key.
            .arg(format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!("--api-audiences={SERVICE_ACCOUNT_ISSUER}"))
            .arg(format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ))
            .arg(format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ))
            // Needed for the `kubernetes` Service; nothing routes to it.
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg("--profiling=false")
            .args(&self.apiserver_args);
        self.apiserver = Some(spawn(&mut cmd, &log, "kube-apiserver")?);
        Ok(())
    }

    fn wait_apiserver_ready(&mut self, port: u16) -> Result<()> {
        let url = format!("https://127.0.0.1:{port}");
        let (ca, header) = (self.ca.clone(), self.work_dir.join("admin-auth-header"));
        self.wait_ready("kube-apiserver", APISERVER_READY_TIMEOUT, || {
            // With the admin token, so that readiness also proves the
            // TLS chain (SAN 127.0.0.1) and the token file work.
            curl(&[
                "--max-time",
                "2",
                "--cacert",
                &ca.to_string_lossy(),
                "-H",
                &format!("@{}", header.display()),
                &format!("{url}/readyz"),
            ])
            .is_some_and(|body| body.trim() == "ok")
        })?;
        self.url = url;
        Ok(())
    }

    /// Polls `ready` until it says yes, the process exits, or `timeout`.
    fn wait_ready(
        &mut self,
        name: &str,
        timeout: Duration,
        ready: impl Fn() -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let log = self.work_dir.join(format!("{name}.log"));
        loop {
            if ready() {
                return Ok(());
            }
            let child = if name == "etcd" {
                &mut self.etcd
            } else {
                &mut self.apiserver
            };
            if let Some(status) = child
                .as_mut()
                .map(Child::try_wait)
                .transpose()
                .with_context(|| format!("waiting for {name}"))?
                .flatten()
            {
                bail!(
                    "{name} exited ({status}) before it was ready; its log:\n{}",
                    log_tail(&log)
                );
            }
            if start.elapsed() > timeout {
                bail!(
                    "{name} did not become ready within {} s; its log:\n{}",
                    timeout.as_secs(),
                    log_tail(&log)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What only the tests use (tests/src/kube_api.rs): xtask starts a server
/// and stops it, nothing in between.
#[allow(dead_code)]
impl ApiServer {
    /// Like `start`, with more kube-apiserver flags after ours (for a flag
    /// given twice, the last one counts), e.g. `--watch-cache-sizes=pods#0`
    /// for watches served by etcd itself.
    pub fn start_with_args(root: &Path, work_dir: &Path, apiserver_args: &[&str]) -> Result<Self> {
        Self::launch(&built_binaries(root)?, work_dir, apiserver_args)
    }

    /// Stops the API server (SIGTERM, then SIGKILL after STOP_TIMEOUT);
    /// etcd and its data stay. Clients see their connections closed, then
    /// refused.
    pub fn stop_apiserver(&mut self) {
        stop(&mut self.apiserver, "kube-apiserver");
    }

    /// Starts the API server again, stopping it first if it runs, on the
    /// same port with the same flags and the same etcd: the URL, the CA and
    /// every token stay valid. Returns once it is ready. Its previous log is
    /// kept as `kube-apiserver.log.1`.
    pub fn restart_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        let log = self.work_dir.join("kube-apiserver.log");
        let previous = self.work_dir.join("kube-apiserver.log.1");
        fs::rename(&log, &previous)
            .with_context(|| format!("keeping {} as {}", log.display(), previous.display()))?;
        // One attempt: a port taken meanwhile is an error here, since the
        // clients know this one. Go's listener sets SO_REUSEADDR, so the old
        // connections in TIME_WAIT do not hold it.
        self.spawn_apiserver(self.port)?;
        self.wait_apiserver_ready(self.port)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The API server first: it would only log errors about a gone etcd.
        stop(&mut self.apiserver, "kube-apiserver");
        stop(&mut self.etcd, "etcd");
        if let Err(e) = fs::remove_dir_all(&self.work_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("xtask: cannot remove {}: {e}", self.work_dir.display());
            }
        }
    }
}

/// The binaries `ensure_binaries` built under `root`, or which is missing.
fn built_binaries(root: &Path) -> Result<KubeBinaries> {
    let bins = KubeBinaries::cached(root);
    for bin in [&bins.kube_apiserver, &bins.etcd] {
        if !bin.is_file() {
            bail!(
                "{} is missing: `cargo xtask kube-api` builds it (once, ~5 min)",
                bin.display()
            );
        }
    }
    Ok(bins)
}

/// SIGTERM, up to STOP_TIMEOUT for a clean exit, then SIGKILL; always reaped.
/// By pid: the child is ours and not yet waited for, so the pid cannot have
/// been reused by another process.
fn stop(child: &mut Option<Child>, name: &str) {
    let Some(mut c) = child.take() else { return };
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    let Ok(pid) = libc::pid_t::try_from(c.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory effects; pid is our unreaped child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "xtask: {name} (pid {pid}) ignored SIGTERM for {} s: SIGKILL",
        STOP_TIMEOUT.as_secs()
    );
    let _ = c.kill();
    let _ = c.wait();
}

fn spawn(cmd: &mut Command, log: &Path, name: &str) -> Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0);
    // SAFETY: only prctl(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting {name} ({cmd:?})"))
}

fn prepare_work_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut entries = fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    if entries.next().is_some() {
        // Drop removes the directory: never one with someone else's files.
        bail!("work directory {} is not empty", dir.display());
    }
    // Keys and the token file inside: only we read them.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}

/// A CA, a server certificate it signs for 127.0.0.1, and the ServiceAccount
/// token signing key pair. ECDSA for TLS (instant to generate); RSA for the
/// ServiceAccount tokens, RS256 being what every JWT consumer expects.
#[rustfmt::skip]
fn make_certificates(dir: &Path) -> Result<()> {
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("ca.key")])?;
    openssl(&[
        "req", "-x509", "-new", "-key", &p("ca.key"), "-out", &p("ca.crt"), "-days", "30",
        "-subj", "/CN=redirector-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    ])?;
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("server.key")])?;
    openssl(&["req", "-new", "-key", &p("server.key"), "-out", &p("server.csr"), "-subj", "/CN=kube-apiserver"])?;
    // Go checks the SAN, not the CN: clients connect to the IP 127.0.0.1.
    fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .with_context(|| format!("writing {}", p("server.ext")))?;
    openssl(&[
        "x509", "-req", "-in", &p("server.csr"), "-CA", &p("ca.crt"), "-CAkey", &p("ca.key"),
        "-CAcreateserial", "-CAserial", &p("ca.srl"), "-days", "30",
        "-extfile", &p("server.ext"), "-out", &p("server.crt"),
    ])?;
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", &p("sa.key")])?;
    openssl(&["pkey", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")])
}

fn openssl(args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (Debian package openssl) to make the test certificates")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The body of a successful (2xx) response, or None.
fn curl(args: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["--silent", "--fail"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free port on 127.0.0.1")?;
    Ok(listener
        .local_addr()
        .context("reading a bound port")?
        .port())
}

fn port_taken(log: &Path) -> bool {
    fs::read_to_string(log).is_ok_and(|s| s.contains("address already in use"))
}

/// The last few KiB of a log, enough for the error that stopped a process.
fn log_tail(log: &Path) -> String {
    const TAIL: u64 = 4096;
    let read = || -> io::Result<String> {
        let mut f = fs::File::open(log)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(s) if s.trim().is_empty() => "(empty)".into(),
        Ok(s) => s,
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for the admin token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `contents` to `path` readable by its owner only (0600, also when
/// the file exists): kubeconfigs and tokens.
pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    // `mode` applies only to a new file: an existing one keeps its mode.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private", path.display()))
}

/// A double-quoted YAML scalar (the JSON escapes are valid YAML).
fn yaml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
