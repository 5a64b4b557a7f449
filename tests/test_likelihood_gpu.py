"""The compiled scoring path (lm-eval's ``compile`` model_arg: blocks compiled with dynamic shapes) gives the
eager path's ELBO estimates on the GPU, over several request lengths and batch sizes without a recompile each."""

from __future__ import annotations

import pytest
import torch

from dlm_titan.likelihood import elbo_batch
from dlm_titan.models import build_transencoder, get_model_args
from dlm_titan.parallelize import compile_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_blocks_score_as_eager():
    device = torch.device("cuda")
    model = build_transencoder(get_model_args("6M"), 256, "auto", device)
    model.to_empty(device=device)
    model.init_weights(0)
    model = model.to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(0)
    texts = []
    for total, cont in [(40, 5), (40, 12), (57, 1), (96, 20), (33, 7)]:
        ids = torch.randint(0, model.args.vocab_size, (total,), generator=gen).tolist()
        texts.append((ids[: total - cont], ids[total - cont :]))

    def score(batch_size: int) -> torch.Tensor:
        out = elbo_batch(model, texts, mask_id=model.args.mask_id, mc_samples=16, batch_size=batch_size)
        return torch.tensor([e.nll for e in out], dtype=torch.float64)

    eager = score(24)
    compile_blocks(model, dynamic=True)
    torch._dynamo.reset()
    compiled, rebatched = score(24), score(7)
    assert torch.allclose(compiled, eager, rtol=2e-2)
    assert torch.allclose(rebatched, eager, rtol=2e-2)
    assert not torch.allclose(eager[:1], eager[1:2], rtol=2e-2)  # the comparison can tell requests apart
