"""The container image and the KubeRay manifest, checked by parsing: no docker, no kubectl, no cluster.

`docker/Dockerfile` builds `clinft-ray:<pyproject version>` on Ray's GPU image for the Ray the tests run;
`docker/kuberay-rayjob.yaml` runs a study from it as a RayJob next to an MLflow server behind
authentication, with the study's outputs on a volume every Ray node mounts at the same path.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import ray
import yaml

from clinft_ray.cli import make_parser
from clinft_ray.config import StudyConfig
from clinft_ray.spaces import load_space

from helpers import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"
MANIFEST = REPO / "docker" / "kuberay-rayjob.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = f"clinft-ray:{PYPROJECT['project']['version']}"
# rayproject/ray:<x.y.z>-py<3NN>-cu<NNN>: an exact Ray release, Python and CUDA; no "latest", no "-gpu" alias.
BASE_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<cuda>cu\d+)$")
EXPECTED_KINDS = {"RayJob", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "Secret"}


# --- Dockerfile parsing -------------------------------------------------------------------------------

def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continued lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def build_args(instrs: list[tuple[str, str]]) -> dict[str, str]:
    """Each ARG's default (a re-declaration without a default keeps the earlier one)."""
    args = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default.strip().strip('"')
    return args


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), value)


@pytest.fixture(scope="module")
def dockerfile() -> dict:
    instrs = instructions(DOCKERFILE.read_text())
    args = build_args(instrs)
    froms = [expand(rest, args) for word, rest in instrs if word == "FROM"]
    workdirs = [rest for word, rest in instrs if word == "WORKDIR"]
    return {"instrs": instrs, "args": args, "from": froms, "workdir": workdirs[-1] if workdirs else None}


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def test_base_image_is_a_pinned_ray_gpu_image_of_the_tested_ray(dockerfile):
    assert len(dockerfile["from"]) == 1, f"one build stage expected, got FROM {dockerfile['from']}"
    tag = BASE_TAG.match(dockerfile["from"][0])
    assert tag, f"FROM {dockerfile['from'][0]!r} is not rayproject/ray:<x.y.z>-py3NN-cuNNN"
    assert _major_minor(tag["ray"]) == _major_minor(ray.__version__), (
        f"the image's Ray is {tag['ray']} but the tests run Ray {ray.__version__}; set RAY_VERSION to it")
    assert _major_minor(tag["ray"]) >= (2, 52), "token authentication (RAY_AUTH_MODE=token) needs Ray >= 2.52"
    needs = re.match(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert int(tag["py"][1:]) >= int(needs[1]), f"py{tag['py']} is older than requires-python"


def test_torch_and_mlflow_are_pinned_to_the_tested_versions_and_the_base_cuda(dockerfile):
    args = dockerfile["args"]
    cuda = BASE_TAG.match(dockerfile["from"][0])["cuda"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", args.get("TORCH_VERSION", "")), "TORCH_VERSION must be an exact version"
    assert PurePosixPath(urlparse(args["TORCH_INDEX_URL"]).path).name == cuda, (
        f"torch wheels from {args['TORCH_INDEX_URL']} but the base image is {cuda}")
    assert _major_minor(args["TORCH_VERSION"]) == _major_minor(importlib.metadata.version("torch"))
    assert _major_minor(args["MLFLOW_VERSION"]) == _major_minor(importlib.metadata.version("mlflow"))
    runs = " ".join(rest for word, rest in dockerfile["instrs"] if word == "RUN")
    assert '"torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"' in runs


def test_every_copy_source_exists_and_is_not_dockerignored(dockerfile):
    ignored = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
               if p.strip() and not p.startswith("#")]
    copies = [shlex.split(rest) for word, rest in dockerfile["instrs"] if word in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    for parts in copies:
        sources = [p for p in parts if not p.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repository"
            rel = src.rstrip("/")
            assert not any(fnmatch.fnmatch(rel, pat) for pat in ignored), f"COPY {src} is excluded by .dockerignore"


def test_image_installs_the_package_as_the_non_root_ray_user_and_smoke_tests_the_cli(dockerfile):
    instrs = dockerfile["instrs"]
    users = [rest for word, rest in instrs if word == "USER"]
    assert users and users[-1] == "ray", f"the image must end as the non-root `ray` user, not {users}"
    first_run = next(i for i, (word, _) in enumerate(instrs) if word == "RUN")
    assert any(word == "USER" for word, _ in instrs[:first_run]), "every RUN must come after USER ray"
    runs = [rest for word, rest in instrs if word == "RUN"]
    assert any("pip install" in r and '".[gpu]"' in r for r in runs), "the package (with [gpu]) is not installed"
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    assert any("clinft --help" in r for r in runs), "no build-time `clinft --help` smoke test"
    assert "mlflow[auth]" in " ".join(runs), "MLflow's basic-auth app needs the mlflow[auth] extra"


def test_dockerignore_keeps_out_git_outputs_caches_and_venvs():
    patterns = set((REPO / ".dockerignore").read_text().split())
    for needed in (".git", "**/__pycache__", ".pytest_cache", ".venv", "clinft-demo", "mlruns", "*.db", ".env"):
        assert needed in patterns, f".dockerignore lacks {needed}"


# --- Manifest parsing ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ray_pods(docs: list[dict]) -> dict[str, dict]:
    """Pod specs of the RayJob's head and of each worker group, by name."""
    spec = one(docs, "RayJob")["spec"]["rayClusterSpec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods |= {f"worker group {g['groupName']}": g["template"]["spec"] for g in spec["workerGroupSpecs"]}
    return pods


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def mounts_of(pod: dict) -> dict[str, tuple[str, dict]]:
    """mountPath -> (volume name, volume source) for the pod's first (Ray) container."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (m["name"], volumes[m["name"]]) for m in pod["containers"][0].get("volumeMounts", [])}


def shared_mount(docs: list[dict]) -> str:
    """The path where one ReadWriteMany claim is mounted on the head and on every worker group."""
    per_pod = [{path: vol.get("persistentVolumeClaim", {}).get("claimName") for path, (_, vol) in
                mounts_of(pod).items()} for pod in ray_pods(docs).values()]
    common = {(p, c) for p, c in per_pod[0].items() if c} & set.intersection(*(set(m.items()) for m in per_pod))
    rwx = [(p, c) for p, c in common
           if "ReadWriteMany" in one(docs, "PersistentVolumeClaim", c)["spec"]["accessModes"]]
    assert len(rwx) == 1, f"expected one ReadWriteMany claim mounted at the same path on all Ray pods, got {rwx}"
    return rwx[0][0]


def entrypoint(docs: list[dict]) -> list[str]:
    return shlex.split(one(docs, "RayJob")["spec"]["entrypoint"])


def study_config(docs: list[dict]) -> tuple[str, str]:
    """(the path the entrypoint reads the study from, the study YAML text in the ConfigMap mounted there)."""
    args = make_parser().parse_args(["run", *entrypoint(docs)[2:]])
    head = ray_pods(docs)["head"]
    for path, (_, vol) in mounts_of(head).items():
        if "configMap" in vol and args.config.startswith(path.rstrip("/") + "/"):
            key = args.config[len(path.rstrip("/")) + 1:]
            return args.config, one(docs, "ConfigMap", vol["configMap"]["name"])["data"][key]
    raise AssertionError(f"the entrypoint's config {args.config} is not in a ConfigMap mounted on the head")


def in_image(path: str, dockerfile: dict) -> Path:
    """A path under the image's WORKDIR, as the file in this repository it was copied from."""
    workdir = dockerfile["workdir"].rstrip("/") + "/"
    assert path.startswith(workdir), f"{path} is not under the image's WORKDIR {workdir}"
    return REPO / path[len(workdir):]


def test_manifest_parses_and_has_every_kind(docs):
    assert EXPECTED_KINDS <= {d["kind"] for d in docs}, f"missing {EXPECTED_KINDS - {d['kind'] for d in docs}}"
    assert one(docs, "RayJob")["apiVersion"] == "ray.io/v1"


def test_rayjob_entrypoint_runs_the_repos_job_script_with_clinft_run_arguments(docs, dockerfile):
    """Fails until jobs/study.py exists: the RayJob would fail the same way."""
    words = entrypoint(docs)
    assert words[0] == "python", f"entrypoint {words}"
    script = in_image(words[1], dockerfile)
    assert script.is_file(), f"the RayJob runs {words[1]} but the repository has no {script.relative_to(REPO)}"
    args = make_parser().parse_args(["run", *words[2:]])
    assert args.out and args.out.startswith(shared_mount(docs) + "/"), f"--out {args.out} is not on the shared volume"


def test_every_image_is_the_dockerfiles_tag_and_ray_version_matches(docs, dockerfile):
    images = [c["image"] for pod in ray_pods(docs).values() for c in pod["containers"]]
    images += [c["image"] for c in one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]]
    assert images and set(images) == {IMAGE}, f"images {sorted(set(images))}, expected {IMAGE} everywhere"
    assert f"-t {IMAGE} " in DOCKERFILE.read_text(), f"the Dockerfile's build line does not tag {IMAGE}"
    ray_version = one(docs, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"]
    assert ray_version == BASE_TAG.match(dockerfile["from"][0])["ray"]


def test_head_and_workers_use_token_auth_from_a_secret(docs):
    cluster = one(docs, "RayJob")["spec"]["rayClusterSpec"]
    secret = cluster["authOptions"]["secretName"]
    assert cluster["authOptions"]["mode"] == "token"
    assert "auth_token" in one(docs, "Secret", secret)["stringData"]
    for name, pod in ray_pods(docs).items():
        env = env_of(pod["containers"][0])
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{name}: RAY_AUTH_MODE is not token"
        ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
        assert (ref.get("name"), ref.get("key")) == (secret, "auth_token"), f"{name}: RAY_AUTH_TOKEN not from {secret}"


def test_nothing_is_exposed_outside_the_cluster(docs):
    head = one(docs, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP", "the Ray dashboard must not be exposed"
    assert not head.get("enableIngress", False)
    assert not [d for d in docs if d["kind"] in ("Ingress", "Route", "HTTPRoute", "Gateway")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert svc["spec"]["type"] == "ClusterIP", f"Service {svc['metadata']['name']} is {svc['spec']['type']}"


def test_worker_groups_request_gpus(docs):
    for name, pod in ray_pods(docs).items():
        if name == "head":
            continue
        resources = pod["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, f"{name} asks for no GPU"
        if "nvidia.com/gpu" in resources.get("requests", {}):
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]


def test_shared_volume_is_rwx_and_mounted_at_the_same_path_on_head_and_workers(docs):
    path = shared_mount(docs)
    assert path.startswith("/") and path != "/"
    assert len(ray_pods(docs)) >= 2, "a head and at least one worker group"


def test_study_configmap_validates_and_keeps_everything_on_the_shared_volume(docs, dockerfile):
    config_path, text = study_config(docs)
    assert text.startswith("#"), "a shipped config starts with a comment showing the command that uses it"
    cfg = StudyConfig.model_validate(yaml.safe_load(text))  # the schema; the data lives on the cluster
    shared = shared_mount(docs) + "/"
    assert str(cfg.output_dir).startswith(shared), f"output_dir {cfg.output_dir} is not on the shared volume"
    assert cfg.storage_path is None or cfg.storage_path.startswith(shared) or "://" in cfg.storage_path
    for task in cfg.tasks:
        for split in ("train", "eval", "dev", "test"):
            assert str(getattr(task.splits, split)).startswith(shared), f"{task.name}.{split} is off the volume"
    for stage in ("sft", "dpo"):
        space = in_image(str(getattr(cfg, stage).space), dockerfile)
        assert load_space(space, stage).num_trials() >= 1
    assert config_path.endswith(".yaml")


def test_mlflow_is_a_cluster_ip_service_behind_basic_auth_and_the_study_logs_to_it(docs):
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items(), "the Service selects no MLflow pod"
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    assert "basic-auth" in {e.name for e in importlib.metadata.entry_points(group="mlflow.app")}
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--artifacts-destination" in command
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    _, text = study_config(docs)
    assert yaml.safe_load(text)["mlflow"]["tracking_uri"] == uri
    for name, pod in ray_pods(docs).items():
        env = env_of(pod["containers"][0])
        assert env["MLFLOW_TRACKING_URI"]["value"] == uri, f"{name}: MLFLOW_TRACKING_URI is not {uri}"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= env.keys(), f"{name}: no MLflow login"


def test_referenced_secrets_exist_and_placeholders_hold_no_secret(docs):
    """Every required secretKeyRef names a Secret of the manifest with that key; those Secrets are
    placeholders (labelled, skipped by the apply selector) whose secret values are empty, so a cluster
    applied with them by mistake refuses to start instead of running with a published password."""
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    pods = list(ray_pods(docs).values()) + [one(docs, "Deployment")["spec"]["template"]["spec"]]
    refs = [e["valueFrom"]["secretKeyRef"] for pod in pods for c in pod["containers"] for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})]
    assert refs
    for ref in refs:
        if ref.get("optional"):
            continue
        assert ref["name"] in secrets, f"Secret {ref['name']} is referenced but not in the manifest"
        assert ref["key"] in secrets[ref["name"]]["stringData"], f"Secret {ref['name']} has no key {ref['key']}"
    for name, secret in secrets.items():
        assert secret["metadata"]["labels"].get("clinft.io/placeholder") == "true", f"{name} is not a placeholder"
        values = {k: v for k, v in secret["stringData"].items() if not k.endswith("username")}
        assert all(v == "" for v in values.values()), f"Secret {name} holds a value; create it with kubectl"
