"""sparsify.measure.breakdown: kernel/op time grouped by kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsify.measure.breakdown import kernel_kind, time_by_kind


@pytest.mark.parametrize(("name", "kind"), [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16>", "copy/cast"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, launch_clamp_scalar>", "elementwise"),
    ("void at::native::elementwise_kernel<128, 4, bfloat16_copy_kernel_cuda>", "copy/cast"),
    ("void at::native::reduce_kernel<512, 1, MeanOps>", "norm/reduce"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("triton_poi_fused_add_relu_3", "elementwise"),
    ("triton_poi_fused_add_convolution_relu_4", "elementwise"),  # inductor's epilogue, not the conv
    ("void at::native::elementwise_kernel<128, 4, gpu_kernel_impl_nocast<CUDAFunctor_add<BFloat16>>>", "elementwise"),
    ("triton_red_fused_mean_3", "norm/reduce"),
    ("aten::mkldnn_convolution", "conv"),
    ("aten::addmm", "matmul"),
    ("aten::max_pool2d_with_indices", "pool"),
    ("aten::empty", "other"),
])
def test_kernel_kind(name: str, kind: str) -> None:
    assert kernel_kind(name) == kind


def test_time_by_kind_on_cpu_splits_a_conv_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        kinds, top = time_by_kind(lambda: model(x), iters=3, warmup=1, top=4)
    assert {"conv", "elementwise", "matmul"} <= set(kinds), kinds
    assert all(v >= 0 for v in kinds.values())
    assert max(kinds, key=kinds.__getitem__) == "conv"  # two 32-channel 3×3 convs dominate this net
    assert len(top) == 4 and top[0]["kind"] == "conv" and top[0]["calls"] == 2
    assert [t["ms"] for t in top] == sorted((t["ms"] for t in top), reverse=True)
    with pytest.raises(ValueError, match="iters"):
        time_by_kind(lambda: None, iters=0)
