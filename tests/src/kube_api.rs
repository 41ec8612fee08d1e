//! A real Kubernetes API server for the tests, and what they do with it.
//!
//! The server is xtask's (`xtask/src/kube/server.rs`, included as it is, so
//! there is one copy): etcd + kube-apiserver 1.20 on loopback with RBAC, an
//! admin token and TokenRequest. Around it: the agent's ServiceAccount with
//! read-only access to pods and a kubeconfig for it, pods as a kubelet would
//! leave them (bound to a node, with a status), etcd compaction, and a proxy
//! that cuts the agent off the server while the server goes on.
//!
//! Every call goes through kube-rs with the admin kubeconfig: no kubectl.

#[path = "../../xtask/src/kube/server.rs"]
mod server;

pub use server::*;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use kube::{
    api::{DeleteParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

/// Where the agent's ServiceAccount lives, and its name.
pub const AGENT_NAMESPACE: &str = "kube-system";
pub const AGENT_ACCOUNT: &str = "redirector";
/// The ClusterRole (and its binding): get/list/watch on pods, nothing else,
/// as in deploy/daemonset.yaml.
pub const AGENT_ROLE: &str = "redirector";

/// The workspace root (target/kube is under it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// Starts etcd + kube-apiserver (with `apiserver_args` after the usual
/// flags) in a new directory under target/kube/tests, removed again when the
/// server is dropped. Fails, naming `cargo xtask kube-api`, when the
/// binaries are not built: a test must not pass by not running.
///
/// The processes die with the calling *thread* (see `ApiServer`): call it
/// from the test's own thread, not from a tokio worker that may retire.
pub fn start_api_server(name: &str, apiserver_args: &[&str]) -> Result<ApiServer> {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let root = workspace_root();
    let bins = KubeBinaries::cached(&root);
    for bin in [&bins.kube_apiserver, &bins.etcd] {
        if !bin.is_file() {
            bail!(
                "{} is missing: run `cargo xtask kube-api` once (it builds etcd and \
                 kube-apiserver into {KUBE_DIR}, ~5 min), then the tests again",
                bin.display()
            );
        }
    }
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let dir = root.join(KUBE_DIR).join("tests").join(format!(
        "{name}-{}-{stamp}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    ApiServer::start_with_args(&root, &dir, apiserver_args)
}

/// The admin's client (group system:masters), through a kubeconfig written
/// to the server's work directory and read by the agent's own loader.
pub async fn admin_client(server: &ApiServer) -> Result<Client> {
    let path = server.work_dir().join("admin.kubeconfig");
    server.write_kubeconfig(&path)?;
    redirector::discovery::kube::watch::client(Some(&path)).await
}

/// A client from `kubeconfig`, as the agent makes it.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    redirector::discovery::kube::watch::client(Some(kubeconfig)).await
}

/// The agent's ServiceAccount, a ClusterRole allowing only get/list/watch on
/// pods, and the binding between them.
pub async fn create_agent_account(admin: &Client) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
    accounts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": AGENT_ACCOUNT, "namespace": AGENT_NAMESPACE},
            }))?,
        )
        .await
        .context("creating the agent's ServiceAccount")?;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": AGENT_ROLE},
                "rules": [{
                    "apiGroups": [""],
                    "resources": ["pods"],
                    "verbs": ["get", "list", "watch"],
                }],
            }))?,
        )
        .await
        .context("creating the agent's ClusterRole")?;
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": AGENT_ROLE},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": AGENT_ROLE,
                },
                "subjects": [{
                    "kind": "ServiceAccount",
                    "name": AGENT_ACCOUNT,
                    "namespace": AGENT_NAMESPACE,
                }],
            }))?,
        )
        .await
        .context("creating the agent's ClusterRoleBinding")?;
    Ok(())
}

/// A token of the agent's ServiceAccount from TokenRequest: what a projected
/// token volume gives the pod (audience: the API server's).
pub async fn agent_token(admin: &Client) -> Result<String> {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), AGENT_NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![SERVICE_ACCOUNT_ISSUER.to_owned()],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let answer = accounts
        .create_token_request(AGENT_ACCOUNT, &PostParams::default(), &request)
        .await
        .context("asking TokenRequest for the agent's token")?;
    answer
        .status
        .map(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow!("TokenRequest answered without a token"))
}

/// Writes a kubeconfig (mode 0600: it holds the token) for `server_url`
/// (the API server's, or a `Proxy`'s) with `ca` and a bearer `token`.
/// JSON, which is YAML too.
pub fn write_token_kubeconfig(path: &Path, server_url: &str, ca: &Path, token: &str) -> Result<()> {
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "redirector-test",
            "cluster": {"server": server_url, "certificate-authority": ca},
        }],
        "users": [{"name": AGENT_ACCOUNT, "user": {"token": token}}],
        "contexts": [{
            "name": "redirector-test",
            "context": {"cluster": "redirector-test", "user": AGENT_ACCOUNT},
        }],
        "current-context": "redirector-test",
    });
    write_private(path, &config.to_string())
}

/// The agent's ServiceAccount (created here) and a kubeconfig for it in the
/// server's work directory, reaching the API at `server_url`.
pub async fn agent_kubeconfig(
    server: &ApiServer,
    admin: &Client,
    server_url: &str,
) -> Result<PathBuf> {
    create_agent_account(admin).await?;
    let token = agent_token(admin).await?;
    let path = server.work_dir().join("agent.kubeconfig");
    write_token_kubeconfig(&path, server_url, server.ca_path(), &token)?;
    Ok(path)
}

pub async fn create_namespace(admin: &Client, name: &str) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}}))?,
        )
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

/// A pod bound to `node` (as the scheduler leaves it) with `labels`. No
/// kubelet runs: the API server alone sets its status (phase Pending, the
/// QoS class of its resources: BestEffort here), `set_pod_status` the rest.
pub async fn create_pod(
    admin: &Client,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    node: &str,
) -> Result<Pod> {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "tempo", "image": "grafana/tempo:test"}],
            },
        }))?,
    )
    .await
    .with_context(|| format!("creating pod {namespace}/{name} on {node}"))
}

/// Sets what the kubelet reports, through the status subresource.
pub async fn set_pod_status(
    admin: &Client,
    namespace: &str,
    name: &str,
    qos_class: Option<&str>,
    phase: Option<&str>,
) -> Result<Pod> {
    let mut status = serde_json::Map::new();
    if let Some(qos) = qos_class {
        status.insert("qosClass".into(), qos.into());
    }
    if let Some(phase) = phase {
        status.insert("phase".into(), phase.into());
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .with_context(|| format!("setting the status of pod {namespace}/{name}"))
}

/// Deletes a pod. `grace_seconds: None` is the pod's own grace period: a
/// pod bound to a node then only gets its deletionTimestamp (the kubelet,
/// absent here, would finish it); `Some(0)` removes it at once.
pub async fn delete_pod(
    admin: &Client,
    namespace: &str,
    name: &str,
    grace_seconds: Option<u32>,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), namespace);
    let params = DeleteParams {
        grace_period_seconds: grace_seconds,
        ..DeleteParams::default()
    };
    pods.delete(name, &params)
        .await
        .with_context(|| format!("deleting pod {namespace}/{name}"))?;
    Ok(())
}

/// Compacts etcd up to its current revision (physically, so it is done when
/// this returns) through its HTTP gateway: every older resourceVersion is then
/// gone, and a watch from one is answered 410 Gone when etcd serves it (not
/// the API server's watch cache: `--watch-cache-sizes=pods#0`). Returns the
/// revision.
pub fn etcd_compact(etcd_url: &str) -> Result<i64> {
    // Any key: the answer's header carries the store's revision.
    let range = etcd_post(etcd_url, "/v3/kv/range", &json!({"key": "Lw=="}))?;
    let revision = range["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse::<i64>().ok())
        .or_else(|| range["header"]["revision"].as_i64())
        .ok_or_else(|| anyhow!("etcd's range answer has no revision: {range}"))?;
    etcd_post(
        etcd_url,
        "/v3/kv/compaction",
        &json!({"revision": revision.to_string(), "physical": true}),
    )?;
    Ok(revision)
}

/// One POST to etcd's gRPC gateway (plain HTTP on loopback). HTTP/1.0, so
/// that the answer is the body up to the close, never chunked.
fn etcd_post(etcd_url: &str, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
    let authority = etcd_url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("etcd URL {etcd_url} is not http://"))?;
    let mut stream = TcpStream::connect(authority)
        .with_context(|| format!("connecting to etcd at {etcd_url}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.0\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("sending POST {path} to etcd"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .with_context(|| format!("reading etcd's answer to POST {path}"))?;
    let (head, payload) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("etcd's answer to POST {path} has no body: {answer:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("etcd answered POST {path} with {head:?}: {payload}");
    }
    serde_json::from_str(payload)
        .with_context(|| format!("etcd's answer to POST {path}: {payload:?}"))
}

/// The port of a `https://127.0.0.1:PORT` URL (the API server's).
pub fn url_addr(url: &str) -> Result<SocketAddr> {
    url.strip_prefix("https://")
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("{url} is not https://IP:PORT"))
}

/// A TCP proxy on 127.0.0.1 in front of the API server, which can cut every
/// connection through it and refuse new ones while the server goes on: a
/// client disconnected as long as the test wants, the cluster changing
/// meanwhile. TLS passes through (the server certificate names 127.0.0.1, so
/// it is valid on the proxy's port too).
pub struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `upstream`, open.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy on 127.0.0.1")?;
        let addr = listener.local_addr().context("reading the proxy's port")?;
        let (open, open_rx) = watch::channel(true);
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut open = open_rx.clone();
                tokio::spawn(async move {
                    if !*open.borrow_and_update() {
                        // Dropped unanswered: the client sees the
                        // connection closed, as with a server gone.
                        return;
                    }
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = open.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Self { addr, open, accept })
    }

    /// `https://127.0.0.1:PORT`, for a kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
