"""Loads /dashboard in headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) and checks what it shows against the API.

Run by scripts/dashboard-test.sh, which starts the gateway and worker and makes
the demo data. Environment: DASH_URL (gateway base URL), DASH_USER (the demo
user's id), DASH_ADMIN_TOKEN, DASH_HOSTILE (the free text stored for the user),
DASH_OUT (where the screenshots go).
"""
import json
import os
import sys
import tempfile
import time
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["DASH_URL"]
USER = os.environ["DASH_USER"]
USER_TOKEN = f"dev:{USER}"
ADMIN_TOKEN = os.environ["DASH_ADMIN_TOKEN"]
HOSTILE = os.environ["DASH_HOSTILE"]
OUT = os.environ.get("DASH_OUT", "target/dashboard")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def api(path, token):
    req = urllib.request.Request(URL + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def fmt(n):
    return f"{n:,}"


def browser(profile_dir):
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile_dir}", "--window-size=1280,2600"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def sign_in(d, token):
    d.get(URL + "/dashboard")
    box = d.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    WebDriverWait(d, 30).until(lambda d: d.execute_script("return document.body.dataset.loaded === 'true'")
                               or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    check(d.execute_script("return document.body.dataset.loaded") == "true",
          f"the page loaded its data (status: {d.find_element(By.ID, 'status').text!r})")


def text(d, id_):
    return d.find_element(By.ID, id_).text.strip()


def view_user(d, user):
    """Clicks the view button of `user`'s row in the users table; False while it is not there."""
    for r in d.find_elements(By.CSS_SELECTOR, "#users tbody tr"):
        cells = r.find_elements(By.TAG_NAME, "td")
        if cells and cells[0].text == user:
            r.find_element(By.TAG_NAME, "button").click()
            return True
    return False


def no_csp_violation(d, who):
    logs = d.get_log("browser")
    bad = [l["message"] for l in logs if "Content Security Policy" in l["message"] or "Refused to" in l["message"]]
    severe = [l["message"] for l in logs if l["level"] == "SEVERE"]
    check(not bad, f"{who}: no CSP violation in the console {bad[:3]}")
    check(not severe, f"{who}: no console error {severe[:3]}")


def main():
    os.makedirs(OUT, exist_ok=True)
    with urllib.request.urlopen(URL + "/dashboard", timeout=10) as r:
        check(r.headers.get("Content-Security-Policy") == CSP, "the page sends the strict CSP")
        check(r.headers.get("Content-Type", "").startswith("text/html"), "the page is HTML")
    for asset in ["app.js", "chart.js", "app.css"]:
        with urllib.request.urlopen(f"{URL}/dashboard/{asset}", timeout=10) as r:
            check(r.headers.get("Content-Security-Policy") == CSP, f"{asset} sends the CSP")
            check(r.headers.get("X-Content-Type-Options") == "nosniff", f"{asset} is nosniff")

    analytics = api("/api/vscode/analytics?days=30", USER_TOKEN)
    profile = api(f"/api/users/{USER}/profile", USER_TOKEN)
    ledger = api(f"/api/users/{USER}/credits/transactions?limit=20", USER_TOKEN)

    with tempfile.TemporaryDirectory() as prof:
        d = browser(prof)
        try:
            sign_in(d, USER_TOKEN)
            check(d.execute_script("return sessionStorage.getItem('vsc-dashboard-token')") == USER_TOKEN,
                  "the token is in sessionStorage")
            check(d.execute_script("return localStorage.length") == 0, "nothing in localStorage")
            bars = d.find_elements(By.CSS_SELECTOR, "#chart-tokens rect.bar")
            check(len(bars) == 30, f"the tokens chart has 30 bars ({len(bars)})")
            values = [int(b.get_attribute("data-value")) for b in bars]
            daily = [x["total_tokens"] for x in analytics["daily"]]
            check(values == daily, "each tokens bar is that day's total_tokens")
            drawn = [b for b in bars if float(b.get_attribute("height")) > 0]
            check(len(drawn) == sum(1 for x in daily if x > 0) and drawn, f"{len(drawn)} tokens bars are drawn")
            credit_bars = d.find_elements(By.CSS_SELECTOR, "#chart-credits rect.bar")
            credits = [int(b.get_attribute("data-value")) for b in credit_bars]
            check(credits == [x["credits_consumed"] for x in analytics["daily"]], "each credits bar is that day's credits")
            check(text(d, "balance") == fmt(profile["credits"]["balance"]),
                  f"balance {text(d, 'balance')} = API {profile['credits']['balance']}")
            check(text(d, "total-tokens") == fmt(analytics["totals"]["total_tokens"]),
                  f"total tokens {text(d, 'total-tokens')} = API {analytics['totals']['total_tokens']}")
            check(text(d, "total-credits") == fmt(analytics["totals"]["credits_consumed"]), "credits used = API")
            first = d.find_elements(By.CSS_SELECTOR, "#ledger tbody tr")
            check(len(first) == len(ledger["transactions"]), f"{len(first)} ledger rows shown")
            cells = first[0].find_elements(By.TAG_NAME, "td")
            want = ledger["transactions"][0]
            check(first[0].get_attribute("data-id") == want["id"] and cells[2].text == fmt(want["amount"]),
                  f"the newest ledger row's amount {cells[2].text} = API {want['amount']}")
            models = d.find_elements(By.CSS_SELECTOR, "#by-model tbody tr")
            check(len(models) == len(analytics["by_model"]), f"{len(models)} models listed")
            check(len(d.find_elements(By.CSS_SELECTOR, "#limits tbody tr")) == 7, "7 limits listed (6 classes, usage_events)")
            check("429" in text(d, "limits-explained"), "the limits are explained")
            check(not d.find_element(By.ID, "admin").is_displayed(), "a user sees no admin section")
            d.save_screenshot(os.path.join(OUT, "dashboard.png"))
            no_csp_violation(d, "user view")
        finally:
            d.quit()

    with tempfile.TemporaryDirectory() as prof:
        d = browser(prof)
        try:
            d.execute_script("window.alerted = false;")
            sign_in(d, ADMIN_TOKEN)
            check(d.find_element(By.ID, "admin").is_displayed(), "an admin sees the admin section")
            check(len(d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")) > 0, "the audit trail is shown")
            box = d.find_element(By.ID, "search")
            box.send_keys(USER)
            d.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()
            # The users table is drawn again when the search answers, so an element found a
            # moment before can be gone: wait for the user's row and click its button with
            # stale elements ignored (each attempt finds the row again).
            WebDriverWait(d, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: view_user(d, USER))
            WebDriverWait(d, 15).until(lambda d: USER in text(d, "viewing") and text(d, "status") == "")
            shown = WebDriverWait(d, 15, ignored_exceptions=(StaleElementReferenceException,)).until(
                lambda d: [c.text for c in d.find_elements(By.CSS_SELECTOR, "#ledger tbody td:last-child")])
            check(HOSTILE in shown, "the hostile description is shown as text")
            check(not d.find_elements(By.CSS_SELECTOR, "#ledger img, main img"), "no element was made of it")
            try:
                d.switch_to.alert
                check(False, "no script ran from it")
            except NoAlertPresentException:
                check(True, "no script ran from it")
            check(d.find_element(By.ID, "controls").is_displayed(), "the admin controls are shown")
            d.save_screenshot(os.path.join(OUT, "dashboard-admin.png"))
            no_csp_violation(d, "admin view")
        finally:
            d.quit()

    print(f"dashboard: {'0 failed' if not failures else str(len(failures)) + ' failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    started = time.monotonic()
    rc = main()
    print(f"dashboard: browser checks took {time.monotonic() - started:.1f} s")
    sys.exit(rc)
