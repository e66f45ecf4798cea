"""The notebooks as documents: kept outputs are there, clean, and still what the code prints; no dead references."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
NO_OUTPUTS_NEEDED = {"00_core", "11_cli"}             # configuration checks and argument parsing: nothing to show
REEXECUTED = ("00a_format", "00b_method", "index")    # cheap and deterministic: their kept text is compared exactly
MACHINE_PATHS = ("/work/", "/tmp/", "/home/", "/root/", "/Users/", "site-packages")
GENERATED_MD = {"report.md"}                          # files the code writes (e.g. `srpo eval`'s report), not documents


def notebooks():
    return sorted(NBS.glob("*.ipynb"))


def load(path):
    return json.loads(Path(path).read_text())


def outputs_of(nb):
    return [(i, o) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code" for o in c.get("outputs", [])]


def text_of(o):
    "The text a reader sees for one output: stream text or the plain-text repr (images and HTML skipped)."
    if o["output_type"] == "stream": return "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
    if o["output_type"] in ("execute_result", "display_data"):
        t = o.get("data", {}).get("text/plain")
        if t is not None and "image/png" not in o.get("data", {}):
            return "".join(t) if isinstance(t, list) else t
    return None


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_kept_outputs_clean(path):
    "Every notebook but the two plumbing ones keeps an output; no output is stderr or shows a machine path."
    nb = load(path)
    outs = outputs_of(nb)
    if path.stem not in NO_OUTPUTS_NEEDED:
        assert outs, f"{path.name} keeps no output: execute the example cells and keep what teaches"
    for i, o in outs:
        assert not (o["output_type"] == "stream" and o.get("name") == "stderr"), f"{path.name} cell {i}: stderr output kept"
        assert o["output_type"] != "error", f"{path.name} cell {i}: an error is kept"
        blob = json.dumps(o)
        for bad in MACHINE_PATHS:
            assert bad not in blob, f"{path.name} cell {i}: output shows a machine path ({bad})"


def test_grpo_from_scratch_has_its_plots():
    "07 keeps its pictures: the group's rewards and advantages, and the clipped surrogate against the ratio."
    nb = load(NBS / "07_grpo_from_scratch.ipynb")
    images = [i for i, o in outputs_of(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 2, images
    sources = [nb["cells"][i]["source"] for i in images]
    sources = ["".join(s) if isinstance(s, list) else s for s in sources]
    assert any("clipped_surrogate" in s for s in sources) and any("group_advantages" in s or "A8" in s for s in sources)


def _references(text, base):
    "Relative paths in `text` that start with ../ (resolved from `base`) and names of Markdown files."
    ups = [(m, (base / m).resolve()) for m in re.findall(r"(?<![\w/.])\.\./[\w./-]+", text)]
    mds = re.findall(r"(?<![\w/-])([\w-]+\.md)\b", text)
    return ups, mds


def test_no_reference_outside_the_repository():
    "A reader has only the repository: every ../ path stays inside it, and every Markdown file named exists in it."
    sources = [(p, NBS, "\n".join("".join(c["source"]) for c in load(p)["cells"])) for p in notebooks()]
    sources += [(p, p.parent, p.read_text()) for p in sorted((ROOT / "srpo_nb").glob("*.py"))]
    sources += [(ROOT / "README.md", ROOT, (ROOT / "README.md").read_text())]
    present = {p.name for p in ROOT.glob("*.md")} | GENERATED_MD
    for path, base, text in sources:
        ups, mds = _references(text, base)
        for raw, target in ups:
            assert ROOT in target.parents or target == ROOT, f"{path.name}: {raw!r} points outside the repository"
        for name in mds:
            assert name in present, f"{path.name}: names {name!r}, which is not in the repository"


@pytest.mark.parametrize("name", REEXECUTED)
def test_kept_outputs_still_produced(name, monkeypatch):
    "Re-run a notebook: each kept text output is what its cell prints today."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    path = NBS / f"{name}.ipynb"
    kept = load(path)
    monkeypatch.chdir(NBS)
    nb = read_nb(path)
    for c in nb.cells: c.outputs = []
    CaptureShell().run_all(nb, exc_stop=True)
    for i, (old, new) in enumerate(zip(kept["cells"], nb.cells)):
        if old["cell_type"] != "code" or not old.get("outputs"): continue
        want = [t for t in map(text_of, old["outputs"]) if t is not None]
        got = [t for t in map(text_of, new.outputs) if t is not None]
        assert got == want, f"{name} cell {i}: kept output differs from what the code prints now"
