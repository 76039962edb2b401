"""The Python examples in README.md run as written, in order."""

import pathlib
import re

from keras import ops

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert tuple(namespace["y"].shape) == (2, 16, 16, 640)
    assert tuple(namespace["model"].output.shape) == (None, 10)
    assert ops.convert_to_numpy(namespace["sparsity"]) > 0
