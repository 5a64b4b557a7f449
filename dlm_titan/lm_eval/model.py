"""lm-eval model ``dlm_titan``: a dlm_titan checkpoint or export behind lm-eval's ``LM`` interface.

Importing this module registers the model with lm-eval (``python -m dlm_titan.lm_eval`` does). Its
``--model_args`` are ``pretrained=PATH`` (a dump folder, a ``step-N`` checkpoint folder, an export folder, or an
SMDM/lit-gpt weights file, which carries no tokenizer and is refused without ``tokenizer_path``), ``tokenizer_path``,
``dtype``, ``compile`` and the :class:`~dlm_titan.lm_eval.scorer.ScorerConfig` fields; lm-eval's
``--batch_size`` is the number of sequences per forward pass and ``--device`` the device. A checkpoint of the
autoregressive baseline (``training.objective = "ar"``) is scored exactly (:mod:`dlm_titan.lm_eval.ar_scorer`).

Data parallel: under ``torchrun --nproc_per_node N`` each process joins the process group (NCCL on GPUs, one
per local rank; gloo on CPUs) and reports lm-eval's rank / world-size protocol (``rank``, ``world_size``,
``all_gather``, ``gather_object``, ``barrier``), so lm-eval's evaluator gives each rank its share of the
documents and gathers the metrics on rank 0. MC noise is keyed by each request's tokens, so the scores are
those of a one-process run.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dlm_titan.checkpoint.eval_tokenizer import load_checked_tokenizer, refuse_litgpt_without_tokenizer
from dlm_titan.checkpoint.export import load_model
from dlm_titan.checkpoint_layout import print_warning
from dlm_titan.distributed import init_distributed
from dlm_titan.errors import UserError
from dlm_titan.lm_eval.ar_scorer import make_scorer
from dlm_titan.lm_eval.scorer import ScorerConfig
from dlm_titan.parallelize import compile_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def scorer_config(options: dict, batch_size: int | str) -> ScorerConfig:
    """ScorerConfig from model_args (lm-eval parses them into str/int/float/bool) and lm-eval's batch size
    ("auto" = 128); UserError naming an unknown option."""
    fields = ScorerConfig.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        known = ", ".join(["pretrained", "tokenizer_path", "dtype", "compile", *fields])
        raise UserError(f"unknown dlm_titan model_args {', '.join(unknown)}; known: {known}")
    values = {k: _coerce(fields[k].default, k, v) for k, v in options.items() if v is not None}
    if str(batch_size).startswith("auto"):
        batch_size = 128
    cfg = ScorerConfig(**values, batch_size=_coerce(1, "batch_size", batch_size))
    cfg.check()  # before the model loads
    return cfg


def _coerce(default, name: str, value):
    """Converts a model_args value to the type of the field's default."""
    kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a string")
    text = str(value).lower()
    if isinstance(default, bool) and text in ("true", "false", "1", "0"):
        return text in ("true", "1")
    try:
        if not isinstance(default, bool):
            return type(default)(value)
    except ValueError:
        pass
    raise UserError(f"model_args {name}={value!r} must be {kind}")


def place(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): torchrun's process group when launched with several processes (each rank
    on cuda:LOCAL_RANK, or the CPU without CUDA), else ``device`` (None, "auto", or a CUDA device on a machine
    without CUDA, as lm-eval's default cuda:0 is: CUDA when available, else the CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return init_distributed()
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %s: CUDA is not available here, running on the CPU", device)
        device = "cpu"
    if device in (None, "", "auto"):
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return 0, 1, torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" = bfloat16 on CUDA, float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"model_args dtype={dtype} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_compile(value: str | bool, device: torch.device) -> bool:
    """"auto" = on CUDA (one compile of under a minute, then 1.47x the eager scoring rate on an H100), off
    elsewhere (a CPU compiles for minutes); true / false."""
    text = str(value).lower()
    if text == "auto":
        return device.type == "cuda"
    if text not in ("true", "false", "1", "0"):
        raise UserError(f"model_args compile={value!r} must be auto, true or false")
    return text in ("true", "1")


@register_model("dlm_titan")
class DLMTitanLM(LM):
    """lm-eval model ``dlm_titan``; see the module docstring."""

    def __init__(self, pretrained: str = "", tokenizer_path: str = "", dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, checkpoint: str = "",
                 compile: str | bool = "auto", **options):
        super().__init__()
        path = str(pretrained or checkpoint)  # checkpoint=: the earlier adapter's name
        if not path:
            raise UserError("model dlm_titan needs --model_args pretrained=PATH (a dump folder, a step-N checkpoint "
                            "folder or an export folder)")
        cfg = scorer_config(options, batch_size)
        how = "tokenizer_path=PATH in --model_args"
        refuse_litgpt_without_tokenizer(path, str(tokenizer_path), how)  # before the model loads
        self._rank, self._world_size, self._device = place(device)
        use_compile = resolve_compile(compile, self._device)
        model = load_model(path, self._device, dtype=resolve_dtype(str(dtype), self._device))
        if use_compile:  # dynamic shapes: one graph for every request length and batch size
            compile_blocks(model, dynamic=True)
        tok = load_checked_tokenizer(path, str(tokenizer_path), model.args.vocab_size, how=how)
        self.scorer = make_scorer(model, tok, cfg)  # exact for an autoregressive checkpoint
        self._causal = bool(getattr(model, "causal", False))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> DLMTitanLM:
        """lm-eval's constructor call, with model_args that repeat one of its own flags (``device=`` beside the
        ``--device`` it always passes, ``batch_size=``) refused in one line: lm-eval passes both, a TypeError."""
        flags = {k for k, v in (additional_config or {}).items() if v is not None}
        both = sorted(flags & set(arg_dict))
        if both:
            many = len(both) > 1
            raise UserError(f"model_args {', '.join(both)} {'repeat' if many else 'repeats'} lm-eval's own "
                            f"{', '.join('--' + k for k in both)}: pass {'them' if many else 'it'} as lm-eval's "
                            f"flag{'s' if many else ''}, not in --model_args")
        return super().create_from_arg_obj(arg_dict, additional_config)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DLMTitanLM:
        """The same, for model_args given as a string (``simple_evaluate(model_args="pretrained=P,...")``), whose
        lm-eval path does not go through :meth:`create_from_arg_obj`."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @property
    def device(self) -> torch.device:
        return self._device

    def _bar(self, desc: str, total: int | None, disable_tqdm: bool) -> tqdm:
        return tqdm(total=total, desc=desc, disable=disable_tqdm or self.rank != 0)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        args = [tuple(r.args[:2]) for r in requests]
        with self._bar("loglikelihood requests", len(args), disable_tqdm) as bar:
            out = self.scorer.loglikelihood(args, progress=bar.update)
        for a, o in zip(args, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", a, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [r.args[0] for r in requests]
        with self._bar("loglikelihood_rolling windows", None, disable_tqdm) as bar:
            out = self.scorer.loglikelihood_rolling(texts, progress=bar.update)
        for t, o in zip(texts, out, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), o)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        args = [(r.args[0], r.args[1]) for r in requests]
        doc_ids = [r.doc_id or 0 for r in requests]  # global ids: a sample's noise does not depend on the rank
        top_k = sorted({kw["top_k"] for _, kw in args if kw.get("top_k")})
        if top_k and not self._causal and self.rank == 0:  # scripts.generate refuses it; a task's kwargs may hold it
            print_warning(f"top_k={top_k[0]} in the generation kwargs does not apply to a masked diffusion model "
                          "(its sampler reveals tokens by confidence): generating without it; drop top_k from "
                          "--gen_kwargs (or the task's generation_kwargs)")
        with self._bar("generate_until requests", len(args), disable_tqdm) as bar:
            out = self.scorer.generate_until(args, progress=bar.update, doc_ids=doc_ids)
        for a, o in zip(args, out, strict=True):
            self.cache_hook.add_partial("generate_until", a, o)
        return out

    # lm-eval's data-parallel protocol (its evaluator calls these when world_size > 1).

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat([p.reshape(-1) for p in parts])

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
