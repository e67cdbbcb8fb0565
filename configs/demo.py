"""The embedded default: LoRA-teach the bundled tiny model 48 made-up facts (no download, CPU is fine).

The config lives in the package (jaxft/demo/config.py) so that `jaxft demo` works from any install;
this file is the same config for `jaxft train --config configs/demo.py[:smoke]`.
"""

from jaxft.demo.config import ARGS, get_config  # noqa: F401
