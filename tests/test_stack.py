"""The stack: the pins srpo_nb is tested with (constraints.txt on CPUs, constraints-gpu.txt on GPUs) are what is
installed, what settings.ini admits, and — for the GPU line of the README — what pip resolves."""
import configparser
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins(name):
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            r = Requirement(line)
            out[canonicalize_name(r.name)] = str(r.specifier).removeprefix("==")
    return out


def requirements(key):
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in cfg["DEFAULT"][key].split()}


def test_installed_stack_is_the_pinned_one():
    cpu = pins("constraints.txt")
    for pkg in ("torch", "torchvision", "transformers", "trl", "datasets", "peft", "accelerate"):
        assert version(pkg).split("+")[0] == cpu[pkg], (pkg, version(pkg), cpu[pkg])


def test_settings_ranges_admit_both_stacks():
    core = requirements("requirements")
    gpu_extra = requirements("gpu_requirements")
    for name in ("constraints.txt", "constraints-gpu.txt"):
        for pkg, v in pins(name).items():
            for reqs in (core, gpu_extra):
                if pkg in reqs:
                    assert reqs[pkg].specifier.contains(v, prereleases=True), (name, pkg, v, str(reqs[pkg]))
    # the two stacks differ only in torch/torchvision and the GPU-only packages
    cpu, gpu = pins("constraints.txt"), pins("constraints-gpu.txt")
    for pkg in ("transformers", "trl", "datasets", "peft", "accelerate"):
        assert cpu[pkg] == gpu[pkg], pkg


def readme_gpu_line():
    lines = [l.strip() for l in (ROOT / "README.md").read_text().splitlines()
             if l.strip().startswith("pip install") and "constraints-gpu.txt" in l]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_readme_gpu_install_line_resolves(tmp_path):
    "pip's resolver, on the README's GPU line as written (dry run, ignoring what is installed): every pin is chosen."
    args = shlex.split(readme_gpu_line())
    assert args[:2] == ["pip", "install"]
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
           *args[2:]]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    chosen = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"].split("+")[0]
              for i in json.loads(report.read_text())["install"]}
    for pkg, v in pins("constraints-gpu.txt").items():
        assert chosen.get(pkg) == v, (pkg, chosen.get(pkg), v)
