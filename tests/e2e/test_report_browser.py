"""The report in a real browser (headless Chromium): no console errors, every image loads, and
the first screen is not blank. Skipped where no Chromium is installed (.ci/run installs Debian's
``chromium`` when it can)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdpo.cli import main
from tests.fixtures.fake_runs import make_fake_runs

BROWSER = next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
    None,
)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed")

# Appended to a copy of index.html (the report itself has no script): after the load event,
# the number of images and those that did not load, written into the page for --dump-dom.
PROBE = """<script>
window.addEventListener('load', function () {
  var bad = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!im.complete || im.naturalWidth === 0) bad.push(im.getAttribute('src'));
  }
  var p = document.createElement('pre');
  p.textContent = 'IMAGES ' + document.images.length + ' BROKEN ' + bad.join(' ');
  document.body.appendChild(p);
});
</script>
"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    command = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("which", ["one run", "several runs"])
def test_report_renders_in_chromium(tmp_path, which):
    runs = make_fake_runs(tmp_path / "runs")
    if which == "one run":
        run = next(r for r in runs if r.name == "tdpo-r-s0")
        assert main(["report", str(run)]) == 0
        report = run / "report"
    else:
        report = tmp_path / "report"
        assert main(["report", str(tmp_path / "runs"), "--out", str(report)]) == 0
    index = report / "index.html"
    probe = report / "_probe.html"
    probe.write_text(index.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    dom = _chromium("--dump-dom", probe.as_uri())
    found = re.search(r"IMAGES (\d+) BROKEN ?(.*?)</pre>", dom.stdout, re.S)
    assert found, dom.stderr[-2000:]
    assert int(found.group(1)) >= 8 and found.group(2).strip() == ""
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []

    shot = tmp_path / "shot.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,1000", index.as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape == (1000, 1400)
    dark = pixels < 128  # text, tables and plots on a white page
    assert dark.mean() > 0.01 and pixels.std() > 20
    assert dark[:120].any()  # the title is at the top
    assert Path(shot).stat().st_size > 10_000
