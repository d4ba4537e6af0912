"""Remote-agent authorization for `lmtuner-mcp --http`: `--auth oauth` hosts an OAuth 2.1 authorization server
(the owner consents with the server's bearer token), `--auth oidc` accepts JWTs from a team's identity provider.
Built on the MCP SDK's auth parts (`mcp.server.auth`); this package fills only what the SDK leaves to a server."""
