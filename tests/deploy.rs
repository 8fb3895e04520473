//! deploy/ checked for real: Prometheus' own tools on the config, the alert
//! rules and a live scrape; Debian's Prometheus server scraping a running
//! terse and answering every PromQL expression of the alerts, the dashboard
//! and the adapter rule; the Kubernetes manifests checked against the
//! server's routes, port, settings and metric names.
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus` package, which
//! .ci/run installs) and python3 with PyYAML (tests/requirements.txt). Without
//! the Prometheus tools the tests that need them say so and pass, unless
//! TERSE_REQUIRE_PROMETHEUS=1 (as in CI) makes that a failure.

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use terse::server::{CHAT_COMPLETIONS, COMPLETIONS, HEALTH, METRICS, READY};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether `tool` can run; when it cannot, fail if it is required, else say so.
fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("TERSE_REQUIRE_PROMETHEUS").is_err(),
            "{tool} is missing (apt-get install prometheus)"
        );
        eprintln!("{tool} not installed: check skipped (TERSE_REQUIRE_PROMETHEUS=1 makes this a failure)");
    }
    found
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

#[test]
fn promtool_accepts_the_config_and_the_rules_and_the_alert_tests_pass() {
    if !have("promtool") {
        return;
    }
    let dir = repo("deploy/prometheus");
    run_ok(Command::new("promtool").args(["check", "config", "prometheus.yml"]).current_dir(&dir));
    let rules = run_ok(Command::new("promtool").args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    assert!(rules.contains("SUCCESS: 7 rules found"), "{rules}");
    let tests = run_ok(Command::new("promtool").args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    assert!(tests.contains("SUCCESS"), "{tests}");
}

/// Every YAML document of `path`, as JSON (via PyYAML: no YAML crate to build).
fn yaml_documents(path: &str) -> Vec<Value> {
    let script = "import json, sys, yaml\nprint(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))";
    let out = Command::new("python3").args(["-c", script]).arg(repo(path)).output().expect("python3");
    assert!(
        out.status.success(),
        "parsing {path}: {} (PyYAML: pip install -r tests/requirements.txt)",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).unwrap() {
        Value::Array(docs) => docs,
        _ => unreachable!(),
    }
}

/// The metric families terse defines (src/metrics.rs), with the registry's
/// `terse_` prefix, plus the process collector's.
fn defined_metrics() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    let mut names: BTreeSet<String> = source
        .split("new(")
        .skip(1)
        .filter_map(|rest| rest.trim_start().strip_prefix('"')?.split('"').next())
        .filter(|name| !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(|name| format!("terse_{name}"))
        .collect();
    for process in ["resident_memory_bytes", "cpu_seconds_total", "open_fds", "virtual_memory_bytes", "start_time_seconds"] {
        names.insert(format!("terse_process_{process}"));
    }
    assert!(names.contains("terse_queue_depth") && names.len() > 15, "{names:?}");
    names
}

/// `terse_*` names in `text`, series suffixes of histograms removed.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices("terse_") {
        if i > 0 && text.as_bytes()[i - 1].is_ascii_alphanumeric() {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        found.insert(family.to_string());
    }
    found
}

fn by_kind<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"))
}

#[test]
fn kubernetes_manifests_match_the_server() {
    let kustomization = &yaml_documents("deploy/kubernetes/kustomization.yaml")[0];
    let mut docs = Vec::new();
    for file in kustomization["resources"].as_array().unwrap() {
        docs.extend(yaml_documents(&format!("deploy/kubernetes/{}", file.as_str().unwrap())));
    }
    let config_map = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "terse-config")
        .expect("the terse-config ConfigMap");
    let config: toml::Table = config_map["data"]["terse.toml"].as_str().unwrap().parse().unwrap();
    let port = config["port"].as_integer().unwrap();

    let deployment = by_kind(&docs, "Deployment");
    let pod = &deployment["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"], labels["app.kubernetes.io/name"]);
    let container = &pod["spec"]["containers"][0];
    let ports = container["ports"].as_array().unwrap();
    let http = ports.iter().find(|p| p["name"] == "http").expect("a port named http");
    assert_eq!(http["containerPort"], port, "containerPort vs the config's port");

    // Probes on the server's own routes, through the named port.
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], HEALTH);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], READY);
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/path"], METRICS);
    assert_eq!(annotations["prometheus.io/port"], port.to_string());

    // The config file the container reads is the ConfigMap's, and the binary accepts it.
    let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config_arg = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let mount = |name: &str| -> String {
        let m = container["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == name).unwrap();
        m["mountPath"].as_str().unwrap().to_string()
    };
    assert_eq!(config_arg, format!("{}/terse.toml", mount("config")));
    let key_file = config["api_key_file"].as_str().unwrap();
    assert!(key_file.starts_with(&format!("{}/", mount("api-keys"))), "{key_file}");
    let volume = |name: &str| pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name).unwrap().clone();
    assert_eq!(volume("config")["configMap"]["name"], "terse-config");
    assert!(volume("api-keys")["secret"]["secretName"].is_string());
    let scratch = std::env::temp_dir().join(format!("terse-deploy-{}.toml", std::process::id()));
    std::fs::write(&scratch, config_map["data"]["terse.toml"].as_str().unwrap()).unwrap();
    let described = run_ok(
        Command::new(env!("CARGO_BIN_EXE_terse"))
            .args(["serve", "--print-config", "--config"])
            .arg(&scratch)
            .env_remove("TERSE_PORT"),
    );
    let _ = std::fs::remove_file(&scratch);
    assert!(described.contains(&format!("port = {port}  # config file")), "{described}");

    // Shutdown: the pause before SIGTERM plus terse's grace fit the kubelet's.
    let pre_stop = &container["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(pre_stop[0], "sleep");
    let pause: i64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    let grace = config["shutdown_grace_secs"].as_integer().unwrap();
    let termination = pod["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(pause + grace < termination, "preStop {pause} s + grace {grace} s must end before {termination} s");

    // Memory: the limit holds the weights' file and the KV cache budget.
    let limit = container["resources"]["limits"]["memory"].as_str().unwrap();
    let limit_bytes: u64 = limit.strip_suffix("Gi").map(|g| g.parse::<u64>().unwrap() << 30).or_else(|| limit.strip_suffix("Mi").map(|m| m.parse::<u64>().unwrap() << 20)).unwrap();
    let model = terse::manifest::resolve_model(config["model"].as_str().unwrap()).unwrap();
    let weights = std::fs::metadata(&model.path).unwrap().len();
    let kv = config["kv_cache_bytes"].as_integer().unwrap() as u64;
    assert!(weights + kv < limit_bytes, "weights {weights} + KV {kv} exceed the limit {limit}");

    // Services reach the named port; the ServiceMonitor scrapes /metrics once per pod.
    let services: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Service").collect();
    assert_eq!(services.len(), 2);
    for service in &services {
        assert_eq!(service["spec"]["selector"]["app.kubernetes.io/name"], labels["app.kubernetes.io/name"]);
        assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    }
    let headless = services.iter().find(|s| s["spec"]["clusterIP"] == "None").expect("a headless Service");
    assert_eq!(headless["spec"]["ports"][0]["port"], port);
    let monitor = by_kind(&docs, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], METRICS);
    let excluded = &monitor["spec"]["selector"]["matchExpressions"][0];
    assert!(headless["metadata"]["labels"][excluded["key"].as_str().unwrap()].is_string(), "the headless Service must not be scraped twice");

    // The HPA scales on a metric that terse exports, served by the adapter rule.
    let defined = defined_metrics();
    let hpa = by_kind(&docs, "HorizontalPodAutoscaler");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"]);
    let hpa_metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"].as_str().unwrap();
    assert!(defined.contains(hpa_metric), "{hpa_metric}");
    let adapter = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["config.yaml"].is_string())
        .expect("the adapter rule ConfigMap");
    let rules: Value = {
        let text = adapter["data"]["config.yaml"].as_str().unwrap();
        let scratch = std::env::temp_dir().join(format!("terse-adapter-{}.yaml", std::process::id()));
        std::fs::write(&scratch, text).unwrap();
        let docs = yaml_documents(scratch.to_str().unwrap());
        let _ = std::fs::remove_file(&scratch);
        docs[0].clone()
    };
    let rule = &rules["rules"][0];
    assert_eq!(rule["name"]["as"], hpa_metric, "the adapter must serve the HPA's metric");
    assert!(rule["seriesQuery"].as_str().unwrap().starts_with(&format!("{hpa_metric}{{")));

    // Every metric any deploy file names exists.
    for file in [
        "deploy/kubernetes/hpa.yaml",
        "deploy/kubernetes/prometheus-adapter-rules.yaml",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/terse-dashboard.json",
    ] {
        let used = referenced_metrics(&read(file));
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<_> = used.difference(&defined).collect();
        assert!(unknown.is_empty(), "{file} names metrics terse does not export: {unknown:?}");
    }

    // The image serves on the same port and checks the same route.
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains(&format!("EXPOSE {port}")), "EXPOSE");
    assert!(dockerfile.contains(&format!("TERSE_PORT={port}")));
    assert!(dockerfile.contains(&format!("\"terse\", \"probe\", \"{HEALTH}\"")), "HEALTHCHECK");
}

/// All PromQL of deploy/: alerts, dashboard panels (Grafana's variables filled
/// in) and the adapter rule (its template filled in).
fn deploy_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let alerts = &yaml_documents("deploy/prometheus/alerts.yml")[0];
    for group in alerts["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            queries.push((format!("alert {}", rule["alert"]), rule["expr"].as_str().unwrap().to_string()));
        }
    }
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/terse-dashboard.json")).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$model", ".*")
                .replace("$mode", ".*");
            queries.push((format!("panel {}", panel["title"]), expr));
        }
    }
    let adapter = read("deploy/kubernetes/prometheus-adapter-rules.yaml");
    let template = adapter.split("metricsQuery: '").nth(1).unwrap().split('\'').next().unwrap();
    queries.push((
        "adapter rule".into(),
        template.replace("<<.Series>>", "terse_queue_depth").replace("<<.LabelMatchers>>", "job=\"terse\""),
    ));
    queries
}

/// Debian's Prometheus on a loopback port, with its data in a scratch folder.
struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("terse-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: terse\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query's `data`, or the error Prometheus gave.
    async fn query(&self, promql: &str) -> Result<Value, String> {
        let resp = client()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// Polls `promql` until its first sample satisfies `want` (bounded: 2 minutes).
    async fn wait_for(&self, promql: &str, want: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let value = self
                .query(promql)
                .await
                .ok()
                .and_then(|d| d["result"][0]["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()));
            if let Some(v) = value.filter(|v| want(*v)) {
                return v;
            }
            assert!(Instant::now() < deadline, "{promql} read {value:?}; prometheus log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn prometheus_scrapes_terse_and_answers_every_deploy_query() {
    if !have("promtool") || !have("prometheus") {
        return;
    }
    let server = TestServer::start(terse::engine::EngineConfig::default());
    // Requests of several modes, one under budget forcing, and one refused.
    let chat = |extra: Value| {
        let mut body = json!({
            "model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "Name a colour."}],
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let bodies = [
        chat(json!({})),
        chat(json!({"reasoning_effort": "low"})),
        chat(json!({"reasoning": {"strategy": "budget", "max_thinking_tokens": 2}})),
        chat(json!({"stream": true, "reasoning_effort": "high"})),
    ];
    for body in &bodies {
        let r = post_json(&server.url(CHAT_COMPLETIONS), body).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    let r = post_json(&server.url(COMPLETIONS), &json!({"model": MODEL, "prompt": "x", "temperature": 9})).await;
    assert_eq!(r.status, 400);

    // The live scrape passes Prometheus' own linter.
    let scrape = metrics_text(&server).await;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it, and the series read back through its API.
    let target = server.url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&target);
    assert_eq!(prometheus.wait_for("up{job=\"terse\"}", |v| v == 1.0).await, 1.0);
    let total = prometheus.wait_for("sum(terse_requests_total)", |v| v >= 5.0).await;
    assert_eq!(total, 5.0, "4 answered + 1 refused");
    let ok = prometheus.wait_for("sum(terse_requests_total{status=\"200\"})", |v| v >= 4.0).await;
    assert_eq!(ok, 4.0);
    let data = prometheus.query("terse_model_info").await.unwrap();
    assert_eq!(data["result"][0]["metric"]["model"], MODEL, "{data}");
    let answer = prometheus.wait_for("sum(terse_answer_tokens_total)", |v| v > 0.0).await;
    let completion = prometheus.wait_for("sum(terse_completion_tokens_total)", |v| v > 0.0).await;
    let reasoning = prometheus.wait_for("sum(terse_reasoning_tokens_total)", |v| v >= 0.0).await;
    assert_eq!(answer + reasoning, completion, "thinking + answer tokens are the completion tokens");

    // Every expression of the alerts, the dashboard and the adapter rule is valid PromQL here.
    let queries = deploy_queries();
    assert!(queries.len() > 20, "{}", queries.len());
    for (source, promql) in &queries {
        if let Err(e) = prometheus.query(promql).await {
            panic!("{source}: {promql}\n{e}");
        }
    }
    // And the queue gauge the HPA scales on reads back at rest as 0.
    let queue = prometheus.wait_for("max(terse_queue_depth)", |v| v >= 0.0).await;
    assert_eq!(queue, 0.0);
    drop(prometheus);
    server.shutdown_and_wait().unwrap();
}
