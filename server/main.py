"""`lmtuner-mcp`: serve lmtuner's tools over stdio (what desktop and IDE agents launch) or Streamable HTTP."""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument(
        "--ray-address",
        action="append",
        metavar="ADDR",
        help="A Ray cluster callers may name (repeatable; also LMTUNER_RAY_ADDRESSES, comma-separated), e.g. "
        "'http://10.0.0.5:8265': its dashboard is what inspect_gpus, propose_config and start_training reach. "
        "Default: only 'auto' (the cluster this machine belongs to).",
    )
    parser.add_argument(
        "--confirm-over-minutes",
        type=float,
        metavar="MIN",
        default=_env_number("LMTUNER_CONFIRM_OVER_MINUTES", 30.0),
        help="start_training asks the user first (elicitation, or a preview to confirm) when a job is estimated to "
        "run longer than this (also LMTUNER_CONFIRM_OVER_MINUTES; default 30; 0 asks for every job).",
    )
    parser.add_argument(
        "--confirm-over-devices",
        type=int,
        metavar="N",
        default=_env_number("LMTUNER_CONFIRM_OVER_DEVICES", 1),
        help="start_training asks the user first when a job holds more than N GPUs or GPU Ray workers (also "
        "LMTUNER_CONFIRM_OVER_DEVICES; default 1).",
    )
    parser.add_argument("--http", action="store_true", help="Serve Streamable HTTP at /mcp instead of stdio.")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8765, help="HTTP port (default 8765).")
    parser.add_argument(
        "--token-file", metavar="FILE", help="File holding the HTTP bearer token (with --auth oauth: the owner token)."
    )
    parser.add_argument(
        "--auth",
        choices=["token", "oauth", "oidc"],
        default="token",
        help="HTTP auth: 'token' (bearer token, default), 'oauth' (this server runs an OAuth 2.1 authorization "
        "server; the owner approves each agent with the token; for ChatGPT and remote connectors), 'oidc' (JWTs "
        "from your identity provider).",
    )
    parser.add_argument(
        "--public-url", metavar="URL", help="With --auth oauth/oidc: the https URL agents reach /mcp at."
    )
    parser.add_argument("--issuer", metavar="URL", help="With --auth oidc: the identity provider's issuer URL.")
    parser.add_argument(
        "--audience", metavar="AUD", help="With --auth oidc: the `aud` tokens must carry (default: --public-url)."
    )
    parser.add_argument(
        "--access-token-ttl",
        type=int,
        metavar="SECONDS",
        help="With --auth oauth: access token lifetime in seconds (default 3600; refresh tokens last 30 days).",
    )
    return parser.parse_args(argv)


def _env_number(name: str, default: float) -> float:
    """A threshold from the environment; a value that is not a number stops the start, naming the variable."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        raise SystemExit(f"lmtuner-mcp: {name}={value!r} is not a number; e.g. {name}={default}") from None
    if number < 0:
        raise SystemExit(f"lmtuner-mcp: {name} must be 0 or more, not {value}")
    return number


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for option, value in (("--confirm-over-minutes", args.confirm_over_minutes),
                          ("--confirm-over-devices", args.confirm_over_devices)):  # fmt: skip
        if value < 0:
            print(f"lmtuner-mcp: {option} must be 0 or more (0 asks before every job), not {value}", file=sys.stderr)
            return 2
    from lmtuner_core.errors import LmtunerError
    from lmtuner_core.library_noise import quiet_library_noise
    from lmtuner_core.paths import lmtuner_home
    from server.logs import configure_process_logging

    quiet_library_noise()
    configure_process_logging(lmtuner_home())  # before the SDK's own logging set-up, which it then leaves alone
    try:
        if args.ray_address or os.environ.get("LMTUNER_RAY_ADDRESSES"):  # without either, nothing to check or import
            from lmtuner_core.jobs.ray_launcher import RayAddresses

            RayAddresses.from_settings(args.ray_address, os.environ)  # a bad entry stops the start, naming it
    except LmtunerError as exc:
        print(f"lmtuner-mcp: {exc}", file=sys.stderr)
        return 2
    if not args.http:
        if args.auth != "token" or args.public_url is not None:
            print("lmtuner-mcp: --auth and its options apply to --http; stdio needs no auth", file=sys.stderr)
            return 2
        from server.app import build_server

        build_server(
            roots=args.root, read_only=args.read_only, ray_addresses=args.ray_address,
            confirm_over_minutes=args.confirm_over_minutes, confirm_over_devices=args.confirm_over_devices,
        ).run()  # fmt: skip
        return 0
    from server.http import read_token, resolve_token, serve_http

    token = setup = None
    generated = False
    try:
        _refuse_options_for_other_modes(args)
        if args.auth in ("token", "oauth"):
            token, generated = resolve_token(args.host, read_token(args.token_file), lmtuner_home())
        if args.auth != "token":
            from server.auth.setup import check_public_url, oauth_setup, oidc_setup

            public_url = check_public_url(args.public_url)
            ttl = 3600 if args.access_token_ttl is None else args.access_token_ttl
            if ttl < 1:
                raise LmtunerError("--access-token-ttl must be at least 1 second", field="--access-token-ttl")
            setup = (
                oauth_setup(public_url, token, lmtuner_home(), ttl)
                if args.auth == "oauth"
                else oidc_setup(public_url, args.issuer, args.audience)
            )
    except LmtunerError as exc:
        print(f"lmtuner-mcp: {exc}", file=sys.stderr)
        return 2
    if generated:
        print(f"lmtuner-mcp: no LMTUNER_TOKEN or --token-file; generated a token in {lmtuner_home() / 'http-token'}",
              file=sys.stderr)  # fmt: skip
    from server.app import build_server  # after the checks above: a refused option answers without the tools' imports

    server = build_server(
        roots=args.root,
        read_only=args.read_only,
        ray_addresses=args.ray_address,
        server_options=setup and setup.server_options,
        confirm_over_minutes=args.confirm_over_minutes,
        confirm_over_devices=args.confirm_over_devices,
    )
    where = f"http://{args.host}:{args.port}/mcp"
    if setup is None:
        print(f"lmtuner-mcp: serving {where} (bearer token required)", file=sys.stderr)
        serve_http(server, host=args.host, port=args.port, token=token)
        return 0
    print(f"lmtuner-mcp: serving {where} as {setup.public_url} (--auth {args.auth})", file=sys.stderr)
    serve_http(
        server, host=args.host, port=args.port, token=None, public_url=setup.public_url, auth_routes=setup.routes
    )
    return 0


def _refuse_options_for_other_modes(args: argparse.Namespace) -> None:
    """An option the chosen --auth does not use is an error, not silently ignored."""
    from lmtuner_core.errors import LmtunerError

    used_by = {
        "public_url": ("oauth", "oidc"),
        "issuer": ("oidc",),
        "audience": ("oidc",),
        "access_token_ttl": ("oauth",),
    }
    for name, modes in used_by.items():
        if getattr(args, name) is not None and args.auth not in modes:
            option = "--" + name.replace("_", "-")
            raise LmtunerError(f"{option} applies to --auth {' or '.join(modes)}, not --auth {args.auth}", field=option)


if __name__ == "__main__":
    sys.exit(main())
