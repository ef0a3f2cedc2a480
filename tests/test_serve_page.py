"""serve.py's page in headless Chromium: send a message, watch the reply stream in, click a generated token
and see its alternatives (the chosen one marked) and that step's attention per layer and head; a base model
gets a completion box. The page must fetch nothing but the server's own routes."""

import pytest

from conftest import conversation
from nanoforge.engine import Generator
from nanoforge.loading import load_model
from conftest import find_chromium
from test_serve import Server, save_base_model


@pytest.fixture(scope="module")
def chat_server(chat_ckpt):
    server = Server(chat_ckpt)
    yield server
    server.stop()


def open_page(p, server, errors):
    browser = p.chromium.launch(executable_path=find_chromium(), args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # a laptop screen
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: errors.append("request " + r.url) if not r.url.startswith(server.url) else None)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return browser, page


def test_chat_streams_a_reply_and_the_why_view_explains_each_token(chat_server, chat_ckpt):
    from playwright.sync_api import sync_playwright

    model, tokenizer = load_model(chat_ckpt, "cpu")
    errors = []
    with sync_playwright() as p:
        browser, page = open_page(p, chat_server, errors)
        try:
            assert "chat model" in page.locator("#title").inner_text()
            page.fill("#temperature", "0")
            page.fill("#input", "spell dog")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.assistant .tok').length >= 5")
            page.wait_for_function("!document.getElementById('go').disabled")
            reply = page.locator(".assistant").last.inner_text()
            assert reply == Generator(model, tokenizer).chat(conversation(("spell dog", None)), temperature=0).text
            assert page.locator(".assistant .tok").count() == 5  # one piece of streamed text per token
            assert page.locator("#whybody").is_hidden()
            page.locator(".assistant .tok").nth(2).click()  # the "o"
            page.wait_for_selector("#whybody", state="visible")
            assert page.locator("#stepinfo").inner_text().startswith('token 3 of 5: "o"')
            assert page.locator("#top .bar").count() == 10
            assert page.locator("#top .bar.chosen .label").inner_text().startswith('"o"')
            assert page.locator("#heads canvas").count() == 1 * 2  # n_layer x n_head of the chat model
            page.locator("#heads canvas[data-layer='0'][data-head='1']").click()
            assert page.locator("#picked").inner_text().startswith("layer 0, head 1")
            context = page.locator("#context span").all_inner_texts()
            assert context[0] == "<|bos|>" and context[-2:] == ["d", " "]  # the step saw the reply so far
            page.click("#next")  # step to the next token
            page.wait_for_function("document.getElementById('stepinfo').textContent.startsWith('token 4 of 5')")
            # a second message continues the conversation
            page.fill("#input", "<b>hi</b>")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.assistant').length == 2 && "
                                   "!document.getElementById('go').disabled")
            assert page.locator(".user").all_inner_texts() == ["spell dog", "<b>hi</b>"]  # text, not markup
        finally:
            browser.close()
    assert errors == []


def test_a_base_model_gets_a_completion_box(tmp_path):
    from playwright.sync_api import sync_playwright

    server = Server(save_base_model(tmp_path))
    errors = []
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server, errors)
            try:
                assert "base model" in page.locator("#title").inner_text()
                page.fill("#max_tokens", "12")
                page.fill("#input", "First Citizen")
                page.click("#go")
                page.wait_for_function("document.querySelectorAll('.completion .tok').length == 12")
                assert page.locator(".completion .prompt-text").inner_text() == "First Citizen"
                page.locator(".completion .tok").first.click()
                page.wait_for_selector("#whybody", state="visible")
                assert page.locator("#stepinfo").inner_text().startswith("token 1 of 12")
                assert page.locator("#heads canvas").count() == 4 * 4
            finally:
                browser.close()
    finally:
        server.stop()
    assert errors == []


def test_a_reply_shows_each_calculator_call_and_the_why_view_sees_it(calculator_ckpt):
    """A chat model with the tool tokens: the reply shows the call and its result beside the final text (no tool
    token in the text), and a token after the call is explained in the context that holds the call."""
    from playwright.sync_api import sync_playwright

    model, tokenizer = load_model(calculator_ckpt, "cpu")
    expected = Generator(model, tokenizer).chat(conversation(("what is six times seven", None)), temperature=0,
                                                tools=True)
    server = Server(calculator_ckpt)
    errors = []
    try:
        with sync_playwright() as p:
            browser, page = open_page(p, server, errors)
            try:
                page.fill("#temperature", "0")
                page.fill("#input", "what is six times seven")
                page.press("#input", "Enter")
                page.wait_for_selector(".assistant .call")
                page.wait_for_function("!document.getElementById('go').disabled")
                assert page.locator(".assistant .call").all_inner_texts() == ["calculator 6*7 \u2192 42"]
                assert expected.calls == [("6*7", "42")]
                assert "".join(page.locator(".assistant .tok").all_inner_texts()) == " ok"
                assert page.locator(".assistant .call").is_visible()
                page.locator(".assistant .tok").last.click()  # "k", after the call
                page.wait_for_selector("#whybody", state="visible")
                n = len(expected.ids) - 1  # every token of the reply but its end
                assert page.locator("#stepinfo").inner_text().startswith(f'token {n} of {n}: "k"')
                context = page.locator("#context span").all_inner_texts()
                assert context[-5:] == ["4", "2", "<|output_end|>", " ", "o"]  # the step saw the call's output
            finally:
                browser.close()
    finally:
        server.stop()
    assert errors == []
