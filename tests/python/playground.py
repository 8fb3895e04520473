"""The playground page in a real headless Chromium, driven over the DevTools protocol.

Usage: playground.py SERVER_URL SCREENSHOT.png   (exits non-zero on failure)

Loads `/`, sends a prompt in `short` mode with a seed, waits for the answer,
and checks what the page shows (answer, thinking / answer / forced counts,
stop reason) against the API's own reply to the same request; saves a
screenshot; fails on any script error in the page or any resource that is
not the server's own.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket

PROMPT = "Name three colours of the rainbow."


class Page:
    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=240):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.eval(expression):
                return
            time.sleep(0.2)
        raise TimeoutError(expression)


def launch():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed (apt-get install chromium)"
    profile = tempfile.mkdtemp(prefix="terse-chromium-")
    proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
                             "--window-size=1280,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if m:
            return proc, int(m.group(1)), profile
    raise RuntimeError("chromium did not start its DevTools server")


def main(server, screenshot):
    proc, port, profile = launch()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        page = Page(target["webSocketDebuggerUrl"])
        page.call("Page.enable")
        page.call("Runtime.enable")
        page.call("Network.enable")
        page.call("Page.navigate", url=server + "/")
        page.wait_for("document.readyState === 'complete' && !!document.getElementById('send')", timeout=60)
        page.wait_for("document.getElementById('model').textContent.length > 1", timeout=60)
        page.eval(f"""
            document.getElementById('mode').value = 'short';
            document.getElementById('seed').value = '7';
            document.getElementById('temperature').value = '0';
            document.getElementById('max').value = '64';
            document.getElementById('prompt').value = {json.dumps(PROMPT)};
            document.getElementById('send').click(); true""")
        page.wait_for("!!document.querySelector('.stats[data-done]')")
        assert page.eval("document.querySelector('.stats').dataset.done") == "true", page.eval("document.body.innerText")
        shown = page.eval("""(() => {
            const stat = (n) => document.querySelector(`.stats [data-stat="${n}"] b`)?.textContent;
            return {answer: document.querySelectorAll('.turn.assistant > .text')[0].textContent,
                    thinking: stat('thinking'), answer_tokens: stat('answer'), forced: stat('forced'),
                    stop: stat('stop'), completion: stat('completion'), mode: stat('mode')};
        })()""")
        page.wait_for("document.querySelectorAll('#efficiency tr').length > 1", timeout=30)
        png = page.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
        with open(screenshot, "wb") as f:
            f.write(base64.b64decode(png))

        request = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64, "temperature": 0, "seed": 7,
                   "reasoning_effort": "short"}
        req = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(request).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req) as r:
            api = json.load(r)
        terse = api["terse"]
        assert shown["answer"] == api["choices"][0]["message"]["content"], (shown, api)
        assert shown["completion"] == str(api["usage"]["completion_tokens"]), (shown, api["usage"])
        assert (shown["thinking"], shown["answer_tokens"], shown["forced"]) == \
            (str(terse["thinking_tokens"]), str(terse["answer_tokens"]), str(terse["forced_tokens"])), (shown, terse)
        assert shown["stop"] == (terse["think_stop_reason"] or api["choices"][0]["finish_reason"]), (shown, terse)
        assert shown["mode"] == "short", shown

        errors = [e for e in page.events if e.get("method") in ("Runtime.exceptionThrown",)]
        assert not errors, errors
        requested = [e["params"]["request"]["url"] for e in page.events if e.get("method") == "Network.requestWillBeSent"]
        foreign = [u for u in requested if not u.startswith(server)]
        assert not foreign, f"the page fetched from elsewhere: {foreign}"
        print(f"ok: playground answered {shown['answer']!r} with {shown['completion']} tokens, stop {shown['stop']}; screenshot {screenshot}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1].rstrip("/"), sys.argv[2])
