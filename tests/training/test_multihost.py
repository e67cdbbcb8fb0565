"""Two processes × 4 CPU devices (jax.distributed + gloo, as on a TPU pod) give the same losses
as one process with 8 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from jaxft.testing import train_batch

from test_train_mesh import run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_llama, tmp_path):
    folder = tiny_llama[0]
    out = tmp_path / "losses.json"
    port = str(free_port())
    worker = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, worker, port, str(i), folder, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    result = json.loads(out.read_text())
    batches = [train_batch(128, batch=8, seed=s) for s in range(3)]
    losses, params, _ = run(folder, batches, mesh_shape={"data": 2, "fsdp": 2, "tensor": 2})
    np.testing.assert_allclose(result["losses"], losses, atol=1e-5)
    np.testing.assert_allclose(np.array(result["up_proj"]), params["model.layers.mlp.up_proj.weight"], atol=1e-5)
