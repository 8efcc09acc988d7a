"""The one command-line system of phi-train: Hydra with structured (dataclass) configs, for every entry point.

Precedence, lowest to highest: the dataclass defaults of the command's schema <- the YAML chosen with
`--config-name NAME` from the command's `conf/<group>/` folder (composed by Hydra's defaults list, so a file may start
from another: `defaults: [base, _self_]`) <- `key=value` overrides on the command line. Hydra's own flags work
unchanged: `--help`, `--cfg job` (print the composed config instead of running; add `--resolve` to resolve
interpolations such as `${stdlib:}`), `--config-dir DIR` (look for `--config-name` there too), `-m` (sweeps).

Every user mistake (an unknown key, a value of the wrong type, an unknown config name or group option, a failed
`__post_init__` check, any `PhiTrainError` the command raises) becomes one line `error: ...` on stderr, naming the
valid choices, and exit status 2; under the deepspeed launcher only rank 0 prints it. The whole config is composed and
checked in-process before Hydra starts the job, so these never reach Hydra's multi-line report. The tools keep no
Hydra outputs (no `outputs/` folder, no `.hydra/`, no log file); `launch/train.py` keeps its run directories.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import sysconfig
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from phi_train.errors import PhiTrainError, report

if not OmegaConf.has_resolver("stdlib"):
    # `${stdlib:}` in YAML: this interpreter's standard library, the demo corpus of every command (no download).
    OmegaConf.register_new_resolver("stdlib", lambda: sysconfig.get_paths()["stdlib"])

QUIET = ("hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled")
"""Hydra overrides of the tools: they write only their own outputs (train keeps Hydra's run directories)."""

_FLAGS_WITHOUT_JOB = ("help", "hydra_help", "info", "shell_completion", "multirun")


class CliError(PhiTrainError):
    """A command line or config file the schema cannot take."""


# --- keys and values checked against the schema -------------------------------------------------------------------


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [t for t in typing.get_args(tp) if t is not type(None)]
        return inner[0] if len(inner) == 1 else tp
    return tp


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


_SCALAR_OK = {
    int: lambda v: v.lstrip("-").replace("_", "").isdigit(),
    float: _is_float,
    bool: lambda v: v.lower() in ("true", "false"),
}


def unknown_key(schema: type, key: str) -> str | None:
    """'unknown key ...: <section> has a, b, c' when `key` (dotted) names no field of `schema`, else None."""
    cls = schema
    parts = key.split(".")
    for depth, name in enumerate(parts):
        fields = _fields(cls)
        if name not in fields:
            where = ".".join(parts[:depth]) or "the config"
            return f"unknown key {key!r}: {where} has {', '.join(fields)}"
        tp = _strip_optional(fields[name])
        if not dataclasses.is_dataclass(tp):
            if depth != len(parts) - 1 and (tp in _SCALAR_OK or tp is str):
                return f"unknown key {key!r}: {'.'.join(parts[: depth + 1])} is a value, not a section"
            return None
        cls = tp
    return None


def check_override(arg: str, schema: type, groups: Sequence[str] = ()) -> None:
    """Fail on one line for an override naming a key or a value `schema` cannot take.

    Group choices (`model=phi1`, `+model=phi1`), deletions (`~x`), Hydra's own keys, sweeps (`a=1,2`) and
    interpolations are left to Hydra; the config is composed right after, which catches the rest. An addition
    (`+x.y=1`) is checked like an assignment: Hydra would add an undeclared key without complaint.
    """
    if "=" not in arg or arg.startswith(("~", "-", "hydra.", "hydra/")):
        return
    key, value = arg.lstrip("+").split("=", 1)
    if key.startswith(("hydra.", "hydra/")):
        return
    if key in groups or "/" in key:
        return
    msg = unknown_key(schema, key)
    if msg:
        raise CliError(msg)
    cls, parts = schema, key.split(".")
    for name in parts[:-1]:
        cls = _strip_optional(_fields(cls)[name])
        if not dataclasses.is_dataclass(cls):
            return  # inside a dict or list field: Hydra checks the element
    tp = _fields(cls)[parts[-1]]
    if "," in value or value.startswith(("${", "choice(", "range(", "glob(", "interval(")):
        return
    if value == "null":
        if tp is not _strip_optional(tp):
            return
        raise CliError(f"{key}=null: {key} cannot be null")
    inner = _strip_optional(tp)
    if typing.get_origin(inner) in (list, dict) or dataclasses.is_dataclass(inner):
        if not value.startswith(("[", "{")):
            kind = "list" if typing.get_origin(inner) is list else "mapping"
            example = f"[{value}]" if kind == "list" else "{k: v}"
            raise CliError(f"{key}={value!r} is not a {kind}: write {key}={example}")
        return
    if not _SCALAR_OK.get(inner, lambda v: True)(value):
        raise CliError(f"{key}={value!r} is not a valid {getattr(inner, '__name__', inner)}")


# --- composing ----------------------------------------------------------------------------------------------------


def _names(folder: Path | None) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder and folder.is_dir() else []


def _groups(conf_dir: Path | None) -> list[str]:
    return sorted(p.name for p in conf_dir.iterdir() if p.is_dir()) if conf_dir and conf_dir.is_dir() else []


def _one_line(exc: BaseException, schema: type, where: str) -> str:
    """Hydra's and OmegaConf's messages, cut to their first line, with the schema's valid keys for a bad key."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, ConfigKeyError) and getattr(e, "full_key", None):
            return f"{where}: " + (unknown_key(schema, e.full_key) or str(e).strip().splitlines()[0])
        if isinstance(e, MissingMandatoryValue) and getattr(e, "full_key", None):
            return f"{e.full_key} is required: give {e.full_key}=..."
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            first = str(e).strip().splitlines()[0]
            return f"{where}: {e.full_key}: {first}"
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return f"{where}: " + "; ".join(lines[:2]) if lines else f"{where}: {type(exc).__name__}"


def _missing(exc: MissingConfigException, config_name: str, conf_dir: Path | None, extra_dir: Path | None) -> str:
    missing = exc.missing_cfg_file or ""
    if missing in (config_name, f"{config_name}.yaml") or "primary config" in str(exc):
        if conf_dir is None:
            return f"unknown config name {config_name!r}: this command has no config files; give key=value overrides"
        names = [n for n in _names(conf_dir) + _names(extra_dir) if not n.endswith("_schema")]
        return f"unknown config name {config_name!r}; choose one of {', '.join(names)} (in {conf_dir})"
    group, _, option = missing.rpartition("/")
    options = _names(conf_dir / group) if conf_dir and group else []
    if options:
        return f"unknown {group} {option!r}; choose one of {', '.join(options)}"
    return f"unknown config group {group or missing!r}; groups: {', '.join(_groups(conf_dir)) or '(none)'}"


def register(schema: type, name: str) -> None:
    ConfigStore.instance().store(name=name, node=schema)


def compose(
    schema: type,
    config_name: str,
    overrides: Sequence[str] = (),
    conf_dir: Path | None = None,
    schema_name: str | None = None,
) -> DictConfig:
    """The composed (not yet resolved) config: `schema_name` (registered from `schema`) <- YAML <- `overrides`.

    `config_name` names `conf_dir/<name>.yaml`, or is a path to a YAML file anywhere (whose defaults list may name
    the files of `conf_dir`). Every failure is a one-line `CliError`.
    """
    register(schema, schema_name or config_name)
    overrides = list(overrides)
    for arg in overrides:
        check_override(arg, schema, _groups(conf_dir))
    primary, name, extra = conf_dir, config_name, None
    path = Path(config_name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise CliError(f"config file {config_name!r} does not exist")
        primary, name, extra = path.resolve().parent, path.stem, path.resolve().parent
        if conf_dir is not None:
            overrides.insert(0, f"hydra.searchpath=[file://{conf_dir}]")
    GlobalHydra.instance().clear()
    init = (
        hydra.initialize_config_dir(config_dir=str(primary), version_base="1.3")
        if primary
        else hydra.initialize(config_path=None, version_base="1.3")
    )
    where = str(path) if extra else (f"conf/{conf_dir.name}/{config_name}.yaml" if conf_dir else "command line")
    try:
        with init:
            return hydra.compose(config_name=name, overrides=overrides)
    except MissingConfigException as exc:
        raise CliError(_missing(exc, config_name, conf_dir, extra)) from None
    except (HydraException, OmegaConfBaseException) as exc:
        raise CliError(_one_line(exc, schema, where)) from None
    except Exception as exc:  # a YAML syntax error in a file: the file and line, not a parser traceback
        mark = getattr(exc, "problem_mark", None)
        if mark is None:
            raise
        problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise CliError(f"{mark.name}, line {mark.line + 1}: invalid YAML: {problem}") from None


def to_object(cfg: DictConfig, schema: type) -> Any:
    """Resolve interpolations and build the dataclasses, running every `__post_init__` check (one-line errors).

    A YAML of the user's that names no defaults list composes untyped: it is merged into the schema here."""
    try:
        if OmegaConf.get_type(cfg) is not schema:
            cfg = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        obj = OmegaConf.to_object(cfg)
    except PhiTrainError:
        raise
    except OmegaConfBaseException as exc:
        raise CliError(_one_line(exc, schema, "config")) from None
    if not isinstance(obj, schema):
        raise CliError(f"the config does not build a {schema.__name__}")
    return obj


def load(
    schema: type,
    config_name: str,
    overrides: Sequence[str] = (),
    conf_dir: Path | None = None,
    schema_name: str | None = None,
) -> Any:
    """`compose` then `to_object`: the command's dataclass, as its CLI would build it (for tests and notebooks)."""
    return to_object(compose(schema, config_name, overrides, conf_dir, schema_name), schema)


def to_yaml(cfg: Any) -> str:
    """A config dataclass as YAML (configs name the API key's *variable*, never the key)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --- the entry point ----------------------------------------------------------------------------------------------


def _parse(argv: list[str]):
    from hydra._internal.utils import get_args_parser

    args, unknown = get_args_parser().parse_known_args(argv)
    if unknown:
        raise CliError(
            f"unknown option {unknown[0]!r}: this command takes key=value overrides (and Hydra's flags); see --help"
        )
    return args


def _without_config_name(flags: list[str]) -> list[str]:
    out, skip = [], False
    for arg in flags:
        if skip:
            skip = False
        elif arg in ("--config-name", "-cn", "--config-dir", "-cd"):
            skip = True
        elif not arg.startswith(("--config-name=", "--config-dir=")):
            out.append(arg)
    return out


def hydra_command(
    schema: type,
    config_name: str,
    conf_dir: Path | None = None,
    *,
    schema_name: str | None = None,
    typed: bool = True,
    outputs: bool = False,
    check: Callable[[DictConfig], None] | None = None,
) -> Callable[[Callable[[Any], int | None]], Callable[[list[str] | None], int]]:
    """Turn `fn(cfg)` into `main(argv=None) -> exit status`, a Hydra app over `schema`.

    `conf_dir`: the command's YAML folder (None: the schema alone, stored as `config_name`). `schema_name`: the
    ConfigStore name the YAMLs' defaults lists start from. `typed`: `fn` gets the dataclass (else the DictConfig).
    `outputs`: keep Hydra's run directory and logs (train). `check`: extra checks on the composed config, run first.
    """

    def decorate(fn: Callable[[Any], int | None]) -> Callable[[list[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            status = 0

            def prepare(cfg: DictConfig) -> Any:
                if check is not None:
                    check(cfg)
                obj = to_object(cfg, schema)
                return obj if typed else cfg

            try:
                args = _parse(argv)
                name = args.config_name or config_name
                if args.config_dir and not Path(name).suffix:
                    name = str(Path(args.config_dir) / f"{name}.yaml")
                if not any(getattr(args, flag, False) for flag in _FLAGS_WITHOUT_JOB) and args.cfg is None:
                    prepare(compose(schema, name, args.overrides, conf_dir, schema_name or config_name))
            except PhiTrainError as exc:
                return report(exc)

            def task(cfg: DictConfig) -> None:
                nonlocal status
                try:
                    status = fn(prepare(cfg)) or 0
                except PhiTrainError as exc:
                    status = report(exc)

            register(schema, schema_name or config_name)
            GlobalHydra.instance().clear()
            # Hydra's parser takes the overrides as one run of positionals: its flags go first, ours after them
            flags = list(argv)
            overrides = list(args.overrides)
            for arg in overrides:
                flags.remove(arg)
            if Path(name).suffix in (".yaml", ".yml"):  # a file anywhere: its folder is the primary, ours the fallback
                flags = [*_without_config_name(flags), "--config-path", str(Path(name).resolve().parent)]
                flags += ["--config-name", Path(name).stem]
                if conf_dir is not None:
                    overrides.insert(0, f"hydra.searchpath=[file://{conf_dir}]")
            saved = sys.argv
            sys.argv = [saved[0], *flags, *(() if outputs else QUIET), *overrides]
            task.__wrapped__ = fn  # type: ignore[attr-defined]  # Hydra names the job (and --help) after fn's module
            try:
                path = str(conf_dir) if conf_dir else None
                hydra.main(config_path=path, config_name=config_name, version_base="1.3")(task)()
            except SystemExit as exc:  # --help and Hydra's own exits
                return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            finally:
                sys.argv = saved
                GlobalHydra.instance().clear()
            return status

        return main

    return decorate
