"""Generate text with a trained masked diffusion model (SMDM's reverse-process samplers) or an autoregressive one.

Usage::

    python -m scripts.generate --checkpoint outputs/debug --prompt "In the beginning" --length 128 --steps 64
    python -m scripts.generate --checkpoint outputs/debug/export --prompt "def main(" --prompt "And God said" \\
        --length 64 --steps 64 --block_length 16 --algorithm stochastic --temperature 1.0 --cfg_scale 0.5

``--checkpoint`` is a dump folder (its newest complete checkpoint), a ``step-N`` checkpoint folder or an export
folder (model.safetensors + config.json). Each sample prints the prompt verbatim followed by the generated text,
cut before the first end-of-text token unless ``--no_stop_at_eos``; after the samples, one line on stderr gives
the samples, tokens and seconds.

A checkpoint of the autoregressive baseline (``training.objective = "ar"``; its config records ``causal``) samples
left to right instead (dlm_titan.ar_sampling): ``--temperature`` (0 = greedy), ``--top_k`` (0 = the whole
vocabulary), a KV cache unless ``--no_kv_cache``. Options of the other kind of checkpoint are refused (``--steps``,
``--block_length``, ``--algorithm`` and ``--cfg_scale`` for an autoregressive one, ``--top_k`` and ``--no_kv_cache``
for a masked diffusion one), not ignored::

    python -m scripts.generate --checkpoint outputs/ar --prompt "In the beginning" --length 64 --temperature 0.8 --top_k 50
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from dlm_titan.ar_sampling import ARSamplerConfig, generate_batch
from dlm_titan.errors import UserError, report, report_interrupted
from dlm_titan.sampling import ALGORITHMS, SamplerConfig, generate
from scripts.cli import HelpFormatter

DEFAULT_STEPS = 64  # forward passes per block unless --steps says otherwise
SamplerOptions = SamplerConfig | ARSamplerConfig


def resolve_device(device: str) -> torch.device:
    """"auto" = CUDA when available, else CPU; UserError for a name that is no device, a device type other than
    CPU and CUDA, or a device this machine lacks."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows, most of them unusable here
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f'--device {device} is not a device this script runs on; use "auto", "cpu", "cuda" or '
                        '"cuda:N"')
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {device} but this machine has {torch.cuda.device_count()} CUDA device(s); use "
                        f"--device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" = bfloat16 on CUDA, float32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise UserError(f"--dtype {dtype} is not one of auto, {', '.join(table)}")
    return table[dtype]


def load_for_inference(path: str, device: str = "auto", dtype: str = "auto") -> torch.nn.Module:
    """The model of a dump / step-N / export folder, in eval mode on ``device`` with parameters in ``dtype``."""
    from dlm_titan.checkpoint.export import load_model

    dev = resolve_device(device)
    return load_model(path, dev, dtype=resolve_dtype(dtype, dev))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the sampling and evaluation scripts."""
    parser.add_argument("--checkpoint", required=True,
                        help="dump folder (newest checkpoint), step-N checkpoint folder, or export folder")
    parser.add_argument("--tokenizer_path", default="",
                        help='SentencePiece .model, tokenizer.json or a folder ("" = an export\'s own, else the '
                             "embedded tokenizer; an SMDM/lit-gpt weights file needs its own, Llama-2's for SMDM's)")
    parser.add_argument("--device", default="auto", help='"auto", "cpu", "cuda", "cuda:1", ...')
    parser.add_argument("--dtype", default="auto", help='"auto" (bf16 on CUDA, fp32 on CPU), float32, bfloat16')


def load_tokenizer_for(model: torch.nn.Module, path: str, checkpoint: str = ""):
    """The tokenizer, checked to fit the model's vocabulary and to be the one the run of ``checkpoint`` trained
    on where its checkpoint records that (a step-N / dump folder carries no tokenizer of its own)."""
    from dlm_titan.checkpoint.eval_tokenizer import load_checked_tokenizer, refuse_litgpt_without_tokenizer

    refuse_litgpt_without_tokenizer(checkpoint, path)
    return load_checked_tokenizer(checkpoint, path, model.args.vocab_size)


def continuation_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Text of ``new_ids`` as it reads after the prompt (SentencePiece drops a leading space when a piece
    list is decoded on its own, so decode prompt + new and strip the prompt's decoding)."""
    head = tokenizer.decode(prompt_ids)
    full = tokenizer.decode(prompt_ids + new_ids)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new_ids)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", default=None,
                        help='prompt text; repeat for a batch ("" = a new document)')
    parser.add_argument("--prompts_file", default="", help="a UTF-8 file with one prompt per line (added to --prompt)")
    parser.add_argument("--num_samples", type=int, default=1,
                        help="samples per prompt (at --temperature 0 only with --algorithm stochastic: the other "
                             "samplers draw no noise there)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="samples per forward pass (more run in further batches; the samples do not depend on it)")
    parser.add_argument("--length", type=int, default=128, help="tokens to generate after the prompt")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"masked diffusion checkpoints: forward passes per block (default: {DEFAULT_STEPS}, "
                             "or the block's length if shorter)")
    parser.add_argument("--block_length", type=int, default=0,
                        help="masked diffusion checkpoints: semi-autoregressive block size (0 = off)")
    parser.add_argument("--algorithm", default=None, choices=ALGORITHMS,
                        help="masked diffusion checkpoints: confidence (the default): reveal the most confident "
                             "tokens; stochastic: reveal with prob 1 - s/t")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (0 = argmax; Gumbel-max for MDM)")
    parser.add_argument("--top_k", type=int, default=0,
                        help="autoregressive checkpoints: sample among the k most likely tokens (0 = all)")
    parser.add_argument("--no_kv_cache", action="store_true",
                        help="autoregressive checkpoints: recompute the whole prefix each step (same tokens, slower)")
    parser.add_argument("--cfg_scale", type=float, default=0.0,
                        help="masked diffusion checkpoints: unsupervised classifier-free guidance")
    parser.add_argument("--no_stop_at_eos", action="store_true", help="keep generating past end-of-text")
    parser.add_argument("--seed", type=int, default=0,
                        help="noise seed: sample i draws with key(seed) + i, the key spread over 62 bits, so runs of "
                             "different seeds share no sample")
    return parser.parse_args(argv)


def read_prompts_file(path: str) -> list[str]:
    """The non-blank lines of ``--prompts_file`` (UTF-8; a byte-order mark is not part of the first prompt,
    Windows line ends are not part of any); UserError when it cannot be read or is not UTF-8."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts_file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--prompts_file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as "
                        "UTF-8") from None


def check_utf8_argument(text: str) -> None:
    """UserError for a ``--prompt`` holding bytes that are not UTF-8 (a Latin-1 terminal, a script's raw bytes):
    Python hands them over as lone surrogates, which no tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        raise UserError(f"--prompt {raw!r} is not UTF-8 text; pass UTF-8 (a UTF-8 terminal locale) or put the "
                        "prompts in a UTF-8 --prompts_file") from None


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    for text in prompts:
        check_utf8_argument(text)
    if args.prompts_file:
        prompts += read_prompts_file(args.prompts_file)
    if not prompts:
        raise UserError('no prompt given; pass --prompt "text" (repeatable) or --prompts_file FILE')
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    return [p for p in prompts for _ in range(args.num_samples)]


def refuse_other_kinds_options(args: argparse.Namespace, causal: bool) -> None:
    """UserError naming the given options that only the other kind of checkpoint reads (they would be ignored
    without a word): the diffusion sampler's for an autoregressive checkpoint, and the reverse."""
    if causal:
        given = {"--steps": args.steps is not None, "--block_length": args.block_length != 0,
                 "--algorithm": args.algorithm is not None, "--cfg_scale": args.cfg_scale != 0}
        this, other = "autoregressive (sampled left to right)", "masked diffusion"
    else:
        given = {"--top_k": args.top_k != 0, "--no_kv_cache": args.no_kv_cache}
        this, other = "a masked diffusion model", "autoregressive"
    names = [name for name, on in given.items() if on]
    if names:
        verb, it = ("applies", "it") if len(names) == 1 else ("apply", "them")
        raise UserError(f"{' and '.join(names)} {verb} only to {other} checkpoints; {args.checkpoint} is {this}: "
                        f"drop {it}")


def refuse_identical_copies(args: argparse.Namespace, causal: bool) -> None:
    """UserError for ``--num_samples`` above 1 where sampling draws no noise (greedy decoding of an autoregressive
    checkpoint, the confidence sampler at temperature 0): every copy of a prompt would be the same text."""
    if args.num_samples < 2 or args.temperature != 0 or not (causal or args.algorithm in (None, "confidence")):
        return
    how = "greedy decoding" if causal else "the confidence sampler at temperature 0"
    other = "" if causal else " (or --algorithm stochastic)"
    raise UserError(f"--num_samples {args.num_samples} would print {args.num_samples} identical copies: {how} draws "
                    f"no noise; add --temperature (e.g. 1.0){other}, or drop --num_samples")


def sample_tokens(model: torch.nn.Module, prompt_ids: list[list[int]], args: argparse.Namespace, tok) -> list[list[int]]:
    """Continuation ids of every prompt: left to right for an autoregressive checkpoint (its config records
    ``causal``), else SMDM's reverse process."""
    device = next(model.parameters()).device
    causal = getattr(model, "causal", False)
    refuse_other_kinds_options(args, causal)
    refuse_identical_copies(args, causal)
    if causal:
        if args.top_k and args.temperature == 0:  # greedy decoding takes the argmax: top-k would change nothing
            raise UserError(f"--top_k {args.top_k} samples, but --temperature 0 (the default) decodes greedily: "
                            "add --temperature (e.g. 1.0), or drop --top_k")
        ar_cfg = ARSamplerConfig(max_new_tokens=args.length, temperature=args.temperature, top_k=args.top_k,
                                 kv_cache=not args.no_kv_cache, stop_at_eos=not args.no_stop_at_eos,
                                 seed=run_key(args.seed))
        return in_batches(lambda prompts, cfg: generate_batch(model, prompts, cfg, eos_id=tok.eos_id,
                                                              vocab_limit=tok.vocab_size, device=device),
                          prompt_ids, ar_cfg, args.batch_size)
    # The confidence sampler reveals at least one token a step: a short block caps the default number of steps.
    steps = args.steps if args.steps is not None else max(1, min(DEFAULT_STEPS, args.block_length or args.length))
    mdm_cfg = SamplerConfig(length=args.length, steps=steps, block_length=args.block_length,
                            algorithm=args.algorithm or "confidence", temperature=args.temperature,
                            cfg_scale=args.cfg_scale, stop_at_eos=not args.no_stop_at_eos, seed=run_key(args.seed))
    mdm_cfg.blocks()  # UserError for bad sampler options
    return in_batches(lambda prompts, cfg: generate(model, prompts, cfg, mask_id=model.args.mask_id,
                                                    eos_id=tok.eos_id, vocab_limit=tok.vocab_size, device=device),
                      prompt_ids, mdm_cfg, args.batch_size)


def run_key(seed: int) -> int:
    """The sampler seed of ``--seed seed``: sample i of the run draws with run_key(seed) + i. The samplers key
    sample i by seed + i: passed on as it is, ``--seed 1``'s sample i would be ``--seed 0``'s sample i + 1 (runs
    of consecutive seeds would print nearly the same samples); spread over 62 bits, runs of different seeds share
    none."""
    return int(np.random.SeedSequence([seed]).generate_state(1, dtype=np.uint64)[0] >> 2)


def in_batches(draw: Callable[[list[list[int]], SamplerOptions], list[list[int]]], prompt_ids: list[list[int]],
               cfg: SamplerOptions, batch_size: int) -> list[list[int]]:
    """``draw(prompts, cfg)`` over consecutive slices of at most ``batch_size`` prompts (the samplers run each
    prompt length of a call as one batch: without slices, --num_samples 300 of a 2048-token model asks for 300
    x 2048 x vocab float32 logits at once). Each slice's seed is moved on by its start, so prompt i still samples
    with ``cfg.seed`` + i and the samples do not depend on ``batch_size``."""
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        out += draw(prompt_ids[start : start + batch_size], dataclasses.replace(cfg, seed=cfg.seed + start))
    return out


def run(args: argparse.Namespace) -> tuple[list[str], str]:
    """Generates for every prompt; returns the texts to print (prompt verbatim + continuation) and a stats line."""
    texts = read_prompts(args)
    if args.length < 1:
        raise UserError(f"--length must be at least 1, got {args.length}")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.seed < 0:  # the noise generators' keys are non-negative (numpy SeedSequence)
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    model = load_for_inference(args.checkpoint, args.device, args.dtype)
    tok = load_tokenizer_for(model, args.tokenizer_path, args.checkpoint)
    # An empty prompt starts a new document: documents follow an EOS in the packed training stream.
    prompt_ids = [tok.encode(t, bos=False, eos=False) or [tok.eos_id] for t in texts]
    longest = max(len(p) for p in prompt_ids) + args.length
    if longest > model.max_seq_len:
        raise UserError(f"prompt + --length = {longest} tokens exceeds the model's {model.max_seq_len}; "
                        "shorten the prompt or lower --length")
    start = time.perf_counter()
    new_ids = sample_tokens(model, prompt_ids, args, tok)
    elapsed = time.perf_counter() - start
    stats = f"{len(texts)} samples, {sum(map(len, new_ids))} tokens in {elapsed:.2f} s"
    return [text + continuation_text(tok, ids, new)
            for text, ids, new in zip(texts, prompt_ids, new_ids, strict=True)], stats


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader stopped (`... | head`)


def write_samples(outputs: list[str]) -> None:
    """Prints the samples, each ending in one newline, headed by its number when there are several."""
    for i, text in enumerate(outputs):
        if len(outputs) > 1:
            print(f"--- sample {i + 1}/{len(outputs)} ---")
        print(text if text.endswith("\n") else text + "\n", end="")
    sys.stdout.flush()


def drop_unwritten_stdout() -> None:
    """Points stdout's file descriptor at /dev/null: the interpreter flushes stdout at exit, and what could not
    be written would fail again there, adding a second error (or a traceback) after ours."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no file behind it (io.UnsupportedOperation is both)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sys.stdout is None:  # started with stdout closed (`>&-`): checked before the sampling it would waste
        return report(UserError("stdout is closed, so no sample could be printed; run it with stdout open (e.g. "
                                "> samples.txt)"))
    try:
        outputs, stats = run(args)
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:
        return report_interrupted("no sample printed (the samples print once all are generated)")
    try:
        write_samples(outputs)
    except BrokenPipeError:  # the reader took what it wanted and stopped: nothing to report
        drop_unwritten_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as e:  # a full disk, a file over quota, a closed terminal
        drop_unwritten_stdout()
        return report(UserError(f"cannot write the samples to stdout ({e.strerror}); free space or redirect the "
                                "output elsewhere"))
    # After the samples, on a line of its own: where stdout and stderr share a terminal or a file, the line is
    # not wedged into (or glued onto) a sample's text.
    print(stats, file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
