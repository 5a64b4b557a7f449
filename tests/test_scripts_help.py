"""Every script's ``--help`` shows the defaults of its options (argparse's ArgumentDefaultsHelpFormatter or
scripts.cli.HelpFormatter): each parser is caught as the script parses ``--help``, in this process."""

import argparse
import importlib
import sys

import pytest

# script -> whether every option with a default must also have help text (argparse prints a default only with
# help); the scripts owned elsewhere only promise the formatter
SCRIPTS = {
    "bench_add_rms_norm": True, "bench_checkpoint": True, "bench_data": True, "bench_loss": True,
    "bench_train": True, "build_embedded_corpus": True, "export_checkpoint": True, "generate": True,
    "plot_run": True, "eval_elbo": False, "isoflop_sweep": False, "lm_eval_adapter": False,
    "prepare_slim_pajama": False, "prepare_starcoder": False, "train_tokenizer": False,
}


class _Caught(Exception):
    pass


def _parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``script``'s entry point builds, stopped where it parses ``--help``."""
    caught: list[argparse.ArgumentParser] = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _Caught

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    module = importlib.import_module(f"scripts.{script}")
    entry = module.main
    with pytest.raises(_Caught):
        entry(["--help"]) if entry.__code__.co_argcount else entry()
    return caught[0]


def _shown(default) -> bool:
    return default not in (None, "", [], argparse.SUPPRESS)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_help_shows_defaults(script, monkeypatch):
    parser = _parser_of(script, monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    monkeypatch.undo()  # format_help below must not meet the patched parse
    text = " ".join(parser.format_help().split())  # help lines wrap at the terminal width
    for action in parser._actions:
        if not action.option_strings or not _shown(action.default) or action.dest == "help":
            continue
        if SCRIPTS[script]:
            assert action.help, f"{script} {action.option_strings[0]} has a default but no help text"
        if action.help and "default" not in action.help:
            assert f"(default: {action.default})" in text, (script, action.option_strings[0])
