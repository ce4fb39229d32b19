"""The status page in headless Chromium (Debian's chromium and chromium-driver, driven by selenium) against a lab of its
own: the cluster, pool and pin sections as rendered, then a failover that the timeline shows without a reload."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
import urllib.request

import psycopg
import pytest

from .labkit import lab, parse_exports

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Set to a directory to keep screenshots of the page (docs/status-page*.png are made so).
SCREENSHOTS = os.environ.get("MULTIPROXY_STATUS_SCREENSHOTS")


def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        pytest.skip("needs Debian's chromium and chromium-driver (tools/install-deps.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1500", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def text_of(driver, ident: str) -> str:
    """The rendered text of a section (read anew: the page's script replaces sections every 2 s)."""
    return driver.execute_script(f"return document.getElementById({ident!r}).innerText")


def wait_for(what, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def traffic(url: str, clients: int, stop: threading.Event) -> list[threading.Thread]:
    """For screenshots only: clients running short transactions with pauses, so that the charts show multiplexing."""
    def run(n):
        stop.wait(2 * n)        # clients arrive one by one: the chart shows backends lagging far behind clients
        while not stop.is_set():
            try:
                with psycopg.connect(url, connect_timeout=10, autocommit=True) as conn:
                    while not stop.is_set():
                        conn.execute("SELECT pg_sleep(0.03)")
                        stop.wait(0.1 + 0.02 * n)
            except psycopg.Error:
                stop.wait(0.2)      # the failover cut the connection: connect again
    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def shoot(driver, name: str) -> None:
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(max(height + 40, 800), 3000))
        driver.save_screenshot(os.path.join(SCREENSHOTS, name))


@pytest.mark.timeout(180)
def test_status_page_in_chromium_shows_the_lab_and_a_failover(tmp_path):
    lab_dir = str(tmp_path / "lab")
    up = lab("up", "--engines", "postgres", "--dir", lab_dir, "--detach", timeout=120)
    assert up.returncode == 0, up.stdout + up.stderr
    driver = None
    held = []
    stop = threading.Event()
    threads = []
    try:
        values = parse_exports(lab("env", "--dir", lab_dir).stdout)
        page_url = values["MULTIPROXY_ADMIN_URL"] + "/"
        assert re.search(r"status page +" + re.escape(page_url) + " ", up.stdout), up.stdout

        # Some traffic: four clients, one of them pinned by a temporary table, one on the reader listener.
        for _ in range(3):
            conn = psycopg.connect(values["MULTIPROXY_PG_URL"], connect_timeout=10, autocommit=True)
            conn.execute("SELECT 1").fetchone()
            held.append(conn)
        held[0].execute("CREATE TEMP TABLE status_page_pin (a int)")
        reader = psycopg.connect(values["MULTIPROXY_PG_READER_URL"], connect_timeout=10, autocommit=True)
        reader.execute("SELECT 1").fetchone()
        held.append(reader)

        raw = urllib.request.urlopen(page_url, timeout=10).read().decode()
        assert values["PGPASSWORD"] not in raw and "SCRAM-SHA-256$" not in raw
        assert len(raw.encode()) < 40_000

        driver = browser()
        driver.set_page_load_timeout(20)
        driver.get(page_url)
        assert driver.title == "multiproxy status"

        clusters = text_of(driver, "clusters")
        writer = re.search(r"writer: (127\.0\.0\.\d+:\d+) \(verified by probe\)", clusters)
        assert writer, clusters
        assert writer.group(1).startswith("127.0.0.2:") and "writer.pg.lab" in clusters
        assert re.search(r"127\.0\.0\.3:\d+\s+reader\s+up", clusters), clusters

        # The pool table counts the three writer clients; the charts fill from the sampler's once-a-second samples.
        wait_for("the pool's clients and a chart in the pool section",
                 lambda: re.search(r"pg/writer/lab/lab\S*\s+3\s+\d+/\d+", text_of(driver, "pools"))
                 and "collecting samples" not in driver.execute_script(
                     "return document.querySelector('#pools figure').innerHTML"), 15)
        pools = text_of(driver, "pools")
        assert "pg-reader" in pools and "borrow wait p50 / p95 / p99" in pools

        pins = text_of(driver, "pins")
        assert re.search(r"temp_table\s+1\s+\d+", pins), pins
        assert "CREATE TEMP TABLE status_page_pin (a int)" in pins
        if SCREENSHOTS:
            threads = traffic(values["MULTIPROXY_PG_URL"], 16, stop) + traffic(values["MULTIPROXY_PG_READER_URL"], 4, stop)
            time.sleep(40)
        shoot(driver, "status-page.png")

        failover = lab("failover", "postgres", "--dir", lab_dir, timeout=90)
        assert failover.returncode == 0, failover.stdout + failover.stderr

        # No reload: the page's script brings the writer change in.
        def changed():
            timeline = text_of(driver, "timeline")
            return re.search(r"writer 127\.0\.0\.2:\d+ → (none|127\.0\.0\.3:\d+)", timeline) and \
                re.search(r"→ 127\.0\.0\.3:\d+ \(probe\)", timeline)
        wait_for("the writer change in the timeline", changed, 30)
        timeline = text_of(driver, "timeline")
        assert "drain" in timeline, timeline
        wait_for("the new writer in the cluster section",
                 lambda: re.search(r"writer: 127\.0\.0\.3:\d+", text_of(driver, "clusters")), 15)
        if SCREENSHOTS:
            time.sleep(15)
        shoot(driver, "status-page-failover.png")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)
        if driver is not None:
            driver.quit()
        for conn in held:
            try:
                conn.close()
            except Exception:
                pass
        lab("down", "--dir", lab_dir, timeout=60)


@pytest.mark.timeout(60)
def test_with_two_workers_the_page_counts_the_clients_of_both(pg, proxy_factory):
    """The workers share the listening sockets; worker 0's page counts the clients of all (the others report to it)."""
    import json

    from .test_admin_console import ADMIN, console_config
    from .pgserver import AUTH_DB
    config = console_config(pg)
    config["proxy"]["workers"] = 2
    proxy = proxy_factory(config)
    admin = "http://%s:%d" % proxy.admin_address
    held = [psycopg.connect(host=proxy.host, port=proxy.port, user=ADMIN, dbname=AUTH_DB, autocommit=True,
                            connect_timeout=10) for _ in range(12)]
    try:
        held[0].execute("CREATE TEMP TABLE two_workers_pin (a int)")
        for conn in held:
            conn.execute("SELECT 1").fetchone()
        seen = {}

        def counted():
            with urllib.request.urlopen(admin + "/status.json", timeout=10) as answer:
                seen.update(json.load(answer)["data"])
            return (seen["reporting"] == 2 and sum(p["clients"] for p in seen["pools"]) == 12
                    and seen["listeners"][0]["clients"] == 12)
        wait_for("12 clients counted over both workers", counted, 15)
        assert seen["workers"] == 2
        # /metrics answers for the group too (multiproxy.groupview): the 12 clients of both workers in one series
        metrics = urllib.request.urlopen(admin + "/metrics", timeout=10).read().decode()
        both = re.findall(r'multiproxy_client_connections\{listener="pg"\} (\S+)', metrics)
        assert [int(float(value)) for value in both] == [12], metrics
        assert seen["pins"]["by_cluster"]["main"]["now"] == {"temp_table": 1}
        assert [s["statement"] for s in seen["pins"]["sessions"]] == ["CREATE TEMP TABLE two_workers_pin (a int)"]
        page = urllib.request.urlopen(admin + "/", timeout=10).read().decode()
        assert "2 of 2 workers" in page
    finally:
        for conn in held:
            conn.close()


@pytest.mark.timeout(60)
def test_with_a_token_the_page_asks_the_browser_for_it(pg, proxy_factory):
    """[admin] http_token_env: 401 with a basic-auth challenge; basic auth with the token as password, or a bearer
    token, opens the page and its JSON."""
    import base64
    import urllib.error

    from .test_admin_console import console_config
    config = console_config(pg)
    config["admin"]["http_token_env"] = "MP_TEST_ADMIN_TOKEN"
    proxy = proxy_factory(config, env={"MP_TEST_ADMIN_TOKEN": "s3cret-token"})
    base = "http://%s:%d" % proxy.admin_address

    def get(path, authorization=None):
        request = urllib.request.Request(base + path, headers={"Authorization": authorization} if authorization else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, dict(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read().decode()

    status, headers, body = get("/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic realm=") and "admin token" in body
    wrong = "Basic " + base64.b64encode(b"me:wrong").decode()
    assert get("/", wrong)[0] == 401
    right = "Basic " + base64.b64encode(b"me:s3cret-token").decode()
    status, _, page = get("/", right)
    assert status == 200 and 'id="clusters-section"' in page and "s3cret-token" not in page
    assert get("/status.json", "Bearer s3cret-token")[0] == 200
    assert get("/admin/lists", right)[0] == 200        # the same basic credentials open /admin/
