"""`lmtuner-mcp`: serve lmtuner's tools over stdio (what desktop and IDE agents launch)."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmtuner-mcp", description="lmtuner's MCP server (stdio by default).")
    parser.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="A folder file arguments may name (repeatable). Default: the working directory and $LMTUNER_HOME.",
    )
    parser.add_argument("--read-only", action="store_true", help="Expose only the tools that change nothing.")
    parser.add_argument("--http", action="store_true", help="Serve Streamable HTTP at /mcp instead of stdio.")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765).")
    parser.add_argument("--token-file", metavar="FILE", help="File holding the HTTP bearer token.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lmtuner_core.errors import LmtunerError
    from lmtuner_core.library_noise import quiet_library_noise
    from lmtuner_core.paths import lmtuner_home
    from server.app import build_server
    from server.logs import configure_process_logging

    quiet_library_noise()
    configure_process_logging(lmtuner_home())  # before the SDK's own logging set-up, which it then leaves alone
    server = build_server(roots=args.root, read_only=args.read_only)
    if not args.http:
        server.run()
        return 0
    from server.http import read_token, resolve_token, serve_http

    try:
        token, generated = resolve_token(args.host, read_token(args.token_file), lmtuner_home())
    except LmtunerError as exc:
        print(f"lmtuner-mcp: {exc}", file=sys.stderr)
        return 2
    if generated:
        print(f"lmtuner-mcp: no LMTUNER_TOKEN or --token-file; generated a token in {lmtuner_home() / 'http-token'}",
              file=sys.stderr)  # fmt: skip
    print(f"lmtuner-mcp: serving http://{args.host}:{args.port}/mcp (bearer token required)", file=sys.stderr)
    serve_http(server, host=args.host, port=args.port, token=token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
