"""The analysis scripts' arithmetic, on cases worked by hand."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


def script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("later_key", "beta", "kept"),
    [(0, 0.5, 0.25), (1, 0.5, 1.0), (0, 0.0, 1.0), ("half", 0.5, 1 - (2 * 0.5 - 0.5**2) / 2)],
)
def test_retention_is_the_product_of_the_later_erasures(later_key, beta, kept):
    """One pair (key 5, value 9) at tokens 0-1, asked at token 4: the value token's key e0 is
    carried through the writes of tokens 2 and 3. Each along e0 with beta 0.5 keeps half; keys
    orthogonal to it erase nothing, nor does beta 0 (the sum rule); two writes along one key k
    at 45 degrees multiply to I - (2 beta - beta^2) k k^T, which keeps 1 - (2 beta - beta^2) / 2."""
    retentions = script("mqar_retention").retentions
    inputs = np.array([[5, 9, 0, 0, 5]])
    weights = np.array([[0, 0, 0, 0, 1.0]])
    e0, e1 = np.eye(2)
    later = (e0 + e1) / np.sqrt(2) if later_key == "half" else np.eye(2)[later_key]
    k = np.stack([e1, e0, later, later, e1])[None, :, None]  # [B, T, H, K]
    found = retentions(inputs, weights, k, np.full((1, 5, 1), beta), num_pairs=1)
    np.testing.assert_allclose(found, [[3, kept]], rtol=1e-12)


def test_token_roles_follow_the_bindings_and_the_weights():
    roles = script("mqar_betas").token_roles(
        np.array([[5, 9, 6, 7, 5, 0]]), np.array([[0, 0, 0, 0, 1.0, 0]]), bindings=2
    )
    assert roles.tolist() == [["key", "value", "key", "value", "query", "filler"]]
