"""The dashboard in a real headless Chromium (the system's, driven by Playwright) against the
proxy and the emulator. Every wait is on a page condition (Playwright's auto-waiting expect)."""
from __future__ import annotations

import os
import re

import pytest

from bench.browser import chromium_path
from proxy.emulator import CatalogModel, load_catalog
from proxy.server.keys import AUTH, EVENTS
from proxy.server.serving import serve
from proxy.app import create_app

from .conftest import proxy_config
from .fakes import GB

if os.environ.get("REQUIRE_BROWSER"):   # CI installs Chromium: its absence is a failure
    if chromium_path() is None:
        raise RuntimeError("REQUIRE_BROWSER is set but no Chromium was found")
    import playwright.async_api as playwright
else:
    if chromium_path() is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)",
                    allow_module_level=True)
    playwright = pytest.importorskip("playwright.async_api")
expect = playwright.expect

A, B = "lab/a", "lab/b"
TWO = [CatalogModel(key=k, size_bytes=10 * GB, memory_bytes=10 * GB, load_time_s=0.0)
       for k in (A, B)]


@pytest.fixture
async def browser():
    from bench.browser import launch
    async with playwright.async_playwright() as pw:
        b = await launch(pw)
        yield b
        await b.close()


@pytest.fixture
async def page(browser):
    """A page that records console errors and uncaught exceptions."""
    p = await browser.new_page()
    p.errors = []
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda exc: p.errors.append(str(exc)))
    yield p
    await p.close()


@pytest.fixture
async def small(make_emulator, make_proxy):
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 16,
                                         "models": {k: {"footprint_gb": 10} for k in (A, B)}})
    proxy.emulator = emu
    return proxy


async def chat(http, url, model):
    async with http.post(f"{url}/v1/chat/completions",
                         json={"model": model, "max_tokens": 2, "messages": []}) as r:
        await r.read()
        return r.status


def state_cell(page, model):
    return page.locator(f'#models tr[data-model="{model}"] td.state')


async def open_dashboard(page, url):
    await page.goto(f"{url}/ui/")
    await expect(page.locator("#conn")).to_have_text("live")


async def test_the_page_loads_without_console_errors_and_lists_the_catalogue(proxy, page):
    await open_dashboard(page, proxy.url)
    keys = sorted(m.key for m in load_catalog())
    await expect(page.locator("#models tbody tr")).to_have_count(len(keys))
    rows = page.locator("#models tbody tr")
    assert sorted([await rows.nth(i).get_attribute("data-model") for i in range(len(keys))]) \
        == keys
    await expect(page.locator("#memory-bar .seg.free")).to_have_count(1)
    await expect(page.locator("#health-status")).to_have_text("ok")
    assert page.errors == []


async def test_a_request_shows_its_model_loaded_without_a_reload(proxy, page, http):
    await open_dashboard(page, proxy.url)
    await expect(state_cell(page, "qwen/qwen3-4b")).to_have_text("unloaded")
    await page.evaluate("window.notReloaded = true")
    assert await chat(http, proxy.url, "qwen/qwen3-4b") == 200
    await expect(state_cell(page, "qwen/qwen3-4b")).to_have_text("loaded")
    await expect(page.locator('#memory-bar .seg.model[data-model="qwen/qwen3-4b"]')) \
        .to_have_count(1)
    await expect(page.locator('#models tr[data-model="qwen/qwen3-4b"] td.owner')) \
        .to_have_text("proxy")
    await expect(page.locator('#timeline .lane[data-model="qwen/qwen3-4b"] rect.resident')) \
        .to_have_count(1)
    assert await page.evaluate("window.notReloaded") is True
    assert page.errors == []


async def test_an_eviction_appears_on_the_timeline_with_its_reason(small, page, http):
    await open_dashboard(page, small.url)
    assert await chat(http, small.url, A) == 200
    assert await chat(http, small.url, B) == 200
    mark = page.locator(f'#timeline .evict-mark[data-model="{A}"]')
    await expect(mark).to_have_attribute("data-reason", "admission")
    await expect(mark).to_have_attribute("data-for", B)
    await expect(mark.locator("text")).to_have_text("admission → b")
    await expect(page.locator(f'#timeline .lane[data-model="{B}"] rect.resident')) \
        .to_have_count(1)
    assert page.errors == []


async def test_the_unload_button_unloads(small, page, http):
    await open_dashboard(page, small.url)
    await chat(http, small.url, A)
    await expect(state_cell(page, A)).to_have_text("loaded")
    await page.locator(f'#models tr[data-model="{A}"] button.unload').click()
    await expect(state_cell(page, A)).to_have_text("unloaded")
    await expect(page.locator("#action-status")).to_have_text(f"{A}: unloaded")
    assert small.emulator.state.instances_of(A) == []
    assert page.errors == []


async def test_the_pin_button_pins_and_is_keyboard_reachable(small, page):
    await open_dashboard(page, small.url)
    pin = page.locator(f'#models tr[data-model="{A}"] button.pin')
    await pin.focus()
    await page.keyboard.press("Enter")
    await expect(pin).to_have_attribute("aria-pressed", "true")
    await expect(page.locator(f'#models tr[data-model="{A}"] td.pinned')).to_have_text("pinned")
    assert small.engine.pinned(A)


async def test_the_dashboard_reconnects_after_the_proxy_restarts(emulator, page):
    config = proxy_config(emulator.url)
    served = await serve(create_app(config))
    port = served.port
    await open_dashboard(page, served.url)
    await served.close()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "down")
    served = await serve(create_app(config), port=port)
    try:
        await expect(page.locator("#conn")).to_have_text("live")
        await expect(page.locator("#models tbody tr")).to_have_count(len(load_catalog()))
    finally:
        await served.close()


async def test_a_proxy_that_goes_silent_is_shown_stale_and_then_live_again(small, page):
    """A proxy that still holds the stream open but sends nothing (stopped, or the path to it
    went silent) is not "live": past two heartbeats the page says since when it heard
    nothing, drops the stream, and is live again once the proxy answers."""
    from .freezable import freezable_relay
    small.app[EVENTS].heartbeat_s = 0.3
    async with freezable_relay(small.served.port) as relay:
        await open_dashboard(page, relay.url)
        conn = page.locator("#conn")
        relay.freeze()
        await expect(conn).to_have_attribute("data-state", "stale")
        await expect(conn).to_have_text(re.compile(r"^stale: nothing from the proxy since "))
        assert await page.evaluate("document.body.hasAttribute('data-stale')")
        relay.thaw()
        await expect(conn).to_have_text("live")
        await expect(conn).to_have_attribute("data-state", "live")
    assert page.errors == []


async def test_an_action_refused_for_auth_asks_for_the_token_and_keeps_it(small, page, http):
    """The proxy's auth is stood in for at the network layer: the page's own logic is tested."""
    seen = []

    async def admin_auth(route, request):
        seen.append(request.headers.get("authorization"))
        if seen[-1] == "Bearer s3cret":
            await route.continue_()
        else:
            await route.fulfill(status=401, content_type="application/json",
                                body='{"error": {"message": "admin token required"}}')

    await page.route("**/proxy/models/*", admin_auth)
    await open_dashboard(page, small.url)
    await page.locator(f'#models tr[data-model="{A}"] button.load').click()
    await expect(page.locator("#token-dialog")).to_be_visible()
    await page.locator("#token-input").fill("s3cret")
    await page.keyboard.press("Enter")
    await expect(state_cell(page, A)).to_have_text("loaded")
    await page.locator(f'#models tr[data-model="{A}"] button.unload').click()
    await expect(state_cell(page, A)).to_have_text("unloaded")
    assert seen == [None, "Bearer s3cret", "Bearer s3cret"]   # asked once, then remembered
    assert await page.evaluate("sessionStorage.getItem('proxy-admin-token')") == "s3cret"


async def test_with_real_auth_the_page_loads_and_unloads_with_the_admin_token(
        make_emulator, make_proxy, page, http):
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 16,
                                         "auth.admin_token": "s3cret-admin",
                                         "models": {k: {"footprint_gb": 10} for k in (A, B)}})
    assert await chat(http, proxy.url, A) == 200
    async with http.post(f"{proxy.url}/proxy/models/unload", json={"model": A}) as r:
        assert r.status in (401, 403)                          # the token is really required
    await open_dashboard(page, proxy.url)                      # static page and stream: open
    await expect(state_cell(page, A)).to_have_text("loaded")
    await page.locator(f'#models tr[data-model="{A}"] button.unload').click()
    await expect(page.locator("#token-dialog")).to_be_visible()
    await page.locator("#token-input").fill("s3cret-admin")
    await page.keyboard.press("Enter")
    await expect(state_cell(page, A)).to_have_text("unloaded")
    assert not emu.state.instances_of(A)


async def test_a_model_loaded_outside_the_proxy_shows_as_external(small, page, http):
    await open_dashboard(page, small.url)
    async with http.post(f"{small.emulator.url}/api/v1/models/load", json={"model": B}) as r:
        assert r.status == 200       # someone loads it in LM Studio itself
    await small.engine.reconcile()
    await expect(state_cell(page, B)).to_have_text("loaded")
    await expect(page.locator(f'#models tr[data-model="{B}"] td.owner')).to_have_text("external")


async def test_an_event_stream_that_needs_the_token_gets_it_from_the_prompt(small, page, http):
    """Were the stream behind the admin token, the page asks once and then streams with it."""
    seen = []

    async def stream_auth(route, request):
        seen.append(request.headers.get("authorization"))
        if seen[-1] == "Bearer s3cret":
            await route.continue_()
        else:
            await route.fulfill(status=401, content_type="application/json",
                                body='{"error": {"message": "admin token required"}}')

    await page.route("**/proxy/events", stream_auth)
    await page.goto(f"{small.url}/ui/")
    await expect(page.locator("#token-dialog")).to_be_visible()
    await page.locator("#token-input").fill("s3cret")
    await page.keyboard.press("Enter")
    await expect(page.locator("#conn")).to_have_text("live")
    assert await chat(http, small.url, A) == 200
    await expect(state_cell(page, A)).to_have_text("loaded")   # events flow through the route
    assert seen == [None, "Bearer s3cret"]


LABEL_BOXES = """() => {
  const box = (n) => { const r = n.getBoundingClientRect();
                       return {l: r.left, r: r.right, t: r.top, b: r.bottom}; };
  const plot = document.querySelector('#timeline .lane-sep').getBoundingClientRect().left;
  return {plot, labels: [...document.querySelectorAll('#timeline .evict-label')].map((n) => ({
            model: n.closest('.evict-mark').dataset.model, ...box(n)})),
          lanes: [...document.querySelectorAll('#timeline .lane-label')].map((n) => ({
            full: n.dataset.full, shown: (n.querySelector('tspan') || n).textContent,
            title: n.querySelector('title')?.textContent, ...box(n)}))};
}"""


def overlapping(a, b):
    return a["l"] < b["r"] and b["l"] < a["r"] and a["t"] < b["b"] and b["t"] < a["b"]


async def test_eviction_labels_close_together_never_overlap(small, page, http):
    await open_dashboard(page, small.url)
    for _ in range(5):                       # A and B take turns: ten evictions in a moment
        assert await chat(http, small.url, A) == 200
        assert await chat(http, small.url, B) == 200
    await expect(page.locator(f'#timeline .evict-mark[data-model="{A}"]')).to_have_count(5)
    await expect(page.locator(f'#timeline .evict-mark[data-model="{B}"]')).to_have_count(4)
    boxes = await page.evaluate(LABEL_BOXES)
    labels = boxes["labels"]
    assert {label["model"] for label in labels} == {A, B}        # each lane still says why
    clashes = [(a, b) for i, a in enumerate(labels) for b in labels[i + 1:] if overlapping(a, b)]
    assert clashes == []
    assert all(label["l"] >= boxes["plot"] for label in labels)   # clear of the names
    marks = page.locator(f'#timeline .evict-mark[data-model="{A}"] > title')
    assert "evicted: admission for lab/b" in await marks.first.text_content()
    assert page.errors == []


LONG = ("a-publisher-with-a-long-name/an-extremely-long-model-name-that-no-label-column-"
        "holds-v1.5-instruct-GGUF-Q4_K_M")


async def test_a_long_unbroken_model_name_never_widens_a_narrow_page(make_emulator, make_proxy,
                                                                     page):
    """A phone-wide window: the memory legend wraps a name with no place to break (a GGUF
    file name) instead of pushing the page sideways."""
    unbroken = "lab/" + "q" * 150 + ".gguf"
    emu = await make_emulator(catalog=[CatalogModel(key=unbroken, size_bytes=GB,
                                                    memory_bytes=GB, load_time_s=0.0)])
    proxy = await make_proxy(emu.url)
    await proxy.engine.load(unbroken)
    await page.set_viewport_size({"width": 380, "height": 800})
    await open_dashboard(page, proxy.url)
    await expect(page.locator("#memory-legend li").first).to_contain_text(unbroken)
    widths = await page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1], widths
    assert page.errors == []


async def test_long_lane_names_are_shortened_visibly_with_the_full_name_kept(
        make_emulator, make_proxy, page):
    catalog = [CatalogModel(key=k, size_bytes=GB, memory_bytes=GB, load_time_s=0.0)
               for k in (A, "text-embedding-nomic-embed-text-v1.5", LONG)]
    emu = await make_emulator(catalog=catalog)
    proxy = await make_proxy(emu.url)
    await open_dashboard(page, proxy.url)
    await expect(page.locator("#timeline .lane")).to_have_count(3)
    boxes = await page.evaluate(LABEL_BOXES)
    lanes = {lane["full"]: lane for lane in boxes["lanes"]}
    assert set(lanes) == {m.key for m in catalog}
    for key, lane in lanes.items():
        assert lane["r"] <= boxes["plot"], key                  # not under the bars
        assert lane["title"] == key                              # the full name on hover
    assert lanes[A]["shown"] == A
    assert lanes["text-embedding-nomic-embed-text-v1.5"]["shown"] == \
        "text-embedding-nomic-embed-text-v1.5"                  # fits: shown whole
    shown = lanes[LONG]["shown"]
    assert "…" in shown and shown.startswith("a-publisher") and shown.endswith("Q4_K_M")
    assert page.errors == []


async def test_a_models_group_is_labelled_beside_its_name(make_emulator, make_proxy, page):
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 32, "groups": [
        {"name": "agent", "members": [A, B], "policy": "together"}]})
    await open_dashboard(page, proxy.url)
    label = page.locator(f'#models tr[data-model="{A}"] th.model .group')
    await expect(label).to_have_text("agent · together")
    await expect(label).to_have_attribute("title", f"together group 'agent': {A}, {B}")
    await expect(page.locator(f'#models tr[data-model="{B}"] th.model')) \
        .to_contain_text("agent · together")
    assert page.errors == []


async def test_a_preload_appears_on_the_timeline_with_its_reason(make_emulator, make_proxy,
                                                                 page, http):
    """Live from the event stream, and again from /proxy/timeline after a reload of the page."""
    emu = await make_emulator(catalog=TWO, capacity_bytes=64 * GB)
    proxy = await make_proxy(emu.url, **{"memory.budget_gb": 32, "groups": [
        {"name": "agent", "members": [A, B], "policy": "together"}]})
    await open_dashboard(page, proxy.url)
    assert await chat(http, proxy.url, A) == 200           # B is loaded with it, unasked
    mark = page.locator(f'#timeline .preload-mark[data-model="{B}"]')
    for _ in range(2):
        await expect(mark).to_have_attribute("data-reason", "group:agent")
        await expect(mark.locator("title")).to_contain_text("preloaded: group:agent at ")
        await expect(page.locator(f'#timeline .preload-mark[data-model="{A}"]')).to_have_count(0)
        await page.reload()
        await expect(page.locator("#conn")).to_have_text("live")
    assert page.errors == []


async def test_a_fleet_has_a_memory_bar_per_host_and_says_where_each_model_lives(
        make_emulator, make_proxy, page, http):
    from .test_fleet import fleet_config
    emus = {n: await make_emulator(catalog=TWO) for n in ("mac", "pc")}
    proxy = await make_proxy("", config=fleet_config(
        [("mac", emus["mac"].url, 24), ("pc", emus["pc"].url, 32)]))
    await proxy.engine.load(A, host="mac")
    await open_dashboard(page, proxy.url)
    blocks = page.locator("#host-bars .host-block")
    await expect(blocks).to_have_count(2)
    mac, pc = (page.locator(f'.host-block[data-host="{n}"]') for n in ("mac", "pc"))
    await expect(mac.locator(f'.seg.model[data-model="{A}"]')).to_have_count(1)
    await expect(pc.locator(".seg.model")).to_have_count(0)
    await expect(pc.locator(".host-summary")).to_have_text("0.0 GB of 32.0 GB used")
    await expect(page.locator("#memory-bar")).to_be_hidden()
    host_cell = page.locator(f'#models tr[data-model="{A}"] td.host')
    await expect(host_cell).to_have_text("mac")
    async with http.post(f"{proxy.url}/proxy/models/load",
                         json={"model": B, "host": "pc"}) as r:   # live, by events
        assert r.status == 200
    await expect(pc.locator(f'.seg.model[data-model="{B}"]')).to_have_count(1)
    await expect(page.locator(f'#models tr[data-model="{B}"] td.host')).to_have_text("pc")
    await expect(page.locator(f'#models tr[data-model="{B}"] td.state')).to_have_text("loaded")
    await emus["pc"].close()
    await proxy.engine.by_name["pc"].core.reconcile()
    await expect(pc).to_have_attribute("data-up", "false")
    await expect(pc.locator(".host-state")).to_have_text("down")
    await expect(mac.locator(".host-state")).to_have_text("up")
    assert page.errors == []


async def test_a_host_that_goes_down_holds_no_model_and_no_memory_on_an_open_page(
        make_emulator, make_proxy, page):
    """As /proxy/stats and a fresh page say: a model on a host that is down is not resident
    there, and the host's last memory figures are not shown as its memory now."""
    from .test_fleet import fleet_config
    emus = {n: await make_emulator(catalog=TWO) for n in ("mac", "pc")}
    proxy = await make_proxy("", config=fleet_config(
        [("mac", emus["mac"].url, 24), ("pc", emus["pc"].url, 32)]))
    await proxy.engine.load(A, host="mac")
    await proxy.engine.load(B, host="pc")
    await open_dashboard(page, proxy.url)
    pc = page.locator('.host-block[data-host="pc"]')
    await expect(pc.locator(f'.seg.model[data-model="{B}"]')).to_have_count(1)
    await emus["pc"].close()
    await proxy.engine.by_name["pc"].core.reconcile()
    await expect(pc.locator(".host-state")).to_have_text("down")
    await expect(state_cell(page, B)).to_have_text("unloaded")
    await expect(page.locator(f'#models tr[data-model="{B}"] td.host')).to_have_text("–")
    await expect(page.locator(f'#models tr[data-model="{B}"] button.unload')).to_be_disabled()
    await expect(pc.locator(".seg")).to_have_count(0)
    await expect(pc.locator(".host-summary")).to_have_text(
        "not answering: its memory is not known")
    await expect(state_cell(page, A)).to_have_text("loaded")
    await page.reload()   # a fresh snapshot says the same
    await expect(page.locator("#conn")).to_have_text("live")
    await expect(state_cell(page, B)).to_have_text("unloaded")
    await expect(pc.locator(".seg")).to_have_count(0)
    assert page.errors == []


async def test_an_unload_a_host_could_not_do_says_where_it_failed(make_emulator, make_proxy,
                                                                   page):
    """A fleet's unload acts on every host it reaches; the status line names the host it could
    not reach and why, as an error, not a plain "unloaded"."""
    from .test_fleet import fleet_config
    emus = {n: await make_emulator(catalog=TWO) for n in ("mac", "pc")}
    proxy = await make_proxy("", config=fleet_config(
        [("mac", emus["mac"].url, 24), ("pc", emus["pc"].url, 32)]))
    for n in ("mac", "pc"):
        await proxy.engine.load(A, host=n)
    await open_dashboard(page, proxy.url)
    await emus["pc"].close()           # gone, and nothing has noticed yet
    await page.locator(f'#models tr[data-model="{A}"] button.unload').click()
    status = page.locator("#action-status")
    await expect(status).to_have_text(re.compile(
        rf"^{A}: unloaded on mac; failed on pc \(cannot reach .*\)$"))
    await expect(status).to_have_class(re.compile(r"\berror\b"))
    assert not emus["mac"].state.instances_of(A)
    assert page.errors == []


async def test_a_single_server_has_no_host_bars_or_host_column(small, page):
    await open_dashboard(page, small.url)
    await expect(page.locator("#memory-bar .seg.free")).to_have_count(1)
    await expect(page.locator("#models th.host")).to_be_hidden()
    await expect(page.locator("#host-bars .host-block")).to_have_count(0)


# -- other sites' pages, in the same browser (security.md: "Web pages") -------------------------
ATTACK = """<script>
async function attack(proxy) {
  // A "simple request": no preflight, so the browser sends it whatever the proxy would say.
  await fetch(proxy + "/proxy/models/unload", {method: "POST", mode: "no-cors",
                                               body: JSON.stringify({model: "%s"})});
  document.title = "sent";
}
</script>""" % A


async def test_a_page_of_another_site_cannot_unload_a_model(small, page, http):
    """What the browser really sends: the page at another origin posts text/plain to the
    proxy; the proxy sees its Origin and refuses (counted), the model stays."""
    from aiohttp import web

    async def evil(_request):
        return web.Response(text=ATTACK, content_type="text/html")
    site = web.Application()
    site.router.add_get("/", evil)
    served = await serve(site)
    try:
        assert await chat(http, small.url, A) == 200
        await page.goto(f"http://localhost:{served.port}/")
        await page.evaluate("proxy => attack(proxy)", small.url)
        await expect(page).to_have_title("sent")
        assert small.app[AUTH].counters.rejected == {"origin_not_allowed": 1}
        assert small.emulator.state.instances_of(A)
    finally:
        await served.close()


FRAME = """<iframe id="ui" src="%s/ui/"></iframe>"""


async def test_a_page_of_another_site_cannot_show_the_dashboard_in_a_frame(small, page, http):
    """Clickjacking: the dashboard's buttons act with the viewer's access, so another site's
    page may not frame it (X-Frame-Options and CSP frame-ancestors); the browser refuses."""
    from aiohttp import web
    for path in ("/ui/", "/ui/app.js", "/ui/style.css"):
        async with http.get(f"{small.url}{path}") as r:
            assert r.status == 200, path
            assert r.headers["X-Frame-Options"] == "DENY"
            assert r.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
    for path in ("/ui/.hidden", "/ui/nothing.js", "/ui/%2e%2e/__init__.py"):
        async with http.get(f"{small.url}{path}") as r:
            assert r.status == 404, path

    async def evil(_request):
        return web.Response(text=FRAME % small.url, content_type="text/html")
    site = web.Application()
    site.router.add_get("/", evil)
    served = await serve(site)
    try:
        async with page.expect_response(lambda r: r.url == f"{small.url}/ui/") as answered:
            await page.goto(f"http://localhost:{served.port}/")
        assert (await answered.value).status == 200   # the proxy answered the frame...
        frame = page.frame_locator("#ui")
        await expect(frame.locator("#conn")).to_have_count(0)   # ...and nothing was shown
    finally:
        await served.close()


REBIND = "attacker.rebind.example"
READ = """<script>
async function attack() {
  // Same origin once the name points at 127.0.0.1: answers would be readable.
  const stats = await fetch("/proxy/stats");
  const sent = await fetch("/proxy/models/unload", {method: "POST",
      headers: {"Content-Type": "application/json"}, body: JSON.stringify({model: "%s"})});
  return [stats.status, sent.status];
}
</script>""" % A


async def test_dns_rebinding_reads_and_changes_nothing(small, http):
    """The attacker's page is served from its own name, which then resolves to 127.0.0.1
    (Chromium's resolver is told so); its same-origin requests reach the proxy with the
    attacker's name as Host and are refused."""
    from bench.browser import CHROMIUM_ARGS
    assert await chat(http, small.url, A) == 200
    port = small.served.port
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=[*CHROMIUM_ARGS, f"--host-resolver-rules=MAP {REBIND} 127.0.0.1",
                  # Chromium's own Local Network Access is a permission a user may grant, and
                  # other browsers have none: off, so that the proxy's defence is what is tested.
                  "--disable-features=LocalNetworkAccessChecks,"
                  "BlockInsecurePrivateNetworkRequests,PrivateNetworkAccessSendPreflights"])
        try:
            page = await browser.new_page()
            origin = f"http://{REBIND}:{port}"
            # The first answer, before the name was rebound: the attacker's own page.
            await page.route(origin + "/", lambda route: route.fulfill(
                body=READ, content_type="text/html"))
            await page.goto(origin + "/")
            assert await page.evaluate("attack()") == [421, 421]
        finally:
            await browser.close()
    assert set(small.app[AUTH].counters.rejected) == {"host_not_allowed"}   # and a favicon
    assert small.emulator.state.instances_of(A)


async def test_a_server_the_proxy_cannot_load_on_shows_unknown_states_and_no_memory(
        make_emulator, make_proxy, page, http):
    """upstream.kind: openai: a model that just served is not `unloaded` with a made-up 4 GB,
    the memory bar is not this machine's, and load/unload (always a 409 there) are off."""
    emu = await make_emulator()
    proxy = await make_proxy(emu.url, **{"upstream.kind": "openai"})
    assert await chat(http, proxy.url, "qwen/qwen3-4b") == 200
    await open_dashboard(page, proxy.url)
    row = page.locator('#models tr[data-model="qwen/qwen3-4b"]')
    await expect(state_cell(page, "qwen/qwen3-4b")).to_have_text("unknown")
    await expect(row.locator("td.memory")).to_have_text("–")
    await expect(row.locator("button.load")).to_be_disabled()
    await expect(row.locator("button.unload")).to_be_disabled()
    await expect(page.locator("#memory-summary")).to_have_text(
        "not managed: the server loads its models itself")
    await expect(page.locator("#memory-bar .seg")).to_have_count(0)
    await expect(page.locator("#pressure")).to_have_text("pressure –")
    assert page.errors == []
