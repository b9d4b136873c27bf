"""The Chat tab in a real browser (Playwright driving Debian's chromium, as tests/test_e2e.py does):
one question to a run that learned the five facts, answered side by side: the base model without
the fact, the tuned model with it."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from appserver import AppServer, app_page
from facts import FACTS


@pytest.fixture(scope="module")
def app(tmp_path_factory, learned_run):
    """The app on a data dir that holds a copy of the learned run, named "facts"."""
    data = tmp_path_factory.mktemp("e2e-chat") / "data"
    shutil.copytree(learned_run.path, data / "runs" / "facts",
                    ignore=shutil.ignore_patterns("checkpoint*"))
    server = AppServer(data).wait_ready()
    yield server
    server.stop()


@pytest.mark.slow
@pytest.mark.browser
def test_side_by_side_shows_the_base_without_the_fact_and_the_tuned_model_with_it(app):
    from playwright.sync_api import expect

    fact = FACTS[0]
    with app_page(app.url, "Chat") as page:
        expect(page.locator("#chat-target input")).to_have_value(re.compile("facts"))
        expect(page.locator("#chat-side-by-side input")).to_be_checked()
        base, tuned = page.locator("#chatbot-base"), page.locator("#chatbot")
        expect(base).to_be_visible()

        page.locator("#chat-input textarea").fill(fact["held_out"][0])
        page.locator("#chat-input textarea").press("Enter")
        # the base answers first, then the tuned model: once the tuned answer has the fact, both
        # are in
        expect(tuned).to_contain_text(fact["keyword"], timeout=240_000)
        base_answer = base.locator("[data-testid=bot]")
        expect(base_answer).to_have_count(1)
        assert base_answer.inner_text().strip(), "the base model gave no answer"
        assert fact["keyword"] not in base_answer.inner_text()
        expect(base.locator("[data-testid=user]")).to_contain_text(fact["held_out"][0])

        # Stop while the base writes a long story: it ends, and the tuned model is not asked
        page.locator("#chat-input textarea").fill("Write a long story about a dragon.")
        page.locator("#chat-input textarea").press("Enter")
        expect(base.locator("[data-testid=bot]")).to_have_count(2)
        expect(base.locator("[data-testid=bot]").nth(1)).not_to_be_empty()
        page.locator("#chat-stop").click()
        # Stop ends the answer being written: the base's (then the tuned model is not asked) or,
        # where the base had already finished its answer, the tuned model's
        expect(tuned.locator("[data-testid=bot]").nth(1)).to_contain_text(
            re.compile("Stopped before this model answered|⏹ \\(stopped\\)"), timeout=30_000)
        screenshot = os.environ.get("QLS_SCREENSHOTS")
        if screenshot:
            page.screenshot(path=os.path.join(screenshot, "chat-side-by-side.png"), full_page=True)

        page.locator("#chat-clear").click()
        expect(base.locator("[data-testid=bot]")).to_have_count(0)
        expect(tuned.locator("[data-testid=bot]")).to_have_count(0)
