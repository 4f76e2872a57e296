"""Why a fused decode kernel (engine/triton_fused.py) is or is not used on this GPU: source checks, the
self-check, and for SiLU * up and rotary the mismatches against torch, with a plain-torch re-rounding as referee.

    python bench/fused_check_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from transformers.models.llama import modeling_llama as ml  # noqa: E402

from comptrust.engine import triton_fused as tf  # noqa: E402


def main() -> None:
    print("enabled", tf.enabled(), "libdevice", tf._libdevice is not None)
    print("sources: rms", tf._norm_src(ml.LlamaRMSNorm.forward) == tf.RMSNORM_SRC, "mlp",
          tf._norm_src(ml.LlamaMLP.forward) == tf.MLP_SRC, "rope", tf._rope_body_of(ml.apply_rotary_pos_emb) == tf.ROPE_BODY,
          "rotate_half", tf._body(ml.rotate_half) == tf.ROTATE_HALF_BODY)
    dev, dt = torch.device("cuda"), torch.bfloat16
    print("self_check", tf.self_check(dev, dt))
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dt).to(dev)
    allv = allv[torch.isfinite(allv)].contiguous()
    up = torch.ones_like(allv)
    ref = torch.nn.functional.silu(allv) * up
    got = tf.silu_mul(allv, up)
    bad = got.view(torch.int16) != ref.view(torch.int16)
    tiny = allv.float().abs() < 1.1754944e-38
    print(f"silu: {int(bad.sum())} of {allv.numel()} differ; {int((bad & ~tiny).sum())} of them at normal inputs")
    for i in bad.nonzero().flatten()[:6].tolist():
        print(f"  x={allv[i].item():.6g} torch={ref[i].item():.8g} fused={got[i].item():.8g}")
    g = torch.Generator(device="cpu").manual_seed(5)
    b, h, d = 64, 8, 128
    q = (torch.randn(b, 1, h, d, generator=g) * 3).to(dt).to(dev).transpose(1, 2)
    ang = torch.rand(b, 1, d, generator=g) * 500
    cos, sin = ang.cos().to(dt).to(dev), ang.sin().to(dt).to(dev)
    rq, _ = ml.apply_rotary_pos_emb(q, q, cos, sin)
    fq = tf.rope_one(q, cos, sin)
    c, s = cos[:, None].float(), sin[:, None].float()
    rot = torch.cat((-q[..., d // 2:], q[..., : d // 2]), -1).float()
    referee = ((q.float() * c).to(dt).float() + (rot * s).to(dt).float()).to(dt)
    bad = fq.view(torch.int16) != rq.view(torch.int16)
    print(f"rope: fused vs torch {int(bad.sum())} of {bad.numel()} differ; torch vs referee "
          f"{int((rq.view(torch.int16) != referee.view(torch.int16)).sum())}; fused vs referee "
          f"{int((fq.view(torch.int16) != referee.view(torch.int16)).sum())}")
    idx = bad.nonzero()[:4].tolist()
    for bi, hi, _, di in idx:
        print(f"  b={bi} h={hi} d={di}: x={q[bi, hi, 0, di].item():.6g} torch={rq[bi, hi, 0, di].item():.6g} "
              f"fused={fq[bi, hi, 0, di].item():.6g} referee={referee[bi, hi, 0, di].item():.6g}")


if __name__ == "__main__":
    main()
