"""The TPU scripts parse, print their usage, pass the arguments through to `jaxft train` on every
worker, and restart it after a preemption (gcloud replaced by a recording stub)."""

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


# A gcloud stub that acts like a spot slice preempted mid-run: the first `jaxft train` dies as a
# worker's ssh session does when its VM goes away (exit 255), the slice reports CREATING once,
# then READY, and the second `jaxft train` (resuming from its checkpoint) finishes.
PREEMPTED_GCLOUD = """#!/usr/bin/env bash
echo "$@" >> {log}
count() {{ n=$(cat "{dir}/$1" 2>/dev/null || echo 0); echo $((n + 1)) > "{dir}/$1"; echo $((n + 1)); }}
case "$*" in
  *"tpu-vm ssh"*"jaxft train"*) [[ $(count train) -ge {succeed_on} ]] && exit 0
                               echo "Connection to 10.0.0.2 closed by remote host." >&2; exit 255 ;;
  *"tpu-vm describe"*) [[ $(count describe) -eq 1 ]] && echo CREATING || echo READY ;;
esac
exit 0
"""


def _preempted_slice(tmp_path, succeed_on):
    log = tmp_path / "calls"
    stub = tmp_path / "gcloud"
    stub.write_text(PREEMPTED_GCLOUD.format(log=log, dir=tmp_path, succeed_on=succeed_on))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TPU_NAME": "t1", "ZONE": "z1", "PROJECT": "p1",
           "POLL_SECONDS": "0", "MAX_RESTARTS": "3"}
    out = subprocess.run([os.path.join(SCRIPTS, "run.sh"), "--config", "configs/demo.py"], env=env,
                         capture_output=True, text=True, timeout=60)
    return out, log.read_text().splitlines()


def test_run_restarts_after_a_preemption_and_finishes(tmp_path):
    out, calls = _preempted_slice(tmp_path, succeed_on=2)
    assert out.returncode == 0, out.stderr
    assert "== attempt 1" in out.stdout and "== attempt 2" in out.stdout and "== finished" in out.stdout
    kinds = ["train" if "jaxft train" in c else "describe" if "describe" in c else "install" if "pip install" in c
             else c for c in calls]
    # stopped → wait until READY (CREATING, READY) → reinstall on every worker → the same command again
    assert kinds == ["train", "describe", "describe", "install", "train"], calls
    assert calls[0] == calls[-1]


def test_run_gives_up_after_max_restarts(tmp_path):
    out, calls = _preempted_slice(tmp_path, succeed_on=99)
    assert out.returncode == 1 and "gave up after 3 attempts" in out.stderr
    assert sum("jaxft train" in c for c in calls) == 3
