from __future__ import annotations

import pytest

from inference.engines.render import render_answer

pytestmark = pytest.mark.abuse  # hostile input: part of the fault and abuse suite (issue 9)


def render(markdown_text: str, source_count: int = 3) -> str:
    return render_answer(markdown_text, source_count=source_count)


def test_script_tags_are_escaped_text() -> None:
    html = render("Hi <script>alert('x')</script>")
    assert "<script" not in html
    assert "&lt;script&gt;" in html


def test_img_with_event_handler_never_becomes_an_element() -> None:
    html = render('<img src="x" onerror="alert(1)"> and <b onclick="alert(2)">bold</b>')
    assert "<img" not in html
    assert "<b" not in html
    assert "&lt;img" in html


def test_javascript_links_never_become_links() -> None:
    html = render(
        '[click](javascript:alert(1)) <JaVaScript:alert(2)> [ref][r] <a href="javascript:alert(3)">x</a>'
        "\n\n[r]: javascript:alert(4)"
    )
    assert "<a" not in html


def test_markdown_image_to_an_external_url_becomes_its_alt_text() -> None:
    html = render("Look: ![a pump diagram](http://evil.example/x.png)")
    assert "<img" not in html
    assert "evil.example" not in html
    assert "a pump diagram" in html


def test_normal_link_is_kept_with_rel_and_without_target() -> None:
    html = render("See [the manual](https://example.com/manual).")
    assert '<a href="https://example.com/manual" rel="noopener noreferrer nofollow">the manual</a>' in html
    assert "target" not in html


@pytest.mark.parametrize("href", ["/admin/delete", "data:text/html,hi", "ftp://example.com/x"])
def test_only_http_https_and_mailto_hrefs_survive(href: str) -> None:
    assert "href" not in render(f"[x]({href})")
    assert 'href="mailto:ops@example.com"' in render("[mail](mailto:ops@example.com)")


def test_tables_render_without_style() -> None:
    html = render("| Port | Use |\n|-----:|:----|\n| 8080 | web |\n")
    assert "<table>" in html
    assert "<th>Port</th>" in html
    assert "<td>8080</td>" in html
    assert "style" not in html


def test_code_blocks_escape_their_content_and_keep_citations_literal() -> None:
    html = render("```html\n<script>alert(1)</script> [1]\n```\n\nInline `<b>[2]</b>` too.")
    assert "<pre><code>&lt;script&gt;alert(1)&lt;/script&gt; [1]\n</code></pre>" in html
    assert "<code>&lt;b&gt;[2]&lt;/b&gt;</code>" in html
    assert "cite" not in html


def test_citations_in_range_are_linked() -> None:
    html = render_answer("Use port 8080 [2]. Restart first [1][3].", source_count=3, anchor_prefix="src-")
    assert '<sup><a href="#src-2" class="cite">[2]</a></sup>' in html
    assert (
        '<sup><a href="#src-1" class="cite">[1]</a></sup><sup><a href="#src-3" class="cite">[3]</a></sup>'
        in html
    )


def test_grouped_citations_link_each_number() -> None:
    html = render("Both agree [1, 2].", source_count=2)
    assert html == (
        '<p>Both agree <sup><a href="#source-1" class="cite">[1]</a></sup>'
        '<sup><a href="#source-2" class="cite">[2]</a></sup>.</p>\n'
    )


def test_out_of_range_citations_stay_plain_text() -> None:
    html = render("Made up [4] and [0].", source_count=3)
    assert "[4]" in html and "[0]" in html
    assert "<sup>" not in html


def test_citation_inside_link_text_is_not_nested() -> None:
    html = render("[see [1]](https://example.com)")
    assert "cite" not in html


def test_forged_placeholders_from_the_model_are_dropped() -> None:
    assert "cite" not in render("\ue0002\ue001", source_count=3)


@pytest.mark.parametrize(
    "partial",
    [
        "```python\nprint('hi')",
        "Some **bold",
        "| a | b |\n|--",
        "[link](http://exa",
        "1. one\n2.",
        "> quote\n\n```",
    ],
)
def test_partial_markdown_renders(partial: str) -> None:
    assert isinstance(render(partial), str)


def test_unclosed_fence_still_escapes() -> None:
    html = render("Here:\n```\n<script>alert(1)</script>")
    assert "<script" not in html
    assert "<pre><code>" in html
