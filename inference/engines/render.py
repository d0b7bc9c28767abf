"""A model's Markdown answer as safe HTML, with its [n] citations linked to the sources, free of Django.

The answer is untrusted: the model can be steered by the documents it read. So raw HTML is
escaped, images never become requests, only http(s)/mailto links survive, and nh3 has the last
word with an explicit allow-list. Rendering must not fail on half-streamed Markdown either;
markdown-it accepts any input.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

import nh3
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict

from training.ml.prompt import CITATION

ALLOWED_TAGS = {
    "p", "br", "strong", "em", "code", "pre", "ul", "ol", "li", "blockquote",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a", "hr", "sup",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href"}, "ol": {"start"}}
LINK_SCHEMES = {"http", "https", "mailto"}
LINK_REL = "noopener noreferrer nofollow"

# A citation travels through markdown-it and nh3 as these private-use characters around its
# number, and becomes a link only after sanitising, so the sanitiser's rules for links (rel, no
# relative hrefs) never apply to the in-page anchors.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def render_answer(markdown_text: str, *, source_count: int, anchor_prefix: str = "source-") -> str:
    # Placeholder characters coming from the model would forge citations: drop them.
    source = markdown_text.replace(_OPEN, "").replace(_CLOSE, "")
    cleaned = _CLEANER.clean(_MARKDOWN.render(source, {"source_count": source_count}))
    prefix = html.escape(anchor_prefix, quote=True)
    return _PLACEHOLDER.sub(
        lambda m: f'<sup><a href="#{prefix}{m[1]}" class="cite">[{m[1]}]</a></sup>', cleaned
    )


def _mark_citations(state: StateCore) -> None:
    """Turn in-range [n] in plain text into placeholders; code and link texts are left alone."""
    source_count: int = state.env["source_count"]

    def marked(match: re.Match[str]) -> str:
        numbers = [int(n) for n in match[1].split(",")]
        if not any(1 <= n <= source_count for n in numbers):
            return match[0]
        return "".join(f"{_OPEN}{n}{_CLOSE}" if 1 <= n <= source_count else f"[{n}]" for n in numbers)

    for block in state.tokens:
        link_depth = 0
        for token in block.children or []:
            link_depth += {"link_open": 1, "link_close": -1}.get(token.type, 0)
            if token.type == "text" and not link_depth:
                token.content = CITATION.sub(marked, token.content)


def _image_as_alt_text(
    renderer: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    """An image becomes its alt text: loading it would send a request wherever the model pointed."""
    return html.escape(renderer.renderInlineAsText(tokens[idx].children or [], options, env))


def _allowed_attribute(tag: str, attribute: str, value: str) -> str | None:
    # nh3 lets relative URLs through; links in an answer may only leave for http(s) or mail.
    if attribute == "href" and urlsplit(value).scheme.lower() not in LINK_SCHEMES:
        return None
    return value


def _markdown() -> MarkdownIt:
    # The commonmark preset passes raw HTML through; the model's HTML must arrive as text.
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.core.ruler.push("citations", _mark_citations)
    md.add_render_rule("image", _image_as_alt_text)
    return md


_MARKDOWN = _markdown()
_CLEANER = nh3.Cleaner(
    tags=ALLOWED_TAGS,
    attributes=ALLOWED_ATTRIBUTES,
    attribute_filter=_allowed_attribute,
    url_schemes=LINK_SCHEMES,
    link_rel=LINK_REL,
)
