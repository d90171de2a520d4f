"""`evtrace view` and `--open`: one file on loopback, as Perfetto's deep link expects."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import evtrace

from .children import sigint_default

UI = "https://ui.perfetto.dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    p = tmp_path / "my trace.json.gz"
    with evtrace.record(p, device=False, quiet=True):
        with evtrace.region("x"):
            pass
    return p


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_view_serves_the_one_file_with_cors_then_exits(trace: Path) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "evtrace", "view", str(trace), "--no-browser", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        url = p.stdout.readline().strip()  # type: ignore[union-attr]
        assert url == f"{UI}/#!/?url=http://127.0.0.1:{port}/my%20trace.json.gz"
        base = f"http://127.0.0.1:{port}"
        for bad in (
            "/",
            "/status",
            "/../my%20trace.json.gz/..",
            "/etc/passwd",
            "/%2e%2e/" + trace.parent.name,
        ):
            code, headers, _ = get(base + bad)
            assert code == 404, bad
            assert headers["Access-Control-Allow-Origin"] == UI
        code, headers, body = get(base + "/my%20trace.json.gz")
        assert code == 200 and body == trace.read_bytes()
        assert headers["Access-Control-Allow-Origin"] == UI and headers["Cache-Control"] == "no-cache"
        assert p.wait(timeout=10) == 0  # served once: done
        assert "only fetches from 127.0.0.1:9001" in p.stderr.read()  # type: ignore[union-attr]


def listening(port: int) -> list[str]:
    """The local addresses listening on ``port``, from the kernel's socket tables (no ``ss`` needed)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                out.append(socket.inet_ntoa(bytes.fromhex(addr)[::-1]) if len(addr) == 8 else "[v6] " + addr)
    return out


def test_view_binds_loopback_only(trace: Path) -> None:
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp (not Linux)")
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "evtrace", "view", str(trace), "--no-browser", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        p.stdout.readline()  # type: ignore[union-attr]
        assert listening(port) == ["127.0.0.1"]
        get(f"http://127.0.0.1:{port}/my%20trace.json.gz")
        assert p.wait(timeout=10) == 0


def test_view_answers_head_and_options_and_keeps_serving(trace: Path) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "evtrace", "view", str(trace), "--no-browser", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as p:
        p.stdout.readline()  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/my%20trace.json.gz"
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as r:
            assert (
                r.status == 200
                and int(r.headers["Content-Length"]) == trace.stat().st_size
                and r.read() == b""
            )
            assert r.headers["Access-Control-Allow-Origin"] == UI
        pre = urllib.request.Request(
            url,
            method="OPTIONS",
            headers={
                "Origin": UI,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Private-Network": "true",
            },
        )
        with urllib.request.urlopen(pre, timeout=10) as r:
            assert r.status == 204
            assert (
                r.headers["Access-Control-Allow-Origin"] == UI
                and "GET" in r.headers["Access-Control-Allow-Methods"]
            )
            assert r.headers["Access-Control-Allow-Private-Network"] == "true"
        assert p.poll() is None  # probes are not the download: still serving
        code, _, body = get(url)
        assert code == 200 and body == trace.read_bytes()
        assert p.wait(timeout=10) == 0


def test_ctrl_c_on_a_waiting_view_exits_quietly(trace: Path) -> None:
    port = free_port()
    with subprocess.Popen(
        [sys.executable, "-m", "evtrace", "view", str(trace), "--no-browser", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_default,
    ) as p:
        assert p.stdout is not None and p.stderr is not None
        p.stdout.readline()  # the URL: it is waiting
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 130
        err = p.stderr.read()
    said = [
        line
        for line in err.splitlines()
        if "note:" not in line and "until ui.perfetto.dev fetches" not in line
    ]
    assert "Traceback" not in err and len(said) <= 1, err


def test_view_refuses_a_corrupt_trace(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "view", str(bad), "--no-browser"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        p.returncode == 2
        and len(p.stderr.strip().splitlines()) == 1
        and "not a complete gzip file" in p.stderr
    )


def test_run_open_hands_the_deep_link_to_the_browser(tmp_path: Path) -> None:
    """--open: the browser (here a script standing in for the UI) fetches the file from the link."""
    fetcher = tmp_path / "ui.py"
    fetcher.write_text(
        "import sys, urllib.parse, urllib.request\n"
        "link = urllib.parse.unquote(sys.argv[1].split('url=', 1)[1])\n"
        "data = urllib.request.urlopen(link, timeout=10).read()\n"
        "open(sys.argv[2], 'wb').write(data)\n"
        "open(sys.argv[2] + '.link', 'w').write(link)\n"
    )
    (tmp_path / "job.py").write_text("import evtrace\nwith evtrace.region('r'):\n    pass\n")
    got = tmp_path / "fetched.bin"
    # any free port: the fixed 9001 may be taken (trace_processor --httpd, a parallel test)
    env = {
        **os.environ,
        "BROWSER": f"{sys.executable} {fetcher} %s {got}",
        "CUDA_VISIBLE_DEVICES": "",
        "EVTRACE_VIEW_PORT": "0",
    }
    p = subprocess.run(
        [sys.executable, "-m", "evtrace", "run", "--open", "-o", "t.json.gz", "job.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert got.read_bytes() == (tmp_path / "t.json.gz").read_bytes()
    assert not Path(f"{got}.link").read_text().startswith("http://127.0.0.1:9001/")


def test_open_with_no_browser_says_what_it_waits_for_and_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import webbrowser

    from evtrace import serve as view

    monkeypatch.setattr(webbrowser, "open", lambda url: False)  # a headless machine
    monkeypatch.setattr(view, "OPEN_TIMEOUT_S", 0.3)
    monkeypatch.setenv("EVTRACE_VIEW_PORT", "0")
    with evtrace.record(tmp_path / "t.json", device=False, open=True):
        with evtrace.region("r"):
            pass
    err = capsys.readouterr().err
    assert "until ui.perfetto.dev fetches it (for up to 0.005 min; Ctrl-C stops)" in err
    assert "nothing fetched t.json; stopped serving" in err
