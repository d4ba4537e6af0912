"""The MCP server (`lmtuner-mcp`) and the CLI (`lmtuner`)."""
