//! What a Tempo operator's Prometheus and Grafana get from the agent, checked
//! with the real tools: the classic /metrics passes `promtool check metrics`,
//! a real Prometheus scrapes the real agent as OpenMetrics and counts exactly
//! the connections the test made, and the alerting rules and the dashboard in
//! deploy/monitoring/ pass promtool, evaluate against those series, and name
//! only series the agent exports (a rename breaks these tests).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use redirector_tests::{FlowSetup as Setup, *};
use serde_json::Value;

/// Redirected connections each test makes (besides one refused connection).
const N: u64 = 5;

/// The content types the agent serves (redirector/src/telemetry/http.rs).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What Prometheus 2.x sends in `Accept` when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// The job name the scrape config uses, and the one the rules' `up` alert selects.
const JOB: &str = "redirector";

/// A stand-in Tempo answering every request with an empty live-store ring
/// page: with `--tempo-ring` pointed at it the agent exports the ring check's
/// series (which rules and dashboard use) and its check succeeds, so no ring
/// alert goes pending. Serves until the test process ends.
fn empty_ring() -> String {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stand-in ring");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "{\"shards\":[],\"now\":\"2026-11-30T08:00:01Z\"}\n";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}/live-store/ring")
}

/// The agent with the ring check on, against [`empty_ring`].
fn agent_with_ring(s: &Setup) -> Agent {
    let ring = empty_ring();
    s.agent(&["--tempo-ring", &ring, "--tempo-ring-interval", "1"])
}

/// The dashboard's rows, one per concern, in order.
const ROWS: [&str; 5] = [
    "Steering",
    "Refusals",
    "Flows and drops",
    "Listeners",
    "Agent health",
];

fn monitoring(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/monitoring")
        .join(file)
}

fn read(file: &str) -> String {
    fs::read_to_string(monitoring(file)).unwrap_or_else(|e| panic!("deploy/monitoring/{file}: {e}"))
}

fn yaml(file: &str) -> yaml_serde::Value {
    yaml_serde::from_str(&read(file)).unwrap_or_else(|e| panic!("deploy/monitoring/{file}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("deploy/monitoring/grafana-dashboard.json: {e}"))
}

/// Runs `promtool ARGS` (Debian's prometheus package; `cargo xtask setup`
/// installs it) with `stdin`: (succeeded, stdout and stderr).
fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(monitoring(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's prometheus package: cargo xtask setup installs it)");
    let mut input = child.stdin.take().expect("promtool's stdin");
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .expect("writing to promtool");
    drop(input);
    let out = child.wait_with_output().expect("promtool finishes");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Makes one refused connection (no live-store listens yet), then starts the
/// live-store and makes [`N`] redirected ones. Returns the live-store and the
/// payload bytes (received from queriers, sent to them).
fn traffic(s: &Setup, agent: &Agent) -> (Server, u64, u64) {
    let addr = format!("{LIVE_STORE_V4}:{ADVERTISE}");
    assert!(
        request(&s.q, &addr, b"x").is_err(),
        "no live-store listens yet: the connection is refused"
    );
    let live_store =
        Server::start(&s.l, &format!("[::]:{LISTEN}"), "live-store").expect("live-store listens");
    agent.wait_registered(1);
    let (mut received, mut sent) = (0, 0);
    for i in 0..N {
        let payload = vec![b'q'; 10usize.pow(i as u32 % 4)];
        let reply = request(&s.q, &addr, &payload).expect("redirected request");
        assert_eq!(reply.server, "live-store");
        received += payload.len() as u64;
        // The header line the server wrote, then the echo.
        sent += (format!("live-store {}\n", reply.peer_seen).len() + reply.echo.len()) as u64;
    }
    (live_store, received, sent)
}

/// Every sample in a classic-format body: name -> label sets (name -> value).
fn samples(body: &str) -> BTreeMap<String, Vec<BTreeMap<String, String>>> {
    let mut out: BTreeMap<String, Vec<BTreeMap<String, String>>> = BTreeMap::new();
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
            .collect();
        out.entry(name.to_owned()).or_default().push(labels);
    }
    out
}

/// Series names (`redirector_*`, `up`) a PromQL expression uses.
fn series_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| is_ident(c)) {
        let tail = &rest[start..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        let word = &tail[..end];
        // Not a label value ("redirector", "up").
        let quoted = rest[..start].ends_with('"');
        if !quoted && (word.starts_with("redirector_") || word == "up") {
            names.insert(word.to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The rule file's expressions, by alert name.
fn rule_exprs() -> BTreeMap<String, String> {
    let rules = yaml("prometheus-rules.yaml");
    let mut out = BTreeMap::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alerting rules only");
            let expr = rule["expr"].as_str().expect("expr");
            out.insert(name.to_owned(), expr.to_owned());
        }
    }
    out
}

/// The dashboard's panels that are not rows.
fn dashboard_panels(d: &Value) -> Vec<&Value> {
    d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_exprs(d: &Value) -> Vec<String> {
    let mut exprs: Vec<String> = dashboard_panels(d)
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets"))
        .map(|t| t["expr"].as_str().expect("expr").to_owned())
        .collect();
    for var in d["templating"]["list"].as_array().expect("variables") {
        if let Some(q) = var["definition"].as_str() {
            exprs.push(q.to_owned());
        }
    }
    exprs
}

/// A dashboard expression as Grafana sends it, with every job and instance.
fn grafana_expands(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$__range", "5m")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "prometheus-rules.yaml"], None);
    println!("$ promtool check rules prometheus-rules.yaml\n{out}");
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "prometheus-rules.test.yaml"], None);
    println!("$ promtool test rules prometheus-rules.test.yaml\n{out}");
    assert!(ok, "promtool test rules:\n{out}");

    // Every alert is tested both ways: firing, and quiet on healthy series.
    let tests = yaml("prometheus-rules.test.yaml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"]
            .as_sequence()
            .expect("alert_rule_test")
        {
            let name = case["alertname"].as_str().expect("alertname").to_owned();
            match case["exp_alerts"].as_sequence().map(Vec::len) {
                Some(0) | None => quiet.insert(name),
                Some(_) => firing.insert(name),
            };
        }
    }
    for alert in rule_exprs().keys() {
        assert!(firing.contains(alert), "no test shows {alert} firing");
        assert!(quiet.contains(alert), "no test shows {alert} quiet");
    }

    // The PrometheusRule carries exactly the plain file's groups.
    let rules = yaml("prometheus-rules.yaml");
    let operator: Vec<yaml_serde::Value> =
        yaml_serde::Deserializer::from_str(&read("prometheus-operator.yaml"))
            .map(|d| serde::Deserialize::deserialize(d).expect("prometheus-operator.yaml parses"))
            .filter(|d: &yaml_serde::Value| !d.is_null())
            .collect();
    let kind = |k: &str| {
        operator
            .iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("prometheus-operator.yaml has no {k}"))
    };
    assert_eq!(
        kind("PrometheusRule")["spec"]["groups"],
        rules["groups"],
        "prometheus-operator.yaml's PrometheusRule differs from prometheus-rules.yaml"
    );
    // The PodMonitor names the job as RedirectorAgentDown expects.
    let monitor = kind("PodMonitor");
    assert_eq!(monitor["spec"]["jobLabel"], "app.kubernetes.io/name");
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        JOB
    );
    assert!(
        rule_exprs()["RedirectorAgentDown"].contains(&format!("job=\"{JOB}\"")),
        "RedirectorAgentDown selects job {JOB:?}"
    );
}

#[test]
fn dashboard_has_the_variables_and_one_row_per_concern() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["job", "instance"] {
        assert_eq!(var(name)["type"], "query", "${name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "${name}");
        assert!(
            var(name)["definition"]
                .as_str()
                .is_some_and(|q| q.starts_with("label_values(redirector_")),
            "${name} lists the values of a redirector series"
        );
    }

    let panels = d["panels"].as_array().expect("panels");
    let rows: Vec<&str> = panels
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().expect("row title"))
        .collect();
    assert_eq!(rows, ROWS, "one row per concern, in order");
    assert_eq!(panels[0]["type"], "row", "every panel is in a row");
    let mut by_row: BTreeMap<&str, usize> = BTreeMap::new();
    let mut row = "";
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("id")), "duplicate id");
        if p["type"] == "row" {
            row = p["title"].as_str().expect("title");
            continue;
        }
        *by_row.entry(row).or_default() += 1;
        let title = p["title"].as_str().expect("panel title");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains("job=~\"$job\"") && expr.contains("instance=~\"$instance\""),
                "{title}: {expr} ignores $job or $instance"
            );
        }
    }
    for r in ROWS {
        assert!(by_row.get(r).copied().unwrap_or(0) >= 2, "row {r} is empty");
    }
}

#[test]
fn every_series_the_rules_and_dashboard_use_is_exported() {
    let s = Setup::new();
    let agent = agent_with_ring(&s);
    // The ring check's first read, which registers its series.
    thread::sleep(Duration::from_millis(1500));
    let (status, body) = http_get(&agent.metrics_url("/metrics"));
    assert_eq!(status, 200);
    let exported = samples(&body);

    // (where, series name) for every use.
    let mut used: Vec<(String, String)> = Vec::new();
    for (alert, expr) in rule_exprs() {
        for name in series_names(&expr) {
            used.push((format!("alert {alert}"), name));
        }
    }
    let d = dashboard();
    for expr in dashboard_exprs(&d) {
        for name in series_names(&expr) {
            used.push((format!("dashboard query {expr}"), name));
        }
    }
    let tests = yaml("prometheus-rules.test.yaml");
    let mut input_series = Vec::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for series in test["input_series"].as_sequence().expect("input_series") {
            let text = series["series"].as_str().expect("series").to_owned();
            let name = text.split('{').next().unwrap_or_default().to_owned();
            used.push((format!("rule test series {text}"), name));
            input_series.push(text);
        }
    }
    let names: BTreeSet<&str> = used.iter().map(|(_, n)| n.as_str()).collect();
    assert!(
        names.len() >= 15,
        "the rules and the dashboard use only {names:?}"
    );
    for (place, name) in &used {
        // `up` is Prometheus's own, for every target.
        assert!(
            name == "up" || exported.contains_key(name),
            "{place}: {name} is not on the agent's /metrics:\n{body}"
        );
    }

    // The test series carry the agent's labels (plus the scrape's job and
    // instance) and only label values the agent exports.
    for text in input_series {
        let parsed = samples(&format!("{text} 0"));
        let (name, sets) = parsed.iter().next().expect("one series");
        let labels = &sets[0];
        if name == "up" {
            continue;
        }
        let real = &exported[name];
        let matches = real.iter().any(|r| {
            labels
                .iter()
                .filter(|(k, _)| *k != "job" && *k != "instance")
                .all(|(k, v)| r.get(k) == Some(v))
                && r.keys().all(|k| labels.contains_key(k))
        });
        assert!(
            matches,
            "rule test series {text}: the agent exports {name} with labels {real:?}"
        );
    }
    drop(agent);
}

#[test]
fn metrics_pass_promtool_and_openmetrics_is_served_when_asked() {
    let s = Setup::new();
    let agent = s.agent(&[]);
    let (_live_store, received, sent) = traffic(&s, &agent);
    // Close records follow the close by a moment.
    let url = agent.metrics_url("/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&http_get(&url).1, "redirector_flows_closed_total") < N {
        assert!(Instant::now() < deadline, "close records never counted");
        thread::sleep(Duration::from_millis(50));
    }

    let classic = http_request(&url, &[]).expect("GET /metrics");
    assert_eq!(classic.status, 200);
    assert_eq!(classic.header("content-type"), Some(CLASSIC));
    let (ok, out) = promtool(&["check", "metrics"], Some(&classic.body));
    println!(
        "$ curl -s http://{url} | promtool check metrics   # exit {}\n{out}",
        if ok { 0 } else { 1 }
    );
    assert!(ok, "promtool check metrics:\n{out}\non:\n{}", classic.body);
    assert_eq!(out, "", "promtool reported problems");
    assert!(!classic.body.contains("# EOF"));

    let om = http_request(&url, &[("Accept", PROMETHEUS_ACCEPT)]).expect("GET /metrics");
    assert_eq!(om.status, 200);
    assert_eq!(om.header("content-type"), Some(OPENMETRICS));
    assert!(om.body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(
        om.body
            .contains("# TYPE redirector_connections_redirected counter\n"),
        "OpenMetrics names a counter family without _total"
    );

    // Both renderings carry the same samples.
    let om_samples = samples(
        &om.body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(samples(&classic.body), om_samples);

    let b = &classic.body;
    for (name, want) in [
        ("redirector_connections_redirected_total", N),
        ("redirector_lookups_redirected_total", N),
        ("redirector_flows_closed_total", N),
        ("redirector_connections_refused_total", 1),
        ("redirector_bytes_received_total", received),
        ("redirector_bytes_sent_total", sent),
        ("redirector_connections_active", 0),
        ("redirector_listeners_registered", 1),
        ("redirector_programs_attached", 2),
        ("redirector_programs_expected", 2),
        ("redirector_ready", 1),
    ] {
        assert_eq!(metric(b, name), want, "{name}");
    }
    drop(agent);
}

#[test]
fn a_real_prometheus_scrapes_openmetrics_counts_exactly_and_evaluates_the_rules() {
    let s = Setup::new();
    let agent = agent_with_ring(&s);
    let target = agent.metrics_url("");
    let prom = Prometheus::start(&target, &monitoring("prometheus-rules.yaml"))
        .expect("prometheus starts");

    // A first scrape before any traffic, so the refusal below is an increase
    // that rate() sees.
    prom.wait_for(
        &[("up", 1.0), ("redirector_connections_refused_total", 0.0)],
        &target,
    );
    let (_live_store, received, sent) = traffic(&s, &agent);
    prom.wait_for(
        &[
            ("up", 1.0),
            ("redirector_connections_redirected_total", N as f64),
            ("redirector_lookups_redirected_total", N as f64),
            ("redirector_flows_closed_total", N as f64),
            ("redirector_connections_refused_total", 1.0),
            ("redirector_bytes_received_total", received as f64),
            ("redirector_bytes_sent_total", sent as f64),
            ("redirector_connections_active", 0.0),
            ("redirector_listeners_registered", 1.0),
            ("sum(redirector_listeners_unservable)", 0.0),
            ("redirector_programs_attached", 2.0),
            ("redirector_programs_expected", 2.0),
            ("redirector_ready", 1.0),
            ("redirector_flow_records_dropped_total", 0.0),
            ("redirector_assign_errors_total", 0.0),
        ],
        &target,
    );

    // Prometheus parsed OpenMetrics: its metadata names the counter family
    // `redirector_connections_redirected`, as only the OpenMetrics rendering
    // does (the classic one names it by its `_total` sample).
    let metadata = |metric: &str| {
        prom.api(&format!(
            "/api/v1/targets/metadata?metric={}",
            encode(metric)
        ))
    };
    let om = metadata("redirector_connections_redirected");
    let entries = om.as_array().expect("metadata list");
    assert_eq!(entries.len(), 1, "{om}");
    assert_eq!(entries[0]["type"], "counter", "{om}");
    assert_eq!(entries[0]["target"]["instance"], target.as_str());
    let classic = metadata("redirector_connections_redirected_total");
    assert_eq!(classic.as_array().map(Vec::len), Some(0), "{classic}");

    // Every rule evaluates without error against the real series, and the
    // refusal made RedirectorRefusalsRising pending (its `for` has not run
    // out); nothing else is active on a healthy agent.
    let loaded = prom.api("/api/v1/rules");
    let names: BTreeSet<String> = rules_of(&loaded)
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        rule_exprs().keys().cloned().collect::<BTreeSet<_>>(),
        "Prometheus loaded every rule"
    );
    prom.wait_until(|| {
        let loaded = prom.api("/api/v1/rules");
        for r in rules_of(&loaded) {
            // "unknown" until the first evaluation; "err" is final.
            assert_ne!(r["health"], "err", "rule {}: {}", r["name"], r["lastError"]);
            if r["health"] != "ok" {
                return Err(format!("rule {} is {}", r["name"], r["health"]));
            }
        }
        let want = vec![(
            "RedirectorRefusalsRising".to_owned(),
            target.clone(),
            "pending".to_owned(),
        )];
        let active = prom.active_alerts();
        if active == want {
            Ok(())
        } else {
            Err(format!("active alerts {active:?}, want {want:?}"))
        }
    });

    // Every dashboard query, as Grafana sends it, returns data from this agent,
    // and the $instance variable lists it.
    let d = dashboard();
    for expr in dashboard_exprs(&d) {
        if expr.starts_with("label_values(") {
            continue;
        }
        let result = prom.query(&grafana_expands(&expr));
        assert!(
            result
                .iter()
                .any(|(labels, _)| labels.get("instance").is_none_or(|i| *i == target)),
            "dashboard query {expr} returned no data: {result:?}"
        );
    }
    let instances = prom.api(&format!(
        "/api/v1/label/instance/values?match[]={}",
        encode("redirector_programs_attached{job=~\".+\"}")
    ));
    assert_eq!(instances, serde_json::json!([target]), "$instance values");

    // The agent goes away: the scrape fails and RedirectorAgentDown is pending.
    drop(agent);
    prom.wait_for(&[("up", 0.0)], &target);
    prom.wait_until(|| {
        let active = prom.active_alerts();
        let down = (
            "RedirectorAgentDown".to_owned(),
            target.clone(),
            "pending".to_owned(),
        );
        if active.contains(&down) {
            Ok(())
        } else {
            Err(format!(
                "active alerts {active:?}, want {down:?} among them"
            ))
        }
    });
}

/// The rules of every group in a `/api/v1/rules` answer.
fn rules_of(data: &Value) -> Vec<&Value> {
    data["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect()
}

/// Percent-encodes a URL query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server (Debian's prometheus package) with its own
/// configuration and storage in a temporary directory, listening on loopback
/// only and scraping only the agent, every second; killed on drop.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:PORT` of its HTTP API.
    addr: String,
}

impl Prometheus {
    fn start(target: &str, rules: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "rdt-prometheus-{}-{}",
            std::process::id(),
            target.replace([':', '.'], "_")
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )?;
        // A port that was free a moment ago; Prometheus reports a bind failure.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let log = fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting prometheus (Debian's prometheus package: cargo xtask setup)")?;
        let mut prom = Self { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_request(&format!("{}/-/ready", prom.addr), &[]).is_ok_and(|r| r.status == 200) {
                return Ok(prom);
            }
            if let Some(status) = prom.child.try_wait()? {
                bail!("prometheus exited with {status}:\n{}", prom.log());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s:\n{}", prom.log());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `data` of a successful API answer.
    fn api(&self, path_query: &str) -> Value {
        let response = http_request(&format!("{}{path_query}", self.addr), &[])
            .unwrap_or_else(|e| panic!("GET {path_query}: {e}\n{}", self.log()));
        let json: Value = serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("GET {path_query}: {e}: {}", response.body));
        assert_eq!(json["status"], "success", "GET {path_query}: {json}");
        json["data"].clone()
    }

    /// An instant query's vector: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .expect("result")
            .iter()
            .map(|r| {
                let labels = serde_json::from_value(r["metric"].clone()).expect("labels");
                let value = r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("value");
                (labels, value)
            })
            .collect()
    }

    /// (alertname, instance, state) of every pending or firing alert.
    fn active_alerts(&self) -> Vec<(String, String, String)> {
        let label = |a: &Value, k: &str| a["labels"][k].as_str().unwrap_or("-").to_owned();
        self.api("/api/v1/alerts")["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| {
                (
                    label(a, "alertname"),
                    label(a, "instance"),
                    a["state"].as_str().unwrap_or("-").to_owned(),
                )
            })
            .collect()
    }

    /// Polls (up to 30 s: scrapes and evaluations run every second) until
    /// `check` is Ok; fails with its last explanation.
    fn wait_until(&self, mut check: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match check() {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => {
                    panic!("after 30 s: {why}\nprometheus log:\n{}", self.log())
                }
                Err(_) => thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Waits until each query returns exactly one series (of `target` where
    /// it has an instance) whose value is exactly the one given.
    fn wait_for(&self, expected: &[(&str, f64)], target: &str) {
        self.wait_until(|| {
            let wrong: Vec<String> = expected
                .iter()
                .filter_map(|(q, want)| {
                    let result = self.query(q);
                    let ok = matches!(result.as_slice(), [(labels, v)]
                        if *v == *want
                            && labels.get("instance").is_none_or(|i| i == target));
                    (!ok).then(|| format!("{q}: want {want}, have {result:?}"))
                })
                .collect();
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(wrong.join("\n"))
            }
        });
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
