"""Fused elementwise kernels for the decode step on CUDA: the same numbers as transformers' Llama modules, in
fewer kernels.

Why: at ~475 rows (tox25, 13B) the decode step's matmuls run near the bf16 matmul rate and its attention near
the bandwidth of reading the rows' own K/V; what is left is ~17% of the step in small elementwise kernels. Per
layer transformers' Llama runs 8 kernels per RMSNorm (cast, square, mean, add eps, rsqrt, multiply, cast, weight),
10 for rotary embeddings (a multiply, a slice negated, a cat, a multiply and an add, for q and for k) and 2 for
SiLU(gate) * up. Here: RMSNorm 3 (square, torch's own mean, one tail kernel), rotary 2 (q, k), SiLU * up 1.

Bit-for-bit: every kernel does the unfused ops' float32 arithmetic in the same order and rounds to the model dtype
where they round (the cross-row sum of RMSNorm stays torch's own reduction, whose order a kernel could not
match). Two of Triton's compiler defaults break that, so every kernel here is compiled without them
(LAUNCH_OPTIONS):
- enable_fp_fusion lets LLVM contract a multiply and an add into one fma. transformers' rotary is
  `(q * cos) + (rotate_half(q) * sin)`, separate torch kernels, each product rounded to bf16 before the add. LLVM
  narrows bf16(float(a) * float(b)) to a bf16 multiply (exact: the same rounding), then fuses that multiply with
  the add into `fma.rn.bf16`, which skips the product's rounding: on an H200 (Triton 3.6) 15,479 of 65,536 rotary
  outputs (64 rows x 8 heads x 128) differed from torch's (15,798 in fp16). With fusion off the PTX has no fma:
  float32 products, each rounded to the dtype, then the add.
- enable_reflect_ftz links libdevice's flush-to-zero variants: div_rn becomes `div.rn.ftz.f32`, which flushes a
  subnormal quotient to zero, where torch's SiLU, x / (1 + exp(-x)), keeps it: on the H200 508 of the 65,280
  finite bf16 inputs came out 0 instead of about x / 2 (the 252 nonzero subnormal ones and the 256 normal ones
  whose silu is subnormal: |x| < 2.4e-38). fp16 has no such input (its subnormals are normal float32 numbers),
  which is why SiLU passed in fp16. With ftz off the division is IEEE (`div.rn.f32`) as in torch's kernel, and
  every finite bf16 and fp16 input then gives torch's bits.
A Triton that lacks one of these options gets the others; a kernel that then rounds differently fails the
self-check and stays unused: install() checks each kernel against the module it replaces on this machine (SiLU
over every 16-bit value, RMSNorm and rotary on random rows) and fuses only what came out identical; so a GPU,
driver or torch build whose exp or rsqrt rounds differently keeps the unfused path. Only the Llama forwards whose
source is the one checked here are replaced (Mistral and Qwen2 copy them); anything else, the CPU, and shapes
other than one-token decode steps (prefill) run the original code. COMPTRUST_FUSED=0 turns it off.
"""

from __future__ import annotations

import inspect
import logging
import os
import types
from typing import Any

try:  # Triton ships with CUDA builds of torch; the CPU build has none
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

log = logging.getLogger("comptrust.engine.hf")

def _find_libdevice() -> Any:
    """Triton's libdevice (accurate exp, rsqrt, IEEE division), wherever this Triton version keeps it."""
    import importlib

    for name in ("triton.language.extra.libdevice", "triton.language.extra.cuda.libdevice"):
        try:
            return importlib.import_module(name)
        except Exception:
            continue
    return None


_libdevice: Any = _find_libdevice() if triton is not None else None


def launch_options(known=None) -> dict[str, bool]:
    """Compile options that keep each op's own rounding (module docstring): no fma contraction, libdevice without
    flush-to-zero; only those this Triton's CUDA backend knows (`known`: its option names, read from it if None)."""
    if known is None:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            known = set(CUDAOptions.__dataclass_fields__)
        except Exception:  # pragma: no cover - no CUDA backend: nothing is launched anyway
            known = set()
    return {k: False for k in ("enable_fp_fusion", "enable_reflect_ftz") if k in known}


LAUNCH_OPTIONS: dict[str, bool] = launch_options() if triton is not None else {}


def enabled() -> bool:
    return triton is not None and _libdevice is not None and os.environ.get("COMPTRUST_FUSED", "1") != "0"


# the forwards replaced, as checked (whitespace-normalised source); a transformers version that changes them keeps them
RMSNORM_SRC = (
    "def forward(self, hidden_states: torch.Tensor) -> torch.Tensor: input_dtype = hidden_states.dtype "
    "hidden_states = hidden_states.to(torch.float32) variance = hidden_states.pow(2).mean(-1, keepdim=True) "
    "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon) "
    "return self.weight * hidden_states.to(input_dtype)")
MLP_SRC = ("def forward(self, x): down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) "
           "return down_proj")
ROPE_BODY = ("cos = cos.unsqueeze(unsqueeze_dim) sin = sin.unsqueeze(unsqueeze_dim) "
             "q_embed = (q * cos) + (rotate_half(q) * sin) k_embed = (k * cos) + (rotate_half(k) * sin) "
             "return q_embed, k_embed")
ROTATE_HALF_BODY = "x1 = x[..., : x.shape[-1] // 2] x2 = x[..., x.shape[-1] // 2 :] return torch.cat((-x2, x1), dim=-1)"


def _norm_src(fn) -> str:
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return ""
    lines = [ln.split("#")[0].strip() for ln in src.splitlines()]
    out = " ".join(ln for ln in lines if ln and not ln.startswith("@"))
    # drop a docstring
    if '"""' in out:
        a = out.find('"""')
        b = out.find('"""', a + 3)
        out = (out[:a] + out[b + 3:]) if b > a else out
    return " ".join(out.split())


def _body(fn) -> str:
    src = _norm_src(fn)
    return src.split(":", 1)[1].strip() if src.startswith("def ") and "):" in src else src


def _rope_body_of(fn) -> str:
    src = _norm_src(fn)
    i = src.find("cos = cos.unsqueeze")
    return src[i:] if i >= 0 else ""


if triton is not None:  # pragma: no cover - compiled on the GPU machine only

    @triton.jit
    def _square_kernel(X, Y, N, BLOCK: tl.constexpr):
        """Y = float32(X) ** 2 (torch's pow(2) is x * x)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + offs, x * x, mask=m)

    @triton.jit
    def _rms_tail_kernel(X, VAR, W, O, eps, N, BLOCK: tl.constexpr):
        """One row: O = W * dtype(float32(X) * rsqrt(VAR + eps)), each product rounded as torch rounds it."""
        row = tl.program_id(0)
        r = _libdevice.rsqrt(tl.load(VAR + row) + eps)
        for c in range(0, N, BLOCK):
            offs = c + tl.arange(0, BLOCK)
            m = offs < N
            x = tl.load(X + row * N + offs, mask=m, other=0.0)
            w = tl.load(W + offs, mask=m, other=0.0)
            y = (x.to(tl.float32) * r).to(x.dtype)
            tl.store(O + row * N + offs, (w.to(tl.float32) * y.to(tl.float32)).to(O.dtype.element_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(G, U, O, N, BLOCK: tl.constexpr):
        """O = dtype(float32(dtype(silu(G))) * float32(U)); silu(x) = x / (1 + exp(-x)), exp and division as
        torch's CUDA kernel computes them (accurate expf, IEEE division)."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < N
        g = tl.load(G + offs, mask=m, other=0.0)
        u = tl.load(U + offs, mask=m, other=0.0)
        gf = g.to(tl.float32)
        s = _libdevice.div_rn(gf, 1.0 + _libdevice.exp(-gf)).to(g.dtype)
        tl.store(O + offs, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    @triton.jit
    def _rope_kernel(X, COS, SIN, O, sxb, sxh, scb, H, HALF: tl.constexpr, BH: tl.constexpr):
        """One (row, head) of a one-token step: out = x * cos + rotate_half(x) * sin, every product and the sum
        rounded to the model dtype as torch's unfused ops round them."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, BH)
        m = offs < HALF
        xb = X + b * sxb + h * sxh
        x1 = tl.load(xb + offs, mask=m, other=0.0)
        x2 = tl.load(xb + HALF + offs, mask=m, other=0.0)
        dt = x1.dtype
        c1 = tl.load(COS + b * scb + offs, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(COS + b * scb + HALF + offs, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + b * scb + offs, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + b * scb + HALF + offs, mask=m, other=0.0).to(tl.float32)
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        a1 = (f1 * c1).to(dt).to(tl.float32)
        b1 = ((-f2) * s1).to(dt).to(tl.float32)
        a2 = (f2 * c2).to(dt).to(tl.float32)
        b2 = (f1 * s2).to(dt).to(tl.float32)
        ob = O + (b * H + h) * (2 * HALF)
        tl.store(ob + offs, (a1 + b1).to(dt), mask=m)
        tl.store(ob + HALF + offs, (a2 + b2).to(dt), mask=m)


_FLOATS = ("torch.bfloat16", "torch.float16")


def _half_dtype(t) -> bool:
    return str(t.dtype) in _FLOATS


def rms_norm(x, weight, eps: float):
    """RMSNorm of the last dim of a contiguous x (bf16/fp16 on CUDA), weight of x's dtype."""
    import torch

    n = x.shape[-1]
    sq = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    total = x.numel()
    _square_kernel[(triton.cdiv(total, 1024),)](x, sq, total, BLOCK=1024, **LAUNCH_OPTIONS)
    var = sq.mean(-1, keepdim=True)  # torch's own reduction: the same order as the unfused module's
    out = torch.empty_like(x)
    _rms_tail_kernel[(total // n,)](x, var, weight, out, float(eps), n, BLOCK=min(1024, triton.next_power_of_2(n)),
                                   **LAUNCH_OPTIONS)
    return out


def silu_mul(g, u):
    import torch

    out = torch.empty_like(g)
    n = g.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](g, u, out, n, BLOCK=1024, **LAUNCH_OPTIONS)
    return out


def rope_one(x, cos, sin):
    """x [B, H, 1, D] (last dim dense), cos/sin [B or 1, 1, D] -> x's rotary embedding, [B, H, 1, D] contiguous."""
    import torch

    b, h, _, d = x.shape
    out = torch.empty((b, h, 1, d), dtype=x.dtype, device=x.device)
    half = d // 2
    scb = cos.stride(0) if cos.shape[0] == b else 0
    _rope_kernel[(b, h)](x, cos, sin, out, x.stride(0), x.stride(1), scb, h, HALF=half,
                         BH=max(16, triton.next_power_of_2(half)), **LAUNCH_OPTIONS)
    return out


def _rms_ok(mod, x) -> bool:
    return (x.is_cuda and _half_dtype(x) and mod.weight.dtype == x.dtype and x.is_contiguous()
            and mod.weight.is_contiguous())


def _fused_rms_forward(self, hidden_states):
    if _rms_ok(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def _fused_mlp_forward(self, x):
    g = self.gate_proj(x)
    u = self.up_proj(x)
    if g.is_cuda and _half_dtype(g) and g.dtype == u.dtype and g.is_contiguous() and u.is_contiguous():
        return self.down_proj(silu_mul(g, u))
    return self.down_proj(self.act_fn(g) * u)


def _rope_ok(q, k, cos, sin, unsqueeze_dim) -> bool:
    if unsqueeze_dim != 1 or not q.is_cuda or q.dim() != 4 or q.shape[2] != 1 or k.shape[2] != 1:
        return False
    if not (_half_dtype(q) and q.dtype == k.dtype == cos.dtype == sin.dtype):
        return False
    if cos.dim() != 3 or cos.shape[1] != 1 or cos.shape != sin.shape or cos.shape[0] not in (1, q.shape[0]):
        return False
    return (q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
            and q.shape[-1] % 2 == 0 and q.shape[-1] == k.shape[-1] == cos.shape[-1])


def _make_rope(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _FUSE["rope"] and _rope_ok(q, k, cos, sin, unsqueeze_dim):
            return rope_one(q, cos, sin), rope_one(k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__wrapped_original__ = original  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


_FUSE: dict[str, bool] = {"rope": False}
_CHECKED: dict[tuple, dict[str, bool]] = {}  # (device index, dtype) -> which kernels reproduce torch here


def self_check(device, dtype) -> dict[str, bool]:
    """Which fused kernels give the unfused ops' exact bits on this device (computed once per device and dtype):
    SiLU * up over every value of the dtype; RMSNorm and rotary on random rows (incl. large and tiny ones)."""
    import torch

    key = (torch.device(device).index or 0, str(dtype))
    if key in _CHECKED:
        return _CHECKED[key]
    res = {"rms": False, "silu": False, "rope": False}
    try:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        # every 16-bit pattern that is a finite number
        allv = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(device)
        allv = allv[torch.isfinite(allv)]
        up = torch.randn(allv.shape, generator=gen).to(dtype).to(device)
        ref = torch.nn.functional.silu(allv) * up
        res["silu"] = bool(torch.equal(silu_mul(allv.contiguous(), up.contiguous()).view(torch.int16),
                                       ref.view(torch.int16)))
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        ok = True
        for rows, n, scale in ((475, 5120, 1.0), (7, 4096, 30.0), (3, 576, 1e-3)):
            norm = LlamaRMSNorm(n, eps=1e-5).to(device=device, dtype=dtype)
            with torch.no_grad():
                norm.weight.copy_((torch.randn(n, generator=gen) * 0.2 + 1).to(dtype))
            x = (torch.randn(rows, 1, n, generator=gen) * scale).to(dtype).to(device)
            ok &= bool(torch.equal(rms_norm(x, norm.weight, 1e-5).view(torch.int16), norm(x).view(torch.int16)))
        res["rms"] = ok
        from transformers.models.llama import modeling_llama as ml

        orig = getattr(ml.apply_rotary_pos_emb, "__wrapped_original__", ml.apply_rotary_pos_emb)
        ok = True
        for b, h, d in ((475, 40, 128), (5, 9, 64)):
            q = (torch.randn(b, 1, h, d, generator=gen) * 3).to(dtype).to(device).transpose(1, 2)
            k = (torch.randn(b, 1, h, d, generator=gen) * 3).to(dtype).to(device).transpose(1, 2)
            ang = torch.rand(b, 1, d, generator=gen) * 500
            cos, sin = ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)
            rq, rk = orig(q, k, cos, sin)
            ok &= bool(torch.equal(rope_one(q, cos, sin), rq) and torch.equal(rope_one(k, cos, sin), rk))
        res["rope"] = ok
        torch.cuda.synchronize(device)
    except Exception as e:  # a kernel that does not compile here: leave everything unfused
        log.warning("fused decode kernels not used (%s: %s)", type(e).__name__, str(e)[:200])
        res = {k: False for k in res}
    _CHECKED[key] = res
    return res


def install(model) -> dict[str, int]:
    """Replace the forwards of model's RMSNorm and MLP modules (and its modeling module's rotary function) by the
    fused ones, where each is the checked Llama source and its kernel reproduces torch's bits on this device.
    Idempotent; returns how many modules of each kind were replaced (the engine notes it)."""
    counts = {"rms": 0, "mlp": 0, "rope": 0}
    if not enabled():
        return counts
    try:
        p = next(model.parameters())
    except StopIteration:
        return counts
    if not p.is_cuda or not _half_dtype(p):
        return counts
    ok = self_check(p.device, p.dtype)
    modules = set()
    for mod in model.modules():
        cls = type(mod)
        if ok["rms"] and hasattr(mod, "variance_epsilon") and _norm_src(cls.forward) == RMSNORM_SRC:
            if "forward" not in mod.__dict__:
                mod.forward = types.MethodType(_fused_rms_forward, mod)
            counts["rms"] += 1
        elif (ok["silu"] and all(hasattr(mod, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))
              and _norm_src(cls.forward) == MLP_SRC and type(mod.act_fn).__name__ in ("SiLUActivation", "SiLU")):
            if "forward" not in mod.__dict__:
                mod.forward = types.MethodType(_fused_mlp_forward, mod)
            counts["mlp"] += 1
        modules.add(inspect.getmodule(cls))
    if ok["rope"]:
        for m in modules:
            if m is None:
                continue
            fn = getattr(m, "apply_rotary_pos_emb", None)
            rh = getattr(m, "rotate_half", None)
            if fn is None or rh is None or _body(rh) != ROTATE_HALF_BODY:
                continue
            orig = getattr(fn, "__wrapped_original__", fn)
            if _rope_body_of(orig) != ROPE_BODY:
                continue
            if fn is orig:
                m.__dict__["apply_rotary_pos_emb"] = _make_rope(orig)
            counts["rope"] += 1
        _FUSE["rope"] = counts["rope"] > 0
    return counts


def uninstall(model) -> None:
    """Undo install() on model (benchmarks compare both paths in one process)."""
    modules = set()
    for mod in model.modules():
        if mod.__dict__.get("forward") is not None and getattr(mod.forward, "__func__", None) in (
                _fused_rms_forward, _fused_mlp_forward):
            del mod.forward
        modules.add(inspect.getmodule(type(mod)))
    for m in modules:
        if m is None:
            continue
        fn = getattr(m, "apply_rotary_pos_emb", None)
        orig = getattr(fn, "__wrapped_original__", None)
        if orig is not None:
            m.__dict__["apply_rotary_pos_emb"] = orig
    _FUSE["rope"] = False
    if hasattr(model, "_comptrust_fused"):
        del model._comptrust_fused
