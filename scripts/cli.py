"""Command-line conventions shared by the scripts."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default and keeps the description's own line breaks (usage examples).

    An option whose help already names its default, or whose default is None or empty (the help says what not
    giving it means), is left as written.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default in ("", []) or "default" in text:
            return text
        return super()._get_help_string(action)
