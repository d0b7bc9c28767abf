"""Asking a question in real Chromium: tokens stream in, then the answer appears with its sources."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_ask_a_question_and_see_tokens_stream_and_a_citation(live_server, page, owner, version):
    page.goto(f"{live_server.url}/login/")
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("pw-alice-123")
    page.get_by_role("button", name="Log in").click()
    page.goto(f"{live_server.url}{version.get_absolute_url()}")
    page.wait_for_selector("#ask-form[data-ready]", state="attached")

    page.get_by_label("Answer length").fill("160")
    page.get_by_label("Your question").fill("How do I reset the P-200 pump?")
    page.get_by_role("button", name="Send").click()

    # While the answer streams, its text grows inside the placeholder (before the final swap).
    page.wait_for_function(
        "() => { const t = document.querySelector('.msg-assistant.streaming .stream-text');"
        " return t && t.textContent.trim().length > 0; }",
        timeout=30_000,
    )
    answer = page.locator("article.msg-assistant").last
    expect(answer.locator(".sources")).to_be_visible(timeout=60_000)
    expect(answer.locator(".source-title").first).to_contain_text("[1] P-200 pump manual")
    expect(answer.locator(".msg-body")).not_to_be_empty()
    assert "/c/" in page.url  # the conversation has its own address to come back to

    page.reload()
    expect(page.locator("article.msg-assistant .source-title").first).to_contain_text("P-200 pump manual")
