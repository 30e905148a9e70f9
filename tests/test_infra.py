"""The production topology in infra/ (Dockerfile, docker-compose.yml, k8s/) cannot run here
(no Docker): it is checked structurally. The YAML parses; every radrepo, prefect and dask
command it runs exists, with its options, in radrepo's CLI or the installed tools; every
environment variable it sets or reads is documented in the README; every image is pinned."""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from infra.services import BIN

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TOOLS = ("radrepo", "prefect", "dask")


def documents() -> dict[str, list]:
    files = [INFRA / "docker-compose.yml", *sorted((INFRA / "k8s").glob("*.yaml"))]
    return {str(f.relative_to(ROOT)): [d for d in yaml.safe_load_all(f.read_text()) if d]
            for f in files}


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def commands() -> list[tuple[str, list[str]]]:
    """Every command line the files run: compose ``command``, k8s ``command`` + ``args``,
    the Dockerfile's CMD."""
    found = []
    for name, docs in documents().items():
        for node in walk(docs):
            if isinstance(node, dict) and isinstance(node.get("command"), list):
                found.append((name, [str(a) for a in node["command"] + node.get("args", [])]))
    cmd = re.search(r"^CMD (\[.*\])$", (INFRA / "Dockerfile").read_text(), re.M)
    found.append(("infra/Dockerfile", yaml.safe_load(cmd.group(1))))
    return found


@cache
def help_text(tool: str, words: tuple[str, ...]) -> str:
    done = subprocess.run([str(BIN / tool), *words, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{tool} {' '.join(words)} does not exist: {done.stderr}"
    return done.stdout


def test_files_parse_and_run_something():
    docs = documents()
    assert all(docs.values()) and len(docs) >= 5
    tools = {argv[0] for _, argv in commands()}
    assert set(TOOLS) <= tools
    kinds = {d.get("kind") for name, ds in docs.items() if "k8s" in name for d in ds}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job"} <= kinds
    compose = docs["infra/docker-compose.yml"][0]["services"]
    assert {"postgres", "prefect-server", "worker", "dask-scheduler", "dask-worker",
            "minio"} <= set(compose)


@pytest.mark.parametrize("where,argv", [c for c in commands() if c[1][0] in TOOLS],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_command_exists_with_its_options(where, argv):
    tool, rest = argv[0], argv[1:]
    words = tuple(a for a in rest[:2] if re.fullmatch(r"[a-z][a-z-]*", a))
    if tool == "radrepo":
        from flows.cli import app

        names = {c.name or c.callback.__name__ for c in app.registered_commands}
        assert words[0] in names, f"{where}: radrepo has no command {words[0]}"
        words = words[:1]
    elif tool == "dask":
        words = words[:1]
    text = help_text(tool, words)
    for option in (a for a in rest if a.startswith("--")):
        assert option in text, f"{where}: {tool} {' '.join(words)} has no option {option}"


def test_every_environment_variable_is_documented():
    readme = (ROOT / "README.md").read_text()
    names = set()
    for _, docs in documents().items():
        for node in walk(docs):
            if isinstance(node, dict) and isinstance(node.get("environment"), dict):
                names |= set(node["environment"])
            if isinstance(node, dict) and isinstance(node.get("env"), list):
                names |= {e["name"] for e in node["env"]}
            if isinstance(node, dict) and "secretKeyRef" in node:
                names.add(node["secretKeyRef"]["key"])
            if isinstance(node, str):
                names |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", node))
                names |= set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", node))
    dockerfile = (INFRA / "Dockerfile").read_text()
    for line in re.findall(r"^ENV (.*(?:\\\n.*)*)", dockerfile, re.M):
        names |= set(re.findall(r"([A-Z_][A-Z0-9_]*)=", line))
    assert {"PREFECT_API_URL", "RADREPO_SECRET"} <= names
    missing = sorted(n for n in names if f"`{n}`" not in readme)
    assert not missing, f"not documented in README.md: {missing}"


def test_every_image_is_pinned():
    images = [node["image"] for _, docs in documents().items() for node in walk(docs)
              if isinstance(node, dict) and isinstance(node.get("image"), str)]
    images += re.findall(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.M)
    assert len(images) >= 5
    for image in images:
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest" and "/" not in tag, f"unpinned image {image}"
