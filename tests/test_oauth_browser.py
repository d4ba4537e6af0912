"""The ChatGPT-shaped connection in a real headless Chromium: discovery from the 401, registration (dynamic or a
Client ID Metadata Document, which ChatGPT prefers), /authorize, the consent form filled in by the owner in the
browser, the redirect with the code, the PKCE token exchange, tools/list and a tool call, and a refresh."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import anyio
import httpx2 as httpx
import pytest

from tests.helpers import READ_ONLY_TOOLS, TOKEN, http_client
from tests.oauth_helpers import ASSERTION_TYPE, document_server, oauth_server, pkce_pair

CHROMIUM = Path("/usr/bin/chromium")
INSTALL = "apt-get update && apt-get install -y --no-install-recommends chromium (make test does it when run as root)"
REDIRECT_PATH = "/connector_platform_oauth_redirect"  # ChatGPT's redirect path, on the test's local server

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is missing: {INSTALL}")


async def tools_and_a_call(url: str, access_token: str):
    async with http_client(url, token=access_token) as client:
        names = [t.name for t in (await client.list_tools()).tools]
        return names, await client.call_tool("list_jobs", {})


@pytest.mark.parametrize("registration", ["client_id_metadata_document", "dynamic_registration"])
def test_chatgpt_shaped_flow_in_a_real_browser(lmtuner_home, monkeypatch, registration):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("LMTUNER_OAUTH_ALLOW_LOOPBACK_CLIENT_IDS", "1")  # the document lives on 127.0.0.1 here
    with document_server() as agent, oauth_server(lmtuner_home) as (_, url, _):
        redirect_uri = agent.base + REDIRECT_PATH
        agent.callbacks[REDIRECT_PATH] = []

        # Discovery, as the agent does it: 401 -> protected-resource metadata -> authorization-server metadata.
        challenge = httpx.post(url, json={}, headers={"Accept": "application/json, text/event-stream"})
        assert challenge.status_code == 401
        resource_metadata_url = re.search(r'resource_metadata="([^"]+)"', challenge.headers["www-authenticate"])[1]
        resource = httpx.get(resource_metadata_url).json()
        issuer = resource["authorization_servers"][0]
        server = httpx.get(f"{issuer}/.well-known/oauth-authorization-server").json()
        assert (
            server["client_id_metadata_document_supported"]
            and "none" in server["token_endpoint_auth_methods_supported"]
        )

        if registration == "client_id_metadata_document":
            # Shaped like ChatGPT's document at https://chatgpt.com/oauth/client.json (keys on its own host).
            client_id, keys = agent.publish_signing_client("ChatGPT", redirect_uri)

            def client_auth():
                assertion = keys.assertion(client_id, server["token_endpoint"])
                return {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}
        else:
            registered = httpx.post(
                server["registration_endpoint"],
                json={"client_name": "ChatGPT", "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none",
                      "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"]},
            )  # fmt: skip
            assert registered.status_code == 201, registered.text
            client_id = registered.json()["client_id"]

            def client_auth():
                return {}

        verifier, code_challenge = pkce_pair()
        authorize = server["authorization_endpoint"] + "?" + urlencode({
            "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "state": "chatgpt-state",
            "code_challenge": code_challenge, "code_challenge_method": "S256", "resource": resource["resource"],
            "scope": " ".join(resource["scopes_supported"]),
        })  # fmt: skip

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
            try:
                page = browser.new_page()
                page.goto(authorize)
                assert page.locator("#client-name").inner_text() == "ChatGPT"
                assert page.locator("#redirect-host").inner_text() == agent.base.removeprefix("http://")
                assert "lmtuner:train" in page.locator("#scopes").inner_text()
                page.fill("input[name=owner_token]", "not-the-token")
                page.click("#approve")
                assert "Wrong owner token" in page.locator("#error").inner_text()
                page.fill("input[name=owner_token]", TOKEN)
                with page.expect_navigation(url=re.compile(re.escape(redirect_uri))):
                    page.click("#approve")
                assert page.locator("#done").inner_text() == "Connected."
            finally:
                browser.close()

        (query,) = agent.callbacks[REDIRECT_PATH]
        answer = {key: values[0] for key, values in parse_qs(query).items()}
        assert answer["state"] == "chatgpt-state" and answer["iss"] == issuer
        exchange = {"client_id": client_id, "redirect_uri": redirect_uri, "resource": resource["resource"]}
        tokens = httpx.post(
            server["token_endpoint"],
            data={"grant_type": "authorization_code", "code": answer["code"], "code_verifier": verifier, **exchange}
            | client_auth(),
        )
        assert tokens.status_code == 200, tokens.text
        names, jobs = anyio.run(tools_and_a_call, url, tokens.json()["access_token"])
        assert set(READ_ONLY_TOOLS) < set(names) and "start_training" in names
        assert not jobs.is_error and jobs.structured_content == {"jobs": []}

        refreshed = httpx.post(
            server["token_endpoint"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens.json()["refresh_token"],
                "client_id": client_id,
            }
            | client_auth(),
        )
        assert refreshed.status_code == 200, refreshed.text
        names_after, _ = anyio.run(tools_and_a_call, url, refreshed.json()["access_token"])
        assert names_after == names
