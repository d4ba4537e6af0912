"""Whether a model folder would run code of its own when a library loads it, decided before anything loads it.

transformers (and llama.cpp's converter, which calls it with trust_remote_code=True for some tokenizers) imports
a model's code from `auto_map` entries in any of the JSON configs it reads (config.json, tokenizer_config.json,
processor and preprocessor configs, …), as `module.Class` beside the config or `repo--module.Class` in another
folder or hub repository. `check_model_code` is the one check every tool runs on a model or adapter folder: without
trust_remote_code it refuses any such reference and any Python file in the folder; with it, code outside the
allowed roots is still refused. `code_guard` is the structural half, for child processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from lmtuner_core.errors import LmtunerError, shown
from lmtuner_core.paths import AllowedRoots

# Keys under which transformers finds code to import (custom_pipelines: pipeline classes of a repository).
CODE_KEYS = (b'"auto_map"', b'"custom_pipelines"')
WALK_LIMIT = 20_000  # entries of a model folder looked at; a model folder holds tens
JSON_LIMIT_BYTES = 512 << 20  # a JSON file past this is not a config any library reads whole


@dataclass(frozen=True)
class CodeReference:
    file: str  # relative to the folder
    field: str  # e.g. auto_map.AutoTokenizer
    reference: str  # e.g. code/evil.EvilTok or other/repo--module.Class

    def describe(self) -> str:
        return f"{self.file} {self.field} names {shown(self.reference)}"


def _references(value, path: str):
    """Every string under an auto_map / custom_pipelines value, with where it sits."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, list):
        for item in value:
            yield from _references(item, path)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _references(item, f"{path}.{key}")


def _code_keys(value, path: str = ""):
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key in ("auto_map", "custom_pipelines"):
                yield from _references(item, where)
            else:
                yield from _code_keys(item, where)
    elif isinstance(value, list):
        for item in value:
            yield from _code_keys(item, path)


def scan_folder(folder: Path) -> tuple[list[CodeReference], list[str]]:
    """(code references in every JSON file, Python files) anywhere in the folder; symlinked folders not followed."""
    references: list[CodeReference] = []
    python_files: list[str] = []
    seen = 0
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            seen += 1
            if seen > WALK_LIMIT:
                raise LmtunerError(
                    f"model: {folder} holds more than {WALK_LIMIT:,} files; a model folder holds config, tokenizer "
                    "and weight files: point to that folder",
                    field="model",
                )
            path = Path(top, name)
            relative = str(path.relative_to(folder))
            if name.endswith((".py", ".pyc", ".pyw")):
                python_files.append(relative)
            elif name.endswith(".json") and path.is_file():
                references.extend(_json_references(path, relative))
    return references, python_files


def _json_references(path: Path, relative: str) -> list[CodeReference]:
    try:
        if path.stat().st_size > JSON_LIMIT_BYTES:
            return []
        data = path.read_bytes()
    except OSError:
        return []
    if not any(key in data for key in CODE_KEYS):  # the common case: no parse of a 10 MB tokenizer.json
        return []
    try:
        parsed = json.loads(data)
    except ValueError:
        # unreadable as JSON here: a library would not read it either, but a key in it is still a claim of code
        return [CodeReference(relative, "auto_map", "(file is not valid JSON)")]
    return [CodeReference(relative, field, ref) for field, ref in _code_keys(parsed)]


def _code_location(folder: Path, reference: str) -> tuple[str | None, Path | None]:
    """(hub repository, local file) a reference would import from."""
    repo, _, class_reference = reference.rpartition("--")
    module = class_reference.rpartition(".")[0] or class_reference
    if not repo:
        return None, folder / f"{module}.py"
    local = Path(repo).expanduser()
    if local.is_absolute() or local.exists() or repo.startswith("."):
        return None, local / f"{module}.py"
    return repo, None


def check_model_code(folder: str | Path, roots: AllowedRoots, trust_remote_code: bool, field: str = "model") -> None:
    """Refuses a folder whose loading would run code of its own, unless trust_remote_code; with it, refuses code
    that lies outside the allowed roots (another folder or a hub repository named with `--`, a symlink out)."""
    folder = Path(folder)
    if not folder.is_dir():
        return  # a hub id: transformers' own trust_remote_code check applies to its cached files
    references, python_files = scan_folder(folder)
    if not trust_remote_code:
        if not references and not python_files:
            return
        found = [r.describe() for r in references[:3]] + [f"{p} is a Python file in it" for p in python_files[:3]]
        raise LmtunerError(
            f"trust_remote_code: {field} folder {folder} ships code of its own that loading it would run "
            f"({'; '.join(found)}). Nothing of it was run. If you trust its author, call again with "
            "trust_remote_code: true (in a TrainConfig: trust_remote_code: true); otherwise remove those entries "
            "and files",
            field="trust_remote_code",
        )
    for reference in references:
        repo, code_file = _code_location(folder, reference.reference)
        if repo is not None:
            raise LmtunerError(
                f"trust_remote_code: {reference.describe()}: code from the hub repository {shown(repo)}, outside the "
                "allowed folders, is not run even with trust_remote_code; copy that code into the model folder",
                field="trust_remote_code",
            )
        _inside_roots(code_file, roots, reference.describe())
    for name in python_files:
        _inside_roots(folder / name, roots, f"{name} in {folder}")


def _inside_roots(path: Path, roots: AllowedRoots, what: str) -> None:
    resolved = path.resolve()
    if roots.roots is not None and not any(resolved == r or resolved.is_relative_to(r) for r in roots.roots):
        raise LmtunerError(
            f"trust_remote_code: {what}: that code lies outside the allowed folders ({roots.describe()}) and is not "
            "run even with trust_remote_code; copy it into the model folder, or start the server with --root for it",
            field="trust_remote_code",
        )
