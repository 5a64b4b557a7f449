"""Grouped-query attention in training: a run initialised from a Hugging Face folder of a GQA model (its shape
taken from the folder, no flavor) loads the folder's weights, and FSDP over 2 ranks reproduces the losses of one
process training the same global batch (DESIGN.md layout invariance), as the MHA flavors do in test_parallel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from harness import read_losses, run_trainer, tiny_run_args, write_random_shards
from test_parallel import assert_close, finish, torchrun

from dlm_titan.config import load_config
from dlm_titan.errors import UserError
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config

VOCAB, STEPS = 512, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), VOCAB)


@pytest.fixture(scope="module")
def gqa_folder(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A GQA model (4 query heads, 2 key/value heads, rope_theta 500000) exported as a Hugging Face folder."""
    args = ModelArgs(2, 4, 64, 128, vocab_size=VOCAB, rope_theta=500000.0, n_kv_heads=2)
    model = build_transencoder(args, 32, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(7)
    folder = tmp_path_factory.mktemp("gqa")
    write_hf_folder(model.state_dict(), model_config(model, ""), folder, "float32", {})
    return folder, model.state_dict()


def train_args(data: Path, dump: Path, folder: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, dump, VOCAB, STEPS, 4, 1, 0, "--checkpoint.initial_load_path", str(folder), *extra)


def test_run_takes_the_folder_shape_and_weights(data, gqa_folder, tmp_path):
    from dlm_titan import distributed as dist_utils
    from dlm_titan.train import Trainer

    folder, state = gqa_folder
    try:
        trainer = Trainer(load_config(train_args(data, tmp_path, folder)))  # model.flavor says 6M: ignored
        a = trainer.model.args
        assert (a.n_layers, a.dim, a.n_heads, a.kv_heads, a.rope_theta) == (2, 64, 4, 2, 500000.0)
        got = trainer.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items())
        with pytest.raises(UserError, match="--model.vocab_size 512"):
            Trainer(load_config([*train_args(data, tmp_path, folder), "--model.vocab_size", "1024"]))
    finally:
        dist_utils.shutdown()


@pytest.mark.multiprocess
def test_gqa_fsdp_two_ranks_equal_one_process(data, gqa_folder, tmp_path):
    folder, _ = gqa_folder
    reference = run_trainer(train_args(data, tmp_path / "ref", folder))
    dump = tmp_path / "fsdp"
    # test_parallel's torchrun launches its own file, whose workers train with the given arguments
    finish(torchrun(1, 2, "localhost:0", [*train_args(data, dump, folder), "--parallelism.fsdp_reshard_after_forward",
                                          "always"]))
    assert_close(read_losses(dump), reference)
