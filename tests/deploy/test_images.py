"""Static checks of the container images (no Docker engine here to build them): pinned bases, a
non-root user, no secrets, exec-form entrypoints, health checks or documented probes, and a build
context (.dockerignore) that keeps credentials and tests out."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "deploy").glob("*.Dockerfile"))
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buffer = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        buffer += " " + line.rstrip("\\").strip() if buffer else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            keyword, _, rest = buffer.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            buffer = ""
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def arg_defaults(path: Path) -> dict[str, str]:
    out = {}
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            out[name] = value.strip('"')
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def test_there_are_a_worker_and_a_slim_image():
    assert {p.name for p in DOCKERFILES} >= {"worker.Dockerfile", "slim.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned(path):
    args = arg_defaults(path)
    for keyword, rest in instructions(path):
        if keyword != "FROM":
            continue
        image = substitute(rest.split()[0], args)
        assert "$" not in image, f"unresolved base {rest}"
        if "@sha256:" in image:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{image}: pin a version tag or a digest"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version (x.y.z), not a floating tag"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_runs_as_a_non_root_user(path):
    final = stages(path)[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: use a numeric non-root uid (runAsNonRoot checks it)"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_secrets_are_baked_in(path):
    for keyword, rest in instructions(path):
        if keyword in ("ENV", "ARG"):
            for name in re.findall(r"(\w+)=", rest) or [rest.split("=")[0]]:
                assert not SECRET_NAME.search(name), f"{keyword} {rest}: secrets belong in Kubernetes Secrets"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.(env|pem|key|p12)\b|id_rsa|\.netrc|kubeconfig", rest), rest
        if keyword == "ADD":
            assert "://" not in rest, "ADD of a URL: download in a RUN with a checksum instead"
        if keyword == "RUN":
            assert not re.search(r"curl[^|]*\|\s*(ba)?sh", rest), "piping a download into a shell"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_exec_form_and_health_is_checked_or_documented(path):
    final = dict((k, v) for k, v in stages(path)[-1])
    entrypoint = json.loads(final["ENTRYPOINT"])
    assert isinstance(entrypoint, list) and "pdserve" in entrypoint
    text = path.read_text()
    has_check = "HEALTHCHECK" in final and final["HEALTHCHECK"] != "NONE"
    assert has_check or re.search(r"^# Probes:", text, re.M), "add a HEALTHCHECK or document the probes"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_exist(path):
    for keyword, rest in instructions(path):
        if keyword != "COPY" or "--from=" in rest:
            continue
        sources = [s for s in rest.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert source == "." or (ROOT / source).exists(), f"COPY {source}: no such file"


def test_worker_image_has_the_gpu_stack_and_the_probe():
    text = (ROOT / "deploy" / "worker.Dockerfile").read_text()
    assert re.search(r"torch==\$\{TORCH_VERSION\}", text) and re.search(r"ARG TORCH_VERSION=\d", text)
    assert re.search(r"flash-attn==\$\{FLASH_ATTN_VERSION\}", text) and "--no-build-isolation" in text
    assert "nvcr.io/nvidia/cuda" in text
    assert "/usr/local/bin/pdserve-worker-probe" in text
    # the chart's probes run this exact command
    chart = (ROOT / "helm" / "pdserve" / "templates" / "workers.yaml").read_text()
    assert '"pdserve-worker-probe", "ready"' in chart


def test_slim_image_has_no_torch():
    text = (ROOT / "deploy" / "slim.Dockerfile").read_text()
    installs = [rest for keyword, rest in instructions(ROOT / "deploy" / "slim.Dockerfile") if keyword == "RUN"]
    assert not any(re.search(r"\btorch\b|\[(cpu|gpu)", r) and "import torch" not in r for r in installs)
    assert '! python -c "import torch"' in text


def test_dockerignore_keeps_credentials_and_clutter_out():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for pattern in (".git", "tests", "**/.env", "**/*.pem", "**/*.key", "**/__pycache__", ".venv"):
        assert pattern in lines, pattern
    assert "!README.md" in lines, "pyproject's readme must reach the build"
