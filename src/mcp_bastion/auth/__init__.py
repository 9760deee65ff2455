"""Sign-in: the gateway as OAuth 2.1 resource server and authorization server, API keys, the auth store.

- ``identity``: who a request acts for (the data plane sees only this).
- ``store``: SQLAlchemy tables and queries (SQLite by default, PostgreSQL by URL); ``migrations``: alembic.
- ``tokens``: signing keys (JWKS), access tokens (JWT), opaque secrets (refresh tokens, API keys, codes).
- ``server``: the authorization server's endpoints, sign-in and consent pages (``pages``), CIMD (``cimd``),
  delegation to an upstream OpenID Connect provider (``oidc``).
- ``resource``: the resource-server side: protected resource metadata, bearer checks, challenges.
"""
