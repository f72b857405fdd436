"""A real headless Chromium, driven through Selenium and Debian's chromedriver,
for the portal's end-to-end tests and its screenshots (docs/portal/)."""

from __future__ import annotations

import http.client
import os
import ssl
import time
import urllib.parse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DESKTOP = (1280, 900)
PHONE = (390, 844)  # a common phone's CSS pixels


class Browser:
    """One browser (one cookie jar) on the portal at ``base``."""

    def __init__(self, base: str, profile: Path, shots: Path | None = None,
                 arguments: tuple[str, ...] = ()) -> None:
        self.base = base.rstrip("/")
        self.shots = shots
        options = Options()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-quic", "--disable-features=Translate,MediaRouter",
            "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={DESKTOP[0]},{DESKTOP[1]}", *arguments,
        ):
            options.add_argument(argument)
        options.accept_insecure_certs = True  # the test CA's certificate
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)

    def close(self) -> None:
        self.driver.quit()

    # -- reading and acting --------------------------------------------------------

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.driver.current_url).path

    def find(self, css: str):
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str):
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str = "main") -> str:
        return self.find(css).text

    def fill(self, field_id: str, value: str) -> None:
        # A page still settling (autofocus, a late layout) can swap the node
        # under the driver: look it up again and retry.
        for attempt in range(3):
            try:
                element = self.find(f"#{field_id}")
                element.clear()
                element.send_keys(value)
                return
            except WebDriverException:
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def press(self, label: str) -> None:
        """Press the button (or follow the link) whose text is ``label``."""
        self._retrying(lambda: self._button(label))

    def click(self, element) -> None:
        """Click, and wait for the page it leads to."""
        self._retrying(lambda: element)

    def _button(self, label: str):
        elements = self.all("main button, main a.button, header button")
        texts = [" ".join(e.text.split()) for e in elements]
        # An exact match first; then one whose words go on (text only a
        # screen reader reads: "Delete" + " Outlook 2010").
        for exact in (True, False):
            for element, text in zip(elements, texts):
                if text == label or (not exact and text.startswith(label + " ")):
                    return element
        raise AssertionError(f"no button {label!r} on {self.path} (only {texts}):\n{self.text()}")

    def _retrying(self, target) -> None:
        # A page still settling can swap nodes under the driver: finding the
        # button again is safe; a click is never repeated (it may have sent
        # a form). Chromium reports a node of a page it has left as "does
        # not belong to the document": for a click, the page went on.
        for attempt in range(3):
            page = self.find("html")
            try:
                element = target()
            except WebDriverException:
                if attempt == 2:
                    raise
                time.sleep(0.3)
                continue
            try:
                element.click()
            except WebDriverException as e:
                if not _left(e):
                    raise
            WebDriverWait(self.driver, 15).until(lambda d: _gone(page))
            WebDriverWait(self.driver, 15).until(
                lambda d: d.execute_script("return document.readyState") == "complete")
            return

    def cookie(self, name: str) -> str | None:
        found = self.driver.get_cookie(name)
        return found["value"] if found else None

    def request(self, method: str, path: str, body: str = "", headers: dict | None = None
                ) -> tuple[int, dict[str, str], str]:
        """A request outside the browser, with its cookies: the status and
        headers a page hides."""
        parts = urllib.parse.urlsplit(self.base)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=30)
        cookies = "; ".join(f"{c['name']}={c['value']}" for c in self.driver.get_cookies())
        sent = {"Cookie": cookies, **(headers or {})}
        if body:
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        connection.request(method, path, body=body.encode(), headers=sent)
        response = connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        connection.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, text

    # -- screenshots -------------------------------------------------------------------

    def screenshot(self, name: str) -> None:
        """The whole page at desktop and phone widths, as docs/portal/NAME-desktop.png
        and NAME-phone.png (when screenshots were asked for)."""
        if self.shots is None:
            return
        self.shots.mkdir(parents=True, exist_ok=True)
        for label, (width, height) in (("desktop", DESKTOP), ("phone", PHONE)):
            self.driver.set_window_size(width, height)
            full = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(width, max(height, int(full) + 10))
            self.driver.save_screenshot(str(self.shots / f"{name}-{label}.png"))
        self.driver.set_window_size(*DESKTOP)


def _left(error: Exception) -> bool:
    return isinstance(error, StaleElementReferenceException) or \
        "does not belong to the document" in str(error)


def _gone(element) -> bool:
    """Whether the page ``element`` belongs to has been left."""
    try:
        element.is_enabled()
    except WebDriverException as e:
        if _left(e):
            return True
        raise
    return False


def screenshots_folder() -> Path | None:
    """``PORTAL_SCREENSHOTS=docs/portal`` writes the screenshots there."""
    folder = os.environ.get("PORTAL_SCREENSHOTS")
    return Path(folder).absolute() if folder else None
