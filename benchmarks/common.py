"""What every benchmark script shares: print one JSON object, and keep it under --out if asked."""

from __future__ import annotations

import json
import os


def emit(result: dict, out: str | None) -> dict:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
    return result
