"""The TPU scripts parse, print their usage, and pass the arguments through to `jaxft train` on
every worker (gcloud replaced by a recording stub)."""

import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")


def test_scripts_parse_and_show_usage():
    for name in ("create.sh", "install.sh", "run.sh", "delete.sh"):
        path = os.path.join(SCRIPTS, name)
        subprocess.run(["bash", "-n", path], check=True)
        out = subprocess.run([path, "--help"], capture_output=True, text=True, check=True)
        assert out.stdout.startswith("#"), name


def test_run_passes_the_config_to_every_worker(tmp_path):
    log = tmp_path / "calls"
    stub = tmp_path / "gcloud"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "t1", "ZONE": "z1", "PROJECT": "p1"}
    subprocess.run([os.path.join(SCRIPTS, "run.sh"), "--config", "configs/demo.py", "--config.train.steps=3"],
                   env=env, check=True, capture_output=True)
    calls = log.read_text()
    assert "tpu-vm ssh t1 --zone z1 --project p1 --worker=all" in calls
    assert "jaxft train --config configs/demo.py --config.train.steps=3" in calls
