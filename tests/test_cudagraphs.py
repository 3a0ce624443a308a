"""src/cudagraphs.py: the eager step recorded as one CUDA graph gives the eager step's weights (GPU only)."""

import copy

import pytest
import torch

from tests.conftest import requires_cuda


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("fused_norms", [False, True])
def test_graph_step_trains_as_the_eager_step(monkeypatch, fused_norms):
    """A training step of a narrow Spatial-Mamba (fused backend, fp32, AdamW) replayed from its recording moves
    the weights as the same number of eager steps does: the first call is warm-up (3) + 1 steps, each later
    call one more; new data written into the input tensor is seen by the replay."""
    from src.cudagraphs import graph_step
    from src.models.spatial_mamba import SpatialMamba

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    device = torch.device("cuda")
    model = SpatialMamba(dims=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_classes=10, backend="fused",
                         drop_path_rate=0.0, fused_norms=fused_norms).to(device).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True, capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, fused=True)

    def step():
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def ref_step(inputs):
        torch.nn.functional.cross_entropy(ref(inputs), y).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    replay = graph_step(step, opt, device)
    replay()
    for _ in range(4):
        ref_step(x)
    new = torch.randn_like(x)
    x.copy_(new)
    replay()
    ref_step(new)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
