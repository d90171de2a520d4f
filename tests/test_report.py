"""`evtrace report` and `evtrace render`: markdown to paste, an SVG that real renderers draw."""

from __future__ import annotations

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
    assert "**Host waits on the device:** 4," in md
    assert "host in `cpu_task`" in md  # the idle GPU is explained by the host's CPU task


def test_report_from_a_saved_trace_via_the_cli(tmp_path: Path) -> None:
    pipeline_trace(tmp_path / "t.json")
    p = subprocess.run([sys.executable, "-m", "evtrace", "report", "t.json", "-o", "r.md"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
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
        row = [img.getpixel((x, y + 10)) for x in range(200, w - 10, 4)]
        coloured = sum(1 for r, g, b in row if max(r, g, b) - min(r, g, b) > 40)
        assert coloured > 10, f"lane at y={y} is blank"


def test_cli_render_window_and_report_flag(tmp_path: Path) -> None:
    pipeline_trace(tmp_path / "t.json")
    p = subprocess.run([sys.executable, "-m", "evtrace", "render", "t.json", "-o", "w.svg", "--window", "0:5ms"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "window 0 ns – 5 ms" in (tmp_path / "w.svg").read_text()
    bad = subprocess.run([sys.executable, "-m", "evtrace", "render", "t.json", "-o", "w.svg", "--window", "5:1"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "ends before it starts" in bad.stderr
    (tmp_path / "job.py").write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    import os

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "evtrace", "--report", "-o", "job.json.gz", "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "job.md").exists() and (tmp_path / "job.svg").exists()
