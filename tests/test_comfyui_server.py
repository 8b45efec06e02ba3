"""The node pack in ComfyUI as its users run it: the real ComfyUI 0.30.0 server, its HTTP API and its web
frontend in headless Chromium (set up by `bash scripts/setup_comfyui.sh`).

One server for the module: a temporary base folder with the pack copied into custom_nodes/ (as a clone
would put it, no pip install of the pack), a tiny SD3 checkpoint in models/checkpoints (built by
tests/comfyui_tiny_checkpoint.py with ComfyUI's own converter) and Serial LoRA files in
models/serial_loras and models/loras; `main.py --cpu` on a free port of 127.0.0.1, in its own process
group, killed at the end. The browser is driven through the Chrome DevTools protocol over aiohttp's
websocket client (no browser download: the Debian chromium).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sd3_tiny import tiny_sd3_comfy_compatible_transformer

from serial_lora_core import SerialLoraConfig, inject_serial_lora, save_serial_lora, serial_lora_parameters

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "outputs" / "test-artifacts"
# What a clone of the repository brings into custom_nodes/ (the pack, the core it imports, its metadata).
PACK_FILES = ["__init__.py", "comfyui_nodes", "serial_lora_core", "requirements.txt", "pyproject.toml", "example_workflows"]
API_WORKFLOW = REPO / "example_workflows" / "api" / "serial_lora_sd3_api.json"
UI_WORKFLOW = REPO / "example_workflows" / "serial_lora_sd3.json"
# ComfyUI's SD3 text encoder without CLIP/T5 weights outputs zeros of these widths (see the checkpoint script).
SD3_TEXT = dict(joint_attention_dim=4096, pooled_projection_dim=2048)
NODES = {
    "SerialLoraLoaderModelOnly": ("Load Serial LoRA (model only)", ["model", "lora_name", "strength_model"], ["MODEL"]),
    "SerialLoraLoader": ("Load Serial LoRA", ["model", "clip", "lora_name", "strength_model", "strength_clip"],
                         ["MODEL", "CLIP"]),
    "SaveSerialLoraAsLora": ("Save Serial LoRA as LoRA", ["model", "lora_name", "strength_model", "filename_prefix"],
                             ["STRING"]),
}
# Starts ComfyUI's main.py as a user's ComfyUI would run: without this checkout's editable install of
# serial-lora (scripts/setup.sh's `pip install -e`), so the pack in custom_nodes/ imports its own copy of
# serial_lora_core, as a clone does (the root __init__.py puts its folder on sys.path).
NOT_INSTALLED_BOOT = """import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not str(getattr(f, '__module__', '')).startswith('__editable__')]
sys.argv[0] = 'main.py'
runpy.run_path('main.py', run_name='__main__')
"""
IMAGE_SIZE = 64
WAIT = 180  # seconds: the bound on every wait for the server (start-up takes ~30 s on 2 busy cores)


def _adapter(path: Path, seed: int, **overrides) -> None:
    """A Serial LoRA with large random weights (so it visibly changes the image) for the tiny SD3."""
    transformer = tiny_sd3_comfy_compatible_transformer(**{**SD3_TEXT, **overrides})
    inject_serial_lora(transformer, SerialLoraConfig(rank=4, alpha=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in serial_lora_parameters(transformer):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    save_serial_lora(transformer, path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    """Kill the process group the process leads (the server or the browser and all their children)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(15)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """The running ComfyUI: its URL, base folder and log, and small HTTP helpers."""

    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def get_json(self, path: str):
        return json.loads(self.get(path))

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; (HTTP status, JSON answer). json.dumps writes NaN as ComfyUI's frontend would send it."""
        request = urllib.request.Request(self.url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def run(self, prompt: dict) -> dict:
        """Queue `prompt` and poll /history until it has finished (bounded); returns its history entry."""
        status, answer = self.post_prompt(prompt)
        assert status == 200 and not answer.get("node_errors"), answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and (entry["status"]["completed"] or entry["status"]["status_str"] == "error"):
                return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish in {WAIT} s; server log:\n{self.log_tail()}")

    def image(self, entry: dict) -> Image.Image:
        (output,) = [o for o in entry["outputs"].values() if "images" in o]
        (image,) = output["images"]
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return Image.open(io.BytesIO(self.get(f"/view?{query}")))

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:]


@pytest.fixture(scope="module")
def server(tmp_path_factory, comfyui_dir):
    """The running server on a base folder of its own: models, custom_nodes/serial-lora, output, database."""
    base = tmp_path_factory.mktemp("comfyui_base")
    models = {name: base / "models" / name for name in ("checkpoints", "loras", "serial_loras")}
    for folder in models.values():
        folder.mkdir(parents=True)
    pack = base / "custom_nodes" / "serial-lora"
    for name in PACK_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, pack / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            pack.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, pack / name)
    transformer = tiny_sd3_comfy_compatible_transformer(**SD3_TEXT)
    diffusers_file = base / "tiny_sd3_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in transformer.state_dict().items()}, diffusers_file)
    build = subprocess.run([sys.executable, str(REPO / "tests" / "comfyui_tiny_checkpoint.py"), str(comfyui_dir),
                            str(diffusers_file), str(models["checkpoints"] / "tiny_sd3.safetensors")],
                           capture_output=True, text=True, timeout=WAIT)
    assert build.returncode == 0, build.stderr[-3000:]
    _adapter(models["serial_loras"] / "tiny.safetensors", seed=1)
    _adapter(models["loras"] / "deeper.safetensors", seed=2, num_layers=3)  # a file for another model
    port, log = _free_port(), base / "server.log"
    command = [sys.executable, "-c", NOT_INSTALLED_BOOT, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", f"sqlite:///{base / 'comfy.db'}"]
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(command, cwd=comfyui_dir, stdout=log_handle, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    running = Server(f"http://127.0.0.1:{port}", base, log)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if process.poll() is not None:
                pytest.fail(f"the ComfyUI server exited with {process.returncode}:\n{running.log_tail()}")
            try:
                running.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"the ComfyUI server did not answer within {WAIT} s:\n{running.log_tail()}")
                time.sleep(0.5)
        yield running
    finally:
        _stop(process)
    assert not _group_alive(process.pid), "a process of the ComfyUI server is still running"


def _example(changes: dict[tuple[str, str], object] | None = None) -> dict:
    """The example workflow (API format) on the tiny checkpoint and adapter: small image, 2 steps;
    `changes` maps (node id, input name) to a value."""
    prompt = json.loads(API_WORKFLOW.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = "tiny_sd3.safetensors"
    prompt["2"]["inputs"]["lora_name"] = "tiny.safetensors"
    prompt["5"]["inputs"].update(width=IMAGE_SIZE, height=IMAGE_SIZE)
    prompt["6"]["inputs"]["steps"] = 2
    for (node, name), value in (changes or {}).items():
        prompt[node]["inputs"][name] = value
    return prompt


def _without_serial_lora(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    prompt["6"]["inputs"]["model"] = prompt.pop("2")["inputs"]["model"]
    return prompt


def _error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return error


# ------------------------------------------------------------------------------------------ HTTP API
def test_object_info_lists_the_nodes_their_inputs_and_the_adapter_files(server):
    info = server.get_json("/object_info")
    for node_id, (display_name, inputs, outputs) in NODES.items():
        node = info[node_id]
        assert node["display_name"] == display_name and node["category"] == "model/loaders"
        assert node["input_order"]["required"] == inputs and node["output"] == outputs
        options = node["input"]["required"]["lora_name"][1]["options"]
        assert options == ["tiny.safetensors", "deeper.safetensors"]  # models/serial_loras, then models/loras
        assert node["python_module"] == "custom_nodes.serial-lora"
    assert info["SaveSerialLoraAsLora"]["output_node"] is True


def test_example_workflow_is_offered_as_a_template(server):
    assert server.get_json("/workflow_templates")["serial-lora"] == ["serial_lora_sd3"]
    served = json.loads(server.get("/api/workflow_templates/serial-lora/serial_lora_sd3.json"))
    assert served == json.loads(UI_WORKFLOW.read_text())


def test_api_example_is_the_ui_example():
    """example_workflows/api/ holds the same graph as the UI workflow, in the format /prompt takes."""
    ui, api = json.loads(UI_WORKFLOW.read_text()), json.loads(API_WORKFLOW.read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    by_id = {n["id"]: n for n in ui["nodes"]}
    for _, source, slot, target, target_slot, _ in ui["links"]:
        name = by_id[target]["inputs"][target_slot]["name"]
        assert api[str(target)]["inputs"][name] == [str(source), slot]
    lora_name, strength = by_id[2]["widgets_values"]
    assert api["2"]["inputs"] == {"model": ["1", 0], "lora_name": lora_name, "strength_model": strength}


def test_example_workflow_makes_an_image_that_the_serial_lora_changes(server):
    with_lora = server.run(_example())
    without = server.run(_without_serial_lora(_example()))
    assert with_lora["status"]["status_str"] == without["status"]["status_str"] == "success"
    images = [server.image(entry) for entry in (with_lora, without)]
    for image in images:
        assert image.format == "PNG" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    pixels = [torch.tensor(list(image.convert("RGB").tobytes()), dtype=torch.int16) for image in images]
    assert (pixels[0] - pixels[1]).abs().max() > 8  # the adapter changed the picture, not just rounding
    assert len(list((server.base / "output").glob("serial_lora_*.png"))) >= 2


def test_unknown_file_name_is_refused_at_queueing_naming_it(server):
    status, answer = server.post_prompt(_example({("2", "lora_name"): "no_such_file.safetensors"}))
    assert status == 400
    (error,) = answer["node_errors"]["2"]["errors"]
    assert "no_such_file.safetensors" in error["details"] and error["extra_info"]["input_name"] == "lora_name"


@pytest.mark.parametrize("case, changes, words", [
    ("file for another model", {("2", "lora_name"): "deeper.safetensors"},
     ["deeper.safetensors", "match nothing", "transformer_blocks.2.attn"]),
    # NaN passes ComfyUI's min/max check (every comparison with NaN is false): the node refuses it.
    ("strength NaN", {("2", "strength_model"): math.nan}, ["strength_model is nan", "finite"]),
])
def test_bad_input_is_an_error_in_history_and_the_server_keeps_serving(server, case, changes, words):
    error = _error(server.run(_example(changes)))
    assert error["node_type"] == "SerialLoraLoaderModelOnly" and error["exception_type"].endswith("SerialLoraError")
    for word in words:
        assert word in error["exception_message"], error["exception_message"]
    after = server.run(_example({("6", "seed"): len(case)}))  # a new seed: really executed, not cached
    assert after["status"]["status_str"] == "success"


# ------------------------------------------------------------------------------------------ browser
class DevTools:
    """A minimal Chrome DevTools protocol client: commands over the page's websocket, events kept."""

    def __init__(self, websocket):
        self.websocket, self.events, self.pending, self.next_id = websocket, [], {}, 0

    async def listen(self) -> None:
        async for message in self.websocket:
            data = json.loads(message.data)
            future = self.pending.pop(data.get("id"), None)
            if future is not None:
                future.set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.websocket.send_json({"id": self.next_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 60)
        assert "error" not in answer, (method, answer)
        return answer["result"]

    async def evaluate(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, seconds: float = 60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"the page never satisfied {expression!r} within {seconds} s")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads, as text with their source URLs."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event.get("method") == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"]))
            elif event.get("method") == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                found.append(json.dumps(params))
            elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(json.dumps(params["entry"]))
        return found


def _returning_user(server: Server) -> None:
    """What a user who has used ComfyUI before has: the first-visit templates browser already dismissed."""
    request = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


async def _node_search(url: str, screenshot: Path) -> dict:
    """Open the ComfyUI frontend in headless Chromium, double-click the empty canvas, type the node's name
    in the node search, take a screenshot, add the first result with Enter; report what was seen."""
    import aiohttp

    profile = tempfile.mkdtemp(prefix="chromium-")
    browser = subprocess.Popen(
        ["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert browser.poll() is None and time.monotonic() < deadline, "chromium did not start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                page = next(t for t in await response.json() if t["type"] == "page")
            async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as websocket:
                tools = DevTools(websocket)
                listener = asyncio.create_task(tools.listen())
                try:
                    return await _search_on_page(tools, url, screenshot)
                except AssertionError:  # keep what the page showed, for whoever reads the failure
                    shot = await tools.send("Page.captureScreenshot", format="png")
                    screenshot.with_name("comfyui_failure.png").write_bytes(base64.b64decode(shot["data"]))
                    raise
                finally:
                    listener.cancel()
    finally:
        _stop(browser)
        shutil.rmtree(profile, ignore_errors=True)


async def _press(tools: DevTools, key: str, code: int) -> None:
    for kind in ("keyDown", "keyUp"):
        await tools.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)


async def _appears(tools: DevTools, expression: str, seconds: float) -> bool:
    try:
        await tools.wait_for(expression, seconds)
    except AssertionError:
        return False
    return True


async def _search_on_page(tools: DevTools, url: str, screenshot: Path) -> dict:
    await tools.send("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False)
    for domain in ("Runtime", "Log", "Page"):
        await tools.send(f"{domain}.enable")
    await tools.send("Page.navigate", url=url)
    await tools.wait_for("!!(window.app && window.app.graph && document.querySelector('canvas'))", WAIT)
    # The start-up workflow is loaded asynchronously: wait for it (bounded), then start from an empty canvas.
    await _appears(tools, "window.app.graph._nodes.length > 0", 15)
    for _ in range(5):  # something loaded late may take the double-click: close it (Escape), clear, retry
        await tools.evaluate("window.app.graph.clear(); window.app.graph.setDirtyCanvas(true, true)")
        await asyncio.sleep(0.5)
        for kind, count in (("mousePressed", 1), ("mouseReleased", 1), ("mousePressed", 2), ("mouseReleased", 2)):
            await tools.send("Input.dispatchMouseEvent", type=kind, x=640, y=420, button="left", clickCount=count)
        if await _appears(tools, "document.activeElement?.getAttribute('placeholder') === 'Add a node...'", 5):
            break
        await _press(tools, "Escape", 27)
    else:
        raise AssertionError("double-clicking the empty canvas never opened the node search")
    await tools.send("Input.insertText", text="Load Serial LoRA")
    options = await tools.wait_for(
        "(() => { const o = Array.from(document.querySelectorAll('[role=option]')).map(e => e.innerText);"
        " return o.some(t => t.includes('Load Serial LoRA')) && o; })()", 30)
    shot = await tools.send("Page.captureScreenshot", format="png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    await _press(tools, "Enter", 13)
    added = await tools.wait_for(
        "(() => { const n = window.app.graph._nodes; return n.length === 1 &&"
        " {type: n[0].type, widgets: n[0].widgets.map(w => [w.name, w.value]), inputs: n[0].inputs.map(i => i.name),"
        "  options: n[0].widgets[0].options.values}; })()", 30)
    await asyncio.sleep(0.5)
    shot = await tools.send("Page.captureScreenshot", format="png")
    screenshot.with_name("comfyui_node_added.png").write_bytes(base64.b64decode(shot["data"]))
    return {"options": options, "added": added, "errors": tools.errors()}


@pytest.fixture(scope="module")
def browser_run(server):
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed: run `bash scripts/setup_comfyui.sh` (apt-get install chromium)")
    _returning_user(server)
    seen = asyncio.run(asyncio.wait_for(_node_search(server.url, ARTIFACTS / "comfyui_node_search.png"), WAIT))
    # Every console error of the page (most come from an offline ComfyUI: update checks, templates not installed).
    (ARTIFACTS / "comfyui_console_errors.json").write_text(json.dumps(seen["errors"], indent=1))
    return seen


def test_frontend_node_search_finds_and_adds_the_loader(browser_run):
    assert browser_run["options"][0].startswith("Load Serial LoRA")
    assert any(o.startswith("Load Serial LoRA (model only)") for o in browser_run["options"])
    added = browser_run["added"]
    assert added["type"] == "SerialLoraLoader"
    assert added["inputs"][:2] == ["model", "clip"]
    assert [name for name, _ in added["widgets"]] == ["lora_name", "strength_model", "strength_clip"]
    assert added["options"] == ["tiny.safetensors", "deeper.safetensors"]


@pytest.mark.parametrize("name", ["comfyui_node_search.png", "comfyui_node_added.png"])
def test_frontend_screenshots_are_written(browser_run, name):
    image = Image.open(ARTIFACTS / name)
    assert image.format == "PNG" and image.size == (1280, 800)
    assert len(set(image.convert("L").resize((64, 40)).tobytes())) > 10  # a rendered page, not a blank one


def test_frontend_shows_no_console_error_caused_by_the_pack(browser_run):
    ours = [e for e in browser_run["errors"] if "serial" in e.lower()]
    assert ours == []
