"""Distillation on CPU: a 4-layer teacher that knows the demo's facts teaches a 2-layer student. No download.

    jaxft demo --variant distill                          # the whole of it: teacher, student, distillation
    jaxft train --config configs/distill_demo.py:teacher    # or step by step: 1. the teacher's fine-tune
    jaxft export --workdir workdir/distill_demo/teacher --out workdir/distill_demo/teacher/hf --format hf
    jaxft make-student --model jaxft/demo/model --layers 2 --out workdir/distill_demo/student
    jaxft train --config configs/distill_demo.py            # 2. the distillation (~30 s on 2 CPU cores)
    jaxft train --config configs/distill_demo.py --config.distill.loss=jsd --config.distill.on_policy_fraction=0.5 \\
        --config.data.packing=False

The config lives in the package (jaxft/demo/distill.py), so that `jaxft demo --variant distill`
works from any install; its docstring says what the teacher, student and data are.
"""

from jaxft.demo.distill import ARGS, get_config  # noqa: F401
