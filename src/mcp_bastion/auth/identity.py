"""Who a request acts for: what the bearer check hands to the data plane."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller.

    ``subject`` is stable and unique ("user:alice", "oidc:<sub>", "key:<key id>"); ``name`` is
    what upstream credential mappings are keyed by (the user name, the OIDC e-mail or subject, or
    "key:<key name>"). ``servers`` limits which servers the caller reaches (None: all of them).
    """

    subject: str
    name: str
    kind: Literal["user", "key", "anonymous"]
    client_id: str | None = None
    scopes: frozenset[str] = frozenset()
    servers: frozenset[str] | None = None

    def may_use(self, server: str) -> bool:
        return self.servers is None or server in self.servers


ANONYMOUS = Identity(subject="anonymous", name="anonymous", kind="anonymous")
