"""``make lab``'s JupyterLab: it serves the lessons, and saving a lesson strips its outputs
(so a learner's run never dirties git or the tests). Started headless on a free port."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    pytest.importorskip("jupyterlab", reason="the lab extra is not installed")
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    shutil.copy(ROOT / "jupyter_server_config.py", tmp_path)
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--config=jupyter_server_config.py",
         "--no-browser", f"--port={port}", "--ip=127.0.0.1", "--ServerApp.token=",
         "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True", "--allow-root"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {proc.stderr.read()[-2000:]}")
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not answer in 60 s")
        yield base, tmp_path / "notebooks"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_lab_lists_the_lessons_and_strips_outputs_on_save(lab):
    base, nb_dir = lab
    listing = json.load(urllib.request.urlopen(f"{base}/api/contents/", timeout=10))
    names = {item["name"] for item in listing["content"]}
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} <= names
    page = urllib.request.urlopen(f"{base}/lab/tree/00_tour.ipynb", timeout=10).read()
    assert b"JupyterLab" in page or b"jupyter" in page.lower()

    model = json.load(urllib.request.urlopen(f"{base}/api/contents/00_tour.ipynb", timeout=10))
    code = next(c for c in model["content"]["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "a learner's run\n"}]
    code["execution_count"] = 7
    body = json.dumps({"type": "notebook", "format": "json",
                       "content": model["content"]}).encode()
    req = urllib.request.Request(f"{base}/api/contents/00_tour.ipynb", data=body,
                                 method="PUT", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10)
    saved = json.loads((nb_dir / "00_tour.ipynb").read_text())
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in saved["cells"] if c["cell_type"] == "code")
