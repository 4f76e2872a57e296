"""The report's charts: radars leave gaps for missing scores and carry a legend; the score curves draw one line per
method family, label every x used, and show the dense line."""

from __future__ import annotations

import re

from comptrust.report import _family, charts


def test_radar_has_a_legend_and_names_missing_scores():
    svg = charts.radar(["ethics", "fairness", "stereotype"],
                       {"dense": [80.0, 60.0, 70.0], "gptq-w3": [50.0, None, 100.0]}, "dense")
    assert "dense (baseline)" in svg and "the variant named above each radar" in svg
    assert "no score: Fairness" in svg  # a gap, named, instead of a polygon drawn to 0


def test_curves_one_line_per_family_with_ticks_at_every_x():
    series = {"ethics": {"gptq": [(8.0, 80.0, 70.0, 90.0), (4.0, 75.0, 60.0, 85.0), (3.0, 50.0, 40.0, 60.0)],
                         "awq": [(4.0, 78.0, 65.0, 88.0)]}}
    svg = charts.curves(["ethics"], series, {"ethics": (81.0, 72.0, 90.0)}, "bits per weight", invert=True)
    labels = re.findall(r">([^<>]+)</text>", svg)
    assert {"8", "4", "3"} <= {x.strip() for x in labels}  # a labelled tick at every bit width used
    assert "gptq" in svg and "awq" in svg and "dense" in svg
    assert charts.curves(["ethics"], {"ethics": {}}, {}, "bits") == ""


def test_family_keeps_variants_at_the_same_x_apart():
    assert _family({"method": "gptq", "group_size": 128}, "bits") == "gptq"
    assert _family({"method": "gptq", "group_size": 32}, "bits") == "gptq g32"
    assert _family({"method": "wanda", "structure": "2:4"}, "sparsity") == "wanda 2:4"
    assert _family({"method": "wanda", "structure": "unstructured"}, "sparsity") == "wanda"
