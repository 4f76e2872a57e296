"""engine/triton_fused.py on any machine: the compile options its kernels launch with (the GPU checks of the
kernels' bits are in tests/test_triton_attn.py, which runs only where there is a CUDA GPU)."""

from __future__ import annotations

from comptrust.engine import triton_fused as tf


def test_launch_options_turn_off_contraction_and_ftz_where_known():
    """fma contraction and libdevice's flush-to-zero each change torch's bits (rotary, SiLU): both are turned off
    where the Triton backend has the option, and an option it lacks is not passed (a launch would reject it)."""
    both = {"num_warps", "enable_fp_fusion", "enable_reflect_ftz"}
    assert tf.launch_options(both) == {"enable_fp_fusion": False, "enable_reflect_ftz": False}
    assert tf.launch_options({"num_warps", "enable_fp_fusion"}) == {"enable_fp_fusion": False}
    assert tf.launch_options(set()) == {}
    if tf.triton is None:
        assert tf.LAUNCH_OPTIONS == {}
