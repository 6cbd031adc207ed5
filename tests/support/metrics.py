"""A scrape of a daemon's /metrics, as {(sample name, its labels but ftd_job and node): value}."""
from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("ftd_job", "node")))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
