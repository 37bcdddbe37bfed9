"""`chrpo` needs jax and chex only: it must import and run with flax, the model,
data and experiment packages (and torch/transformers/optax) made unimportable."""
import math
import os
import subprocess
import sys

BLOCKED = ("flax", "models", "data", "experiments", "optax", "orbax", "torch",
           "transformers", "tensorflow", "tensorflow_datasets", "grain")

SCRIPT = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None          # `import name` now raises ImportError
import jax
import jax.numpy as jnp
jax.config.update("jax_numpy_rank_promotion", "raise")
import chrpo
ones = jnp.ones(2, bool)
r = chrpo.hierarchical_reward(ones, ones, jnp.full(2, .4), jnp.array([.3, .9]),
                              jnp.full(2, .4), ones)
a = chrpo.group_advantages(r, jnp.zeros(2, jnp.int32), num_groups=1).advantages
logp = jnp.array([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0]])
out = chrpo.policy_loss(logp, jnp.zeros((2, 3)), a, jnp.ones((2, 3), bool))
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}
                and sys.modules[m] is not None)
print(loaded, float(out.loss_sum))
"""


def test_chrpo_imports_without_flax_models_data_or_experiments():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    loaded, loss = proc.stdout.split("] ")
    assert loaded == "["
    # R = [1.5, 0.6] -> A = [1, -1] (up to eps); rho = [e^0.1, 1] per token,
    # inside the clip range, so the token sum is -3 e^0.1 + 3.
    assert abs(float(loss) - (3 - 3 * math.exp(0.1))) < 1e-4
