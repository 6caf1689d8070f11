"""In a real browser, as a user: retry a failed deployment run from the Prefect UI (both of its UIs),
then follow the registered model in the MLflow UI to its training run and the datasets it used.

Headless Chromium from the system (Debian's ``chromium`` package) driven by Playwright; nothing is
downloaded (no ``playwright install``) and the pages may reach nothing but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import httpx
import pytest
import yaml
from mlflow.tracking import MlflowClient
from playwright import sync_api  # the test extra; CI has it: a missing browser fails, never skips

from tests.browser import chromium_path, launch, screenshot_on_failure, stop_process_tree, wait_until
from tests.conftest import BIN, ROOT
from tests.test_e2e import FINAL, STAGES, parent_runs, stage_runs, task_states, write_config

expect = sync_api.expect

pytestmark = pytest.mark.e2e

POOL = DEPLOYMENT = "browser-ui"
EXPERIMENT, MODEL = "browser-ui", "browser-ui-gpt"
UIS = ["v2", "v1"]   # Prefect 3.8 serves both; a browser without a saved preference lands on v2
RUN_TIMEOUT = 600    # seconds for a pipeline run on a busy 2-core machine
UI_TIMEOUT = 60_000  # milliseconds for a page to show something


def prefect_env(servers: dict[str, str], home) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(servers, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="2", PYTHONUNBUFFERED="1")
    return env


def flow_run(api: str, fr_id: str) -> dict:
    r = httpx.get(f"{api}/flow_runs/{fr_id}", timeout=30)
    r.raise_for_status()
    return r.json()


def wait_for_attempt(api: str, fr_id: str, attempt: int, worker, log) -> dict:
    """The flow run once its ``attempt``-th run is over (run_count counts attempts)."""
    def done():
        fr = flow_run(api, fr_id)
        over = fr["state"]["type"] in FINAL
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-4000:]}")
        return fr if over and fr["run_count"] >= attempt else None
    return wait_until(done, RUN_TIMEOUT, f"flow run {fr_id}, attempt {attempt}", every=2,
                      describe=lambda: log.read_text()[-4000:])


def fix_config(path: str) -> None:
    """What the user corrects before pressing Retry: the flow reads the file again."""
    cfg = yaml.safe_load(open(path))
    cfg["train"]["device"] = "cpu"
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)


@pytest.fixture(scope="module")
def failed_runs(tmp_path_factory, servers):
    """The pipeline deployed to a process work pool with a worker serving it, and one flow run per
    Prefect UI created from the deployment, each with a config whose train device does not exist:
    collect..tokenize finish, train fails. Yields {ui: {"id", "name", "config"}}; the worker keeps
    serving (retries) until the module ends."""
    home = tmp_path_factory.mktemp("browser")
    env = prefect_env(servers, home / ".prefect")
    api = servers["PREFECT_API_URL"]
    prefect_file = home / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump({
        "name": "browser-ui", "prefect-version": "3.8.8", "build": None, "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        "deployments": [{"name": DEPLOYMENT, "entrypoint": "flows/pipeline.py:pipeline",
                         "parameters": {"config_path": None, "overrides": []},
                         "work_pool": {"name": POOL}}]}))
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    for cmd in (["work-pool", "create", POOL, "--type", "process", "--overwrite"],
                ["deploy", "--prefect-file", str(prefect_file), "--all"]):
        proc = subprocess.run(prefect + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    deployment = httpx.get(f"{api}/deployments/name/ssl-pipeline/{DEPLOYMENT}", timeout=30).json()

    log = home / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(prefect[:1] + ["worker", "start", "--pool", POOL, "--type", "process"],
                                  cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        runs = {}
        for ui in UIS:
            # its own data folder, hence its own cache: this run's first attempt computes every stage
            config = write_config(home / f"{ui}.yaml", EXPERIMENT, MODEL, device="cuda:99")
            cfg = yaml.safe_load(open(config))
            cfg["data_dir"] = str(home / f"runs-{ui}")
            with open(config, "w") as f:
                yaml.safe_dump(cfg, f)
            # the server on SQLite answers 503 while its database is busy (seen once, on a fresh
            # machine, as the suite's first test started): retried, as Prefect's own client does
            for attempt in range(6):
                r = httpx.post(f"{api}/deployments/{deployment['id']}/create_flow_run", timeout=30,
                               json={"parameters": {"config_path": config, "overrides": []}})
                if r.status_code != 503:
                    break
                time.sleep(2 + 2 * attempt)
            r.raise_for_status()
            runs[ui] = {"id": r.json()["id"], "name": r.json()["name"], "config": config}
        for ui, run in runs.items():
            fr = wait_for_attempt(api, run["id"], 1, worker, log)
            assert fr["state"]["type"] == "FAILED", (ui, fr["state"], log.read_text()[-4000:])
            assert fr["deployment_id"] == deployment["id"]
            states = task_states(api, run["id"])
            assert [states.get(s) for s in STAGES] == [["Completed"]] * STAGES.index("train") + [["Failed"], None], \
                (states, log.read_text()[-4000:])
        yield {**runs, "_worker": (worker, log)}
    finally:
        stop_process_tree(worker)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    if executable is None:
        pytest.fail("no Chromium on this machine (apt-get install chromium, or set $CHROMIUM)")
    expect.set_options(timeout=UI_TIMEOUT)
    with sync_api.sync_playwright() as p:
        b = launch(p, executable)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    # the UIs phone home (analytics, docs, feature flags): only the local servers may be reached
    context.route(lambda url: not url.startswith("http://127.0.0.1"), lambda route: route.abort())
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT)
    try:
        yield page
    finally:
        context.close()


def open_flow_run_from_runs_list(page, ui_url: str, ui: str, name: str) -> None:
    """From the Prefect home page, as a user: (v1: switch UI,) Runs, search the run's name, open it."""
    page.goto(f"{ui_url}/")
    if ui == "v1":
        page.get_by_role("button", name="Switch to V1 UI").click()
        page.get_by_role("dialog").get_by_role("button", name="Skip feedback and switch").click()
        page.get_by_role("button", name="Switch to V2 UI").wait_for()
        page.get_by_role("button", name="Runs", exact=True).click()
    else:
        expect(page).to_have_url(re.compile(r"/v2/"))
        page.get_by_role("link", name="Runs", exact=True).first.click()
    page.get_by_placeholder("Search by flow run name").filter(visible=True).fill(name)
    page.get_by_role("link", name=name, exact=True).click()
    expect(page).to_have_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"))
    # the URL changes before the page does: wait until the list has made way for the run
    expect(page.get_by_placeholder("Search by flow run name")).to_have_count(0)
    expect(page.get_by_text(name, exact=True).first).to_be_visible()


def press_retry(page, ui: str, name: str) -> None:
    """The Retry action of a failed run from a deployment, confirmed in its dialog."""
    if ui == "v1":
        page.get_by_role("button", name="Retry", exact=True).click()
        dialog = page.get_by_role("dialog").filter(has_text=f"Retry {name}?")
    else:
        page.get_by_role("button", name="Open menu").click()
        page.get_by_role("menuitem", name="Retry", exact=True).click()
        dialog = page.get_by_role("alertdialog", name="Retry Flow Run")
        expect(dialog).to_contain_text(re.compile(r"Current state:\s*Failed"))
        expect(dialog).to_contain_text("AwaitingRetry")
    dialog.get_by_role("button", name="Retry", exact=True).click()
    expect(dialog).to_be_hidden()


@pytest.mark.parametrize("ui", UIS)
def test_retry_button_in_prefect_ui_reruns_only_the_failed_stage(ui, page, failed_runs, servers, tmp_path):
    api = servers["PREFECT_API_URL"]
    run = failed_runs[ui]
    worker, log = failed_runs["_worker"]
    assert flow_run(api, run["id"])["state"]["type"] == "FAILED"
    fix_config(run["config"])

    with screenshot_on_failure(page, tmp_path / f"prefect-{ui}.png"):
        open_flow_run_from_runs_list(page, api.removesuffix("/api"), ui, run["name"])
        expect(page).to_have_url(re.compile(f"/runs/flow-run/{run['id']}"))
        if ui == "v2":
            expect(page).to_have_url(re.compile(r"/v2/"))
        else:
            expect(page).not_to_have_url(re.compile(r"/v2/"))
        # the run's state badge in the page heading
        expect(page.get_by_text("Failed", exact=True)).to_be_visible()
        expect(page.get_by_text("Completed", exact=True)).to_have_count(0)
        press_retry(page, ui, run["name"])

        fr = wait_for_attempt(api, run["id"], 2, worker, log)
        assert fr["state"]["type"] == "COMPLETED", (fr["state"], log.read_text()[-4000:])
        page.reload()
        expect(page.get_by_text("Completed", exact=True)).to_be_visible()
        expect(page.get_by_text("Failed", exact=True)).to_have_count(0)

    states = task_states(api, run["id"])
    for stage in STAGES[:STAGES.index("train")]:
        assert states[stage] == ["Completed", "Cached"], (stage, states)
    assert states["train"] == ["Failed", "Completed"] and states["evaluate"] == ["Completed"], states


def completed_run(failed_runs, servers) -> dict:
    """A run whose retry completed: one the Prefect UI test retried, else retried here the same way
    the UI does it (state AwaitingRetry, picked up by the worker)."""
    api = servers["PREFECT_API_URL"]
    for ui in UIS:
        if flow_run(api, failed_runs[ui]["id"])["state"]["type"] == "COMPLETED":
            return failed_runs[ui]
    run = failed_runs[UIS[0]]
    fix_config(run["config"])
    r = httpx.post(f"{api}/flow_runs/{run['id']}/set_state", timeout=30,
                   json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    r.raise_for_status()
    fr = wait_for_attempt(api, run["id"], 2, *failed_runs["_worker"])
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    return run


def test_mlflow_ui_leads_from_the_registered_model_to_its_training_datasets(page, failed_runs, servers,
                                                                            tmp_path):
    run = completed_run(failed_runs, servers)
    client = MlflowClient(servers["MLFLOW_TRACKING_URI"])
    (parent,) = parent_runs(client, EXPERIMENT, run["id"])
    model_uri = parent.data.tags["ssl_pipeline.model_uri"]           # models:/<name>/<version>
    name, version_no = model_uri.removeprefix("models:/").rsplit("/", 1)
    assert name == MODEL
    version = client.get_model_version(MODEL, version_no)
    train_run = client.get_run(version.run_id)
    assert train_run.data.tags["ssl_pipeline.stage"] == "train"

    def context(d):
        return next(t.value for t in d.tags if t.key == "mlflow.data.context")
    used = {(d.dataset.name, d.dataset.digest, context(d)) for d in train_run.inputs.dataset_inputs}
    (trained_on,) = [d.dataset for d in train_run.inputs.dataset_inputs if context(d) == "input"]
    # lineage: what train read is what this pipeline run's tokenize stage wrote
    tokenize_id = parent.data.tags.get("ssl_pipeline.tokenize.mlflow_run_id") or next(
        r.info.run_id for r in stage_runs(client, parent.info.run_id)
        if r.info.run_name == "tokenize" and r.info.status == "FINISHED")
    tokenize = client.get_run(tokenize_id)
    written = [d.dataset for d in tokenize.inputs.dataset_inputs if context(d) == "output"]
    assert [(d.name, d.digest) for d in written] == [(trained_on.name, trained_on.digest)] == \
        [("tokenize", trained_on.digest)]

    # MLflow's promotion of its new registry UI pops up over the page now and then: close it
    page.add_locator_handler(page.get_by_role("dialog").filter(has_text="new Model Registry UI"),
                             lambda d: d.get_by_role("button", name="Close").click())
    # the experiment, from the link in the flow run's funnel report in Prefect, in a browser that
    # never chose GenAI or Model training: the runs table, as model training, not a GenAI overview
    arts = httpx.post(f"{servers['PREFECT_API_URL']}/artifacts/filter", timeout=30, json={
        "artifacts": {"key": {"any_": ["funnel-report"]}, "flow_run_id": {"any_": [run["id"]]}}}).json()
    experiment_link = re.search(r"\[the experiment's runs\]\((http[^)]+)\)", arts[-1]["data"]).group(1)
    assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    with screenshot_on_failure(page, tmp_path / "mlflow-experiment.png"):
        page.goto(experiment_link)
        expect(page.get_by_role("link", name=parent.info.run_name, exact=True)).to_be_visible()
        expect(page.get_by_role("link", name="Model registry", exact=True)).to_be_visible()   # the training sidebar
        expect(page.get_by_role("link", name="Evaluation runs")).to_have_count(0)
        expect(page.get_by_text("Token Usage")).to_have_count(0)
        page.screenshot(path=tmp_path / "experiment.png")   # to look at

    with screenshot_on_failure(page, tmp_path / "mlflow.png"):
        page.goto(servers["MLFLOW_TRACKING_URI"] + "/")
        page.get_by_role("button", name="Model training", exact=True).click()
        page.get_by_role("link", name="Model registry", exact=True).click()
        page.get_by_role("link", name=MODEL, exact=True).click()
        expect(page).to_have_url(re.compile(f"#/models/{MODEL}$"))
        page.get_by_role("link", name=f"Version {version_no}", exact=True).click()
        expect(page).to_have_url(re.compile(f"#/models/{MODEL}/versions/{version_no}$"))
        source_run = page.get_by_test_id("descriptions-item").filter(has_text="Source Run").get_by_role("link")
        expect(source_run).to_have_text(train_run.info.run_name)
        # what it was trained on (data digest, tokens), then its scores; its tags
        expect(page.get_by_text(f"Trained in MLflow run {version.run_id}").first).to_be_visible()
        expect(page.get_by_text(f"tokenize output sha256 {version.tags['data.sha256']}").first).to_be_visible()
        expect(page.get_by_text("Evaluated (MLflow run ").first).to_be_visible()
        expect(page.get_by_text(version.tags["data.sha256"], exact=True)).to_be_visible()   # the data.sha256 tag
        page.screenshot(path=tmp_path / "model-version.png", full_page=True)
        source_run.click()

        expect(page).to_have_url(re.compile(f"/runs/{version.run_id}"))
        expect(page.get_by_text(version.run_id, exact=True).first).to_be_visible()   # "Run ID"
        # the Datasets section: what this run was trained on, by name and digest
        shown = page.get_by_text(f"{trained_on.name} ({trained_on.digest})", exact=True).first
        expect(shown).to_be_visible()
        shown.click()
        details = page.get_by_role("dialog").filter(has_text="Data details for")
        expect(details).to_contain_text(f"Digest: {trained_on.digest}")
        expect(details).to_contain_text(f"Path: {json.loads(trained_on.source)['uri']}")
        text = details.inner_text()

    listed = set(re.findall(r"^(\S+) \(([0-9a-f]+)\)\n(Input|Output)$", text, flags=re.M))
    assert listed == {(n, d, c.capitalize()) for n, d, c in used}, (listed, used)
