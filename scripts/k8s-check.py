#!/usr/bin/env python3
"""Offline checks of deploy/kubernetes (run by scripts/k8s-check.sh in its venv).

For the base and every overlay, rendered with `kubectl kustomize`:
1. the core kinds against the Kubernetes JSON schemas `kubernetes-validate`
   bundles (strict: unknown fields are errors), at K8S_VERSION;
2. the KEDA objects against deploy/kubernetes/schemas/*.json;
3. every environment variable a container gets (env and the keys of envFrom
   ConfigMaps/Secrets) is one the binaries accept: the well-known names of
   common/src/settings (WELL_KNOWN), APP__SECTION__KEY for every field of the
   Settings structs there, and the variables the code reads itself (RUST_LOG);
   credentials only through secretKeyRef, never as a value or in a ConfigMap;
4. the shape issue 21 asks for: per Deployment readiness on /readyz, liveness
   on /healthz, CPU and memory requests, a PodDisruptionBudget, a grace period
   longer than the drain; an HPA on the gateway; per queue of
   common/src/amqp/topology.rs a worker Deployment consuming only it and a
   ScaledObject on "<amqp.namespace>.<queue>"; and in a rendered overlay,
   every Secret and ConfigMap referenced exists.

`k8s-check.py [--no-self-test]` checks the real tree and then breaks copies of it in a
temp dir, one fault each, and requires each to be caught (exit 1 otherwise).
"""

import copy
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"
KEDA_SCHEMAS = {
    "ScaledObject": "keda-scaledobject.json",
    "TriggerAuthentication": "keda-triggerauthentication.json",
}
# Set only from a Secret: a value in a manifest or ConfigMap would be a leak.
CREDENTIALS = {"DATABASE_URL", "REDIS_URL", "AMQP_URL", "JWT_SECRET"}
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


# ---- what the binaries accept, from the code ---------------------------------


def rust_structs(text):
    """{struct name: [(field, type)]} of the `pub struct X { pub f: T, }` in text."""
    out = {}
    for m in re.finditer(r"pub struct (\w+)\s*\{(.*?)\n\}", text, re.S):
        fields = []
        for line in m.group(2).splitlines():
            f = re.match(r"\s*pub (\w+):\s*(.+?),?\s*$", line)
            if f:
                fields.append((f.group(1), f.group(2)))
        out[m.group(1)] = fields
    return out


def settings_paths(structs, name="Settings", prefix=()):
    """Every key path of the Settings tree; `*` for a map's key."""
    for field, ty in structs[name]:
        path = prefix + (field,)
        inner = re.sub(r"\b(?:\w+::)+", "", ty)
        while True:
            opt = re.fullmatch(r"Option<(.+)>", inner)
            if not opt:
                break
            inner = opt.group(1)
        mapped = re.fullmatch(r"(?:Hash|BTree)Map<String,\s*(.+)>", inner)
        if mapped:
            path, inner = path + ("*",), mapped.group(1)
        if inner in structs:
            yield from settings_paths(structs, inner, path)
        else:
            yield path


def accepted_env(root=ROOT):
    """(exact names, APP__ patterns) the binaries read."""
    settings_dir = root / "common" / "src" / "settings"
    text = "\n".join(p.read_text() for p in sorted(settings_dir.glob("*.rs")))
    known = re.search(r"pub const WELL_KNOWN[^=]*=\s*\[(.*?)\];", text, re.S)
    if not known:
        sys.exit("k8s-check: WELL_KNOWN not found in common/src/settings")
    exact = set(re.findall(r'\(\s*"([A-Z0-9_]+)"\s*,\s*"[a-z0-9_.]+"\s*\)', known.group(1)))
    # Variables read directly (tracing's filter, any std::env::var).
    for src in ("common", "gateway", "worker"):
        for p in (root / src / "src").rglob("*.rs"):
            code = p.read_text()
            exact |= set(re.findall(r'(?:from_env|env::var(?:_os)?)\(\s*"([A-Z0-9_]+)"\s*\)', code))
    # The Settings structs may live anywhere in common (e.g. `crate::tls::TlsSettings`).
    structs = rust_structs("\n".join(p.read_text() for p in sorted((root / "common" / "src").rglob("*.rs"))))
    patterns = []
    for path in settings_paths(structs):
        parts = ["[A-Z0-9_]+" if p == "*" else re.escape(p.upper()) for p in path]
        patterns.append(re.compile("APP__" + "__".join(parts)))
    return exact, patterns


def env_accepted(name, exact, patterns):
    return name in exact or any(p.fullmatch(name) for p in patterns)


# ---- rendering and schemas -------------------------------------------------------


def render(directory):
    out = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise CheckFailed([f"kubectl kustomize {directory}: {out.stderr.strip()}"])
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class CheckFailed(Exception):
    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = problems


def kn(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def schema_problems(docs, deploy=DEPLOY):
    problems = []
    for doc in docs:
        kind = doc.get("kind")
        if kind in KEDA_SCHEMAS:
            schema = json.loads((deploy / "schemas" / KEDA_SCHEMAS[kind]).read_text())
            validator = jsonschema.Draft202012Validator(schema)
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
                where = "/".join(str(p) for p in e.path)
                problems.append(f"{kn(doc)}: {where}: {e.message}")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            problems.append(f"{kn(doc)}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{kn(doc)}: no schema for {doc.get('apiVersion')} {kind} in Kubernetes {K8S_VERSION}")
    return problems


# ---- environment and shape -------------------------------------------------------


def pod_specs(docs):
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def containers(spec):
    return spec.get("initContainers", []) + spec.get("containers", [])


def env_problems(docs, exact, patterns):
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    rendered_overlay = any(d["kind"] == "Secret" for d in docs)
    problems = []
    sourced = set()

    def check_name(where, name):
        if not env_accepted(name, exact, patterns):
            problems.append(f"{where}: unknown environment variable {name} (not in WELL_KNOWN nor an APP__ settings key)")

    for doc, spec in pod_specs(docs):
        for c in containers(spec):
            where = f"{kn(doc)} container {c['name']}"
            for e in c.get("env", []):
                check_name(where, e["name"])
                if e["name"] in CREDENTIALS and "secretKeyRef" not in e.get("valueFrom", {}):
                    problems.append(f"{where}: {e['name']} must come from a secretKeyRef, not a value")
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and rendered_overlay and not ref.get("optional"):
                    secret = by_name.get(("Secret", ref["name"]))
                    if secret is None:
                        problems.append(f"{where}: {e['name']}: no Secret {ref['name']}")
                    elif ref["key"] not in {**secret.get("data", {}), **secret.get("stringData", {})}:
                        problems.append(f"{where}: {e['name']}: Secret {ref['name']} has no key {ref['key']}")
            for source in c.get("envFrom", []):
                for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if key not in source:
                        continue
                    target = by_name.get((kind, source[key]["name"]))
                    if target is None:
                        if rendered_overlay or kind == "Secret":
                            problems.append(f"{where}: envFrom {kind} {source[key]['name']} not found")
                        continue
                    sourced.add((kind, target["metadata"]["name"]))
    # The keys of each ConfigMap or Secret a container takes whole (envFrom), once.
    for kind, name in sorted(sourced):
        target = by_name[(kind, name)]
        for key in target.get("data", {}):
            check_name(f"{kn(target)} (envFrom)", key)
            if kind == "ConfigMap" and key in CREDENTIALS:
                problems.append(f"{kn(target)}: {key} is a credential: put it in the Secret")
    for doc in docs:
        if doc["kind"] == "TriggerAuthentication" and rendered_overlay:
            for ref in doc["spec"].get("secretTargetRef", []):
                secret = by_name.get(("Secret", ref["name"]))
                if secret is None or ref["key"] not in secret.get("data", {}):
                    problems.append(f"{kn(doc)}: Secret {ref['name']} key {ref['key']} not found")
    return problems


def settings_value(docs, root, key):
    """The effective value of a settings key: a ConfigMap's APP__ entry, else defaults.toml."""
    name = "APP__" + "__".join(p.upper() for p in key.split("."))
    for d in docs:
        if d["kind"] == "ConfigMap" and name in d.get("data", {}):
            return d["data"][name]
    value = tomllib.loads((root / "common" / "src" / "settings" / "defaults.toml").read_text())
    for part in key.split("."):
        value = value[part]
    return value


def probe_path(container, probe):
    return container.get(probe, {}).get("httpGet", {}).get("path")


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def shape_problems(docs, root=ROOT):
    problems = []
    topology = (root / "common" / "src" / "amqp" / "topology.rs").read_text()
    queues = re.findall(r'"(\w+)"', re.search(r"pub const QUEUES[^=]*=\s*\[(.*?)\];", topology, re.S).group(1))
    namespace = settings_value(docs, root, "amqp.namespace")
    gateway_drain = (
        int(settings_value(docs, root, "gateway.request_timeout_ms")) + int(settings_value(docs, root, "amqp.confirm_timeout_ms"))
    ) / 1000
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    consumed = {}
    for dep in deployments:
        spec = dep["spec"]["template"]["spec"]
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        main = spec["containers"][0]
        where = kn(dep)
        if probe_path(main, "readinessProbe") != "/readyz":
            problems.append(f"{where}: readinessProbe must GET /readyz")
        if probe_path(main, "livenessProbe") != "/healthz":
            problems.append(f"{where}: livenessProbe must GET /healthz")
        for c in containers(spec):
            requests = c.get("resources", {}).get("requests", {})
            if "cpu" not in requests or "memory" not in requests:
                problems.append(f"{where} container {c['name']}: cpu and memory requests are required")
        if not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problems.append(f"{where}: no PodDisruptionBudget selects its pods")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        command = main.get("command", []) + main.get("args", [])
        if command[:1] == ["gateway"]:
            pause = 0
            pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            if pre_stop[:1] == ["sleep"]:
                pause = float(pre_stop[1])
            if grace <= gateway_drain + pause:
                problems.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed the drain {gateway_drain + pause:g} s")
            if not any(h["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"] for h in docs if h["kind"] == "HorizontalPodAutoscaler"):
                problems.append(f"{where}: no HorizontalPodAutoscaler targets the gateway")
        elif command[:2] == ["worker", "run"]:
            if "--queues" not in command:
                problems.append(f"{where}: a worker Deployment must name its queue (--queues)")
                continue
            its = command[command.index("--queues") + 1].split(",")
            if len(its) != 1 or its[0] not in queues:
                problems.append(f"{where}: --queues {','.join(its)}: one of {queues} per Deployment, so each scales alone")
                continue
            consumed[its[0]] = dep["metadata"]["name"]
            if grace <= 2:
                problems.append(f"{where}: terminationGracePeriodSeconds {grace} leaves no time to finish a batch")
    for q in queues:
        if q not in consumed:
            problems.append(f"queue {q}: no worker Deployment runs `worker run --queues {q}`")
            continue
        scaled = [s for s in docs if s["kind"] == "ScaledObject" and s["spec"]["scaleTargetRef"]["name"] == consumed[q]]
        if len(scaled) != 1:
            problems.append(f"queue {q}: {len(scaled)} ScaledObjects target {consumed[q]}, want 1")
            continue
        for t in scaled[0]["spec"]["triggers"]:
            want = f"{namespace}.{q}"
            if t["type"] != "rabbitmq" or t["metadata"].get("queueName") != want:
                problems.append(f"{kn(scaled[0])}: trigger must be rabbitmq on queueName {want}, got {t['type']} {t['metadata'].get('queueName')}")
    return problems


def check_tree(deploy=DEPLOY, root=ROOT, quiet=False):
    """Problems of every kustomization under deploy/ (base and overlays), rendered from a
    copy whose overlays get their secrets.env from secrets.env.example."""
    exact, patterns = accepted_env(root)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "kubernetes"
        shutil.copytree(deploy, tree, ignore=shutil.ignore_patterns("secrets.env"))
        for example in tree.rglob("secrets.env.example"):
            shutil.copy(example, example.with_name("secrets.env"))
        targets = [tree / "base"] + sorted(p for p in (tree / "overlays").iterdir() if p.is_dir())
        for target in targets:
            label = target.relative_to(tree)
            try:
                docs = render(target)
            except CheckFailed as e:
                problems += [f"{label}: {p}" for p in e.problems]
                continue
            found = schema_problems(docs, tree) + env_problems(docs, exact, patterns) + shape_problems(docs, root)
            problems += [f"{label}: {p}" for p in found]
            if not quiet:
                print(f"k8s-check: {label}: {len(docs)} objects ({', '.join(sorted({d['kind'] for d in docs}))}), {len(found)} problems")
    return problems


# ---- the checker's own test --------------------------------------------------------


def edit_yaml(path, change):
    docs = list(yaml.safe_load_all(path.read_text()))
    for d in docs:
        change(d)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def worker_container(doc):
    if doc.get("kind") == "Deployment":
        return doc["spec"]["template"]["spec"]["containers"][0]
    return {}


def set_probe(doc, path):
    c = worker_container(doc)
    if c:
        c["readinessProbe"]["httpGet"]["path"] = path


# (name, what to break, text the report must contain)
FAULTS = [
    ("unknown variable in the ConfigMap", lambda t: t.joinpath("base/config.env").write_text(
        t.joinpath("base/config.env").read_text() + "APP__DATABASE__MAX_CONECTIONS=8\n"), "APP__DATABASE__MAX_CONECTIONS"),
    ("unknown variable in a container", lambda t: edit_yaml(t / "base/worker-usage.yaml", lambda d: worker_container(d).get("env", []).append(
        {"name": "DATABSE_URL", "value": "x"})), "DATABSE_URL"),
    ("credential inlined", lambda t: edit_yaml(t / "base/gateway.yaml", lambda d: worker_container(d).get("env", []).append(
        {"name": "JWT_SECRET", "value": "inline"})), "must come from a secretKeyRef"),
    ("misspelt field (strict schema)", lambda t: edit_yaml(t / "base/gateway.yaml", lambda d: d.get("kind") == "Deployment"
        and d["spec"]["template"]["spec"].update(terminationGracePeriodSecond=40)), "terminationGracePeriodSecond"),
    ("wrong type", lambda t: edit_yaml(t / "base/gateway.yaml", lambda d: d.get("kind") == "HorizontalPodAutoscaler"
        and d["spec"].update(maxReplicas="ten")), "maxReplicas"),
    ("KEDA value not a string", lambda t: edit_yaml(t / "base/worker-credits.yaml", lambda d: d.get("kind") == "ScaledObject"
        and d["spec"]["triggers"][0]["metadata"].update(value=2000)), "ScaledObject/vsc-worker-credits"),
    ("KEDA queue without its namespace", lambda t: edit_yaml(t / "base/worker-sessions.yaml", lambda d: d.get("kind") == "ScaledObject"
        and d["spec"]["triggers"][0]["metadata"].update(queueName="sessions")), "queueName vsc.sessions"),
    ("readiness on /healthz", lambda t: edit_yaml(t / "base/worker-users.yaml", lambda d: set_probe(d, "/healthz")), "readinessProbe must GET /readyz"),
    ("grace shorter than the drain", lambda t: edit_yaml(t / "base/gateway.yaml", lambda d: d.get("kind") == "Deployment"
        and d["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=20)), "must exceed the drain"),
    ("secret key missing", lambda t: t.joinpath("overlays/example/secrets.env.example").write_text(
        "\n".join(line for line in t.joinpath("overlays/example/secrets.env.example").read_text().splitlines()
                  if not line.startswith("REDIS_URL=")) + "\n"), "has no key REDIS_URL"),
]


def self_test():
    """Each fault, in a fresh copy, must be reported; returns the faults missed."""
    missed = []
    for name, breaks, expect in FAULTS:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp) / "kubernetes"
            shutil.copytree(DEPLOY, tree, ignore=shutil.ignore_patterns("secrets.env"))
            breaks(tree)
            problems = check_tree(tree, quiet=True)
        caught = [p for p in problems if expect in p]
        print(f"k8s-check self-test: {name}: {'caught' if caught else 'MISSED'}" + (f" ({caught[0]})" if caught else ""))
        if not caught:
            missed.append(name)
    return missed


def main():
    if sys.argv[1:] == ["names"]:
        exact, patterns = accepted_env()
        print("\n".join(sorted(exact) + [p.pattern for p in patterns]))
        return 0
    args = sys.argv[1:]
    deploy = Path(args[args.index("--deploy") + 1]).resolve() if "--deploy" in args else DEPLOY
    problems = check_tree(deploy)
    for p in problems:
        print(f"k8s-check: {p}", file=sys.stderr)
    if problems:
        return 1
    if "--no-self-test" in args or deploy != DEPLOY:
        return 0
    missed = self_test()
    if missed:
        print(f"k8s-check: the checker missed {len(missed)} broken copies: {missed}", file=sys.stderr)
        return 1
    print(f"k8s-check: PASS (base and overlays valid; {len(FAULTS)} broken copies each caught)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
