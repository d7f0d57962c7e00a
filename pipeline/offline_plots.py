"""`python -m pipeline.offline_plots`: `dvc plots show` and `dvc plots diff` draw their charts
without internet. DVC's page loads Vega from a CDN, and offline (a GPU node, a train) it shows the
figures but no chart, without an error. This writes a page template for DVC with Vega, Vega-Lite
and vega-embed inside it, bundled by vl-convert (the Vega project's own converter), and points
this repository's local DVC config at it (`plots.html_template`). Run it once per clone; undo
with `dvc config --local --unset plots.html_template`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import vl_convert

from pipeline import atomic
from pipeline.errors import PipelineError
from pipeline.stage import run_stage

TEMPLATE = Path(".dvc/tmp/plots/offline.html")  # DVC's own temporary folder: git ignores it
VEGA_LITE = "v5.21"  # DVC's plot templates are Vega-Lite 5 specs

# The bundle's globals, as DVC's divs call them; charts drawn as SVG, whose text (titles, axes,
# legends) can be selected, searched and read by a test.
GLOBALS = """
window.vegaEmbed = (element, spec, options) => vegaEmbed(element, spec, {renderer: "svg", ...options});
window.vega = vega;
window.vegaLite = vegaLite;
"""
# DVC fills {plot_divs} with a <div> per chart, each calling vegaEmbed from an inline script, so
# the bundle is a classic script in <head>: vegaEmbed is defined before the first div runs.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <script>BUNDLE</script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> None:
    if not Path(".dvc").is_dir():
        raise PipelineError("no .dvc folder here: run it from the project root")
    bundle = vl_convert.javascript_bundle(GLOBALS, vl_version=VEGA_LITE)
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(TEMPLATE, PAGE.replace("BUNDLE", bundle))
    dvc = Path(sys.executable).parent / "dvc"  # this environment's
    subprocess.run([str(dvc), "config", "--local", "plots.html_template", str(TEMPLATE.resolve())], check=True)
    print(
        f"wrote {TEMPLATE} (Vega {vl_convert.get_vega_version()}, Vega-Lite {VEGA_LITE}, vega-embed "
        f"{vl_convert.get_vega_embed_version()}, {len(bundle) / 1e6:.1f} MB); `dvc plots diff` now draws "
        "its charts offline"
    )


if __name__ == "__main__":
    run_stage(main)
