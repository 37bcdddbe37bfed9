"""docs/chrpo.md's example runs as written; docstring examples are doctests."""
import doctest
import pathlib
import re

import pytest

import chrpo.advantages
import chrpo.budget
import chrpo.losses
import chrpo.objective
import chrpo.registry
import chrpo.rewards

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "chrpo.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_doc_example_runs():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) == 1
    namespace = {"__name__": "chrpo_doc_example"}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)   # the doc's own asserts run
    # Three passes over the same rollouts lower the surrogate loss.
    losses = namespace["losses"]
    assert len(losses) == 3 and losses[2] < losses[1] < losses[0]
    # Realized ratios [0.6, 0.4, 0.625] (the invalid row is excluded): the
    # mean 0.5417 exceeds the budget 0.4, so lambda = 0.1 * 0.1417.
    assert float(namespace["lagrange"].multiplier) == pytest.approx(
        0.1 * ((0.6 + 0.4 + 0.625) / 3 - 0.4), rel=1e-5)
    assert set(namespace["metrics"]) >= {"clip_low_fraction", "clip_high_fraction"}


@pytest.mark.parametrize("module", [chrpo.rewards, chrpo.budget, chrpo.advantages,
                                    chrpo.losses, chrpo.objective, chrpo.registry],
                         ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
