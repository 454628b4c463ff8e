"""Training through the Triton kernels: a compiled training step, and a short training run that
must converge like the same run on the reference backend. GPU only (the interpreter is far too
slow for hundreds of steps); the compile path with backward is also covered on CPU by
tests/test_triton_forward.py::test_forward_torch_compile_fullgraph."""

import copy

import pytest
import torch

import gna

pytestmark = pytest.mark.gpu  # skipped without a CUDA device (conftest)

GEOMETRY = dict(kernel_size=(3, 5, 5), stride=(1, 2, 2), dilation=(1, 1, 2),
                is_causal=(True, False, False))


def _model(backend, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        gna.NeighborhoodAttention3D(64, 4, **GEOMETRY, backend=backend),
        torch.nn.GELU(),
        gna.NeighborhoodAttention3D(64, 4, **GEOMETRY, backend=backend),
    ).cuda()


def _train(model, steps, seed=1):
    """Regress a fixed random teacher's output; returns the loss curve."""
    teacher = _model("reference", seed=123)
    g = torch.Generator(device="cuda").manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 6, 12, 16, 64, device="cuda", generator=g)
        with torch.no_grad():
            target = teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_converges_like_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = _train(_model("triton"), steps=300)
    ref = _train(_model("reference"), steps=300)
    assert ours[-1] < 0.5 * ours[0], f"did not converge: {ours[0]:.4f} -> {ours[-1]:.4f}"
    # Same init, same data, fp32: the curves must stay together.
    for step in (50, 150, 299):
        assert abs(ours[step] - ref[step]) <= 0.02 * ref[step], (step, ours[step], ref[step])


def test_compiled_training_step_fullgraph():
    torch._dynamo.reset()
    model = _model(None).half()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 6, 12, 16, 64, device="cuda", dtype=torch.float16)
    out = compiled(x)
    out.float().square().mean().backward()
    eager(x).float().square().mean().backward()
    for p_c, p_e in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, rtol=2e-2, atol=2e-3)
