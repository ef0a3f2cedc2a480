"""The one rule for tests that need a browser (conftest.find_chromium): found, it is used; missing, a plain run
skips saying how to install it, and CI fails rather than skip."""

import pytest

from conftest import find_chromium


def test_a_missing_chromium_is_a_skip_that_says_how_to_install_it_but_a_failure_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no chromium at .*no-chromium.*apt-get install chromium"):
        find_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI never skips the browser tests"):
        find_chromium()


def test_chromium_points_at_the_binary_to_use(monkeypatch, tmp_path):
    binary = tmp_path / "chrome"
    binary.write_text("")
    monkeypatch.setenv("CHROMIUM", str(binary))
    assert find_chromium() == str(binary)
