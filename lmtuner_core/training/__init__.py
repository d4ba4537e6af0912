"""The training child process: the recipe, each method's model set-up, attention and RoPE variants."""
