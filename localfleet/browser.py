"""
Debian's Chromium, headless, driven through chromedriver with selenium: how
the tests and the bench look at the fleet page. A fresh profile each time,
nothing of the browser's own reaching the network (no sync, no component
updates, no background requests), and the page's console kept for reading.
"""

import shutil
import tempfile
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


# In a page of the fleet page: records when each line of its rollout view first shows
# (window.__seen: key, the master's _stamp of the line, shown at in the page's clock, ms).
OBSERVE_ROLLOUT = """
window.__seen = [];
const seen = new Set();
new MutationObserver(() => {
  for (const el of document.querySelectorAll('#view-rollout li[data-key]')) {
    if (!seen.has(el.dataset.key)) {
      seen.add(el.dataset.key);
      window.__seen.push({key: el.dataset.key, stamp: el.dataset.stamp || null, shown: Date.now()});
    }
  }
}).observe(document.body, {subtree: true, childList: true});
"""


class BrowserMissing(RuntimeError):
    """Chromium or chromedriver is not installed (`make test` installs Debian's chromium and chromium-driver)."""


def installed():
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class Chromium:
    """A headless Chromium of its own profile: ``with Chromium() as driver: driver.get(url)``."""

    def __init__(self, width=1280, height=900):
        self.size = (width, height)
        self.profile = None
        self.driver = None

    def __enter__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        if not installed():
            raise BrowserMissing(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver")
        self.profile = tempfile.mkdtemp(prefix="sf-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}"):
            options.add_argument(flag)
        # The page's console (errors, CSP reports) for driver.get_log("browser").
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # An alert the page did not expect stays open, so the next command fails on it.
        options.set_capability("unhandledPromptBehavior", "ignore")
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
        return self.driver

    def __exit__(self, *exc):
        try:
            if self.driver is not None:
                self.driver.quit()
        finally:
            if self.profile:
                shutil.rmtree(self.profile, ignore_errors=True)
