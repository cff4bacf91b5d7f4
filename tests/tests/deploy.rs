//! Offline checks of the files in `deploy/`.
//!
//! # Theory of operation
//!
//! No cluster is reachable here, so the manifests are checked the way a
//! cluster would check them as far as that goes offline:
//!
//! * Built-in kinds (every document whose API group is core, `apps`, ... or
//!   `*.k8s.io`) go through PyPI's `kubernetes-validate --strict` against
//!   [`KUBERNETES_VERSIONS`]; strict mode refuses unknown fields, which is
//!   what the API server does with `kubectl apply --validate=strict`. A
//!   control case proves the validator really catches such errors.
//! * Custom kinds (Multus's NetworkAttachmentDefinition, KubeVirt's CRs)
//!   have no bundled schema: the test checks their apiVersion and kind, the
//!   fields tapgate depends on, that the NAD's `spec.config` is JSON with
//!   only known keys, and that the files agree with each other (plugin
//!   name, socket path, binding name, metrics port).
//! * `systemd-analyze verify` checks the unit file, on a temporary copy
//!   whose ExecStart points at an executable that exists.
//!
//! The validator and PyYAML live in the virtualenv `cargo xtask setup`
//! makes (`xtask/src/setup.rs`: `$TAPGATE_VENV`, else
//! `$HOME/.local/share/tapgate/venv`); YAML is turned into JSON by that
//! PyYAML, so this crate needs no YAML parser of its own.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tapgate_tests::scratch::ScratchDir;

/// Kubernetes versions the built-in kinds are validated against: the
/// oldest this project supports (KubeVirt 1.5's floor) and the newest
/// kubernetes-validate 1.37.0 bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.37.0"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The virtualenv with kubernetes-validate (same rule as xtask's setup).
fn venv() -> PathBuf {
    let dir = std::env::var_os("TAPGATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".local/share/tapgate/venv")
        });
    assert!(
        dir.join("bin/kubernetes-validate").exists(),
        "no kubernetes-validate in {}: run `cargo xtask setup` (or `cargo xtask test`)",
        dir.display()
    );
    dir
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every YAML document of `path`, as JSON values (empty documents dropped).
fn documents(path: &Path) -> Vec<Value> {
    let out = output(
        Command::new(venv().join("bin/python"))
            .args([
                "-c",
                "import json, sys, yaml\n\
                 with open(sys.argv[1]) as f:\n\
                 \x20   docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
                 json.dump(docs, sys.stdout)",
            ])
            .arg(path),
    );
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        text(&out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn file_docs(name: &str) -> Vec<Value> {
    documents(&deploy_dir().join(name))
}

/// The one document of `docs` with this kind.
fn the<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// Whether an apiVersion belongs to Kubernetes itself (core, `apps`,
/// `batch`, `*.k8s.io`) rather than to a CRD.
fn is_builtin(api_version: &str) -> bool {
    match api_version.split_once('/') {
        None => true,
        Some((group, _)) => !group.contains('.') || group.ends_with(".k8s.io"),
    }
}

/// The `deploy/*.yaml` files, by name.
fn yaml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

fn kubernetes_validate(path: &Path, version: &str) -> Output {
    output(
        Command::new(venv().join("bin/kubernetes-validate"))
            .args(["--strict", "--no-warn", "--kubernetes-version", version])
            .arg(path),
    )
}

/// A container's argument following `flag`.
fn arg_after<'a>(container: &'a Value, flag: &str) -> &'a str {
    let args = container["args"].as_array().unwrap();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag}"));
    args[i + 1].as_str().unwrap()
}

#[test]
fn builtin_kinds_pass_strict_validation() {
    let mut validated = BTreeSet::new();
    for file in yaml_files() {
        let docs = documents(&file);
        assert!(!docs.is_empty(), "{} has no document", file.display());
        let builtin: Vec<bool> = docs
            .iter()
            .map(|d| is_builtin(d["apiVersion"].as_str().unwrap()))
            .collect();
        // The validator knows no custom kinds: keep them in files of their own.
        assert!(
            builtin.iter().all(|b| *b) || builtin.iter().all(|b| !*b),
            "{} mixes built-in and custom kinds",
            file.display()
        );
        if !builtin[0] {
            continue;
        }
        for version in KUBERNETES_VERSIONS {
            let out = kubernetes_validate(&file, version);
            assert!(
                out.status.success(),
                "{} fails kubernetes-validate --strict for {version}:\n{}",
                file.display(),
                text(&out)
            );
        }
        validated.extend(docs.iter().map(|d| d["kind"].as_str().unwrap().to_owned()));
    }
    assert_eq!(
        validated,
        BTreeSet::from(["DaemonSet".to_owned(), "ServiceAccount".to_owned()])
    );
}

#[test]
fn validator_catches_errors() {
    let original = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).unwrap();
    let scratch = ScratchDir::new("deploy-control").unwrap();
    // (what is wrong, the line to replace, its replacement, what the error names)
    let cases = [
        (
            "unknown field",
            "      hostPID: false\n",
            "      hostPID: false\n      hostPIDD: true\n",
            "hostPIDD",
        ),
        (
            "wrong type",
            "      terminationGracePeriodSeconds: 30\n",
            "      terminationGracePeriodSeconds: thirty\n",
            "thirty",
        ),
    ];
    for (what, from, to, named) in cases {
        assert_eq!(
            original.matches(from).count(),
            1,
            "{what}: {from:?} not found once"
        );
        let path = scratch.path().join("daemonset.yaml");
        std::fs::write(&path, original.replacen(from, to, 1)).unwrap();
        let out = kubernetes_validate(&path, KUBERNETES_VERSIONS[0]);
        assert!(
            !out.status.success(),
            "{what} was not caught:\n{}",
            text(&out)
        );
        assert!(text(&out).contains(named), "{what}: {}", text(&out));
    }
}

#[test]
fn custom_kinds_have_the_expected_shape() {
    let ds_docs = file_docs("daemonset.yaml");
    let ds = the(&ds_docs, "DaemonSet");
    let pod = &ds["spec"]["template"];
    let agent = &pod["spec"]["containers"][0];
    let socket = arg_after(agent, "--socket");

    // The NetworkAttachmentDefinition and its CNI configuration.
    let nad_docs = file_docs("network-attachment-definition.yaml");
    let nad = the(&nad_docs, "NetworkAttachmentDefinition");
    assert_eq!(nad["apiVersion"], "k8s.cni.cncf.io/v1");
    assert_eq!(nad["metadata"]["name"], "tapgate");
    let config: Value =
        serde_json::from_str(nad["spec"]["config"].as_str().unwrap()).expect("spec.config is JSON");
    assert_eq!(config["type"], "tapgate-cni");
    assert_eq!(config["cniVersion"], "1.0.0");
    assert_eq!(config["name"], "tapgate");
    assert_eq!(config["agentSocket"], socket, "the agent's --socket");
    assert_eq!(config["tap"]["owner"], 107, "KubeVirt's qemu user");
    assert_eq!(config["tap"]["group"], 107);
    // Every key is checked by the plugin's own loader (unit test
    // `the_shipped_network_attachment_definition_loads` in cni/config.rs).

    // The init container installs the binary the configuration names.
    let install = pod["spec"]["initContainers"][0]["command"].to_string();
    assert!(
        install.contains("/host/opt/cni/bin/tapgate-cni"),
        "{install}"
    );

    // The binding registration points at that NAD.
    let kv_docs = file_docs("kubevirt-binding.yaml");
    let kv = the(&kv_docs, "KubeVirt");
    assert_eq!(kv["apiVersion"], "kubevirt.io/v1");
    let binding = &kv["spec"]["configuration"]["network"]["binding"]["tapgate"];
    assert_eq!(
        binding["networkAttachmentDefinition"].as_str().unwrap(),
        format!(
            "{}/{}",
            nad["metadata"]["namespace"].as_str().unwrap(),
            nad["metadata"]["name"].as_str().unwrap()
        )
    );
    assert_eq!(binding["domainAttachmentType"], "tap");

    // The example VM uses the binding on the pod network.
    let vm_docs = file_docs("example-vm.yaml");
    let vm = the(&vm_docs, "VirtualMachine");
    assert_eq!(vm["apiVersion"], "kubevirt.io/v1");
    let spec = &vm["spec"]["template"]["spec"];
    let iface = &spec["domain"]["devices"]["interfaces"][0];
    assert_eq!(iface["binding"]["name"], "tapgate");
    let net = spec["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == iface["name"])
        .expect("the interface's network");
    assert!(net["pod"].is_object(), "on the pod network: {net}");
}

#[test]
fn daemonset_probes_and_metrics_agree() {
    let docs = file_docs("daemonset.yaml");
    let ds = the(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"];
    let agent = &pod["spec"]["containers"][0];
    let listen = arg_after(agent, "--listen");
    let port = listen.rsplit(':').next().unwrap();
    assert_eq!(pod["metadata"]["annotations"]["prometheus.io/port"], port);
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert_eq!(agent["ports"][0]["containerPort"].to_string(), port);
    let port_name = &agent["ports"][0]["name"];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(&agent[probe]["httpGet"]["port"], port_name, "{probe}");
    }
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    assert_eq!(pod["spec"]["priorityClassName"], "system-node-critical");
}

#[test]
fn systemd_unit_verifies() {
    let unit = std::fs::read_to_string(deploy_dir().join("tapgate@.service")).unwrap();
    const EXEC: &str = "ExecStart=/usr/local/bin/tapgate run --tap %i --keep-datapath\n";
    assert!(unit.contains(EXEC), "ExecStart changed: update this test");
    // systemd-analyze refuses an ExecStart binary that does not exist:
    // verify a copy whose ExecStart names a stand-in that does.
    let scratch = ScratchDir::new("deploy-unit").unwrap();
    let stand_in = scratch.path().join("tapgate");
    std::fs::copy("/bin/true", &stand_in).unwrap();
    let copy = scratch.path().join("tapgate@.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/tapgate", stand_in.to_str().unwrap()),
    )
    .unwrap();
    let out = output(Command::new("systemd-analyze").arg("verify").arg(&copy));
    // Unknown keys are only warnings (exit 0): any output is a failure.
    assert!(
        out.status.success() && text(&out).trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
}
