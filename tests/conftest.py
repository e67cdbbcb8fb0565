"""Suite-wide setup: 8 fake CPU devices for mesh tests, set before anything imports jax.

Tests run on CPU unless JAXFT_TEST_BACKEND names another JAX platform (e.g. `cuda`, `tpu`), or
`auto` for whatever JAX finds first: how the accelerator suite runs the fused-attention tests on
the accelerator they need (`JAXFT_TEST_BACKEND=cuda pytest tests/models/test_attention_impls.py -k cudnn`).
"""

import os

_backend = os.environ.get("JAXFT_TEST_BACKEND", "").strip().lower()
if _backend == "auto":
    os.environ.pop("JAX_PLATFORMS", None)
elif _backend:
    os.environ["JAX_PLATFORMS"] = _backend
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
