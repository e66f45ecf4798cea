"""srpo_nb.data: the shipped set regenerates byte for byte, every generated gold re-derives from its drawing
parameters (and the pixels agree), and the hub loaders map each schema fixture without losing a field."""
import hashlib
import io
import json
import math
import re
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import datasets
import srpo_nb.data as D

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "problems"
KINDS = {"bar_chart": {"max", "difference", "smallest_mc", "sum", "mean"},
         "function_plot": {"value_at", "y_intercept", "x_intercept", "extremum"},
         "geometry": {"right_triangle", "missing_angle", "circle"},
         "counting": {"color", "shape", "color_shape"},
         "clock": {"read_time", "minutes_past", "minutes_until"},
         "fraction": {"fraction_mc", "percent"}}


def sha256(path): return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shipped():
    return {s: D.load_problems(SHIPPED / f"{s}.parquet") for s in ("train", "test")}


@pytest.fixture(scope="module")
def generated():
    "Problems of every difficulty, plus extra draws so that every (family, kind) occurs."
    return [p for lvl in D.DIFFICULTIES for p in D.generate_problems(90, seed=f"pytest-{lvl}", difficulty=lvl)]


# ---------------------------------------------------------------- the shipped set

def test_shipped_set_regenerates_byte_identically(tmp_path, monkeypatch, shipped):
    "An install without data/ regenerates the set into the cache folder: the same bytes as the shipped files."
    monkeypatch.setattr(D, "_repo_data_dir", lambda: tmp_path / "no-checkout")
    monkeypatch.setenv("SRPO_NB_HOME", str(tmp_path / "home"))
    assert D.content_hash(D.shipped_problems("test")) == D.content_hash(shipped["test"])
    regen = tmp_path / "home" / "problems" / f"v{D.GENERATOR_VERSION}"
    manifest, new = (json.loads((d / "manifest.json").read_text()) for d in (SHIPPED, regen))
    drift = {k: (v, new["versions"][k]) for k, v in manifest["versions"].items() if new["versions"][k] != v}
    for split in ("train", "test"):
        assert sha256(regen / f"{split}.parquet") == sha256(SHIPPED / f"{split}.parquet"), \
            f"{split}.parquet differs from the shipped file (library versions shipped vs now: {drift or 'same'})"
        assert new["splits"][split]["content_sha256"] == manifest["splits"][split]["content_sha256"]
    assert (regen / "manifest.json").read_text() == (SHIPPED / "manifest.json").read_text()


def test_shipped_set_matches_its_manifest(shipped):
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    for split, problems in shipped.items():
        entry = manifest["splits"][split]
        assert len(problems) == entry["n"] == D.SHIPPED_SET[f"n_{split}"]
        assert sha256(SHIPPED / entry["file"]) == entry["sha256"]
        assert D.content_hash(problems) == entry["content_sha256"]
        assert sum(sum(c.values()) for c in D.family_mix(problems).values()) == len(problems)
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 3_000_000
    train_ids, test_ids = {p.id for p in shipped["train"]}, {p.id for p in shipped["test"]}
    assert len(train_ids) == 200 and len(test_ids) == 100 and not train_ids & test_ids
    key = lambda p: json.dumps([p.metadata["family"], p.metadata["params"]], sort_keys=True)
    assert not {key(p) for p in shipped["train"]} & {key(p) for p in shipped["test"]}


def test_shipped_problems_reads_the_checkout(shipped):
    assert D._repo_data_dir() == SHIPPED
    assert D.content_hash(D.shipped_problems("test")) == D.content_hash(shipped["test"])
    with pytest.raises(ValueError, match="split='dev'"):
        D.shipped_problems("dev")


# ---------------------------------------------------------------- answers re-derived from the drawing parameters

def _letter(options, correct):
    assert options.count(correct) == 1, (options, correct)
    return "ABCDEFGHIJ"[options.index(correct)]


def _sqrt_value(answer):
    "k\\sqrt{m} / \\sqrt{m} / k -> (k, m)."
    m = re.fullmatch(r"(\d*)(?:\\sqrt\{(\d+)\})?", answer)
    assert m and (m.group(1) or m.group(2)), answer
    return int(m.group(1) or 1), int(m.group(2) or 1)


def derive(p):
    "The gold re-derived from metadata['params'] alone, written independently of the generator."
    fam, q = p.metadata["family"], p.metadata["params"]
    kind = q["kind"]
    if fam == "bar_chart":
        vals = dict(zip(q["labels"], q["values"]))
        assert len(set(q["values"])) == len(q["values"]) and all(v % q["step"] == 0 and 0 < v <= 10 * q["step"] for v in q["values"])
        if kind == "max": return str(max(vals.values()))
        if kind == "sum": return str(sum(vals.values()))
        if kind == "mean":
            x = Fraction(sum(vals.values()), len(vals))
            return str(x.numerator) if x.denominator == 1 else repr(float(x))
        if kind == "difference": return str(abs(vals[q["pair"][0]] - vals[q["pair"][1]]))
        if kind == "smallest_mc": return _letter(q["options"], min(vals, key=vals.get))
    if fam == "function_plot":
        f = q["func"]
        fx = (lambda x: f["a"] * x + f["b"]) if f["type"] == "linear" else (lambda x: f["a"] * (x - f["h"]) ** 2 + f["k"])
        if kind == "value_at":
            assert abs(fx(q["x0"])) < q["R"]  # the point is inside the drawn window
            return str(fx(q["x0"]))
        if kind == "y_intercept": return str(fx(0))
        if kind == "x_intercept":
            roots = [x for x in range(-q["R"], q["R"] + 1) if fx(x) == 0]
            assert len(roots) == 1
            return str(roots[0])
        if kind == "extremum":
            ys = [fx(Fraction(x, 2)) for x in range(-40, 41)]
            return str(min(ys) if f["a"] > 0 else max(ys))
    if fam == "geometry":
        if kind == "right_triangle":
            a, b = q["legs"]
            if q["unknown"] == "hyp": want = a * a + b * b
            else:
                c = math.isqrt(a * a + b * b)
                assert c * c == a * a + b * b  # the shown hypotenuse is exact
                want = c * c - b * b
            k, m = _sqrt_value(p.answer)
            assert k * k * m == want and all(m % (d * d) for d in range(2, m + 1) if d * d <= m)
            return p.answer
        if kind == "missing_angle":
            assert sum(q["angles"]) == 180 and min(q["angles"]) > 0
            return str(180 - sum(t for i, t in enumerate(q["angles"]) if i != q["unknown"]))
        if kind == "circle":
            r = q["r"]
            return f"{r * r if q['quantity'] == 'area' else 2 * r}\\pi"
    if fam == "counting":
        t = q["target"]
        return str(sum(all(it[k] == v for k, v in t.items()) for it in q["items"]))
    if fam == "clock":
        h, m = q["hour"], q["minute"]
        if kind == "read_time": return _letter(q["options"], f"{h}:{m:02d}")
        if kind == "minutes_past": return str(m)
        if kind == "minutes_until": return str(60 - m)
    if fam == "fraction":
        n, k = q["rows"] * q["cols"], len(q["shaded"])
        assert 0 < k < n and len(set(q["shaded"])) == k
        if kind == "percent":
            assert 100 * k % n == 0
            return str(100 * k // n)
        if kind == "fraction_mc":
            values = [Fraction(*map(int, o.split("/"))) for o in q["options"]]
            assert len(set(values)) == len(values)  # no two options are the same number
            return _letter(values, Fraction(k, n))
    raise AssertionError(f"no derivation for {fam}/{kind}")


def check_problem(p):
    assert derive(p) == p.answer, (p.id, p.metadata["params"], p.answer)
    q = p.metadata["params"]
    assert p.choices == q.get("options") and (p.answer_type == "choice") == (p.choices is not None)
    assert p.answer_type in ("choice", "integer", "float", "expression")
    assert 224 <= q["size"] <= 448 and (p.metadata["width"], p.metadata["height"]) == (q["size"], q["size"])
    im = Image.open(io.BytesIO(D.image_bytes(p.image)))
    im.load()  # decodes
    assert im.format == "PNG" and im.size == (q["size"], q["size"]) and p.image.size == im.size


@pytest.mark.parametrize("family", list(D.FAMILIES))
def test_every_gold_rederives_from_its_parameters(family, shipped, generated):
    problems = [p for p in shipped["train"] + shipped["test"] + generated if p.metadata["family"] == family]
    assert len(problems) >= 50
    for p in problems: check_problem(p)
    assert {p.metadata["kind"] for p in problems} == KINDS[family]  # every question kind was exercised
    assert {p.metadata["difficulty"] for p in problems} == set(D.DIFFICULTIES)


def test_images_are_redrawn_exactly_from_their_parameters(shipped):
    for p in shipped["test"]:
        drawn = D.FAMILIES[p.metadata["family"]].draw(p.metadata["params"])
        assert drawn.tobytes() == p.image.convert("RGB").tobytes(), p.id


@settings(max_examples=40, deadline=None)
@given(seed=st.one_of(st.integers(-10**6, 10**6), st.text("abc-_019", max_size=8)), index=st.integers(0, 10**5),
       family=st.sampled_from(list(D.FAMILIES)), difficulty=st.sampled_from(list(D.DIFFICULTIES) + ["mixed"]))
def test_any_seed_gives_a_valid_problem(seed, index, family, difficulty):
    p = D.make_problem(family, seed, index, difficulty)
    check_problem(p)
    assert p.id == f"synth-{seed}-{family}-{index:05d}"
    assert D.content_hash([D.make_problem(family, seed, index, difficulty)]) == D.content_hash([p])


# ---------------------------------------------------------------- the pixels agree with the parameters

def _rgb(p): return np.asarray(p.image.convert("RGB")).astype(int)


def _components(mask):
    "Number of 4-connected components of a boolean mask."
    mask, n = mask.copy(), 0
    for y, x in zip(*np.nonzero(mask)):
        if not mask[y, x]: continue
        n += 1; stack = [(y, x)]; mask[y, x] = False
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx]:
                    mask[ny, nx] = False; stack.append((ny, nx))
    return n


def _of_family(problems, family, n):
    return [p for p in problems if p.metadata["family"] == family][:n]


def test_counting_pictures_show_the_counted_shapes(shipped):
    for p in _of_family(shipped["train"], "counting", 12):
        arr, items = _rgb(p), p.metadata["params"]["items"]
        for name, rgb in D.COLORS.items():
            blobs = _components((arr == rgb).all(-1))
            assert blobs == sum(it["color"] == name for it in items), (p.id, name)


def test_fraction_pictures_shade_the_stated_share(shipped):
    for p in _of_family(shipped["train"] + shipped["test"], "fraction", 20):
        q, arr = p.metadata["params"], _rgb(p)
        shaded, white = (arr == D.COLORS[q["color"]]).all(-1), (arr == 255).all(-1)
        ys, xs = np.nonzero(~white)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        inside = np.zeros_like(white)
        if q["shape"] == "circle":
            yy, xx = np.mgrid[:arr.shape[0], :arr.shape[1]]
            cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, (x1 - x0) / 2
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else: inside[y0:y1 + 1, x0:x1 + 1] = True
        share = (shaded & inside).sum() / ((shaded | white) & inside).sum()
        assert abs(share - len(q["shaded"]) / (q["rows"] * q["cols"])) < 0.03, (p.id, share)


def test_bar_heights_are_proportional_to_the_values(shipped):
    for p in _of_family(shipped["train"], "bar_chart", 12):
        q, arr = p.metadata["params"], _rgb(p)
        mask = (arr == D.COLORS[q["color"]]).all(-1)
        cols = np.nonzero(mask.any(0))[0]
        runs = np.split(cols, np.nonzero(np.diff(cols) > 1)[0] + 1)
        assert len(runs) == len(q["values"]), p.id
        heights = np.array([mask[:, r[len(r) // 2]].sum() for r in runs], float)
        v = np.array(q["values"], float)
        slope = (heights * v).sum() / (v * v).sum()
        assert np.abs(heights - slope * v).max() <= 2.0, (p.id, heights, v)


def test_clock_hands_point_at_the_stated_time(shipped):
    for p in _of_family(shipped["train"] + shipped["test"], "clock", 20):
        q, arr = p.metadata["params"], _rgb(p)
        dark = arr.sum(-1) < 200
        ys, xs = np.nonzero(dark)
        cy, cx, R = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2, (xs.max() - xs.min()) / 2
        def dark_angles(radius):
            return [a for a in range(360) if dark[round(cy - radius * math.cos(math.radians(a))), round(cx + radius * math.sin(math.radians(a)))]]
        def near(a, b, tol): return min(abs(a - b) % 360, 360 - abs(a - b) % 360) <= tol
        minute = q["minute"] * 6
        hour = (q["hour"] % 12 + q["minute"] / 60) * 30
        ring = dark_angles(0.6 * R)  # only the minute hand reaches this far inside the numerals
        assert ring and all(near(a, minute, 5) for a in ring), (p.id, ring, minute)
        inner = dark_angles(0.35 * R)  # both hands
        assert any(near(a, hour, 2) for a in inner) and all(near(a, hour, 8) or near(a, minute, 5) for a in inner), (p.id, inner)


# ---------------------------------------------------------------- determinism and speed

def test_generation_is_deterministic_per_family_and_index():
    mixed = D.generate_problems(18, seed=42)
    assert [p.metadata["family"] for p in mixed[:6]] == list(D.FAMILIES)
    for fam in ("clock", "geometry"):
        alone = D.generate_problems(3, seed=42, families=[fam])
        assert D.content_hash(alone) == D.content_hash([p for p in mixed if p.metadata["family"] == fam])
    assert D.content_hash(D.generate_problems(6, seed=42)) == D.content_hash(mixed[:6])
    assert D.content_hash(D.generate_problems(6, seed=43)) != D.content_hash(mixed[:6])
    assert D.generate_problems(0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        D.generate_problems(-1)


def test_generating_300_problems_is_fast():
    t0 = time.perf_counter()
    problems = D.generate_problems(300, seed="speed")
    assert len(problems) == 300 and time.perf_counter() - t0 < 20


# ---------------------------------------------------------------- schema and storage

def _png(color, size=(16, 12)):
    buf = io.BytesIO(); Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_dataset_and_parquet_round_trip_keep_every_field(tmp_path):
    probs = [D.Problem("a", [D.open_image(_png("red")), D.open_image(_png("blue", (5, 7)))], "Q?", ["x", "y"], "B", "choice", "s", {"n": 1, "l": [1, "b"]}),
             D.Problem("b", [], "text only", None, "2.5", "float", "s")]
    ds = D.problems_to_dataset(probs)
    assert isinstance(ds.features["images"], datasets.List) and isinstance(ds.features["images"].feature, datasets.Image)
    for back in (D.dataset_to_problems(ds), D.load_problems(D.save_problems(probs, tmp_path / "p.parquet"))):
        for a, b in zip(probs, back):
            assert (a.id, a.question, a.choices, a.answer, a.answer_type, a.source, a.metadata) == \
                   (b.id, b.question, b.choices, b.answer, b.answer_type, b.source, b.metadata)
            assert [D.image_bytes(i) for i in a.images] == [D.image_bytes(i) for i in b.images]
    hub_style = datasets.load_dataset("parquet", data_files=str(tmp_path / "p.parquet"), split="train", cache_dir=str(tmp_path / "cache"))
    assert hub_style[0]["images"][1].size == (5, 7) and hub_style[1]["choices"] is None
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        D.load_problems(tmp_path / "nope.parquet")


def test_problem_rejects_inconsistent_records():
    im = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="names no option"): D.Problem("x", [im], "q", ["a", "b"], "D", "choice", "s")
    with pytest.raises(ValueError, match="one capital letter"): D.Problem("x", [im], "q", None, "ab", "choice", "s")
    with pytest.raises(ValueError, match="empty answer"): D.Problem("x", [im], "q", None, "", "integer", "s")
    with pytest.raises(TypeError, match="list of PIL images"): D.Problem("x", ["img.png"], "q", None, "1", "integer", "s")
    with pytest.raises(ValueError, match="non-empty str"): D.Problem("", [im], "q", None, "1", "integer", "s")
    assert D.format_question(D.Problem("x", [im], "Pick.", ["1/2", "2/3", "3/4"], "C", "choice", "s")) == "Pick.\nChoices:\n(A) 1/2\n(B) 2/3\n(C) 3/4"


# ---------------------------------------------------------------- hub loaders on schema fixtures

@pytest.fixture()
def pics(tmp_path):
    "Three real PNGs: as bytes, and as files under tmp_path/images."
    (tmp_path / "images").mkdir()
    raw = [D.image_bytes(p.image) for p in D.generate_problems(3, seed="fixture", families=["counting"])]
    for i, b in enumerate(raw): (tmp_path / "images" / f"{i}.png").write_bytes(b)
    return raw


def _pixels(b): return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
def _same(img, b): return np.array_equal(np.asarray(img.convert("RGB")), _pixels(b))


def virl_rows():
    return [{"question": "<image>How many red shapes?", "answer": "\\boxed{3}", "PassRate_32BTrained": 0.5, "PassRate_7BBase": 0.25,
             "category": "Counting", "source": "synthetic", "qid": "q0", "image": ["images/0.png"]},
            {"question": "<image><image> Which picture has more shapes?\nA. left\nB. right", "answer": "\\boxed{B}", "PassRate_32BTrained": 1.0,
             "PassRate_7BBase": -1.0, "category": "Spatial Reasoning", "source": "DVQA", "qid": "q1", "image": ["images/1.png", "images/2.png"]},
            {"question": "<image>Solve for x: $x^2=4$, x>0.", "answer": "\\boxed{\\frac{1}{2}}", "PassRate_32BTrained": 0.0, "PassRate_7BBase": 0.0,
             "category": "Math", "source": "geo", "qid": "q2", "image": ["images/2.png"]}]


def test_virl39k_fixture_maps_every_field(tmp_path, pics):
    rows = virl_rows()
    got, rep = D.load_hub_problems(datasets.Dataset.from_list(rows), schema="virl39k", image_root=tmp_path)
    assert (rep.rows_read, rep.loaded, dict(rep.skipped)) == (3, 3, {})
    for row, p in zip(rows, got):
        assert p.id == row["qid"] and p.source == "TIGER-Lab/ViRL39K"
        assert p.question == row["question"].replace("<image>", "").strip()
        assert "\\boxed{" + p.answer + "}" == row["answer"] == p.metadata["raw_answer"]
        assert p.metadata["image_paths"] == row["image"]
        for k in ("category", "source", "PassRate_32BTrained", "PassRate_7BBase"): assert p.metadata[k] == row[k]
        assert all(_same(im, pics[int(Path(path).stem)]) for im, path in zip(p.images, row["image"]))
    assert [p.answer_type for p in got] == ["integer", "choice", "expression"]


def test_virl39k_bad_rows_raise_with_the_row_id_or_are_counted(tmp_path, pics):
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = virl_rows()
    rows[0] = {**rows[0], "image": ["images/missing.png"]}
    rows[1] = {**rows[1], "answer": "\\boxed{ }"}
    rows[2] = {**rows[2], "image": ["images/bad.png"]}
    rows.append({**virl_rows()[0], "qid": "q3", "question": "How many?", "image": []})  # text-only
    rows.append({**virl_rows()[0], "qid": "q4", "image": ["images/0.png", "images/1.png"]})  # 1 placeholder, 2 images
    ds = datasets.Dataset.from_list(rows + virl_rows()[:1])  # row 5 is good
    for i, (rid, what) in enumerate([("q0", "image file not found"), ("q1", "answer is empty"), ("q2", "undecodable image bytes"),
                                     ("q3", "no image"), ("q4", "1 <image> placeholders but 2 images")]):
        with pytest.raises(ValueError, match=re.escape(f"row 1 (id '{rid}'): ") + ".*" + re.escape(what)):
            D.load_hub_problems(ds.select([5, i]), schema="virl39k", image_root=tmp_path)
    got, rep = D.load_hub_problems(ds, schema="virl39k", image_root=tmp_path, on_error="skip")
    assert [p.id for p in got] == ["q0"] and rep.rows_read == 6
    assert dict(rep.skipped) == {"missing image": 2, "empty answer": 1, "undecodable image": 1, "image count mismatch": 1}
    assert rep.skipped_ids["missing image"] == ["q0", "q3"] and "skipped" in str(rep)
    kept, _ = D.load_hub_problems(ds.select([3]), schema="virl39k", image_root=tmp_path, require_image=False)
    assert kept[0].images == [] and kept[0].answer == "3"
    with pytest.raises(ValueError, match="is relative; pass image_root="):
        D.load_hub_problems(ds, schema="virl39k", on_error="skip")  # a setup error is never skipped


def test_mmk12_fixture_maps_every_field(pics):
    rows = [{"id": "u-1", "subject": "physics", "question": "A ball is thrown. Its speed is\nA. $$10.5$$\nB. 12 m/s\nC. 14 m/s\nD. 16 m/s", "answer": "A", "image": Image.open(io.BytesIO(pics[0]))},
            {"id": "u-2", "subject": "math", "question": "Find the angle ABC.", "answer": "$$35^{\\circ}$$", "image": Image.open(io.BytesIO(pics[1]))},
            {"id": "u-3", "subject": "math", "question": "Simplify.", "answer": "3/4", "image": Image.open(io.BytesIO(pics[2]))}]
    ds = datasets.Dataset.from_list(rows)
    assert isinstance(ds.features["image"], datasets.Image)
    got, _ = D.load_hub_problems(ds, schema="mmk12", split="test")
    a, b, c = got
    assert (a.id, a.question, a.choices, a.answer, a.answer_type, a.gold_text) == ("u-1", "A ball is thrown. Its speed is", ["$$10.5$$", "12 m/s", "14 m/s", "16 m/s"], "A", "choice", "$$10.5$$")
    assert D.format_question(a) == "A ball is thrown. Its speed is\nChoices:\n(A) $$10.5$$\n(B) 12 m/s\n(C) 14 m/s\n(D) 16 m/s"
    assert (b.answer, b.answer_type, b.metadata) == ("35^{\\circ}", "expression", {"subject": "math", "raw_answer": "$$35^{\\circ}$$"})
    assert (c.answer, c.choices, c.metadata) == ("3/4", None, {"subject": "math"})
    assert all(_same(p.image, raw) for p, raw in zip(got, pics)) and {p.source for p in got} == {"FanqingM/MMK12"}


def test_mmk12_skip_counts_every_reason(pics):
    S = datasets.Value("string")
    feats = datasets.Features({"id": S, "subject": S, "question": S, "answer": S, "image": datasets.Image()})
    ds = datasets.Dataset.from_list([
        {"id": "m0", "subject": "math", "question": "q", "answer": "1", "image": None},
        {"id": "m1", "subject": "math", "question": "q", "answer": " ", "image": {"bytes": pics[0], "path": None}},
        {"id": "m2", "subject": "math", "question": "q", "answer": "2", "image": {"bytes": b"garbage", "path": None}},
        {"id": "m3", "subject": "math", "question": "", "answer": "2", "image": {"bytes": pics[0], "path": None}},
        {"id": "m4", "subject": "math", "question": "q", "answer": "4", "image": {"bytes": pics[1], "path": None}}], features=feats)
    for i, (rid, what) in enumerate([("m0", "no image"), ("m1", "answer is empty"), ("m2", "undecodable image bytes"), ("m3", "question is empty")]):
        with pytest.raises(ValueError, match=re.escape(f"FanqingM/MMK12 [train] row 1 (id '{rid}'): ") + ".*" + re.escape(what)):
            D.load_hub_problems(ds.select([4, i]), schema="mmk12")  # the good row first, so the bad one is row 1
    got, rep = D.load_hub_problems(ds, schema="mmk12", on_error="skip")
    assert [p.id for p in got] == ["m4"] and rep.rows_read == 5 and rep.loaded == 1
    assert dict(rep.skipped) == {"missing image": 1, "empty answer": 1, "undecodable image": 1, "empty question": 1}


def test_geometry3k_fixture_both_revisions(pics):
    img = lambda i: Image.open(io.BytesIO(pics[i]))
    old = datasets.Dataset.from_list([{"images": [img(0)], "problem": "<image>Find x.", "answer": "3"},
                                      {"images": [img(1)], "problem": "<image>Find y.", "answer": "2 \\sqrt { 221 }"}])
    new = datasets.Dataset.from_list([{"images": [img(2)], "problem": "<image>Find the area.", "answer": "12 \\pi", "id": 7,
                                       "choices": ["6 \\pi", "12 \\pi", "18 \\pi", "24 \\pi"], "ground_truth": "B"}])
    (a, b), _ = D.load_hub_problems(old, schema="geometry3k", split="validation")
    assert (a.id, a.question, a.answer, a.answer_type, a.metadata) == ("validation-0", "Find x.", "3", "integer", {})
    assert (b.id, b.answer, b.answer_type) == ("validation-1", "2 \\sqrt { 221 }", "expression")
    (c,), _ = D.load_hub_problems(new, schema="geometry3k")
    assert (c.id, c.question, c.answer, c.choices) == ("7", "Find the area.", "12 \\pi", None)
    assert c.metadata == {"choices": ["6 \\pi", "12 \\pi", "18 \\pi", "24 \\pi"], "ground_truth": "B"}
    assert _same(a.image, pics[0]) and _same(c.image, pics[2]) and c.source == "hiyouga/geometry3k"
    S = datasets.Value("string")
    bad = datasets.Dataset.from_list([{"images": [], "problem": "<image>Find x.", "answer": "3"},
                                      {"images": [{"bytes": b"nope", "path": None}], "problem": "<image>Find x.", "answer": "3"},
                                      {"images": [{"bytes": pics[0], "path": None}], "problem": "<image>Find x.", "answer": ""}],
                                     features=datasets.Features({"images": datasets.List(datasets.Image()), "problem": S, "answer": S}))
    got, rep = D.load_hub_problems(bad, schema="geometry3k", on_error="skip")
    assert got == [] and dict(rep.skipped) == {"missing image": 1, "undecodable image": 1, "empty answer": 1}
    assert rep.skipped_ids == {"missing image": ["train-0"], "undecodable image": ["train-1"], "empty answer": ["train-2"]}


def test_llava_cot_and_mulberry_fixtures(tmp_path, pics):
    gpt = "<SUMMARY> I will read the chart. </SUMMARY>\n\n<CAPTION> A bar chart. </CAPTION>\n\n<REASONING> 2017 shows 21. </REASONING>\n\n<CONCLUSION> 21 </CONCLUSION>"
    llava = datasets.Dataset.from_list([
        {"id": "chartqa_1", "image": "images/0.png", "conversations": [{"from": "human", "value": "<image>\nHow many were killed?"}, {"from": "gpt", "value": gpt}]},
        {"id": "chartqa_2", "image": "images/1.png", "conversations": [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "It is 5."}]}])
    got, rep = D.load_hub_problems(llava, schema="llava_cot", image_root=tmp_path, on_error="skip")
    (p,) = got
    assert (p.id, p.question, p.answer, p.answer_type, p.source) == ("chartqa_1", "How many were killed?", "21", "integer", "Xkev/LLaVA-CoT-100k")
    assert p.metadata == {"image_paths": ["images/0.png"], "response": gpt, "n_turns": 2} and _same(p.image, pics[0])
    assert dict(rep.skipped) == {"no final answer": 1}
    reply = "### Image Description: three shapes.\n### Rationale: count.\n### Step 1: count them.\n### The final answer is: 3."
    mul = datasets.Dataset.from_list([{"images": ["images/2.png"], "messages": [{"role": "user", "content": "<image>How many shapes?"}, {"role": "assistant", "content": reply}]}])
    (m,), _ = D.load_hub_problems(mul, schema="mulberry", image_root=tmp_path)
    assert (m.id, m.question, m.answer, m.metadata["response"], m.source) == ("train-0", "How many shapes?", "3", reply, "HuanjinYao/Mulberry-SFT")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['messages'\].*UNVERIFIED"):
        D.load_hub_problems(mul.rename_column("messages", "conversations"), schema="mulberry", image_root=tmp_path)


def test_schema_mismatch_names_the_missing_column(pics):
    ds = datasets.Dataset.from_list([{"qid": "q", "question": "x", "answer": "\\boxed{1}", "images": ["a.png"]}])
    with pytest.raises(ValueError, match=r"TIGER-Lab/ViRL39K: missing column\(s\) \['image'\]; found \['answer', 'images', 'qid', 'question'\]"):
        D.load_hub_problems(ds, schema="virl39k")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['problem'\]"):  # also without declared features (streamed json)
        D.load_hub_problems(iter([{"images": [], "question": "x", "answer": "1"}]), schema="geometry3k")
    with pytest.raises(ValueError, match="pass schema="):
        D.load_hub_problems(ds)
    with pytest.raises(ValueError, match="schema='virl' is not one of"):
        D.load_hub_problems(ds, schema="virl")


def test_streaming_and_limit(tmp_path, pics):
    ds = datasets.Dataset.from_list(virl_rows() * 4)
    it = ds.to_iterable_dataset()
    got, rep = D.load_hub_problems(it, schema="virl39k", image_root=tmp_path, limit=5)
    assert [p.id for p in got] == ["q0", "q1", "q2", "q0", "q1"] and rep.rows_read == 5
    got, rep = D.load_hub_problems(ds, schema="virl39k", image_root=tmp_path, limit=2)
    assert len(got) == 2 and rep.rows_read == 2
    def rows():  # a stream whose features are unknown, as `load_dataset("json", streaming=True)` gives
        yield {"images": [{"bytes": pics[0], "path": None}], "problem": "<image>Find x.", "answer": "3"}
        yield {"images": [{"bytes": pics[1], "path": None}], "problem": "<image>Find y.", "answer": ""}
    unknown = datasets.IterableDataset.from_generator(rows)
    assert unknown.features is None
    got, rep = D.load_hub_problems(unknown, schema="geometry3k", on_error="skip")
    assert [p.answer for p in got] == ["3"] and _same(got[0].image, pics[0]) and dict(rep.skipped) == {"empty answer": 1}
    assert D.load_hub_problems(ds, schema="virl39k", limit=0)[0] == []
    with pytest.raises(ValueError, match="limit must be >= 0"):
        D.load_hub_problems(ds, schema="virl39k", limit=-1)


def test_hub_ids_dispatch_to_load_dataset(monkeypatch, tmp_path, pics):
    calls = []
    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        ds = datasets.Dataset.from_list(virl_rows())
        return ds.to_iterable_dataset() if kwargs.get("streaming") else ds
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got, rep = D.load_hub_problems("TIGER-Lab/ViRL39K", image_root=tmp_path, streaming=True, limit=1)
    assert [p.id for p in got] == ["q0"] and rep.dataset == "TIGER-Lab/ViRL39K" and rep.rows_read == 1
    assert calls[-1] == (("parquet",), {"split": "train", "streaming": True,
                                        "data_files": {"train": "hf://datasets/TIGER-Lab/ViRL39K/39Krelease.parquet"}})
    D.load_hub_problems("TIGER-Lab/ViRL39K", image_root=tmp_path, data_files={"train": "/local/39Krelease.parquet"})
    assert calls[-1][1]["data_files"] == {"train": "/local/39Krelease.parquet"}  # a local copy overrides the hub file
    got, _ = D.load_hub_problems("me/virl-copy", schema="virl39k", image_root=tmp_path, split="train")
    assert calls[-1] == (("me/virl-copy",), {"split": "train", "streaming": False}) and {p.source for p in got} == {"me/virl-copy"}
    for hub_id, args in (("FanqingM/MMK12", ("FanqingM/MMK12",)), ("hiyouga/geometry3k", ("hiyouga/geometry3k",))):
        with pytest.raises(ValueError, match="missing column"):  # the fake returns ViRL39K columns
            D.load_hub_problems(hub_id, split="test")
        assert calls[-1] == (args, {"split": "test", "streaming": False})
    with pytest.raises(NotImplementedError, match="schema='geometry3k'"):
        D.load_hub_problems("Zhiqiang007/MathV360K")
    with pytest.raises(ValueError, match="no loader for 'AI4Math/MathVista'"):
        D.load_hub_problems("AI4Math/MathVista")
    with pytest.raises(ValueError, match="on_error='ignore' is not one of"):
        D.load_hub_problems("TIGER-Lab/ViRL39K", on_error="ignore")


# ---------------------------------------------------------------- SRPO's answer filter

def test_filter_keeps_letters_and_numbers_and_reports_drops():
    mk = lambda i, ans, typ, ch=None: D.Problem(f"p{i}", [], "q", ch, ans, typ, "s")
    probs = [mk(0, "B", "choice", ["a", "b", "c", "d"]), mk(1, "12", "integer"), mk(2, "-0.5", "float"), mk(3, "16\\pi", "expression"),
             mk(4, "E", "choice", list("abcde")), mk(5, "yes", "text"), mk(6, "$$0.6$$", "float"), mk(7, "2\\sqrt{13}", "expression")]
    kept, rep = D.filter_answerable(probs)
    assert [p.id for p in kept] == ["p0", "p1", "p2", "p6"]
    assert (rep.total, rep.kept) == (8, 4)
    assert dict(rep.dropped) == {"answer is expression": 2, "letter outside ABCD": 1, "answer is text": 1}
    assert rep.dropped_ids["answer is expression"] == ["p3", "p7"]
    kept, rep = D.filter_answerable(probs, allow=("letter", "number", "expression"), letters="ABCDE")
    assert [p.id for p in kept] == ["p0", "p1", "p2", "p3", "p4", "p6", "p7"] and dict(rep.dropped) == {"answer is text": 1}
    with pytest.raises(ValueError, match="allow='numbers' is not one of"):
        D.filter_answerable(probs, allow=("numbers",))


def test_filter_on_the_shipped_set_drops_only_expressions(shipped):
    kept, rep = D.filter_answerable(shipped["train"])
    n_expr = sum(p.answer_type == "expression" for p in shipped["train"])
    assert 0 < n_expr < 200 and rep.kept == 200 - n_expr and dict(rep.dropped) == {"answer is expression": n_expr}
