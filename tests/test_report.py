"""`evtrace report` and `evtrace render`: markdown to paste, an SVG that real renderers draw."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import evtrace
from evtrace.export.render import render
from evtrace.export.report import report

from .simdevice import FakeClock, SimBackend

GOLDEN = Path(__file__).parent / "golden" / "report.md"


def pipeline_trace(path: Path) -> evtrace.Session:
    """The seed article's pipeline on the simulated device: model1 queues work, the host does a
    CPU task meanwhile (in one mode) or after waiting (in the other)."""
    clk = FakeClock(seed=3)
    sim = SimBackend(clk)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        for mode in ("sync", "events"):
            for _ in range(4):
                with evtrace.region(f"step ({mode})"):
                    with evtrace.region("model1"):
                        sim.launch(3_000_000)
                        if mode == "sync":
                            with evtrace.region("wait synchronize job.py:12", host_only=True):
                                sim.synchronize(0)
                    with evtrace.region("cpu_task", host_only=True):
                        clk.advance(2_000_000)
                    with evtrace.region("model2"):
                        sim.launch(500_000)
    assert r.session is not None
    return r.session


def normalised(md: str) -> str:
    md = re.sub(r"\| (python|torch|CUDA|driver) \| [^|]* \|", r"| \1 | * |", md)
    md = re.sub(r"\| command \| [^|]* \|", "| command | * |", md)
    md = re.sub(r"host id `[0-9a-f]+`", "host id `*`", md)
    md = re.sub(r"the versions of [^,]*(, [^,]*)*?, the command", "the versions of *, the command", md)
    md = re.sub(r"the command line as stored \(`[^`]*`\)", "the command line as stored (`*`)", md)
    return re.sub(r"\(`t.json`, \d+ KiB\)", "(`t.json`, * KiB)", md)


def test_report_structure_golden(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Regenerate deliberately with EVTRACE_ACCEPT=1 pytest tests/test_report.py."""
    import os

    s = pipeline_trace(tmp_path / "t.json")
    md = normalised(report(s, tmp_path / "t.json"))
    if os.environ.get("EVTRACE_ACCEPT"):
        GOLDEN.write_text(md, encoding="utf-8")
    assert md == GOLDEN.read_text(encoding="utf-8")
    lines = md.splitlines()
    assert len(lines) <= 40  # one screen
    assert "**Host waits on the device:** 4 waits," in md
    assert "host in `cpu_task`" in md  # the idle GPU is explained by the host's CPU task


def test_report_from_a_saved_trace_via_the_cli(tmp_path: Path) -> None:
    pipeline_trace(tmp_path / "t.json")
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "report", "t.json", "-o", "r.md"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("### evtrace report: `t.json`") and "opens offline in https://ui.perfetto.dev" in md
    assert str(Path.home()) not in md or str(Path.home()) == "/"


def test_svg_is_well_formed_small_and_labelled(tmp_path: Path) -> None:
    s = pipeline_trace(tmp_path / "t.json")
    svg = render(s)
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and len(svg) < 300_000
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "host · MainThread" in texts and "GPU 0 · stream 0 (default)" in texts
    assert any(t and t.endswith("ms") for t in texts)  # labelled ticks
    assert any(t == "model1" for t in texts)
    assert list(root.iter("{http://www.w3.org/2000/svg}line"))  # launch arrows and ticks
    only_gpu = ET.fromstring(render(s, lanes="GPU"))
    assert "host · MainThread" not in [t.text for t in only_gpu.iter("{http://www.w3.org/2000/svg}text")]


def test_svg_renders_with_a_real_renderer(tmp_path: Path) -> None:
    rsvg = shutil.which("rsvg-convert")
    if rsvg is None:
        pytest.skip("rsvg-convert is not installed (.ci/run installs librsvg2-bin)")
    from PIL import Image

    s = pipeline_trace(tmp_path / "t.json")
    (tmp_path / "t.svg").write_text(render(s))
    subprocess.run([rsvg, str(tmp_path / "t.svg"), "-o", str(tmp_path / "t.png")], check=True, timeout=60)
    img = Image.open(tmp_path / "t.png").convert("RGB")
    w, h = img.size
    assert w == 1200
    # inside each lane's plot area there are coloured (not white or grey) pixels where slices are
    for y in range(30, h - 30, 22):
        pixels = [img.getpixel((x, y + 10)) for x in range(200, w - 10, 4)]
        row = [px for px in pixels if isinstance(px, tuple)]
        assert len(row) == len(pixels)  # RGB: every pixel is an (r, g, b) tuple
        coloured = sum(1 for r, g, b in row if max(r, g, b) - min(r, g, b) > 40)
        assert coloured > 10, f"lane at y={y} is blank"


def test_cli_render_window_and_report_flag(tmp_path: Path) -> None:
    pipeline_trace(tmp_path / "t.json")
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "render", "t.json", "-o", "w.svg", "--window", "0:5ms"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0, p.stderr
    assert "window 0 ms – 5 ms since the start" in (tmp_path / "w.svg").read_text()
    assert (
        p.stderr.startswith("evtrace: wrote w.svg (") and len(p.stderr.splitlines()) == 1
    )  # says what it wrote
    bad = subprocess.run(
        [sys.executable, "-m", "evtrace", "render", "t.json", "-o", "w.svg", "--window", "5:1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "ends before it starts" in bad.stderr
    (tmp_path / "job.py").write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        [sys.executable, "-m", "evtrace", "--report", "-o", "job.json.gz", "job.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "job.md").exists() and (tmp_path / "job.svg").exists()


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evtrace", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(p: subprocess.CompletedProcess[str], says: str) -> None:
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr and "Traceback" not in p.stderr, (
        p.stderr
    )


@pytest.mark.parametrize("command, out", [("render", "t.svg"), ("report", "t.md")])
def test_render_and_report_never_overwrite_their_input(tmp_path: Path, command: str, out: str) -> None:
    pipeline_trace(tmp_path / "t.json.gz")
    before = (tmp_path / "t.json.gz").read_bytes()
    one_line_error(cli(command, "t.json.gz", "-o", "t.json.gz", cwd=tmp_path), "must end in")
    (tmp_path / out).symlink_to("t.json.gz")  # the right suffix, but a link to the input
    one_line_error(cli(command, "t.json.gz", "-o", out, cwd=tmp_path), "is the input")
    (tmp_path / out).unlink()
    os.link(tmp_path / "t.json.gz", tmp_path / out)  # a hard link: the same file under another name
    one_line_error(cli(command, "t.json.gz", "-o", out, cwd=tmp_path), "is the input")
    (tmp_path / "sub").mkdir()
    one_line_error(cli(command, "sub/../t.json.gz", "-o", "t.json.gz", cwd=tmp_path), "must end in")
    assert (tmp_path / "t.json.gz").read_bytes() == before and evtrace.load(tmp_path / "t.json.gz")


@pytest.mark.parametrize("command, bad, good", [("render", "x.png", "x.svg"), ("report", "x.svg", "x.md")])
def test_an_output_suffix_must_match_what_is_written(
    tmp_path: Path, command: str, bad: str, good: str
) -> None:
    pipeline_trace(tmp_path / "t.json")
    one_line_error(cli(command, "t.json", "-o", bad, cwd=tmp_path), f"must end in {Path(good).suffix}")
    assert not (tmp_path / bad).exists()
    p = cli(command, "t.json", "-o", good, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == f"evtrace: wrote {good}" + (
        f" ({p.stderr.split(' (', 1)[1]}" if command == "render" else "\n"
    )


def test_render_says_when_there_is_nothing_to_draw(tmp_path: Path) -> None:
    pipeline_trace(tmp_path / "t.json")
    one_line_error(
        cli("render", "t.json", "-o", "w.svg", "--window", "100s:200s", cwd=tmp_path),
        "nothing was recorded on these lanes between 100 s and 200 s",
    )
    one_line_error(
        cli("render", "t.json", "-o", "w.svg", "--lanes", "^nope$", cwd=tmp_path),
        "--lanes '^nope$' matches no lane; the lanes are: host · MainThread, GPU 0 · stream 0 (default)",
    )
    with evtrace.record(tmp_path / "empty.json", device=False, quiet=True):
        pass
    one_line_error(cli("render", "empty.json", "-o", "w.svg", cwd=tmp_path), "holds no regions")
    assert not (tmp_path / "w.svg").exists()


def training_trace(path: Path) -> evtrace.Session:
    """A training loop as the CLI's hooks record it: a data wait before each step (one more at
    the end, when the loader runs out), then forward and backward, which do device work."""
    clk = FakeClock(seed=1)
    sim = SimBackend(clk)
    with evtrace.record(path, backend=sim, clock=clk, quiet=True) as r:
        clk.advance(16_900_000_000)  # well into the run: tick labels must still differ
        for i in range(5):
            with evtrace.region("data wait", host_only=True):
                clk.advance(1_000_000 + 10_000 * i)
            if i == 4:
                break
            with evtrace.region("Net"):
                sim.launch(700_000)
            with evtrace.region("Net (backward)"):
                sim.launch(1_400_000)
            with evtrace.region("wait synchronize train.py:9", host_only=True):
                sim.synchronize(0)
    assert r.session is not None
    return r.session


def test_render_picks_a_step_that_does_device_work_not_a_wait(tmp_path: Path) -> None:
    from evtrace.export.render import default_window

    s = training_trace(tmp_path / "t.json")
    a, b = default_window(s)
    r = s.regions
    inside = [s.names[k] for k in r["name"][(r["host_start"] >= a) & (r["host_end"] <= b)].tolist()]
    assert "Net (backward)" in inside and "data wait" not in inside, (
        inside
    )  # the repeating one with the most host time
    texts = [t.text for t in ET.fromstring(render(s)).iter("{http://www.w3.org/2000/svg}text")]
    assert "Net (backward)" in texts and "data wait" not in texts


def test_render_ticks_and_window_are_distinct_at_any_offset(tmp_path: Path) -> None:
    s = training_trace(tmp_path / "t.json")
    root = ET.fromstring(render(s))
    texts = [(t.get("y"), t.text or "") for t in root.iter("{http://www.w3.org/2000/svg}text")]
    ticks = [text for y, text in texts if y == "20"]
    assert len(ticks) >= 4 and len(set(ticks)) == len(ticks), ticks
    assert ticks[0].split()[0].strip("0.") == "", ticks  # relative to the window's start
    footer = next(text for _, text in texts if text.startswith("window "))
    a, b = footer.removeprefix("window ").split(" since")[0].split(" – ")
    assert a != b and a.startswith("16.9") and b.startswith("16.9"), footer


def test_render_escapes_control_characters_and_markup(tmp_path: Path) -> None:
    clk = FakeClock()
    sim = SimBackend(clk)
    odd = "a\x00b\x01<c>&\x7f\ud800 \t"
    with evtrace.record(tmp_path / "t.json", backend=sim, clock=clk, quiet=True) as r:
        for _ in range(2):
            with evtrace.region(odd):
                sim.launch(5_000_000)
    assert r.session is not None
    for s in (r.session, evtrace.load(tmp_path / "t.json")):
        svg = render(s)
        root = ET.fromstring(svg)  # well-formed XML 1.0
        titles = [t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}title")]
        assert any(t.startswith("a\\x00b\\x01<c>&\\x7f") for t in titles), titles
    (tmp_path / "t.svg").write_text(render(r.session), encoding="utf-8")  # and encodable as UTF-8
