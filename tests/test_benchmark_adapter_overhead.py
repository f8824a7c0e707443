"""benchmarks/adapter_overhead.py counts parameters and FLOPs of the real FLUX.1 and FLUX.2 configs on the meta device."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import REPO


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("adapter_overhead_benchmark", REPO / "benchmarks" / "adapter_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("base, billions, adapters", [
    ("flux2-klein-4b", 3.88, ["double_0", "double_2", "double_4", "single_0", "single_4", "single_8", "single_12",
                              "single_16"]),
    ("flux1-dev", 11.90, None),
])
def test_each_base_is_counted_on_the_meta_device(overhead, tmp_path, base, billions, adapters):
    out = tmp_path / "overhead.json"
    assert overhead.main(["--base", base, "--sizes", "256", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["base"] == base and result["base_parameters"] / 1e9 == pytest.approx(billions, abs=0.005)
    if adapters is not None:
        assert result["adapters"] == adapters
    (row,) = result["steps"]
    assert row["image_tokens"] == 256 and 0 < row["sampling_overhead"] < 0.05 and 0 < row["training_overhead"] < 0.05
    assert row["adapter_forward"] > row["base_forward"] > 0
