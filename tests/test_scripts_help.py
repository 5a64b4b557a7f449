"""Every script's ``--help`` shows the defaults of its options (argparse's ArgumentDefaultsHelpFormatter or
scripts.cli.HelpFormatter): each parser is caught as the script parses ``--help``, in this process."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every script with a command line. Those owned elsewhere only promise the defaults formatter; the others also give
# every option with a default a help text (argparse prints a default only beside help).
SCRIPTS = sorted(p.stem for p in (ROOT / "scripts").glob("*.py") if "ArgumentParser(" in p.read_text())
FORMATTER_ONLY = {"bench_lm_eval", "eval_elbo", "isoflop_sweep", "prepare_corpus", "prepare_slim_pajama", "prepare_starcoder",
                  "train_tokenizer"}


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


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_defaults(script, monkeypatch):
    parser = _parser_of(script, monkeypatch)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    monkeypatch.undo()  # format_help below must not meet the patched parse
    text = " ".join(parser.format_help().split())  # help lines wrap at the terminal width
    for action in parser._actions:
        if not action.option_strings or not _shown(action.default) or action.dest == "help":
            continue
        if script not in FORMATTER_ONLY:
            assert action.help, f"{script} {action.option_strings[0]} has a default but no help text"
        if action.help and "default" not in action.help:
            assert f"(default: {action.default})" in text, (script, action.option_strings[0])
