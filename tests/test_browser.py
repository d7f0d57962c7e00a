"""The MLflow UI, opened in a real headless Chromium over a real `mlflow server` on the store of two
`dvc exp run` experiments, lists the runs by their DVC experiment names and shows each run's
source, commit, description, losses and images. Screenshots are kept in reports/."""

from __future__ import annotations

import getpass
import shutil
import sys
from pathlib import Path

import mlflow
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.projects import ROOT, run
from tests.servers import runs_of, serve_mlflow

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)

REPORTS = ROOT / "reports"


@pytest.fixture(scope="module")
def server(experiments, tmp_path_factory):
    with serve_mlflow(f"sqlite:///{experiments}/mlruns/mlflow.db", tmp_path_factory.mktemp("artifacts")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--window-size=1600,1100",
    ):
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
    server, browser, experiments
):
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
    text = open_and_wait(
        browser,
        f"{base}/runs/{first.info.run_id}",
        first.info.run_name,
        "Description",
        "train_total",
        "val_total",
        "test_total",
        "test_knn_accuracy",
    )
    assert f"Created by\n{getpass.getuser()}\n" in text, "the user, from mlflow.user"
    assert f"Source\ntrain.py\n{branch}\n{commit[:7]}\n" in text, "the source, its branch and commit"
    browser.find_element(By.XPATH, "//*[normalize-space(text())='Show more']").click()  # the whole description
    reproduce = f"dvc exp run -S train.learning_rate={first.data.params['train.learning_rate']}"
    WebDriverWait(browser, 30).until(lambda b: "Reproduce" in page_text(b) and reproduce in page_text(b))
    for name in ("train_total", "test_total"):  # the values too, as the store holds them
        assert repr(first.data.metrics[name]) in text, f"{name} = {first.data.metrics[name]!r} not shown"
    screenshot(browser, "mlflow-run.png")

    # The per-epoch reconstructions' image card opens at step 0, and has an image there.
    browser.get(f"{base}/runs/{first.info.run_id}/model-metrics")
    search = "input[placeholder='Search metric charts']"
    WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, search))
    browser.find_element(By.CSS_SELECTOR, search).send_keys("reconstructions")
    WebDriverWait(browser, 60).until(
        lambda b: any(
            "reconstructions%2Bstep%2B0%2B" in (img.get_attribute("src") or "") and img.get_property("naturalWidth")
            for img in b.find_elements(By.TAG_NAME, "img")
        )
    )
    assert "No image logged at this step" not in page_text(browser)
    screenshot(browser, "mlflow-image-card.png")

    open_and_wait(
        browser,
        f"{base}/runs/{first.info.run_id}/artifacts/figures/reconstructions.png",
        "figures",
        "manifold.png",
        "latent_space.png",
        "loss_curves.png",
        "reconstructions.png",
    )
    WebDriverWait(browser, 60).until(
        lambda b: any(
            img.get_attribute("src").startswith("blob:") and img.get_property("naturalWidth") > 100
            for img in b.find_elements(By.TAG_NAME, "img")
        )
    )
    screenshot(browser, "mlflow-artifact.png")
    assert (REPORTS / "mlflow-artifact.png").stat().st_size > 10_000


def test_a_run_that_only_evaluated_links_to_its_model_and_training_run(partial_experiments, browser, tmp_path_factory):
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


CHARTS = {  # dvc.yaml's top-level plots of metrics/*.csv: the page's id -> its y axis and legend entries
    "Total_loss_per_epoch": ("loss per image (reconstruction + KL)", "train_total", "val_total"),
    "Reconstruction_error_per_epoch": ("squared error per image", "train_reconstruction", "val_reconstruction"),
    "KL_divergence_per_epoch": ("KL divergence per image", "train_kl", "val_kl"),
    "Active_latent_dimensions_per_epoch": ("active latent dimensions",),
    # metrics/latent.csv in our own template: a line per latent dimension (2 by default) and revision
    "KL_per_latent_dimension_per_epoch": ("validation KL per image (nats)", "latent dimension", "0", "1"),
}
FIGURES = (
    "reconstructions",
    "prior_samples",
    "latent_space",
    "manifold",
    "interpolation",
    "traversals",
    "loss_curves",
)


def test_dvc_plots_diff_of_two_experiments_draws_each_chart_and_figure_once_offline(experiments, browser, tmp_path):
    """DVC's own page loads Vega from a CDN, so offline it draws no chart; after `python -m
    pipeline.offline_plots` the same `dvc plots diff` draws every chart with no network at all."""
    project = Path(shutil.copytree(experiments, tmp_path / "project", symlinks=True))
    names = run(["dvc", "exp", "list", "--name-only"], project).stdout.split()
    run(["dvc", "plots", "diff", *names, "-o", str(tmp_path / "online")], project)
    run([sys.executable, "-m", "pipeline.offline_plots"], project)
    run(["dvc", "plots", "diff", *names, "-o", str(tmp_path / "plots")], project)

    browser.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    try:
        browser.get((tmp_path / "online" / "index.html").as_uri())
        assert browser.execute_script("return typeof vegaEmbed") == "undefined", "DVC's page reached its CDN"
        browser.get((tmp_path / "plots" / "index.html").as_uri())
        WebDriverWait(browser, 60).until(
            lambda b: len(b.find_elements(By.CSS_SELECTOR, ".vega-embed svg")) >= len(CHARTS)
        )
    finally:
        browser.delete_network_conditions()
    screenshot(browser, "dvc-plots-diff.png")
    charts = {c.get_attribute("id"): c.text for c in browser.find_elements(By.CSS_SELECTOR, ".vega-embed")}
    assert sorted(charts) == sorted(CHARTS), "each chart drawn once"
    for chart_id, (y_label, *curves) in CHARTS.items():
        text = set(charts[chart_id].splitlines())  # the title, the axes' titles, the legends' entries
        expected = {chart_id.replace("_", " "), "epoch", y_label, *names, *curves}
        assert expected <= text, f"{chart_id} lacks {sorted(expected - text)}: {sorted(text)}"
    for figure in FIGURES:
        sections = browser.find_elements(By.ID, f"figures_{figure}_png")
        assert len(sections) == 1, f"figures/{figure}.png shown {len(sections)} times"
        images = sections[0].find_elements(By.TAG_NAME, "img")
        assert [img.get_attribute("src").rsplit("/", 1)[1] for img in images] == [
            f"{name}_figures_{figure}.png" for name in names
        ], "one image per experiment"
        assert all(img.get_property("naturalWidth") > 0 for img in images), f"figures/{figure}.png did not load"
