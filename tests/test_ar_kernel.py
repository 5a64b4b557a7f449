"""The AR loss through the fused loss kernel (Triton under TRITON_INTERPRET=1, in a process of its own: see
``interpreted.py``): every row predicted, equal weights 1 / token_count, against float64 and the PyTorch reference."""

import pytest
import torch

pytest.importorskip("triton")

from interpreted import replace_unless_interpreted  # noqa: E402
from test_ar import ARGS, _reference_mean_ce, ar_loss, tiny_model  # noqa: E402

from dlm_titan.autoregressive import next_token_batch  # noqa: E402


def _loss_and_grads(impl, windows):
    model = tiny_model(seq_len=8)
    loss = ar_loss(model, next_token_batch(windows, token_count=windows.shape[0] * (windows.shape[1] - 1)), impl)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, model


def test_fused_ar_loss_equals_float64_and_the_reference():
    windows = torch.randint(0, ARGS.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    fused, fused_grads, model = _loss_and_grads("fused", windows)
    torch_loss, torch_grads, _ = _loss_and_grads("torch", windows)
    params = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters()}
    expected = _reference_mean_ce(params, windows)
    expected.backward()
    assert fused == pytest.approx(expected.item(), rel=1e-5)
    assert torch_loss == pytest.approx(expected.item(), rel=1e-5)
    for name, param in params.items():
        torch.testing.assert_close(fused_grads[name].double(), param.grad, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(fused_grads[name], torch_grads[name], rtol=1e-5, atol=1e-7, msg=name)


replace_unless_interpreted(globals(), __file__)
