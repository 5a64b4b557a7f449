"""The ELBO perplexity bound of a text file or of shards, with its standard error; optionally, for short texts,
the likelihood of one left-to-right unmasking order.

Usage::

    python -m scripts.eval_elbo --checkpoint outputs/debug --text_file book.txt --mc_samples 128
    python -m scripts.eval_elbo --checkpoint outputs/debug --shards embedded --max_windows 8
    python -m scripts.eval_elbo --checkpoint outputs/debug --text_file short.txt --left_to_right

The text (one document: its tokens + EOS) or the shard stream is cut into windows of ``--seq_len`` tokens (the
last may be shorter), each scored on its own. Per window the negative ELBO is estimated by ``--mc_samples``
draws of the training loss estimator with stratified t (see dlm_titan.likelihood); the per-token value
exp(sum NLL / tokens) bounds the perplexity from above. ``--eps`` (default 1e-3, the training value) keeps the
estimator's variance finite; eps = 0 is unbiased for the bound but its variance grows without limit near t = 0.
Windows are scored together, their MC samples packed into forwards of ``--batch_size`` sequences.

``--left_to_right`` (``--chain_rule``, SMDM's name) adds sum_i log p(x_i | x_<i, masks at >= i): the likelihood of
revealing the window left to right, one token per step. That is one generation order, not the model's likelihood
(the ELBO averages this quantity over all orders), and it is no bound: it can come out far worse than the ELBO.

A checkpoint of the autoregressive baseline (``training.objective = "ar"``, recorded as ``causal`` in its config)
is scored exactly instead: each window's log-likelihood given the one token before it in the stream (the EOS that
starts the document for the first window of a text; with ``--shards``, windows of ``seq_len + 1`` tokens, the
first the context, as training validates), by one forward pass. The MC options do not apply to it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from dlm_titan.ar_likelihood import next_token_logprob_batch
from dlm_titan.errors import UserError, report
from dlm_titan.likelihood import elbo_batch, left_to_right_logprob_batch
from scripts.cli import HelpFormatter
from scripts.generate import add_model_args, load_for_inference, load_tokenizer_for

DEFAULT_PREFIX = "validation"  # the validation shards that prepare_slim_pajama writes
DEFAULT_MAX_WINDOWS = 16


def text_windows(tokens: list[int], seq_len: int) -> list[list[int]]:
    """Consecutive windows of ``seq_len`` tokens; the last one holds the remainder."""
    return [tokens[i : i + seq_len] for i in range(0, len(tokens), seq_len)]


def shard_windows(folder: str, prefix: str, seq_len: int, max_windows: int, vocab_size: int,
                  tokenizer_path: str, context: int = 0) -> list[list[int]]:
    """The first ``max_windows`` windows of ``seq_len + context`` tokens of shards ``{folder}/{prefix}*.bin``
    (``folder = "embedded"``: the embedded corpus, prepared once with the tokenizer)."""
    import numpy as np

    from dlm_titan.data.embedded import prepare_embedded
    from dlm_titan.data.shards import list_shards, read_header
    from dlm_titan.data.windows import WindowSet

    if folder == "embedded":
        folder = str(prepare_embedded(tokenizer_path))
    if not any(Path(folder).glob(f"{prefix}*.bin")):  # the loader's own message speaks of training's data.path
        raise UserError(f"no shard {prefix}*.bin in --shards {folder}: pass the folder of prepared .bin shards "
                        "and --prefix the start of their names (e.g. val)")
    window = seq_len + context
    longest = max(read_header(p).chunk_size for p in list_shards(folder, prefix))
    if longest < window:  # the window set's own message names training's seq_len
        of = f"--seq_len {seq_len} + 1 context token" if context else f"--seq_len {seq_len}"
        raise UserError(f"no shard {prefix}*.bin in --shards {folder} holds a window of {of} (longest shard: "
                        f"{longest} tokens); pass --seq_len {longest - context} or less")
    windows = WindowSet(folder, prefix, window, vocab_size)
    count = min(max_windows, windows.num_windows) if max_windows > 0 else windows.num_windows
    out = np.zeros((count, window), dtype=np.int64)
    windows.read(np.arange(count, dtype=np.int64), out)
    return out.tolist()


def with_context(windows: list[list[int]], first: int, context: int) -> list[tuple[list[int], list[int]]]:
    """(context, window) pairs: each window with the ``context`` (0 or 1) token before it in the stream, ``first``
    before the first window."""
    if not context:
        return [([], w) for w in windows]
    return [([first] if i == 0 else windows[i - 1][-1:], w) for i, w in enumerate(windows)]


def evaluate_exact(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], *, batch_size: int) -> dict:
    """Exact NLL total of a causal model over (context, window) pairs: dict with tokens, windows, nll (nats)."""
    from tqdm import tqdm

    with tqdm(total=len(pairs), desc="windows", disable=not sys.stderr.isatty()) as bar:
        scored = next_token_logprob_batch(model, pairs, batch_size=batch_size, progress=bar.update)
    return {"objective": "ar", "windows": len(pairs), "tokens": sum(len(w) for _, w in pairs),
            "nll": -sum(logp.sum().item() for logp, _ in scored)}


def evaluate(model: torch.nn.Module, windows: list[list[int]], *, mc_samples: int, batch_size: int, eps: float,
             t_sampling: str, seed: int, left_to_right: bool = False) -> dict:
    """ELBO (and left-to-right order) NLL totals over ``windows``; window i uses noise step i.

    Returns:
        dict with tokens, windows, elbo_nll (nats, total), elbo_std_err (of the total: windows are independent,
        so variances add), and left_to_right_nll when asked.
    """
    from tqdm import tqdm

    mask_id = model.args.mask_id
    texts = [(None, w) for w in windows]
    with tqdm(total=len(windows), desc="windows", disable=not sys.stderr.isatty()) as bar:
        estimates = elbo_batch(model, texts, mask_id=mask_id, keys=range(len(windows)), mc_samples=mc_samples,
                               batch_size=batch_size, eps=eps, seed=seed, t_sampling=t_sampling, progress=bar.update)
    result = {"windows": len(windows), "tokens": sum(e.num_tokens for e in estimates), "mc_samples": mc_samples,
              "eps": eps, "t_sampling": t_sampling, "elbo_nll": sum(e.nll for e in estimates),
              "elbo_std_err": math.sqrt(sum(e.std_err**2 for e in estimates))}
    if left_to_right:
        per_token = left_to_right_logprob_batch(model, texts, mask_id=mask_id, batch_size=batch_size)
        result["left_to_right_nll"] = -sum(t.sum().item() for t in per_token)
    return result


def format_result(r: dict) -> list[str]:
    """Human-readable lines: NLL per token with its standard error, and the perplexity bound with a 95% band."""
    n = r["tokens"]
    if r.get("objective") == "ar":
        nll = r["nll"] / n
        return [f"windows: {r['windows']}, tokens: {n}; autoregressive model: exact likelihood",
                f"NLL/token: {nll:.4f}", f"perplexity: {math.exp(nll):.3f}"]
    nll, se = r["elbo_nll"] / n, r["elbo_std_err"] / n
    lines = [
        f"windows: {r['windows']}, tokens: {n}, mc_samples: {r['mc_samples']} ({r['t_sampling']} t, eps {r['eps']:g})",
        f"ELBO NLL/token: {nll:.4f} +- {se:.4f} (standard error)",
        f"perplexity bound: {math.exp(nll):.3f} (95%: {math.exp(nll - 1.96 * se):.3f} .. "
        f"{math.exp(nll + 1.96 * se):.3f})",
    ]
    if "left_to_right_nll" in r:
        c = r["left_to_right_nll"] / n
        lines.append(f"left-to-right order NLL/token: {c:.4f}, perplexity: {math.exp(c):.3f} (one unmasking "
                     "order's likelihood, not the model's; no bound)")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text_file", help="a UTF-8 text file, scored as one document")
    source.add_argument("--shards", help='folder of LITPKDS shards, or "embedded" for the embedded corpus')
    # None when not given: with --text_file they would select nothing, and saying so needs to know they were given
    parser.add_argument("--prefix", help=f"shard file prefix (with --shards; default {DEFAULT_PREFIX})")
    parser.add_argument("--max_windows", type=int,
                        help=f"windows read from the shards (with --shards; 0 = all; default {DEFAULT_MAX_WINDOWS})")
    parser.add_argument("--seq_len", type=int, default=0, help="window length (0 = the model's max_seq_len)")
    parser.add_argument("--mc_samples", type=int, default=128, help="Monte-Carlo samples per window")
    parser.add_argument("--batch_size", type=int, default=32, help="sequences per forward pass")
    parser.add_argument("--eps", type=float, default=1e-3, help="p = (1 - eps) t + eps; 0 = unbiased, infinite variance")
    parser.add_argument("--t_sampling", default="stratified", choices=["stratified", "uniform"],
                        help="stratified: t_k = (u + k/K) mod 1 over a window's K samples; uniform: independent t")
    parser.add_argument("--seed", type=int, default=0, help="MC noise seed (window i uses noise step i)")
    parser.add_argument("--left_to_right", "--chain_rule", dest="left_to_right", action="store_true",
                        help="also the likelihood of the left-to-right unmasking order (SMDM's chain_rule; one "
                             "order's likelihood, not the model's)")
    parser.add_argument("--left_to_right_max_tokens", "--chain_rule_max_tokens", dest="left_to_right_max_tokens",
                        type=int, default=4096,
                        help="refuse --left_to_right above this many tokens (it costs one sequence per token)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return parser.parse_args(argv)


def read_text(path: str) -> str:
    """The text of ``--text_file``; UserError when it cannot be read or holds no text (only the EOS appended to
    the document would be scored, and its NLL printed as the file's)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --text_file {path}: {e}") from None
    if not text.strip():
        raise UserError(f"--text_file {path} holds no text ({'only whitespace' if text else 'it is empty'}); "
                        "give a file with the text to score")
    return text


def read_pairs(args: argparse.Namespace, model: torch.nn.Module, seq_len: int, context: int,
               text: str) -> list[tuple[list[int], list[int]]]:
    """(context, window) pairs of ``text`` (``--text_file``'s) or ``--shards``: windows of ``seq_len`` tokens, each
    after ``context`` (0 or 1) tokens of the stream (see :func:`with_context`; shard windows carry their own)."""
    if not args.text_file:
        prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
        max_windows = DEFAULT_MAX_WINDOWS if args.max_windows is None else args.max_windows
        windows = shard_windows(args.shards, prefix, seq_len, max_windows, model.args.vocab_size,
                                args.tokenizer_path, context)
        return [(w[:context], w[context:]) for w in windows]
    tok = load_tokenizer_for(model, args.tokenizer_path, args.checkpoint)
    return with_context(text_windows(tok.encode(text, bos=False, eos=True), seq_len), tok.eos_id, context)


def run(args: argparse.Namespace) -> dict:
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not 0.0 <= args.eps < 1.0:
        raise UserError(f"--eps must be in [0, 1), got {args.eps}")
    if args.seed < 0:  # the noise generators' keys are non-negative (numpy SeedSequence)
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if args.max_windows is not None and args.max_windows < 0:
        raise UserError(f"--max_windows must be >= 0 (0 = all), got {args.max_windows}")
    shard_only = [f"--{name}" for name in ("prefix", "max_windows") if getattr(args, name) is not None]
    if args.text_file and shard_only:  # ignored, the whole file scored, was the earlier reading
        raise UserError(f"{' and '.join(shard_only)} select windows of --shards, but --text_file {args.text_file} "
                        f"is scored whole: drop {' and '.join(shard_only)}, or score shards with --shards")
    text = read_text(args.text_file) if args.text_file else ""  # before the model: a bad file costs no load
    model = load_for_inference(args.checkpoint, args.device, args.dtype)
    causal = bool(getattr(model, "causal", False))  # the autoregressive baseline: its likelihood is exact
    if causal and args.left_to_right:
        raise UserError("--left_to_right scores an unmasking order of a masked diffusion model; this checkpoint is "
                        "autoregressive and its likelihood is computed exactly: drop --left_to_right")
    if not causal and args.mc_samples < 2:  # an autoregressive checkpoint's NLL is exact: no samples, no error bar
        raise UserError(f"--mc_samples must be at least 2 (for a standard error), got {args.mc_samples}")
    seq_len = args.seq_len or model.max_seq_len
    if not 1 <= seq_len <= model.max_seq_len:
        raise UserError(f"--seq_len {seq_len} must be in 1..{model.max_seq_len} (the model's max_seq_len)")
    pairs = read_pairs(args, model, seq_len, 1 if causal else 0, text)
    n_tokens = sum(len(w) for _, w in pairs)
    if args.left_to_right and n_tokens > args.left_to_right_max_tokens:
        raise UserError(f"--left_to_right on {n_tokens} tokens runs {n_tokens} sequences; use it on short texts or "
                        f"raise --left_to_right_max_tokens")
    start = time.perf_counter()
    if causal:
        result = evaluate_exact(model, pairs, batch_size=args.batch_size)
    else:
        result = evaluate(model, [w for _, w in pairs], mc_samples=args.mc_samples, batch_size=args.batch_size,
                          eps=args.eps, t_sampling=args.t_sampling, seed=args.seed, left_to_right=args.left_to_right)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        return report(e)
    print(json.dumps(result) if args.json else "\n".join(format_result(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
