"""The runtime side installs and runs without torch: prove it in a process where torch cannot load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import csv, importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "torchvision", "transformers", "peft"}:
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, NoTorch())
    import radixpert.runtime, radixpert.config, radixpert.prompt, radixpert.imageio, radixpert.phantom, radixpert.errors
    import radixpert.runtime.pipeline, radixpert.runtime.sr, radixpert.checks.checker, radixpert.evaluation.checks
    import radixpert.evaluation.gate
    from radixpert.config import get_config
    from radixpert.imageio import read_image
    from radixpert.phantom import write_dataset

    out = sys.argv[1]
    csv_path = write_dataset(out, n=2, seed=5, size=256, workers=1)
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    scan = read_image(f"{out}/{rows[0]['DicomPath']}", size=get_config("tiny").image_size)
    assert scan.model_input.shape == (3, 224, 224), scan.model_input.shape
    assert not any(m.split(".")[0] == "torch" for m in sys.modules)
    print("read", scan.model_input.dtype)
    """
)


def test_runtime_and_reader_work_where_torch_cannot_be_imported(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "read float32" in done.stdout
