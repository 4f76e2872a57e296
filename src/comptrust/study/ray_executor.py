"""Run a study's units as Ray tasks; the driver (this process) alone writes the store.

Why this shape:
- Ray schedules, places and retries; comptrust only says what each unit needs (1 GPU where the cluster has
  GPUs, else `cpus_per_unit` CPUs) and what depends on what (an evaluation takes its compression's result as an
  argument, so Ray starts it only after the checkpoint exists).
- Workers never open the study's SQLite file: no concurrent writers, no database on a network file system.
  An evaluation task generates into a private temporary store and returns its scores, compact records and
  generation rows; the driver commits them with the unit rows. Resume and --status therefore behave exactly as
  with the local executor.
- A worker that dies mid-unit (killed, out of memory, node lost) is retried by Ray up to `max_retries` times;
  after that the unit is recorded as failed and the study goes on. Exceptions raised by comptrust itself (bad
  input, NaN weights) are not retried: they are returned as failures, since a rerun would fail the same way.
- Checkpoints go to `models_dir` (default DIR/models), which must be readable by every worker: on a cluster, a
  shared file system path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from comptrust.errors import UsageError
from comptrust.store import Store
from comptrust.study.plan import Plan, instance_key
from comptrust.study.spec import DENSE, StudySpec
from comptrust.study.units import (
    _one_line,
    backend_for,
    compress_task,
    eval_task,
    model_work,
    record_compress,
    record_eval,
)

MAX_RETRIES = 2  # re-runs of a unit whose worker died


def _init_ray(address: str | None, workers: int | None) -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'comptrust[ray]'") from None
    passed = ("OMP_WAIT_POLICY", "TQDM_DISABLE", "COMPTRUST_HOME", "COMPTRUST_STUDY_CACHE", "HF_HUB_OFFLINE", "HF_HOME")
    env = {"env_vars": {k: os.environ[k] for k in passed if k in os.environ}}
    if address:
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UsageError(f"--ray-address {address}: cannot connect to a Ray cluster ({_one_line(e)})") from None
    else:
        cores, gpus = os.cpu_count() or 1, _local_gpus()
        if gpus:  # one unit per GPU (--workers of them at most); all cores, shared out among the units
            ray.init(num_cpus=cores, num_gpus=min(workers or gpus, gpus), include_dashboard=False, runtime_env=env,
                     log_to_driver=True)
        else:  # one unit per CPU, --workers of them
            ray.init(num_cpus=workers or cores, include_dashboard=False, runtime_env=env, log_to_driver=True)
    return ray


def _local_gpus() -> int:
    """CUDA devices this machine shows (CUDA_VISIBLE_DEVICES applies), without initialising CUDA here."""
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- no torch build with CUDA: no GPUs
        return 0


def run_on_ray(spec: StudySpec, out_dir: Path, plan: Plan, store: Store, say: Any, address: str | None = None,
               workers: int | None = None, models_dir: Path | None = None, cpus_per_unit: int = 1) -> None:
    ray = _init_ray(address, workers)
    try:
        cluster = ray.cluster_resources()
        gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
        if gpus:  # a unit holds one GPU and its share of the cores (tokenising, calibration, sampling run there)
            cpus_per_unit = max(cpus_per_unit, int(cpus // gpus))
        res = {"num_gpus": 1, "num_cpus": cpus_per_unit} if gpus else {"num_cpus": cpus_per_unit}
        device = "cuda" if gpus else "cpu"
        say(f"Ray cluster: {cpus:g} CPUs, {gpus:g} GPUs; one unit per "
            f"{f'GPU with {cpus_per_unit} CPUs' if gpus else f'{cpus_per_unit} CPU'}")
        compress_remote = ray.remote(max_retries=MAX_RETRIES)(compress_task).options(**res)
        eval_remote = ray.remote(max_retries=MAX_RETRIES)(eval_task).options(**res)
        spec_dict = {k: v for k, v in spec.to_dict().items() if k != "source"}
        stored = store.units()
        refs: dict[Any, tuple[str, Any, int | None, Any]] = {}
        # Compressions are submitted first: Ray starts ready tasks roughly in submission order, and a compression
        # is on the critical path of its evaluation, so with several GPUs the compressions run side by side and
        # dense's evaluation fills a free GPU instead of delaying one of them.
        evals: list[tuple[Any, int | None, str, Any, list[str], Any]] = []
        for v, seed in plan.instances():
            inst = instance_key(v, seed)
            w = model_work(spec, plan, stored, v, seed, out_dir, models_dir)
            cref = None
            if w.need_compress:
                say(f"submit compress {inst}")
                cref = compress_remote.remote(spec_dict, v.name, seed, str(w.ckpt), cpus_per_unit)
                refs[cref] = ("compress", v, seed, w.ckpt)
            if w.pending:
                evals.append((v, seed, inst, w.model_ref, w.pending, cref))
        for v, seed, inst, model_ref, pending, cref in sorted(evals, key=lambda e: e[0].is_dense):
            say(f"submit evaluate {inst} on {', '.join(pending)}")
            eref = eval_remote.remote(spec_dict, model_ref, pending, device, cpus_per_unit, cref, backend_for(spec, v))
            refs[eref] = ("eval", v, seed, pending)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                kind, v, seed, extra = refs.pop(ref)
                inst = instance_key(v, seed)
                try:
                    out = ray.get(ref)
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # the worker died more than MAX_RETRIES times, or Ray lost the task
                    out = {"status": "failed", "error": f"worker failed after {MAX_RETRIES} retries: {_one_line(e)}",
                           "seconds": 0.0}
                secs = out.get("seconds", 0.0)
                if kind == "compress":
                    record_compress(store, v, seed or 0, secs, out.get("record"), out.get("error"), extra)
                    say(f"{'FAILED ' if out['status'] != 'done' else ''}compress {inst}"
                        + (f": {out['error']}" if out["status"] != "done" else f" in {secs:.0f} s"))
                    say.finished("compress", 1, secs, failed=out["status"] != "done", instance=inst)
                elif out["status"] == "blocked":  # like the local executor: no rows, shown as blocked
                    say.blocked(len(extra), instance=inst)
                else:
                    if out["status"] == "done":
                        store.put_generation_rows(out["generations"])
                    record_eval(store, spec, v, seed, extra, secs, out.get("outcome"), out.get("error"))
                    say(f"{'FAILED ' if out['status'] != 'done' else ''}evaluate {inst}"
                        + (f": {out['error']}" if out["status"] != "done" else f" in {secs:.0f} s"))
                    say.finished("eval", len(extra), secs, failed=out["status"] != "done", instance=inst)
    finally:
        ray.shutdown()


__all__ = ["run_on_ray", "DENSE"]
