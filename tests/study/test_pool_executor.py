"""How many worker processes a local study gets (study/pool_executor.auto_workers), and the CLI's --workers."""

from __future__ import annotations

import subprocess
import sys

from comptrust.study.pool_executor import PER_WORKER_BASE, PER_WORKER_WEIGHTS, auto_workers
from comptrust.study.spec import load_spec, parse_spec

GIB = 2**30
SMALL = 270 * 2**20  # the embedded model's weights in bf16


def _spec(**keys):
    base = {k: v for k, v in load_spec(None).to_dict().items() if k != "source"}
    return parse_spec({**base, **keys})


def test_two_cores_and_room_give_two_workers():
    n, why = auto_workers(_spec(device="cpu"), cores=2, models=8, mem_available=16 * GIB, weight_bytes=SMALL)
    assert n == 2 and "2 cores" in why and "8 models" in why


def test_bounded_by_cores_models_and_memory():
    spec = _spec(device="cpu")
    assert auto_workers(spec, cores=16, models=3, mem_available=64 * GIB, weight_bytes=SMALL)[0] == 3
    assert auto_workers(spec, cores=16, models=8, mem_available=64 * GIB, weight_bytes=SMALL)[0] == 8
    per = PER_WORKER_BASE + PER_WORKER_WEIGHTS * SMALL
    assert auto_workers(spec, cores=16, models=8, mem_available=int(2.5 * per), weight_bytes=SMALL)[0] == 2
    # a 7B model's weights on a 32 GiB laptop: one worker, in this process
    n, why = auto_workers(spec, cores=8, models=8, mem_available=32 * GIB, weight_bytes=14 * GIB)
    assert n == 1 and "memory for 0" in why


def test_one_worker_on_one_core_a_gpu_or_an_unknown_size():
    assert auto_workers(_spec(device="cpu"), cores=1, models=8, mem_available=64 * GIB, weight_bytes=SMALL) == (
        1, "one core")
    n, why = auto_workers(_spec(device="cuda"), cores=16, models=8, mem_available=64 * GIB, weight_bytes=SMALL)
    assert n == 1 and "GPU" in why
    n, why = auto_workers(_spec(device="cpu", model="org/some-model"), cores=4, models=8, mem_available=64 * GIB)
    assert n == 1 and "org/some-model" in why


def test_the_embedded_model_is_sized_from_its_gguf():
    from comptrust.models.resolve import embedded_gguf

    size = embedded_gguf().stat().st_size
    n, why = auto_workers(_spec(device="cpu"), cores=2, models=8,
                          mem_available=int(PER_WORKER_BASE + PER_WORKER_WEIGHTS * 4 * size) * 2 + 1)
    assert n == 2, why


def test_workers_must_be_positive_and_ray_address_needs_ray(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "comptrust", "study", "--out", str(tmp_path / "s"), *args],
                              capture_output=True, text=True, timeout=120)

    p = run("--workers", "0")
    assert p.returncode == 2 and "--workers 0: must be at least 1" in p.stderr
    p = run("--ray-address", "auto")
    assert p.returncode == 2 and "--ray-address needs --executor ray" in p.stderr
    p = run("--adaptive", "--workers", "2")
    assert p.returncode == 2 and "--workers" in p.stderr and "--adaptive" in p.stderr
