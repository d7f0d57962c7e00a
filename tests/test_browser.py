"""The MLflow UI, opened in a real headless Chromium over a real `mlflow server` on the store of two
`dvc exp run` experiments, lists the runs by their DVC experiment names and shows each run's
source, commit, description, losses and images. Screenshots are kept in reports/."""

from __future__ import annotations

import getpass
import shutil

import mlflow
import pytest

from tests.conftest import ROOT, run, runs_of, serve_mlflow

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

REPORTS = ROOT / "reports"


@pytest.fixture(scope="module")
def server(experiments, tmp_path_factory):
    with serve_mlflow(f"sqlite:///{experiments}/mlruns/mlflow.db", tmp_path_factory.mktemp("artifacts")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1600,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def page_text(browser) -> str:
    return browser.find_element(By.TAG_NAME, "body").text


def open_and_wait(browser, url: str, *texts: str) -> str:
    """Open `url` and wait until every one of `texts` is on the page (the UI renders asynchronously)."""
    browser.get(url)
    try:
        WebDriverWait(browser, 60).until(lambda b: all(t in page_text(b) for t in texts))
    except Exception:
        missing = [t for t in texts if t not in page_text(browser)]
        raise AssertionError(f"{url} did not show {missing}; page text:\n{page_text(browser)[:3000]}") from None
    return page_text(browser)


def screenshot(browser, name: str) -> None:
    REPORTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(REPORTS / name))


def test_mlflow_ui_shows_the_runs_by_experiment_name_with_source_commit_description_and_results(
        server, browser, experiments):
    url, store, _ = server
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("vae-pipeline")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    names = run(["dvc", "exp", "list", "--name-only"], experiments).stdout.split()
    assert sorted(r.info.run_name for r in runs) == sorted(names)
    base = f"{url}/#/experiments/{experiment.experiment_id}"

    open_and_wait(browser, f"{base}/runs?workflowType=machine_learning", "vae-pipeline", *names)
    screenshot(browser, "mlflow-runs.png")

    first = runs[0]
    commit = first.data.tags["mlflow.source.git.commit"]
    branch = first.data.tags["mlflow.source.git.branch"]
    text = open_and_wait(browser, f"{base}/runs/{first.info.run_id}", first.info.run_name, "Description",
                         "train_total", "val_total", "test_total", "test_knn_accuracy")
    assert f"Created by\n{getpass.getuser()}\n" in text, "the user, from mlflow.user"
    assert f"Source\ntrain.py\n{branch}\n{commit[:7]}\n" in text, "the source, its branch and commit"
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Show more']").click()  # the whole description
    reproduce = f"dvc exp run -S train.learning_rate={first.data.params['train.learning_rate']}"
    WebDriverWait(browser, 30).until(lambda b: "Reproduce" in page_text(b) and reproduce in page_text(b))
    for name in ("train_total", "test_total"):  # the values too, as the store holds them
        assert repr(first.data.metrics[name]) in text, f"{name} = {first.data.metrics[name]!r} not shown"
    screenshot(browser, "mlflow-run.png")

    open_and_wait(browser, f"{base}/runs/{first.info.run_id}/artifacts/figures/reconstructions.png",
                  "figures", "manifold.png", "latent_space.png", "loss_curves.png", "reconstructions.png")
    WebDriverWait(browser, 60).until(lambda b: any(
        img.get_attribute("src").startswith("blob:") and img.get_property("naturalWidth") > 100
        for img in b.find_elements(By.TAG_NAME, "img")))
    screenshot(browser, "mlflow-artifact.png")
    assert (REPORTS / "mlflow-artifact.png").stat().st_size > 10_000


def test_a_run_that_only_evaluated_links_to_its_model_and_training_run(partial_experiments, browser,
                                                                        tmp_path_factory):
    project, _ = partial_experiments
    client, runs = runs_of(project)
    by_name = {r.info.run_name: r for r in runs}
    evaluated, trained = by_name["eval-only"], by_name["first"]
    model_id = evaluated.data.tags["model_id"]
    with serve_mlflow(f"sqlite:///{project}/mlruns/mlflow.db", tmp_path_factory.mktemp("artifacts")) as (url, _, _):
        base = f"{url}/#/experiments/{evaluated.info.experiment_id}"
        open_and_wait(browser, f"{base}/runs/{evaluated.info.run_id}", "eval-only", "Description")
        browser.find_element(By.XPATH, "//*[normalize-space(text())='Show more']").click()
        WebDriverWait(browser, 30).until(lambda b: "Trained by" in page_text(b))
        links = {a.get_attribute("href"): a.text for a in browser.find_elements(By.TAG_NAME, "a")}
        screenshot(browser, "mlflow-evaluate-only-run.png")
        training_link = next(h for h in links if h.endswith(f"/runs/{trained.info.run_id}"))
        model_link = next(h for h in links if h.endswith(f"/models/{model_id}"))

        open_and_wait(browser, training_link, "first")  # the link leads to the training run
        open_and_wait(browser, model_link, model_id)  # and to the model, whose page lists its evaluations
        screenshot(browser, "mlflow-logged-model.png")
