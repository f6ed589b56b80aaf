"""The explorers in a real browser: JupyterLab on localhost and headless Chromium (Selenium).

Notebooks 01 and 03 (copies, in a temporary folder) are opened in JupyterLab and run with "Run All" on
the smoke preset (`DGNB_PRESET=smoke`, read by their parameters cells). Then an explorer control is
moved the way a user would (a dropdown choice, a slider key press), and the explorer's picture must
change: the kernel received the new value, the callback redrew, the front end rendered it.
Screenshots go to $DGNB_SCREENSHOTS (or the test's temporary folder).

Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`; `.ci/run`
does it), `selenium` and `jupyterlab`; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMEDRIVER = shutil.which("chromedriver")
RUN_TIMEOUT = 240  # seconds per notebook (smoke preset; runs are cached when the notebook tests ran first)

try:
    import jupyterlab  # noqa: F401
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    MISSING = None
except ImportError as exc:  # pragma: no cover - depends on the machine
    MISSING = f"{exc.name} is not installed (pip install -e '.[notebooks,test]')"

pytestmark = pytest.mark.skipif(
    MISSING is not None or CHROMIUM is None or CHROMEDRIVER is None,
    reason=MISSING or "no chromium/chromedriver on PATH: apt-get install -y chromium chromium-driver (as .ci/run does)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(course_home, tmp_path_factory):
    """JupyterLab on 127.0.0.1 (a free port, a random token) serving copies of notebooks 01 and 03;
    its kernels and the server are always shut down at the end."""
    tmp = tmp_path_factory.mktemp("lab")
    root = tmp / "notebooks"
    root.mkdir()
    for name in ("01_domain_shift", "03_pin_the_memory"):
        shutil.copy(NOTEBOOKS / f"{name}.ipynb", root)
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "JPY_SESSION_NAME")}
    env.update(DGNB_PRESET="smoke", DGNB_HOME=str(course_home), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
               JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"))
    log = open(tmp / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--LabApp.expose_app_in_browser=True", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
         "--ServerApp.shutdown_no_activity_timeout=600", "--MappingKernelManager.cull_idle_timeout=0"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                api(url, token, "/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: see {tmp / 'jupyterlab.log'}")
                time.sleep(0.5)
        yield {"url": url, "token": token, "log": tmp / "jupyterlab.log"}
    finally:
        try:
            for kernel in api(url, token, "/api/kernels") or []:
                api(url, token, f"/api/kernels/{kernel['id']}", "DELETE")
        except OSError:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1100",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DGNB_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


STATE_JS = """
const app = window.jupyterapp;
if (!app) return {ready: false, why: 'no app'};
const nb = app.shell.currentWidget;
if (!nb || !nb.content || !nb.sessionContext) return {ready: false, why: 'no notebook'};
const kernel = nb.sessionContext.session && nb.sessionContext.session.kernel;
if (!kernel) return {ready: false, why: 'no kernel'};
let pending = 0, cells = 0; const errors = [];
for (const cell of nb.content.widgets) {
  if (cell.model.type !== 'code') continue;
  cells += 1;
  const prompt = cell.inputArea ? cell.inputArea.promptNode.textContent : '';
  if (cell.model.executionCount === null || prompt.includes('*')) pending += 1;
  for (let j = 0; j < cell.model.outputs.length; j++) {
    const o = cell.model.outputs.get(j).toJSON();
    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
  }
}
return {ready: true, status: kernel.status, pending: pending, cells: cells, errors: errors};
"""


def wait_for(driver, predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last state: {last!r})")


def run_all(driver, lab, name: str, shots: Path) -> None:
    """Open notebook `name` in JupyterLab, Run All, wait until every cell ran; fail on an error output."""
    # a workspace of its own, reset: only this notebook is open, so it is the one "Run All" runs
    driver.get(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?reset&token={lab['token']}")
    wait_for(driver, lambda: (lambda s: s.get("ready") and s.get("status") == "idle")(driver.execute_script(STATE_JS)),
             120, f"{name}: the notebook and its kernel")
    driver.execute_script("""
        const app = window.jupyterapp;
        app.shell.activateById(app.shell.currentWidget.id);
        app.commands.execute('notebook:run-all-cells');  // not awaited: progress is polled below""")
    last: dict = {}

    def finished():
        s = driver.execute_script(STATE_JS)
        last.update(s)
        if s.get("errors"):
            raise AssertionError(f"{name}: a cell failed in the browser: {s['errors']}")
        return s if s.get("ready") and s["pending"] == 0 and s["status"] == "idle" else False

    try:
        wait_for(driver, finished, RUN_TIMEOUT, f"{name}: Run All (state: {last})")
    finally:
        driver.save_screenshot(str(shots / f"{name}_after_run_all.png"))


def explorer_cell(driver, marker: str):
    """Scroll to the code cell whose source contains `marker`, tag it, and return its DOM element."""
    index = driver.execute_script("""
        document.querySelectorAll('#explorer-under-test').forEach(e => e.removeAttribute('id'));
        const nb = window.jupyterapp.shell.currentWidget.content;
        const i = nb.widgets.findIndex(c => c.model.sharedModel.getSource().includes(arguments[0]));
        if (i < 0) return -1;
        nb.activeCellIndex = i;
        nb.widgets[i].node.id = 'explorer-under-test';
        nb.widgets[i].node.scrollIntoView({block: 'start'});
        return i;""", marker)
    assert index >= 0, f"no cell contains {marker!r}"
    cell = driver.find_element(By.ID, "explorer-under-test")
    wait_for(driver, lambda: cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img"), 60,
             f"the picture of the explorer in cell {marker!r}")
    return cell


def picture(cell) -> str:
    return cell.find_element(By.CSS_SELECTOR, ".jp-OutputArea-output img").get_attribute("src")


def moved(driver, cell, act, what: str, shots: Path, shot: str) -> None:
    """Do `act` (a user's action on a control), then wait for the explorer's picture to change."""
    cell.screenshot(str(shots / f"{shot}_before.png"))
    before = picture(cell)
    act()
    wait_for(driver, lambda: picture(cell) != before, 60, f"the explorer's picture to change after {what}")
    time.sleep(0.5)  # let the new image paint before the screenshot
    cell.screenshot(str(shots / f"{shot}_after.png"))


def control(cell, label: str):
    """The widget whose description is `label` (ipywidgets puts it in a .widget-label next to the control)."""
    for box in cell.find_elements(By.CSS_SELECTOR, ".widget-inline-hbox"):
        labels = box.find_elements(By.CSS_SELECTOR, ".widget-label")
        if labels and labels[0].text.strip() == label:
            return box
    raise AssertionError(f"no control labelled {label!r}")


def test_shift_explorer_in_the_browser(lab, browser, shots):
    run_all(browser, lab, "01_domain_shift", shots)
    cell = explorer_cell(browser, "shift_explorer(method")
    select = Select(control(cell, "domain").find_element(By.TAG_NAME, "select"))
    target = select.options[-1].text
    moved(browser, cell, lambda: select.select_by_visible_text(target), f"choosing the domain {target}", shots,
          "01_shift_explorer_domain")


def test_memory_explorers_in_the_browser(lab, browser, shots):
    run_all(browser, lab, "03_pin_the_memory", shots)
    cell = explorer_cell(browser, "memory_training_explorer(snaps)")
    handle = control(cell, "iteration").find_element(By.CSS_SELECTOR, ".noUi-handle")
    moved(browser, cell, lambda: (handle.click(), handle.send_keys(Keys.ARROW_LEFT)),
          "moving the iteration slider one step left", shots, "03_memory_training_explorer_iteration")
    cell = explorer_cell(browser, "memory_explorer(pm")
    select = Select(control(cell, "memory slot").find_element(By.TAG_NAME, "select"))
    moved(browser, cell, lambda: select.select_by_visible_text("car"), "choosing the slot 'car'", shots,
          "03_memory_explorer_slot")
