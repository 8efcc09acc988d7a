"""Config loading and the CLI shell shared by the config-driven data_tools commands.

`codetextbook`, `textbooks`, `exercises` and `decontaminate` each read one YAML (`conf/<group>/<name>.yaml`, or a
path) into a dataclass schema by OmegaConf structured merge (schema <- YAML <- `key=value` overrides), so an unknown
key or a wrong type fails at start and the dataclasses' `__post_init__` checks run once on the final values. Each
command keeps its own error class (its tests and callers catch it); this module only takes the class as a parameter.
Every failure becomes that class with a one-line message: the CLI prints `error: <message>` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

if not OmegaConf.has_resolver("stdlib"):
    # `${stdlib:}` in YAML: this interpreter's standard library, the demo corpus of every command (no download).
    OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"])


def config_path(conf_dir: Path, name: str, error_cls: type[ValueError], relative_to: Path | None = None) -> Path:
    """`<relative_to or conf_dir>/<name>.yaml`, or `name` itself if it has a suffix; the error lists the known names."""
    path = Path(name)
    if not path.suffix:
        path = (relative_to or conf_dir) / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in conf_dir.glob("*.yaml"))
        raise error_cls(f"config {str(path)!r} not found; available in {conf_dir}: {', '.join(names)}")
    return path


def load(
    schema: T,
    path: Path,
    overrides: Sequence[str] | None,
    error_cls: type[ValueError],
    yaml_loader: Callable[[Path], Any] = OmegaConf.load,
) -> T:
    """`schema` (a dataclass instance) <- the YAML at `path` (read by `yaml_loader`) <- dotlist `overrides`.

    The message says where the bad value came from (the file or the command line), its first line only (OmegaConf
    appends a multi-line dump of the config) and the full key.
    """
    where = str(path)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), yaml_loader(path))
        if overrides:
            where = "command line"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        where = str(path)  # to_object resolves interpolations written in the file
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        first = str(e).strip().splitlines()[0]
        key = getattr(e, "full_key", None)
        raise error_cls(f"{where}: {first}" + (f" (key: {key})" if key else "")) from None
    except yaml.YAMLError as e:  # a YAML syntax error is the user's too: one line, not a traceback
        mark = getattr(e, "problem_mark", None)  # names the file: with `extends:` it may be a base file
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        src = f"{mark.name}, line {mark.line + 1}" if mark else where
        raise error_cls(f"{src}: invalid YAML: {problem}") from None
    assert isinstance(cfg, type(schema))
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (holds no secret: configs name the API key's *variable*, never the key)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def parse_cli(
    command: str,
    doc: str,
    group: str,
    example: str,
    argv: list[str] | None,
    flags: dict[str, str] | None = None,
) -> argparse.Namespace:
    """The common command line: `--config-name`, `--print-config`, extra store-true `flags` (name -> help), overrides.

    `doc` is the module docstring (its first line is the description); `example` shows an override in the help.
    """
    ap = argparse.ArgumentParser(prog=f"python -m data_tools.{command}", description=doc.split("\n")[0])
    ap.add_argument("--config-name", default="demo", help=f"conf/{group}/<name>.yaml, or a path to a YAML file")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, help_text in (flags or {}).items():
        ap.add_argument(flag, action="store_true", help=help_text)
    ap.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return ap.parse_args(argv)


def fail(exc: Exception) -> int:
    """Print a user error on one line (no traceback) and return the CLI's exit status for it."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def run_cli(
    args: argparse.Namespace,
    load_config: Callable[[str, list[str]], Any],
    run: Callable[[Any], object],
    errors: tuple[type[Exception], ...],
) -> int:
    """Load the config, then print it (`--print-config`) or `run` it; `errors` are the user errors that exit 2."""
    try:
        cfg = load_config(args.config_name, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        run(cfg)
    except errors as e:
        return fail(e)
    return 0
