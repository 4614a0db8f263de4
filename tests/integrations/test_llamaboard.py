"""LlamaBoard in a real browser: the real `llamafactory-cli webui` (subprocess) driven by headless Chromium (selenium).

One webui and one browser serve the whole module; the tests run in file order (the training test leaves the
checkpoint the chat / eval / export steps use). Elements are found by the labels LLaMA-Factory sets (its English
locale) and by the elem_ids of our MoE widgets (``moe_<method>_<field>``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BASE_ENV, REPO_ROOT, read_jsonl

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
# Training-speed settings typed into LlamaBoard's own "Extra arguments" box (JSON, applied after the UI's fields).
EXTRA_ARGS = ('{"optim": "adamw_torch", "max_steps": 3, "logging_steps": 1, "save_steps": 3, "cutoff_len": 32, '
              '"max_samples": 16, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, '
              '"preprocessing_num_workers": 1, "bf16": false, "report_to": "none"}')
WAIT = 30  # seconds for a UI reaction; long runs (training, loading) pass their own timeout


def _require_browser() -> None:
    """Skip only when .ci/run could not install the browser (it says why in LLAMAFACTORY_MOE_NO_BROWSER)."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.environ.get("LLAMAFACTORY_MOE_NO_BROWSER"):
        reason = os.environ["LLAMAFACTORY_MOE_NO_BROWSER"]
        pytest.skip(f"LlamaBoard browser tests need chromium + chromedriver: {reason}")
    pytest.fail(f"chromium / chromedriver not found ({CHROMIUM}, {CHROMEDRIVER}): install them with "
                "`apt-get install -y chromium chromium-driver` (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """The real webui in a temp cwd (it writes saves/ and llamaboard_cache/ there); yields (url, workdir)."""
    _require_browser()
    workdir = tmp_path_factory.mktemp("llamaboard")
    port = _free_port()
    env = {**BASE_ENV, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "BROWSER": "true"}  # BROWSER: launch(inbrowser=True) opens nothing
    log = open(workdir / "webui.log", "w")
    proc = subprocess.Popen(["llamafactory-cli", "webui"], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"llamafactory-cli webui did not start: {(workdir / 'webui.log').read_text()[-3000:]}")
    yield url, workdir
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def ui(board, tiny_model, tiny_data):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    url, workdir = board
    driver.get(url)
    page = Page(driver, workdir)
    page.data_dir = tiny_data
    page.wait_for(lambda: page.dropdown("Finetuning method"), timeout=60)
    page.choose("Model name", "Custom")
    page.type_into("Model path", tiny_model)
    page.type_into("Data dir", tiny_data)
    page.choose("Dataset", "tiny")
    page.open_accordion("Extra configurations")
    page.type_into("Extra arguments", EXTRA_ARGS)
    yield page
    driver.quit()


class Page:
    """Small helpers over LlamaBoard's DOM (gradio 5): blocks are found by their visible label."""

    def __init__(self, driver, workdir: Path):
        self.d, self.workdir = driver, workdir

    def wait_for(self, condition, timeout: float = WAIT, message: str = ""):
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.support.ui import WebDriverWait

        def safe(_):
            try:
                return condition()
            except WebDriverException:
                return False

        return WebDriverWait(self.d, timeout, poll_frequency=0.5).until(safe, message)

    def visible(self, xpath: str):
        from selenium.webdriver.common.by import By

        found = [e for e in self.d.find_elements(By.XPATH, xpath) if e.is_displayed()]
        return found[0] if found else None

    def block(self, label: str):
        return self.visible(f"//span[@data-testid='block-info' and normalize-space()='{label}']"
                            "/ancestor::div[contains(@class,'block')][1]")

    def dropdown(self, label: str):
        block = self.block(label)
        return block.find_element("tag name", "input") if block is not None else None

    def choose(self, label: str, value: str) -> None:
        self.wait_for(lambda: self.dropdown(label), message=label).click()
        option = f"//li[@data-testid='dropdown-option' and @aria-label='{value}']"
        self.wait_for(lambda: self.visible(option), message=f"{label}: option {value}").click()
        self.d.find_element("tag name", "body").click()  # close the list (and blur a multiselect)

    def type_into(self, label_or_id: str, text: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.wait_for(lambda: self._input(label_or_id), message=label_or_id)
        field.click()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        field.send_keys(text)
        field.send_keys(Keys.TAB)  # blur: gradio fires change / input

    def _input(self, label_or_id: str):
        from selenium.webdriver.common.by import By

        block = self.visible(f"//div[@id='{label_or_id}']") or self.block(label_or_id)
        if block is None:
            return None
        found = [e for e in block.find_elements(By.CSS_SELECTOR, "textarea, input[type=number], input[type=text], "
                                                                  "input:not([type])") if e.is_displayed()]
        return found[0] if found else None

    def check(self, elem_id: str, on: bool) -> None:
        box = self.wait_for(lambda: self.visible(f"//div[@id='{elem_id}']//input[@type='checkbox']"), message=elem_id)
        if box.is_selected() != on:
            box.click()

    def click(self, text: str) -> None:
        button = f"//button[normalize-space()='{text}' and not(@role='tab')]"  # not the tab of the same name
        self.wait_for(lambda: self.visible(button), message=text).click()

    def tab(self, name: str) -> None:
        self.wait_for(lambda: self.visible(f"//button[@role='tab' and normalize-space()='{name}']"),
                      message=name).click()

    def open_accordion(self, label: str) -> None:
        button = self.wait_for(lambda: self.visible(f"//button[.//span[normalize-space()='{label}']]"), message=label)
        if button.get_attribute("aria-expanded") != "true":
            button.click()

    def text(self) -> str:
        return self.d.find_element("tag name", "body").text

    def wait_text(self, needle: str, timeout: float = WAIT) -> str:
        return self.wait_for(lambda: needle in self.text() and self.text(), timeout, f"text {needle!r} never showed;"
                             f" page ends with: {self.text()[-1500:]}")

    def preview(self) -> dict[str, str]:
        """Click "Preview command" and parse the command it shows into {key: value}."""
        self.d.execute_script("document.querySelectorAll('pre code').forEach(e => e.textContent = '');")
        self.click("Preview command")
        code = self.wait_for(lambda: self.visible("//pre[contains(., 'llamafactory-cli train')]"),
                             message=f"no command; the page ends with: {self.text()[-800:]}")
        return dict(re.findall(r"--(\S+) (.*?) *\\?$", code.text, flags=re.M))

    def screenshot(self, element, name: str) -> Path:
        path = self.workdir / name
        self.d.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
        time.sleep(0.5)
        element.screenshot(str(path))
        return path


def _textarea_values(page: Page) -> str:
    return "\n".join(page.d.execute_script("return [...document.querySelectorAll('textarea')].map(t => t.value);"))


def test_lora_preview_unchanged(ui):
    cmd = ui.preview()
    assert cmd["finetuning_type"] == "lora"
    assert (cmd["lora_rank"], cmd["lora_alpha"], cmd["lora_dropout"], cmd["lora_target"]) == ("8", "16", "0", "all")
    assert not [k for k in cmd if k.startswith("moe_")]
    assert ui.visible("//div[@id='moe_tab']") is None  # the MoE accordion only shows for our methods


def test_invalid_value_shows_error_and_nothing_starts(ui):
    ui.choose("Finetuning method", "moelora")
    ui.type_into("moe_moelora_num_experts", "2")
    ui.type_into("moe_moelora_top_k", "3")
    message = ("llamafactory-moe: invalid configuration: `moe_top_k` (3) must be <= `moe_num_experts` (2) for "
               "`moelora`; lower `moe_top_k` or raise `moe_num_experts`")
    for button in ("Preview command", "Start"):
        ui.d.execute_script("document.querySelectorAll('.toast-text').forEach(e => e.remove());")
        ui.click(button)
        ui.wait_for(lambda: any(message in e.text for e in ui.d.find_elements("css selector", ".toast-text")),
                    message=f"{button}: no warning with our message")
        # and the output box (markdown: backticks become <code>; after Start it still holds the same message)
        ui.wait_for(lambda: ui.visible(f'//p[normalize-space()="{message.replace("`", "")}"]'),
                    message=f"{button}: our message is not in the output box")
    time.sleep(3)
    assert not (ui.workdir / "saves").exists()  # nothing was launched
    ui.type_into("moe_moelora_top_k", "1")
    ui.type_into("moe_moelora_aux_loss_coef", "-1")  # below the widget's minimum: gradio refuses it
    ui.click("Preview command")
    ui.wait_text("Value -1 is less than minimum value 0")
    ui.type_into("moe_moelora_aux_loss_coef", "0.01")
    cmd = ui.preview()
    assert (cmd["moe_num_experts"], cmd["moe_top_k"]) == ("2", "1")


def test_hydralora_keys_in_preview(ui):
    ui.choose("Finetuning method", "hydralora")
    ui.wait_for(lambda: ui.visible("//div[@id='moe_hydralora_num_experts']"))
    assert ui.visible("//div[@id='moe_moelora_top_k']") is None  # only the chosen method's keys show
    ui.type_into("moe_hydralora_num_experts", "2")
    ui.check("moe_hydralora_head_balance_loss", True)
    cmd = ui.preview()
    assert cmd["finetuning_type"] == "hydralora"
    assert (cmd["moe_num_experts"], cmd["moe_head_balance_loss"], cmd["lora_rank"]) == ("2", "True", "8")


def test_every_method_shows_only_its_keys_and_previews(ui):
    from llamafactory_moe.integrations.llamaboard import method_keys, method_names

    for method in method_names():
        ui.choose("Finetuning method", method)
        ui.wait_for(lambda: ui.visible(f"//div[@id='moe_group_{method}']"), message=method)
        shown = {e.get_attribute("id") for e in ui.d.find_elements("css selector", "[id^='moe_']") if e.is_displayed()}
        assert {k for k in shown if k.count("_") > 1 and not k.startswith("moe_group")} == \
            {k.elem_name for k in method_keys(method)}, method
        cmd = ui.preview()  # a command, not our error: the UI's defaults are valid for every method
        assert cmd["finetuning_type"] == method, method
        # S'MoRE sizes its experts per layer and rejects lora_rank / lora_alpha; the others read them.
        assert ("lora_rank" in cmd) == (method != "smore"), method
    ui.choose("Finetuning method", "goat")
    ui.check("moe_goat_svd_init", False)  # a key whose default is true: false must reach the command
    assert ui.preview()["moe_svd_init"] == "False"


def test_smora_trains_lists_chats_evaluates_and_refuses_export(ui, tmp_path):
    ui.choose("Finetuning method", "smora")
    ui.type_into("moe_smora_top_k", "4")
    ui.type_into("moe_smora_rank_partition", "2")
    cmd = ui.preview()
    assert (cmd["finetuning_type"], cmd["moe_top_k"], cmd["moe_rank_partition"]) == ("smora", "4", "2")
    assert (cmd["lora_rank"], cmd["lora_alpha"], cmd["max_steps"]) == ("8", "16", "3")
    accordion = ui.visible("//div[@id='moe_tab']")
    shot = ui.screenshot(accordion, "llamaboard_train.png")

    ui.click("Start")
    ui.wait_text("Finished.", timeout=600)
    saves = ui.workdir / "saves" / "Custom" / "smora"
    run = next(saves.iterdir())
    logs = (run / "trainer_log.jsonl").read_text()
    assert '"lm_loss"' in logs and '"moe_aux_loss"' in logs
    from llamafactory.webui.control import gen_loss_plot  # the function the Train tab plots with (patched)

    lines = gen_loss_plot(read_jsonl(run / "trainer_log.jsonl")).axes[0].get_lines()
    assert {"lm_loss", "moe_aux_loss"} <= {line.get_label() for line in lines}
    plot = ui.wait_for(lambda: ui.visible("//div[contains(@class,'block')][.//img[contains(@src,'data:')]]"))
    loss_shot = ui.screenshot(plot, "llamaboard_loss.png")

    ui.choose("Checkpoint path", run.name)  # listed as an adapter of our method
    ui.tab("Chat")
    ui.click("Load model")
    ui.wait_for(lambda: "Model loaded" in _textarea_values(ui), timeout=300, message=_textarea_values(ui))
    query = ui.wait_for(lambda: ui.visible("//textarea[@placeholder='Input...']"))
    query.send_keys("add 1 and 2")
    ui.click("Submit")
    reply = ui.wait_for(lambda: (e := ui.visible("//*[@data-testid='bot']")) and e.text.strip() and e, timeout=120)
    assert reply.text.strip()

    ui.tab("Evaluate & Predict")
    ui.type_into("Data dir", ui.data_dir)
    ui.choose("Dataset", "tiny")
    ui.type_into("Max samples", "4")
    ui.type_into("Maximum new tokens", "8")
    ui.click("Start")
    ui.wait_text("predict_", timeout=600)  # LlamaBoard shows all_results.json when the run finished
    assert list((ui.workdir / "saves" / "Custom" / "smora").glob("eval_*/generated_predictions.jsonl"))

    ui.tab("Export")
    ui.type_into("Export dir", str(tmp_path / "merged"))
    ui.click("Export")
    ui.wait_for(lambda: "cannot be merged" in _textarea_values(ui))
    assert "llamafactory-moe: invalid configuration: `export_dir`" in _textarea_values(ui)
    assert not (tmp_path / "merged").exists()

    for path in (shot, loss_shot):
        assert path.stat().st_size < 200_000
    if os.environ.get("LLAMAFACTORY_MOE_SAVE_SCREENSHOTS") == "1":
        shutil.copy(shot, REPO_ROOT / "docs" / "llamaboard_train.png")


def test_moslora_trains_and_exports_merged(ui, tmp_path):
    ui.tab("Train")
    ui.choose("Finetuning method", "moslora")
    cmd = ui.preview()
    assert cmd["finetuning_type"] == "moslora" and not [k for k in cmd if k.startswith("moe_")]
    ui.click("Start")
    saves = ui.workdir / "saves" / "Custom" / "moslora"
    ui.wait_for(lambda: list(saves.glob("*/adapter_model.safetensors")) and "Finished." in ui.text(), timeout=600,
                message="moslora training did not finish")
    ui.choose("Checkpoint path", next(saves.iterdir()).name)
    ui.tab("Export")
    ui.type_into("Export dir", str(tmp_path / "merged"))
    ui.click("Export")
    ui.wait_for(lambda: "Model exported." in _textarea_values(ui), timeout=300, message=_textarea_values(ui))
    assert list((tmp_path / "merged").glob("model*.safetensors"))
    assert not (tmp_path / "merged" / "adapter_config.json").exists()  # merged into the base weights
