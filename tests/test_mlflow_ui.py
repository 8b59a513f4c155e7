"""What a person sees in the MLflow UI of a finished tiny run and its weekly rerun (V6), checked
on the page Chromium renders (headless, Debian's package: scripts/setup.sh installs it), not on
the REST API: the experiment lists the pipeline's parent run with its nested stage runs, the RLHF
versions' eval runs V1..V6 compare side by side, and the chat model's registry page shows its aliases. Screenshots go
to test-artifacts/mlflow-ui/ (gitignored) for a person to look at.

Chromium is driven over the DevTools protocol with a small stdlib websocket client (no
Playwright/Selenium browser download). The UI's routes are hash-based (mlflow 3.17):
`#/experiments/<id>/runs`, `#/compare-runs?runs=[...]&experiments=[...]`, `#/models/<name>`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

# the first test also waits for the shared run's weekly V6 (tests/conftest.py tiny_week6)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(4800)]

SHOTS = REPO / "test-artifacts" / "mlflow-ui"
EXPERIMENT = "llama2-tiny"
CHAT_MODEL = "llama2-tiny-chat"
PAGE_TIMEOUT = 180  # seconds for a page to render: the UI fetches runs after the bundle loads


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")


def _end_group(proc: subprocess.Popen) -> None:
    """End the process group we started (server workers, browser renderers): SIGTERM, 30 s for
    the leader to exit, then SIGKILL for whatever of the group is left."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class MlflowUI:
    """`mlflow server` on 127.0.0.1 and a free port over a run's sqlite store and artifacts
    (one worker: the default starts many processes, STACK.md)."""

    def __init__(self, out: Path, log_dir: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / "mlflow-server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{out}/mlflow.db",
             "--default-artifact-root", (out / "mlartifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"], stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own group: close() ends its uvicorn and job workers too
        try:
            _wait_http(f"{self.url}/health", 300, self.proc, "mlflow server")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        _end_group(self.proc)
        self.log.close()


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (a websocket)."""

    def __init__(self, chromium: str, profile: Path, width: int = 1600, height: int = 1000):
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--remote-debugging-port=0", "--remote-allow-origins=*",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file, deadline = profile / "DevToolsActivePort", time.time() + 120
            while not port_file.exists() or not port_file.read_text().strip():
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = _WebSocket(page["webSocketDebuggerUrl"])
            self._id = 0
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def wait_text(self, *needles: str, timeout: float = PAGE_TIMEOUT) -> str:
        """The page's rendered text once every needle appears in it."""
        deadline, text = time.time() + timeout, ""
        while time.time() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(1)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not rendered within {timeout:.0f} s: {missing}\n--- page text ---\n{text[:3000]}")

    def wait_for(self, expression: str, ready, timeout: float = PAGE_TIMEOUT, interval: float = 1.0):
        """The value of a JS expression once `ready(value)` holds."""
        deadline, value = time.time() + timeout, None
        while time.time() < deadline:
            value = self.js(expression)
            if ready(value):
                return value
            time.sleep(interval)
        raise AssertionError(f"not rendered within {timeout:.0f} s; last value: {value!r}")

    def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        _end_group(self.proc)


class _WebSocket:
    """The client side of RFC 6455, text frames only: enough for the DevTools protocol."""

    def __init__(self, url: str):
        u = urllib.parse.urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=PAGE_TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("the DevTools websocket closed during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"DevTools websocket handshake refused: {head[:200]!r}")

    def send(self, text: str) -> None:
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        header = bytearray([0x81])  # FIN + text
        if n < 126:
            header.append(0x80 | n)
        elif n < 1 << 16:
            header += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            header += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))  # clients must mask
        self.sock.sendall(bytes(header) + mask + masked)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the DevTools websocket closed")
            buf += chunk
        return buf

    def recv(self) -> str:
        parts = []
        while True:
            b0, b1 = self._exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(self._exact(2), "big")
            elif n == 127:
                n = int.from_bytes(self._exact(8), "big")
            payload = self._exact(n)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the DevTools websocket was closed by Chromium")
            if opcode in (0x9, 0xA):  # ping/pong: not used by Chromium's DevTools server
                continue
            parts.append(payload)
            if b0 & 0x80:  # FIN: the message is complete
                return b"".join(parts).decode()

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------------------------ fixtures


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed: run scripts/setup.sh (it installs Debian's chromium)")
    return found


@pytest.fixture(scope="module")
def ui(tiny_week6, tmp_path_factory):
    # after the weekly rerun (V6 on a second batch): the page shows V1..V6, as a user sees it next week
    server = MlflowUI(tiny_week6.out, tmp_path_factory.mktemp("mlflow-ui"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    b = Browser(_chromium(), profile)
    yield b
    b.close()
    shutil.rmtree(profile, ignore_errors=True)


def _client(out: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{out}/mlflow.db")


# ---------------------------------------------------------------------------------- the checks


def check_experiment_lists_parent_with_nested_stage_runs(browser: Browser, url: str, out: Path) -> None:
    client = _client(out)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    newest = max(parents, key=lambda r: r.info.start_time)
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id}
    assert {"data", "tokenizer", "pretrain", "sft"} <= children, children

    # the runs table (not the GenAI overview a new experiment may open in), nested runs collapsed
    browser.open(f"{url}/#/experiments/{exp.experiment_id}/runs")
    browser.wait_text(newest.info.run_name)
    top = browser.wait_for(RUN_NAMES, lambda names: names and "pretrain" not in names)
    assert newest.info.run_name in top and not children & set(top), f"stage runs listed at top level: {top}"
    browser.screenshot("experiment-runs")
    # the parent row's expander (the button in its run-name cell) lists its stage runs under it
    clicked = browser.js(f"""(() => {{
        const link = document.querySelector('[role=gridcell] a[href$="/runs/{newest.info.run_id}"]');
        const cell = link && link.closest('[role=gridcell]');
        const button = cell && cell.querySelector('button');
        if (!button) return false;
        button.click();
        return true; }})()""")
    assert clicked, "the pipeline's parent run has no expander for nested runs"
    # ag-grid renders the rows in view (newest first): at least ten of its ~37 stage runs
    enough = min(10, len(children))
    shown = browser.wait_for(RUN_NAMES, lambda names: len(children & set(names or [])) >= enough)
    assert shown.index(newest.info.run_name) < min(shown.index(n) for n in children & set(shown)), shown
    browser.screenshot("experiment-runs-expanded")


# the run names in the runs table, top to bottom (the rows ag-grid has rendered)
RUN_NAMES = """[...document.querySelectorAll('[role=gridcell][col-id="attributes.`Run Name`"]')]
    .map(c => [c.closest('[role=row]'), c.innerText.trim()])
    .sort((a, b) => Number(a[0].getAttribute('row-index')) - Number(b[0].getAttribute('row-index')))
    .map(x => x[1].split('\\n').pop())"""


def check_eval_runs_compare_side_by_side(browser: Browser, url: str, out: Path) -> None:
    client = _client(out)
    exp = client.get_experiment_by_name(EXPERIMENT)
    evals = {}
    for r in sorted(client.search_runs([exp.experiment_id], "tags.cache_hit = 'false'", max_results=5000),
                    key=lambda r: r.info.start_time):
        if r.info.run_name.startswith("eval_v") and "win_rate.vs_sft.judge" in r.data.metrics:
            evals[r.info.run_name] = r  # the newest run of each version that computed it
    names = [f"eval_v{i}" for i in range(1, 7)]  # V1..V5 and the weekly V6
    assert set(names) <= set(evals), sorted(evals)
    ids = [evals[n].info.run_id for n in names]
    query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
    browser.open(f"{url}/#/compare-runs?{query}")
    browser.wait_text("Metrics", "champion.promoted", *names)
    # the metrics table is a small box that renders only the rows (and columns) in view: scroll it
    # down to the win-rate row, then read that row's rendered cells
    row = browser.wait_for(f"(() => {{ const row = {_METRIC_ROW % 'win_rate.vs_sft.judge'}; "
                           f"if (row && row.length >= 5) return row; {_SCROLL_METRICS} return null; }})()",
                           lambda cells: bool(cells) and len(cells) >= 5, timeout=120, interval=0.5)
    browser.screenshot("compare-eval-runs")
    values = [float(c) for c in row[1:] if c.replace(".", "", 1).isdigit()]
    want = [evals[n].data.metrics["win_rate.vs_sft.judge"] for n in names]
    # the box shows the first four or five columns; every value shown is one of the six versions'
    assert len(values) >= 4, row
    assert all(any(abs(v - w) < 5e-3 for w in want) for v in values), (row, want)


_SCROLL_METRICS = """let boxes = [...document.querySelectorAll('[data-metrics-box]')];
    if (!boxes.length) {  // react-virtualized grids (names, values) in the table holding the first metric
      const first = [...document.querySelectorAll('.ReactVirtualized__Grid')]
        .find(e => e.textContent.includes('champion.promoted'));
      let table = first;
      while (table && table.querySelectorAll('.ReactVirtualized__Grid').length < 2) table = table.parentElement;
      boxes = table ? [...table.querySelectorAll('.ReactVirtualized__Grid')].filter(
        e => e.scrollHeight > e.clientHeight + 5) : [];
      boxes.forEach(e => e.setAttribute('data-metrics-box', '1'));  // scrolling un-renders the first row
    }
    // names and values scroll together (same row heights): the same offset keeps rows aligned
    const top = Math.min(...boxes.map(e => Math.min(e.scrollTop + 90, e.scrollHeight - e.clientHeight)));
    boxes.forEach(e => { e.scrollTop = top; e.dispatchEvent(new Event('scroll')); });"""


# the metric's name and the texts rendered on the same line to its right (its values, whether the
# table is one grid or a frozen name column beside a scrolling value grid)
_METRIC_ROW = """(() => {
    const key = [...document.querySelectorAll('*')].find(e => [...e.childNodes].some(
        n => n.nodeType === Node.TEXT_NODE && n.textContent.trim() === '%s'));
    if (!key) return null;
    const r = key.getBoundingClientRect(), y = (r.top + r.bottom) / 2;
    if (r.height === 0) return null;
    const cells = [...document.querySelectorAll('*')].filter(e => e.childElementCount === 0 && e !== key)
        .filter(e => { const b = e.getBoundingClientRect();
                       return b.height > 0 && b.top <= y && b.bottom >= y && b.left >= r.right; })
        .sort((a, b) => a.getBoundingClientRect().left - b.getBoundingClientRect().left)
        .map(e => e.textContent.trim()).filter(t => t);
    return [key.textContent.trim(), ...cells]; })()"""


def check_registry_shows_aliases(browser: Browser, url: str, out: Path, required: set[str]) -> None:
    model = _client(out).get_registered_model(CHAT_MODEL)
    aliases = set(model.aliases)
    assert required <= aliases, sorted(aliases)
    browser.open(f"{url}/#/models/{CHAT_MODEL}")
    browser.wait_text(CHAT_MODEL, *sorted(aliases))
    browser.screenshot("registry-chat-model")


# ----------------------------------------------------------------------------------- the tests


def test_experiment_lists_the_pipeline_run_with_nested_stage_runs(tiny_run, ui, browser):
    check_experiment_lists_parent_with_nested_stage_runs(browser, ui.url, tiny_run.out)


def test_rlhf_versions_eval_runs_compare_side_by_side(tiny_run, ui, browser):
    check_eval_runs_compare_side_by_side(browser, ui.url, tiny_run.out)


def test_registry_page_shows_the_chat_model_aliases(tiny_run, ui, browser):
    required = {"sft", "champion", *(f"rlhf-v{i}" for i in range(1, 7))}
    check_registry_shows_aliases(browser, ui.url, tiny_run.out, required)
