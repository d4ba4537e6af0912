"""How long operations report progress, whoever calls them: an MCP request with a progress token, the CLI, a test."""

from collections.abc import Callable

# progress(done, total, message), called as the work advances; operations take None where nobody listens.
ProgressFn = Callable[[float, float, str], None]
