"""One process of the 2-process test (run by test_multihost.py): 4 CPU devices each, gloo."""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

from jaxft import distributed  # noqa: E402

distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from test_train_mesh import run  # noqa: E402

from jaxft.testing import train_batch  # noqa: E402

folder, out = sys.argv[3], sys.argv[4]
assert jax.device_count() == 8 and jax.local_device_count() == 4
rows = slice(4 * jax.process_index(), 4 * (jax.process_index() + 1))
# Each process feeds only its own half of every global batch.
batches = [{k: v[rows] for k, v in train_batch(128, batch=8, seed=s).items()} for s in range(3)]
losses, params, _ = run(folder, batches, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2})
if jax.process_index() == 0:
    with open(out, "w") as f:
        json.dump({"losses": losses, "up_proj": np.asarray(params["model.layers.mlp.up_proj.weight"]).tolist()}, f)
