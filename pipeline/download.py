"""Stage download: the four IDX files of `data.dataset` into data/raw/, from torchvision's
download or `data.mirror`, each checked before it lands (pipeline.raw_data)."""

from __future__ import annotations

import socket

from pipeline.params import load_params
from pipeline.raw_data import download
from pipeline.stage import run_stage

NETWORK_TIMEOUT_S = 30


def main() -> None:
    params = load_params()
    socket.setdefaulttimeout(NETWORK_TIMEOUT_S)
    download(params.data.dataset, params.data.mirror)


if __name__ == "__main__":
    run_stage(main)
