"""deploy/ checked against the code, on CPU and without Docker or a cluster.

The manifests are plain text checked with regular expressions (PyYAML is not a dependency); where PyYAML
happens to be installed, one more test parses every YAML file and repeats the key checks structurally.
What is checked: every FLASHSERVE_* variable is a ServerConfig setting (or a build/client variable in the
file where those belong), every `--flag` given to `flashserve serve` is a real flag, the settings parse,
ports / probes / metrics / grace periods agree with the effective server configuration, the GPU request,
the headless Service, the non-root user, and the image's health check run against a live server."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
HEALTH_SERVICES = ("", "flashserve.v1.Attention")
ENV_RE = re.compile(r"\bFLASHSERVE_[A-Z0-9_]*[A-Z0-9]\b")
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

EXPECTED_FILES = ["Dockerfile", "Dockerfile.dockerignore", "compose.yaml", "flashserve.env.example", "README.md",
                  "k8s/deployment.yaml", "k8s/service.yaml", "k8s/secret.example.yaml", "k8s/kustomization.yaml"]


def read(rel: str) -> str:
    return (DEPLOY / rel).read_text()


def server_env_names() -> set:
    return {ServerConfig.env_name(f.name) for f in dataclasses.fields(ServerConfig)}


def serve_parser():
    parser = build_parser()
    for action in parser._actions:  # the subparsers action
        if getattr(action, "choices", None) and "serve" in action.choices:
            return action.choices["serve"]
    raise AssertionError("build_parser() has no 'serve' subcommand")


def serve_flags() -> set:
    return {s for a in serve_parser()._actions for s in a.option_strings}


def effective_config(args, env) -> ServerConfig:
    """What `flashserve serve ARGS` would run with under environment ENV (nothing from os.environ)."""
    ns = build_parser().parse_args(["serve", *args])
    return ServerConfig.from_args(ns, environ=dict(env))


def block(text: str, key: str) -> str:
    """The lines indented under the first line `<indent>key:` (YAML written in block style)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(rf"^(\s*)(- )?{re.escape(key)}:\s*(#.*)?$", line)
        if m:
            indent = len(m.group(1)) + (2 if m.group(2) else 0)
            out = []
            for nxt in lines[i + 1:]:
                if nxt.strip() and (len(nxt) - len(nxt.lstrip())) <= indent:
                    break
                out.append(nxt)
            return "\n".join(out)
    raise AssertionError(f"no '{key}:' block")


def scalar(text: str, key: str) -> str:
    """The value of the first `key: value` line (quotes removed, comment dropped)."""
    m = re.search(rf"^\s*(?:- )?{re.escape(key)}:[ \t]*(?:\"([^\"]*)\"|([^#\n]*?))[ \t]*(?:#.*)?$", text, re.M)
    assert m, f"no '{key}:' in\n{text}"
    return m.group(1) if m.group(1) is not None else m.group(2)


def flow_list(text: str, key: str) -> list:
    """The value of a `key: [...]` line written as a JSON list."""
    m = re.search(rf"^\s*(?:- )?{re.escape(key)}:\s*(\[.*\])\s*(?:#.*)?$", text, re.M)
    assert m, f"no '{key}: [...]' in\n{text}"
    return json.loads(m.group(1))


# ------------------------------------------------------------------------------------------- Dockerfile

def dockerfile() -> list:
    """[(INSTRUCTION, arguments)] with continuations joined and comment lines dropped."""
    out, cur = [], ""
    for line in read("Dockerfile").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        cur += line
        if cur.strip():
            instr, _, rest = cur.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
        cur = ""
    return out


def docker_args() -> dict:
    """ARG defaults (first definition wins, as a global ARG's default carries into the stages)."""
    args = {}
    for instr, rest in dockerfile():
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
    return args


def docker_env() -> dict:
    env = {}
    for instr, rest in dockerfile():
        if instr == "ENV":
            for part in shlex.split(rest):
                k, _, v = part.partition("=")
                env[k] = v
    return env


def docker_json(instr_name: str) -> list:
    values = [rest for instr, rest in dockerfile() if instr == instr_name]
    assert len(values) == 1, f"expected one {instr_name}, found {len(values)}"
    return json.loads(values[0])


def dockerfile_config() -> ServerConfig:
    env = {k: v for k, v in docker_env().items() if k.startswith("FLASHSERVE_")}
    return effective_config(docker_json("CMD"), env)


def healthcheck_code_dockerfile() -> str:
    rest = [rest for instr, rest in dockerfile() if instr == "HEALTHCHECK"]
    assert len(rest) == 1
    cmd = json.loads(rest[0][rest[0].index("CMD") + 3:].strip())
    assert cmd[:2] == ["python", "-c"], cmd
    return cmd[2]


def healthcheck_code_compose() -> str:
    cmd = flow_list(block(read("compose.yaml"), "healthcheck"), "test")
    assert cmd[:3] == ["CMD", "python", "-c"], cmd
    return cmd[3]


# ------------------------------------------------------------------------------------------- manifests

def k8s_env() -> dict:
    text = read("k8s/deployment.yaml")
    return dict(re.findall(r"- name: (FLASHSERVE_\w+)\n\s+value: \"([^\"]*)\"", text))


def k8s_args() -> list:
    return flow_list(read("k8s/deployment.yaml"), "args")


def k8s_config() -> ServerConfig:
    return effective_config(k8s_args(), k8s_env())


def compose_env() -> dict:
    return dict(re.findall(r"^\s+(FLASHSERVE_\w+): \"([^\"]*)\"", block(read("compose.yaml"), "environment"), re.M))


def env_file_env() -> dict:
    out = {}
    for line in read("flashserve.env.example").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


def compose_config() -> ServerConfig:
    # no `command:` in compose.yaml: the image's CMD applies
    assert not re.search(r"^\s+command:", read("compose.yaml"), re.M), "compose command: check its flags too"
    return effective_config(docker_json("CMD"), {**env_file_env(), **compose_env()})


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", value.strip())
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


# ------------------------------------------------------------------------------------------- tests

def test_files_present():
    missing = [f for f in EXPECTED_FILES if not (DEPLOY / f).is_file()]
    assert not missing


def test_dockerfile_stages_cuda_and_torch_match():
    args = docker_args()
    froms = [rest for instr, rest in dockerfile() if instr == "FROM"]
    assert len(froms) == 2, froms
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_VERSION\}-devel-\$\{UBUNTU\} AS builder", froms[0], re.I), froms[0]
    assert re.fullmatch(r"nvidia/cuda:\$\{CUDA_VERSION\}-runtime-\$\{UBUNTU\}( AS \w+)?", froms[1], re.I), froms[1]
    major, minor = re.fullmatch(r"(\d+)\.(\d+)\.\d+", args["CUDA_VERSION"]).groups()
    assert args["TORCH_CUDA"] == f"cu{major}{minor}", "torch's CUDA build must match the base image's toolkit"
    assert re.fullmatch(r"ubuntu\d\d\.\d\d", args["UBUNTU"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["TORCH_VERSION"])
    # both stages install exactly the same torch (the extension's ABI) from the CUDA index
    torch_installs = [rest for instr, rest in dockerfile() if instr == "RUN" and "torch==" in rest]
    assert len(torch_installs) == 2
    for rest in torch_installs:
        assert "--index-url https://download.pytorch.org/whl/${TORCH_CUDA}" in rest
        assert '"torch==${TORCH_VERSION}"' in rest


def test_dockerfile_builds_the_extension_for_our_archs():
    spec = importlib.util.spec_from_file_location("fs_build_config", REPO / "csrc" / "build_config.py")
    build_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_config)
    args = docker_args()
    archs = args["FLASHSERVE_ARCHS"].split(",")
    assert archs and set(archs) <= set(build_config.ARCHS), archs
    assert "90a" in archs, "Hopper (sm_90a) is the primary target"
    # release image: every head dim and dtype
    assert args.get("FLASHSERVE_HEADDIMS", "") == "" and args.get("FLASHSERVE_DTYPES", "") == ""
    builds = [rest for instr, rest in dockerfile() if instr == "RUN" and "pip wheel" in rest]
    assert len(builds) == 1
    assert "FLASHSERVE_BUILD_EXT=1" in builds[0] and "--no-build-isolation" in builds[0]
    assert "TORCH_CUDA_ARCH_LIST" in builds[0] and "flashserve/_C" in builds[0]


def test_dockerfile_entrypoint_cmd_ports():
    assert docker_json("ENTRYPOINT") == ["flashserve", "serve"]
    cfg = dockerfile_config()
    assert cfg.host == "0.0.0.0" and cfg.metrics_port == 9400
    exposed = {int(p.split("/")[0]) for instr, rest in dockerfile() if instr == "EXPOSE" for p in rest.split()}
    assert {cfg.port, cfg.metrics_port} <= exposed, exposed


def test_dockerfile_runs_as_numeric_non_root_user():
    users = [rest for instr, rest in dockerfile() if instr == "USER"]
    assert users, "no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)
    pod = block(read("k8s/deployment.yaml"), "securityContext")
    assert scalar(pod, "runAsNonRoot") == "true"
    assert scalar(pod, "runAsUser") == uid


def test_dockerignore_allows_exactly_what_is_copied():
    rules = [r.strip() for r in read("Dockerfile.dockerignore").splitlines() if r.strip() and not r.startswith("#")]
    assert rules[0] == "*", "allow-list expected"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = []
    for instr, rest in dockerfile():
        if instr == "COPY" and "--from" not in rest:
            copied += rest.split()[:-1]
    assert copied
    for src in copied:
        assert src.rstrip("/") in allowed, f"COPY {src} is excluded by Dockerfile.dockerignore"
        assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
    # every folder setup.py packages reaches the context and is copied
    package_dirs = set(re.findall(r'"flashserve[\w.]*":\s*"([\w/]+)"', (REPO / "setup.py").read_text()))
    assert package_dirs
    for top in {d.split("/")[0] for d in package_dirs}:
        assert top in allowed and top in copied, f"setup.py packages {top}/ but the image build does not get it"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(code: str, port: int) -> int:
    env = {**os.environ, "FLASHSERVE_PORT": str(port)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60).returncode


def test_healthchecks_pass_on_a_live_server_and_fail_when_draining_or_down():
    codes = {"Dockerfile": healthcheck_code_dockerfile(), "compose.yaml": healthcheck_code_compose()}
    for where, code in codes.items():
        assert "grpc_health.v1" in code, where
        services = re.findall(r"HealthCheckRequest\(service='([^']*)'\)", code)
        assert services and set(services) <= set(HEALTH_SERVICES), (where, services)
        assert "FLASHSERVE_PORT" in code, where
        compile(code, where, "exec")
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="torch", device="cpu")) as srv:
        for where, code in codes.items():
            assert _probe(code, srv.running.port) == 0, f"{where} health check fails on a serving server"
        srv.call(srv.running.health.enter_graceful_shutdown())
        for where, code in codes.items():
            assert _probe(code, srv.running.port) != 0, f"{where} health check passes on a draining server"
    for where, code in codes.items():
        assert _probe(code, _free_port()) != 0, f"{where} health check passes with no server"


def test_compose_gpu_ports_grace():
    text = read("compose.yaml")
    dev = block(text, "devices")
    assert scalar(dev, "driver") == "nvidia" and scalar(dev, "count") == "1"
    assert re.search(r"^\s+capabilities: \[gpu\]\s*$", dev, re.M)
    build = block(text, "build")
    assert scalar(build, "context") == ".." and scalar(build, "dockerfile") == "deploy/Dockerfile"
    assert (DEPLOY / scalar(build, "context") / scalar(build, "dockerfile")).resolve() == DEPLOY / "Dockerfile"
    cfg = compose_config()
    ports = set(re.findall(r'^\s+- "(\d+:\d+)"', block(text, "ports"), re.M))
    assert {f"{cfg.port}:{cfg.port}", f"{cfg.metrics_port}:{cfg.metrics_port}"} <= ports, ports
    assert seconds(scalar(text, "stop_grace_period")) > cfg.drain_s
    assert scalar(block(text, "env_file"), "path") == "./flashserve.env"
    assert "FLASHSERVE_TOKEN" in env_file_env(), "the token comes from the env file"
    assert "FLASHSERVE_TOKEN" not in compose_env(), "no token in compose.yaml itself"
    assert "flashserve.env" in read(".gitignore").split()


def test_k8s_gpu_probes_grace_secret_metrics():
    text = read("k8s/deployment.yaml")
    cfg = k8s_config()
    assert cfg.host == "0.0.0.0" and cfg.metrics_port > 0
    resources = block(text, "resources")
    assert scalar(block(resources, "limits"), "nvidia.com/gpu") == "1"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        body = block(text, probe)
        grpc_block = block(body, "grpc")
        assert int(scalar(grpc_block, "port")) == cfg.port, probe
        if "service:" in grpc_block:
            assert scalar(grpc_block, "service") in HEALTH_SERVICES, probe
    assert re.search(r"^\s+service: \"\"\s*$", block(block(text, "readinessProbe"), "grpc"), re.M)
    ports = dict(re.findall(r"- name: (\w+)\n\s+containerPort: (\d+)", text))
    assert ports == {"grpc": str(cfg.port), "metrics": str(cfg.metrics_port)}
    # grace period covers the preStop sleep and the drain
    pre_stop = flow_list(block(text, "preStop"), "command")
    assert pre_stop[0] == "sleep"
    assert int(scalar(text, "terminationGracePeriodSeconds")) > float(pre_stop[1]) + cfg.drain_s
    # token from the Secret the example defines
    token = block(text, "secretKeyRef")
    secret = read("k8s/secret.example.yaml")
    assert re.search(r"- name: FLASHSERVE_TOKEN\n\s+valueFrom:", text)
    assert scalar(token, "name") == scalar(block(secret, "metadata"), "name")
    assert re.search(rf"^\s+{scalar(token, 'key')}: ", block(secret, "stringData"), re.M)
    # Prometheus scrape annotations point at the metrics port
    ann = block(text, "annotations")
    assert scalar(ann, "prometheus.io/scrape") == "true"
    assert scalar(ann, "prometheus.io/port") == str(cfg.metrics_port)
    assert scalar(ann, "prometheus.io/path") == "/metrics"
    # container hardening
    sc = block(block(text, "containers"), "securityContext")
    assert scalar(sc, "allowPrivilegeEscalation") == "false"


def test_k8s_headless_service_for_client_side_balancing():
    svc = read("k8s/service.yaml")
    dep = read("k8s/deployment.yaml")
    assert re.search(r"^kind: Service$", svc, re.M)
    assert scalar(block(svc, "spec"), "clusterIP") == "None"
    name = scalar(block(svc, "metadata"), "name")
    assert name == "flashserve-headless"
    selector = dict(re.findall(r"^\s+([\w./-]+): (\S+)$", block(svc, "selector"), re.M))
    labels = dict(re.findall(r"^\s+([\w./-]+): (\S+)$", block(block(dep, "template"), "labels"), re.M))
    assert selector and selector.items() <= labels.items(), (selector, labels)
    assert re.search(rf"port: {k8s_config().port}\n\s+targetPort: grpc", svc)
    readme = read("README.md")
    target = f"dns:///{name}.default.svc.cluster.local:{k8s_config().port}"
    assert target in readme and 'load_balancing="round_robin"' in readme
    import inspect

    import flashserve

    assert "load_balancing" in inspect.signature(flashserve.Client).parameters


def test_kustomization_applies_manifests_but_not_the_example_secret():
    text = read("k8s/kustomization.yaml")
    resources = re.findall(r"^\s+- ([\w.-]+\.yaml)\s*$", block(text, "resources"), re.M)
    assert sorted(resources) == ["deployment.yaml", "service.yaml"]
    assert all((K8S / r).is_file() for r in resources)


def test_every_flashserve_env_var_is_real():
    server = server_env_names()
    build = set(ENV_RE.findall((REPO / "setup.py").read_text() + (REPO / "csrc" / "build_config.py").read_text()))
    client = set(ENV_RE.findall("".join(p.read_text() for p in (REPO / "client").glob("*.py"))))
    # build variables belong to the image build (Dockerfile, compose's build args), client ones to the README
    allowed = {"Dockerfile": server | build, "compose.yaml": server | build, "README.md": server | build | client}
    seen = set()
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        rel = str(path.relative_to(DEPLOY))
        names = set(ENV_RE.findall(path.read_text()))
        seen |= names
        bad = names - allowed.get(rel, server)
        assert not bad, f"{rel}: {sorted(bad)} are not flashserve settings"
    assert "FLASHSERVE_TOKEN" in seen and "FLASHSERVE_DRAIN_S" in seen


def test_every_setting_value_parses():
    for where, env in (("compose.yaml", compose_env()), ("k8s/deployment.yaml", k8s_env()),
                       ("flashserve.env.example", env_file_env()),
                       ("Dockerfile", {k: v for k, v in docker_env().items() if k.startswith("FLASHSERVE_")})):
        assert env, where
        assert set(env) <= server_env_names(), where
        try:
            ServerConfig.from_env(env)
        except SystemExit as e:  # from_env's message for a bad value
            pytest.fail(f"{where}: {e}")
    # compose and Kubernetes run the same settings
    same = {"FLASHSERVE_PORT", "FLASHSERVE_MAX_CONCURRENT", "FLASHSERVE_MAX_REQUEST_BYTES", "FLASHSERVE_DRAIN_S"}
    assert {k: compose_env()[k] for k in same} == {k: k8s_env()[k] for k in same}


def readme_serve_args() -> list:
    """Argument lists the README passes to `flashserve serve` (directly or after the image in `docker run`)."""
    text = re.sub(r"\\\n\s*", " ", read("README.md"))
    out = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        m = re.search(r"\bflashserve serve\b(.*)", line)
        if m is None and "docker run" in line:
            m = re.search(r"(?<![\w.-])flashserve:[\w.-]+(.*)", line)
        if m:
            out.append(m.group(1).split("`")[0].split("#")[0])
    return out


def test_every_serve_flag_is_real():
    real = serve_flags()
    used = {"Dockerfile CMD": " ".join(docker_json("CMD")), "k8s args": " ".join(k8s_args())}
    for i, args in enumerate(readme_serve_args()):
        used[f"README #{i}"] = args
    assert any(FLAG_RE.search(v) for k, v in used.items() if k.startswith("README")), "README shows no serve flags"
    for where, args in used.items():
        bad = set(FLAG_RE.findall(args)) - real
        assert not bad, f"{where}: {sorted(bad)} are not `flashserve serve` flags"
    for args in (docker_json("CMD"), k8s_args()):
        effective_config(args, {})  # parses (argparse exits on a bad value)


def test_readme_metrics_exist():
    from flashserve.server import metrics

    names = set()
    for family in metrics.REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":  # prometheus_client drops _total from the family name
            names.add(family.name + "_total")
        names |= {s.name for s in family.samples}
    used = set(re.findall(r"\bflashserve_[a-z_]+\b", read("README.md")))
    assert {"flashserve_requests_total", "flashserve_request_seconds", "flashserve_stage_seconds",
            "flashserve_requests_in_flight"} <= used
    assert not used - names, f"README names metrics the server lacks: {sorted(used - names)}"


def test_yaml_parses():
    yaml = pytest.importorskip("yaml")  # not a project dependency: only this structural re-check needs it
    docs = {str(p.relative_to(DEPLOY)): list(yaml.safe_load_all(p.read_text())) for p in DEPLOY.rglob("*.yaml")}
    assert set(docs) >= {"compose.yaml", "k8s/deployment.yaml", "k8s/service.yaml", "k8s/secret.example.yaml"}
    svc = docs["compose.yaml"][0]["services"]["flashserve"]
    assert svc["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert {k: str(v) for k, v in svc["environment"].items()} == compose_env()
    dep = docs["k8s/deployment.yaml"][0]
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"] == k8s_args()
    assert {e["name"]: e["value"] for e in container["env"] if "value" in e} == k8s_env()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == k8s_config().port, probe
    assert container["readinessProbe"]["grpc"]["service"] == ""
    assert dep["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    service = docs["k8s/service.yaml"][0]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
