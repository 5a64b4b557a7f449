"""Plain text of a Sphinx HTML page's main body, with the stdlib ``html.parser``."""

from __future__ import annotations

import re
from html.parser import HTMLParser

# fmt: off
_BLOCK_TAGS = {
    "p", "div", "section", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "dl", "ul", "ol", "pre",
    "table", "tr", "blockquote", "br", "hr", "figure", "figcaption", "caption",
}
# fmt: on


class _SphinxBodyText(HTMLParser):
    """Plain text of a Sphinx page's `<div role="main">`: paragraphs split by blank lines, `<pre>` verbatim."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self._line: list[str] = []
        self._main_depth = 0  # open <div>s inside the main body; 0 = outside it
        self._pre_depth = 0
        self._cell_depth = 0  # inside <td>/<th>: cells of a row share one line, joined by " | "
        self._skip_tag: str | None = None  # inside a headerlink anchor, <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        if not self._main_depth:
            if tag == "div" and attr.get("role") == "main":
                self._main_depth = 1
            return
        if tag == "div":
            self._main_depth += 1
        if self._skip_tag:
            return
        if tag in ("script", "style") or (tag == "a" and "headerlink" in (attr.get("class") or "")):
            self._skip_tag = tag
            return
        if tag in ("td", "th"):
            self._cell_depth += 1
            if self._line:
                self._line.append(" | ")
        elif tag in _BLOCK_TAGS:
            self._block_break()
        if tag == "pre":
            self._pre_depth += 1
        elif tag == "li" and "".join(self._line) != "- ":  # an item whose first child is a nested list
            self._line.append("- ")

    def handle_endtag(self, tag: str) -> None:
        if not self._main_depth:
            return
        if self._skip_tag:
            if tag == self._skip_tag:
                self._skip_tag = None
            if tag == "div":
                self._main_depth -= 1
            return
        if tag in ("td", "th"):
            self._cell_depth -= 1
        elif tag in _BLOCK_TAGS:
            self._block_break()
        if tag == "pre":
            self._pre_depth -= 1
        if tag == "div":
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth and not self._skip_tag:
            self._line.append(data if self._pre_depth else re.sub(r"\s+", " ", data))

    def _block_break(self) -> None:
        if self._cell_depth and not self._pre_depth:
            self._line.append(" ")  # a paragraph inside a table cell stays on the row's line
        else:
            self._flush()

    def _flush(self) -> None:
        raw = "".join(self._line)
        if raw == "- ":  # a list bullet whose item starts with a paragraph: keep it for that paragraph
            return
        self._line = []
        if self._pre_depth:
            text = "\n".join(line.rstrip() for line in raw.strip("\n").split("\n"))
        else:
            text = re.sub(r" {2,}", " ", raw).strip()
        if text.strip():
            self.blocks.append(text)


def html_to_text(html: str) -> str:
    """Main body text of one Sphinx HTML page.

    Args:
        html: The page source.

    Returns:
        The blocks of the ``<div role="main">`` body separated by blank lines, ending in one newline.
    """
    parser = _SphinxBodyText()
    parser.feed(html)
    parser.close()
    parser._flush()
    return "\n\n".join(parser.blocks) + "\n"
