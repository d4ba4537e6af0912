"""Runs a script (llama.cpp's converter) in this child with a model's own code made impossible to import.

`python -m lmtuner_core.models.code_guard --deny MODEL_DIR -- SCRIPT ARGS…`. The converter calls
`AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` for some tokenizers, whatever our caller decided, so a
check of the folder's files (model_code.py) is not enough on its own: here a Python audit hook (which nothing run
later can remove) refuses to execute any code object whose file lies outside the interpreter's own folders, the
script's folder and lmtuner's package, or inside the model folder or transformers' dynamic-module cache; and
transformers' dynamic-module entry points are replaced before anything imports them, so the refusal comes with a
plain message. Downloads are off, so a `repo--module.Class` reference cannot fetch code either.
"""

from __future__ import annotations

import atexit
import os
import runpy
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

REFUSAL = "lmtuner refused to run code shipped with the model"


def _within(path: str, folders: list[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def install(denied: list[str | Path], allowed: list[str | Path]) -> None:
    """Forbids code from `denied` folders (and from anywhere not `allowed` or the interpreter's own) in this process."""
    modules_cache = tempfile.mkdtemp(prefix="lmtuner-no-modules-")
    atexit.register(shutil.rmtree, modules_cache, ignore_errors=True)
    os.environ["HF_MODULES_CACHE"] = modules_cache  # read when transformers is imported: empty, and denied below
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    real = os.path.realpath
    deny = [real(str(d)) for d in [*denied, modules_cache]]
    paths = sysconfig.get_paths()
    ours = str(Path(__file__).resolve().parents[1])  # lmtuner_core itself (an editable install lives outside the venv)
    interpreter = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    trusted = [real(t) for t in [*interpreter, paths["stdlib"], paths["purelib"], paths["platlib"], ours, *allowed]]

    def refuse_model_code(event: str, args: tuple) -> None:
        if event == "exec":
            filename = getattr(args[0], "co_filename", "") or ""
            if filename.startswith("<"):  # frozen modules, exec of strings, Jinja's compiled templates
                return
            where = real(filename)
            if _within(where, deny) or not _within(where, trusted):
                raise RuntimeError(f"{REFUSAL}: {filename}")
        elif event == "ctypes.dlopen" and args and isinstance(args[0], str) and _within(real(args[0]), deny):
            raise RuntimeError(f"{REFUSAL}: {args[0]}")

    sys.addaudithook(refuse_model_code)

    # The plain message, and no copy into the modules cache: replaced before any transformers module imports them.
    import transformers.dynamic_module_utils as dynamic

    def refused(*args, **kwargs):
        raise RuntimeError(f"{REFUSAL} (transformers asked to import {args[0] if args else 'a module'})")

    dynamic.get_class_from_dynamic_module = refused
    dynamic.get_cached_module_file = refused
    dynamic.get_class_in_module = refused


def main(argv: list[str]) -> None:
    denied: list[str] = []
    while argv and argv[0] == "--deny":
        denied.append(argv[1])
        argv = argv[2:]
    if not argv or argv[0] != "--":
        raise SystemExit("usage: python -m lmtuner_core.models.code_guard --deny DIR … -- SCRIPT ARGS…")
    script = argv[1]
    install(denied, allowed=[Path(script).resolve().parent])
    sys.argv = argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python SCRIPT` would have it
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
