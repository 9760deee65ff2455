"""The sign-in, consent and error pages: plain HTML that works without JavaScript and with a screen reader.

Every value shown is escaped with :func:`html.escape`; each page has one form, labelled fields, a
``lang`` and a heading structure. The styling is inline (the CSP allows only inline styles).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from html import escape

__all__ = ["ConsentView", "consent_page", "error_page", "login_page"]

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;padding:2rem 1rem;
background:#f6f7f9;color:#1b1f24;line-height:1.5}
main{max-width:28rem;margin:0 auto;background:#fff;border:1px solid #d0d7de;border-radius:8px;
padding:1.5rem 2rem}
h1{font-size:1.35rem;margin:0 0 1rem}
h2{font-size:1rem;margin:1.25rem 0 .5rem}
label{display:block;font-weight:600;margin:.75rem 0 .25rem}
input[type=text],input[type=password]{width:100%;box-sizing:border-box;padding:.5rem;font-size:1rem;
border:1px solid #8c959f;border-radius:4px}
input:focus,button:focus{outline:3px solid #0969da;outline-offset:2px}
button{font-size:1rem;padding:.5rem 1.25rem;border-radius:4px;border:1px solid #1f6feb;background:#1f6feb;
color:#fff;cursor:pointer;margin:1rem .5rem 0 0}
button.secondary{background:#fff;color:#1b1f24;border-color:#8c959f}
.error{background:#ffebe9;border:1px solid #cf222e;border-radius:4px;padding:.5rem .75rem}
.warning{background:#fff8c5;border:1px solid #9a6700;border-radius:4px;padding:.5rem .75rem}
.muted{color:#57606a;font-size:.9rem}
code{word-break:break-all}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{escape(title)} · mcp-bastion</title>\n<style>{_STYLE}</style>\n</head>\n"
        f"<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def _alert(message: str | None) -> str:
    if not message:
        return ""
    return f'<p class="error" role="alert" id="form-error">{escape(message)}</p>\n'


def login_page(
    *,
    action: str,
    tx: str,
    csrf: str,
    client_name: str,
    username: str = "",
    error: str | None = None,
) -> str:
    """The local users' sign-in form; it names the application that asked for the sign-in."""
    described = ' aria-describedby="form-error"' if error else ""
    body = (
        "<h1>Sign in to mcp-bastion</h1>\n"
        f"<p><strong>{escape(client_name)}</strong> wants to use your MCP servers. "
        "Sign in to continue.</p>\n"
        f"{_alert(error)}"
        f'<form method="post" action="{escape(action)}">\n'
        f"{_hidden('tx', tx)}\n{_hidden('csrf', csrf)}\n"
        '<label for="username">User name</label>\n'
        f'<input type="text" id="username" name="username" value="{escape(username)}" '
        f'autocomplete="username" autocapitalize="none" spellcheck="false" required autofocus{described}>\n'
        '<label for="password">Password</label>\n'
        f'<input type="password" id="password" name="password" autocomplete="current-password" '
        f"required{described}>\n"
        '<button type="submit">Sign in</button>\n'
        "</form>\n"
    )
    return _page("Sign in", body)


@dataclass(frozen=True)
class ConsentView:
    """What the consent page must show so the person knows whom they are letting in, and where to."""

    client_name: str
    client_id: str
    client_kind: str  # 'static' | 'dcr' | 'cimd'
    redirect_uri: str
    redirect_host: str
    loopback: bool
    scopes: tuple[tuple[str, str], ...]  # (scope, what it allows)
    resource: str
    user: str | None  # None: before an upstream sign-in (delegated mode)
    upstream: str | None = None  # the identity provider's host in delegated mode


def consent_page(*, action: str, tx: str, csrf: str, view: ConsentView) -> str:
    """Approve or deny one client; the client's name is its own claim, so the redirect host is shown too."""
    if view.client_kind == "cimd":
        who = (
            f"<p>The application calls itself <strong>{escape(view.client_name)}</strong>; its identity "
            f"is the address <code>{escape(view.client_id)}</code>.</p>\n"
        )
    elif view.client_kind == "dcr":
        who = (
            f"<p>The application calls itself <strong>{escape(view.client_name)}</strong>. It registered "
            "itself, so this name is not verified: check where it sends you back.</p>\n"
        )
    else:
        who = (
            f"<p>The application <strong>{escape(view.client_name)}</strong> "
            "was set up by your operator.</p>\n"
        )
    where = (
        f"<p>After you answer you will be sent to <strong>{escape(view.redirect_host)}</strong> "
        f"(<code>{escape(view.redirect_uri)}</code>).</p>\n"
    )
    if view.loopback:
        where += (
            '<p class="warning">This application receives the sign-in on <strong>this computer</strong> '
            "(a local address). Approve only if you just started it yourself.</p>\n"
        )
    items = "".join(
        f"<li><code>{escape(scope)}</code>: {escape(meaning)}</li>\n" for scope, meaning in view.scopes
    )
    signed_in = (
        f'<p class="muted">Signed in as {escape(view.user)}.</p>\n'
        if view.user
        else (
            '<p class="muted">If you approve, you will sign in at '
            f"{escape(view.upstream or 'your identity provider')} next.</p>\n"
        )
    )
    body = (
        f"<h1>Allow {escape(view.client_name)}?</h1>\n"
        f"{who}{where}"
        "<h2>It will be able to</h2>\n"
        f"<ul>\n{items}</ul>\n"
        f'<p class="muted">For the resource <code>{escape(view.resource)}</code>.</p>\n'
        f"{signed_in}"
        f'<form method="post" action="{escape(action)}">\n'
        f"{_hidden('tx', tx)}\n{_hidden('csrf', csrf)}\n"
        '<button type="submit" name="decision" value="approve">Allow</button>\n'
        '<button type="submit" name="decision" value="deny" class="secondary">Deny</button>\n'
        "</form>\n"
    )
    return _page(f"Allow {view.client_name}?", body)


def error_page(title: str, message: str, details: Iterable[str] = ()) -> str:
    """A sign-in that cannot go on. Shown instead of redirecting when the redirect target is not trusted."""
    extra = "".join(f'<p class="muted">{escape(d)}</p>\n' for d in details)
    body = (
        f"<h1>{escape(title)}</h1>\n"
        f'<p class="error" role="alert">{escape(message)}</p>\n'
        f"{extra}"
        "<p>Close this window and start again from the application you were using.</p>\n"
    )
    return _page(title, body)
