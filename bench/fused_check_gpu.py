"""Why a fused decode kernel (engine/triton_fused.py) is or is not used on this GPU: source checks, the
self-check, and for SiLU * up and rotary the mismatches against torch under Triton's default compile options and
under the ones the module launches with (triton_fused.LAUNCH_OPTIONS: no fma contraction, libdevice without
flush-to-zero), with the PTX instructions that make the difference and a plain-torch re-rounding as referee.

    python bench/fused_check_gpu.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import triton  # noqa: E402
from transformers.models.llama import modeling_llama as ml  # noqa: E402

from comptrust.engine import triton_fused as tf  # noqa: E402

DEFAULTS = {k: True for k in tf.LAUNCH_OPTIONS}  # Triton's own defaults for the options the module turns off
TELLING = r"\b(fma\.rn\.bf16x?2?|fma\.rn\.f16x?2?|div\.[a-z.0-9]+|ex2\.[a-z.0-9]+|rsqrt\.[a-z.0-9]+|mul\.bf16x?2?|mul\.f16x?2?)\b"


def ptx_ops(compiled) -> str:
    ops = sorted(set(re.findall(TELLING, compiled.asm["ptx"])))
    return ", ".join(ops) or "none of interest"


def silu(dt, opts) -> tuple[int, int, str]:
    allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dt).to("cuda")
    allv = allv[torch.isfinite(allv)].contiguous()
    up = torch.randn(allv.shape, generator=torch.Generator().manual_seed(3)).to(dt).to("cuda")
    ref = torch.nn.functional.silu(allv) * up
    got = torch.empty_like(allv)
    k = tf._silu_mul_kernel[(triton.cdiv(allv.numel(), 1024),)](allv, up, got, allv.numel(), BLOCK=1024, **opts)
    bad = got.view(torch.int16) != ref.view(torch.int16)
    return int(bad.sum()), allv.numel(), ptx_ops(k)


def rope(dt, opts) -> tuple[int, int, int, str]:
    g = torch.Generator(device="cpu").manual_seed(5)
    b, h, d = 64, 8, 128
    q = (torch.randn(b, 1, h, d, generator=g) * 3).to(dt).to("cuda").transpose(1, 2)
    ang = torch.rand(b, 1, d, generator=g) * 500
    cos, sin = ang.cos().to(dt).to("cuda"), ang.sin().to(dt).to("cuda")
    rq, _ = ml.apply_rotary_pos_emb(q, q, cos, sin)
    c, s = cos[:, None].float(), sin[:, None].float()
    rot = torch.cat((-q[..., d // 2:], q[..., : d // 2]), -1).float()
    referee = ((q.float() * c).to(dt).float() + (rot * s).to(dt).float()).to(dt)
    out = torch.empty((b, h, 1, d), dtype=dt, device="cuda")
    k = tf._rope_kernel[(b, h)](q, cos, sin, out, q.stride(0), q.stride(1), cos.stride(0), h, HALF=d // 2,
                                BH=d // 2, **opts)
    bad = int((out.view(torch.int16) != rq.view(torch.int16)).sum())
    return bad, out.numel(), int((rq.view(torch.int16) != referee.view(torch.int16)).sum()), ptx_ops(k)


def main() -> None:
    print("triton", triton.__version__, "torch", torch.__version__, "GPU", torch.cuda.get_device_name())
    print("enabled", tf.enabled(), "libdevice", tf._libdevice is not None, "launch options", tf.LAUNCH_OPTIONS)
    print("sources: rms", tf._norm_src(ml.LlamaRMSNorm.forward) == tf.RMSNORM_SRC, "mlp",
          tf._norm_src(ml.LlamaMLP.forward) == tf.MLP_SRC, "rope", tf._rope_body_of(ml.apply_rotary_pos_emb) == tf.ROPE_BODY,
          "rotate_half", tf._body(ml.rotate_half) == tf.ROTATE_HALF_BODY)
    for dt in (torch.bfloat16, torch.float16):
        tf._CHECKED.clear()
        print(f"\n{dt}: self_check {tf.self_check(torch.device('cuda'), dt)}")
        for name, opts in (("Triton defaults", DEFAULTS), ("launch options", tf.LAUNCH_OPTIONS)):
            n_bad, n, ops = silu(dt, opts)
            print(f"  silu * up, {name}: {n_bad} of {n} finite inputs differ from torch; PTX: {ops}")
            n_bad, n, ref_bad, ops = rope(dt, opts)
            print(f"  rotary, {name}: {n_bad} of {n} outputs differ from torch (torch vs referee: {ref_bad}); "
                  f"PTX: {ops}")


if __name__ == "__main__":
    main()
