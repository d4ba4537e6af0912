"""Tool functions: plain typed functions over `lmtuner_core`, shared by the MCP server and the CLI."""
