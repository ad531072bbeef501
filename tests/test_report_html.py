"""report.html: self-contained, conclusion first, and rendered by a real headless browser.

The browser check loads a copy of the report with a small probe script put first in its head:
it records every script and resource error from the start, and once the page has loaded
writes the count of images, those that did not load (``naturalWidth`` 0) and the errors into
the DOM, which ``chromium --dump-dom`` prints. The browser runs with a proxy that refuses
every connection, so a report that needed the network would show broken images. Without a
chromium on PATH the browser tests skip, saying how to install one — unless
``KVQ_REQUIRE_BROWSER`` is set, as CI sets it after installing chromium: then they fail.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from kvqueue.cli import main
from kvqueue.report.html import REPORT_FILE
from kvqueue.report.plots import PLOT_FILES
from kvqueue.report.sweep_plots import GOODPUT_FILE, KV_USAGE_FILE

SWEEP_PLOTS = 8

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
PROBE = """<script>
window.__kvqErrors = [];
window.addEventListener("error", function (e) {
  window.__kvqErrors.push(e.message || ("failed to load " + (e.target && e.target.src)));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var out = document.createElement("pre");
  out.id = "kvq-check";
  out.textContent = JSON.stringify({
    images: images.length,
    broken: broken.map(function (i) { return i.alt; }),
    errors: window.__kvqErrors
  });
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """report.html of simulate runs on either engine and of a sweep (the batched engine, its
    default), each with its plots."""
    root = tmp_path_factory.mktemp("reports")
    tiny = ["--workload", "shared-prefix-tiny", "--json"]
    assert main(["simulate", *tiny, "--out", str(root / "simulate")]) == 0
    batched = ["--engine", "batched", "--latency", "calibrated"]
    assert main(["simulate", *tiny, *batched, "--out", str(root / "simulate-batched")]) == 0
    sweep = ["--rates", "1,2,8", "--strategies", "round_robin,cache_aware"]
    assert main(["sweep", *tiny, *sweep, "--out", str(root / "sweep")]) == 0
    return {kind: root / kind / REPORT_FILE for kind in ("simulate", "simulate-batched", "sweep")}


def images_of(document: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', document)


KINDS = [
    ("simulate", len(PLOT_FILES)),
    ("simulate-batched", len(PLOT_FILES)),
    ("sweep", SWEEP_PLOTS),
]


@pytest.mark.parametrize(("kind", "num_images"), KINDS)
def test_the_report_embeds_every_plot_and_refers_to_nothing_outside_itself(
    reports: dict[str, Path], kind: str, num_images: int
) -> None:
    document = reports[kind].read_text()
    sources = images_of(document)
    assert len(sources) == num_images
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    without_images = re.sub(r'src="data:image/png;base64,[^"]*"', "", document)
    for outside in ("http://", "https://", "<script", "<link", "src=", "url(", "@import"):
        assert outside not in without_images, outside


def conclusion_of(document: str) -> str:
    return html.unescape(document.split("<h2>Conclusion</h2>", 1)[1].split("<h2>", 1)[0])


def test_the_conclusion_comes_first_and_names_the_overload(reports: dict[str, Path]) -> None:
    document = reports["simulate"].read_text()
    headings = re.findall(r"<h2>([^<]*)</h2>", document)
    assert headings == ["Conclusion", "Settings", "Strategies", "Engines", "Plots"]
    # The default simulate workload arrives all at once: one request at a time, queueing
    # decides its latencies.
    assert "Overload: all 16 requests arrive at once" in conclusion_of(document)
    assert "sequential engine (one request at a time per GPU, FIFO)" in html.unescape(document)


def test_a_batched_report_judges_the_burst_by_what_each_gpu_runs_at_once(
    reports: dict[str, Path],
) -> None:
    document = reports["simulate-batched"].read_text()
    # Four requests per GPU run in one batch: no backlog, so no overload line.
    assert "No run was overloaded" in conclusion_of(document)
    text = html.unescape(document)
    assert "batched engine (continuous batching with vLLM's scheduling" in text
    assert "calibrated step-time model of llama-2-13b@a100-40gb" in text
    assert "measured by a saturating burst" in text


def test_the_sweep_report_says_which_engine_model_was_used(reports: dict[str, Path]) -> None:
    document = html.unescape(reports["sweep"].read_text())
    assert "model used" in document
    assert "batched engine (continuous batching with vLLM's scheduling" in document
    assert "calibrated latency profile" in document
    assert document.index("Conclusion") < document.index("Highest rate sustained")
    for name in (GOODPUT_FILE, KV_USAGE_FILE):
        assert (reports["sweep"].parent / name).is_file()


# -- in a real browser -------------------------------------------------------------------------
def browser() -> str:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    why = (
        "no headless browser on PATH (looked for chromium, chromium-browser, google-chrome): "
        "install Debian's chromium (apt-get install -y chromium) to run the browser checks"
    )
    if os.environ.get("KVQ_REQUIRE_BROWSER"):
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def render(page: Path, profile: Path) -> dict:
    """The probe's findings for `page`, loaded by headless chromium without network."""
    probed = page.with_name(f"probed-{page.name}")
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    done = subprocess.run(
        [
            browser(), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
            "--virtual-time-budget=10000", "--dump-dom", probed.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    found = re.search(r'<pre id="kvq-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the probe did not report (exit {done.returncode}): {done.stderr[-2000:]}"
    return orjson.loads(html.unescape(found.group(1)))


@pytest.mark.parametrize(("kind", "num_images"), KINDS)
def test_a_headless_browser_loads_every_image_without_a_script_error(
    reports: dict[str, Path], tmp_path: Path, kind: str, num_images: int
) -> None:
    found = render(reports[kind], tmp_path / "profile")
    assert found == {"images": num_images, "broken": [], "errors": []}


def test_the_browser_probe_sees_a_broken_image_and_a_script_error(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head></head><body><img src="https://example.com/x.png" '
        'alt="remote"><script>notDefined();</script></body></html>'
    )
    found = render(page, tmp_path / "profile")
    assert found["images"] == 1 and found["broken"] == ["remote"]
    assert any("notDefined" in error for error in found["errors"])
