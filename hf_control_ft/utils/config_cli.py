"""Dataclasses from a YAML file and command-line flags, in the conventions of ``transformers.HfArgumentParser``.

Every field of every dataclass is a flag of the same name. Accepted forms (values of non-string fields are read as YAML
scalars, so ``1e-3``, ``true``, ``null`` and ``[a, b]`` mean what they say; string fields keep the text as typed):

* ``--name value`` and ``--name=value``; dashes in names may be underscores (``--learn-initial-noise``);
* a bare ``--flag`` for a boolean field (true) and ``--no_flag`` (false);
* several values for a list field (``--lora_target_modules to_q to_k``);
* ``--config file.yaml``: a mapping of field names; flags given on the command line win over it;
* ``-h`` / ``--help``: every field with its type, default and help text (``field(metadata={"help": ...})``).

A field may have *aliases* (``field(metadata={"aliases": ("train_batch_size",)})``): diffusers' names for the same
setting, accepted as flags and YAML keys. A dataclass may name flags it does not take with what to use instead
(a class attribute ``FLAG_HINTS = {"num_train_epochs": "..."}``). Other unknown names are an error that suggests
the closest field. The dataclasses' own ``__post_init__`` validates values; this module only routes text to
fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import textwrap

import yaml

__all__ = ["ConfigCliError", "parse_dataclasses", "explicit_fields", "format_help", "read_yaml_mapping", "aliases_of"]


class ConfigCliError(ValueError):
    """A command line or config file that does not map onto the dataclasses' fields (one-line message)."""


def _type_text(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "")


def _is_bool(f: dataclasses.Field) -> bool:
    return _type_text(f).replace(" ", "") in ("bool", "bool|None")


def _is_list(f: dataclasses.Field) -> bool:
    text = _type_text(f)
    return "list" in text and not text.startswith("int | list")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "(required)"


def format_help(classes, prog: str | None = None, description: str | None = None) -> str:
    """The ``--help`` text: one entry per field of each dataclass, grouped by class, with its help text."""
    lines = [f"usage: {prog or 'script'} [--config FILE.yaml] [--FIELD VALUE | --FIELD=VALUE | --SWITCH] ...", ""]
    if description:
        lines += [description.strip(), ""]
    lines += ["  --config FILE.yaml    YAML mapping of the fields below; command-line flags override it",
              "  -h, --help            show this message and exit", ""]
    seen = set()
    for cls in classes:
        lines.append(f"{cls.__name__}:")
        for f in dataclasses.fields(cls):
            if f.name in seen or not f.init:
                continue
            seen.add(f.name)
            kind = "switch" if _is_bool(f) else _type_text(f)
            also = "".join(f", --{a}" for a in f.metadata.get("aliases", ()))
            lines.append(f"  --{f.name}{also}  ({kind}, default {_default_text(f)})")
            help_text = f.metadata.get("help", "")
            if help_text:
                lines += textwrap.wrap(help_text, width=100, initial_indent="        ", subsequent_indent="        ")
        lines.append("")
    return "\n".join(lines)


def read_yaml_mapping(path: str) -> dict:
    """A YAML file's top-level mapping (``{}`` for an empty file); a clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigCliError(f"cannot read config file {path!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigCliError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigCliError(f"config file {path!r} must hold a mapping of field names, got {type(values).__name__}")
    return values


def _value(f: dataclasses.Field, text: str):
    """Command-line text -> value: kept as text for string fields (``--negative_prompt no`` is the word "no"; only
    ``null`` / ``None`` clear an optional one), a YAML scalar otherwise (unparsable text stays text, and the
    dataclass names the field)."""
    kind = _type_text(f).replace(" ", "")
    if kind in ("str", "str|None", "list[str]", "list[str]|None"):
        return None if "None" in kind and text in ("null", "None", "~") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown(name: str, fields: dict, hints: dict | None = None) -> ConfigCliError:
    if hints and name in hints:
        return ConfigCliError(f"--{name}: {hints[name]}")
    close = difflib.get_close_matches(name, list(fields), n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return ConfigCliError(f"unknown flag --{name}{hint}; --help lists every flag")


def aliases_of(fields: dict) -> dict:
    """``{alias: field name}`` from the fields' ``metadata["aliases"]``."""
    return {alias: name for name, f in fields.items() for alias in f.metadata.get("aliases", ())}


def _hints(classes) -> dict:
    out = {}
    for cls in classes:
        out.update(getattr(cls, "FLAG_HINTS", {}))
    return out


def parse_flags(fields: dict, argv: list[str], hints: dict | None = None) -> tuple[dict, str | None]:
    """Flag tokens -> ``({field: value}, config_path)``; ``fields`` maps names to ``dataclasses.Field`` (aliases
    in their metadata are accepted); ``hints``: ``{flag: what to use instead}`` for flags that are not taken."""
    aliases = aliases_of(fields)
    values, config_path, i = {}, None, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or len(token) < 3:
            raise ConfigCliError(f"expected '--name value' or '--name=value', got {token!r}")
        name, eq, inline = token[2:].partition("=")
        name = name.replace("-", "_")
        following = []
        if not eq:
            rest = argv[i + 1:]
            while len(following) < len(rest) and not rest[len(following)].startswith("--"):
                following.append(rest[len(following)])
        i += 1 + len(following)
        if name == "config":
            if not (eq or len(following) == 1):
                raise ConfigCliError("--config takes one YAML file")
            config_path = inline if eq else following[0]
            continue
        name = aliases.get(name, name)
        negated = name.startswith("no_") and name[3:] in fields and _is_bool(fields[name[3:]])
        if name not in fields and not negated:
            raise _unknown(name, fields, hints)
        if negated:
            if eq or following:
                raise ConfigCliError(f"--{name} is a switch and takes no value")
            values[name[3:]] = False
            continue
        f = fields[name]
        if eq:
            values[name] = _value(f, inline)
        elif not following:
            if not _is_bool(f):
                raise ConfigCliError(f"--{name} needs a value (--{name} VALUE or --{name}=VALUE)")
            values[name] = True
        elif len(following) > 1 or _is_list(f):
            if "list" not in _type_text(f):
                raise ConfigCliError(f"--{name} takes one value, got {following}")
            values[name] = [_value(f, v) for v in following]
        else:
            values[name] = _value(f, following[0])
    return values, config_path


def secret_values(argv: list[str]) -> list[str]:
    """The values given to secret flags (any flag whose name holds ``token``, e.g. ``--hub_token``), inline or
    following, so that no error message echoes them (:func:`parse_dataclasses` masks them)."""
    secrets = []
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        if arg.startswith("--") and "token" in name.lower():
            if eq:
                secrets.append(inline)
            else:
                for value in argv[i + 1:]:
                    if value.startswith("--"):
                        break
                    secrets.append(value)
    return [v for v in secrets if v]


def parse_dataclasses(classes, argv: list[str] | None = None, prog: str | None = None,
                      description: str | None = None, config_path: str | None = None, exit_on_help: bool = True):
    """:func:`_parse_dataclasses` with every value of a secret flag replaced by ``***`` in the error it raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _parse_dataclasses(classes, argv, prog, description, config_path, exit_on_help)
    except (ConfigCliError, ValueError) as err:
        message, secrets = str(err), secret_values(argv)
        if not any(v in message for v in secrets):
            raise
        for value in sorted(secrets, key=len, reverse=True):
            message = message.replace(value, "***")
        try:
            masked = type(err)(message)
        except Exception:  # noqa: BLE001 - an exception type with another signature
            masked = ConfigCliError(message)
        raise masked from None


def _merged(classes, argv: list[str], config_path: str | None = None) -> dict:
    """``{field: value}`` the user gave: YAML files (``config_path``, then ``--config``) below the flags."""
    fields = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.init:
                fields.setdefault(f.name, f)
    hints = _hints(classes)
    flags, cli_config = parse_flags(fields, argv, hints)
    aliases = aliases_of(fields)
    merged = {}
    for path in (config_path, cli_config):
        if path:
            from_file = {aliases.get(k, k): v for k, v in read_yaml_mapping(path).items()}
            hinted = sorted(set(from_file) & set(hints))
            if hinted:
                raise ConfigCliError(f"config file {path!r}: key {hinted[0]}: {hints[hinted[0]]}")
            unknown = sorted(set(from_file) - set(fields))
            if unknown:
                raise ConfigCliError(f"config file {path!r}: unknown keys {unknown}; --help lists every field")
            merged.update(from_file)
    merged.update(flags)
    return merged


def explicit_fields(classes, argv: list[str] | None = None, config_path: str | None = None) -> set[str]:
    """The fields a flag or a config file sets (the rest keep their defaults, or a caller's preset)."""
    return set(_merged(classes, list(sys.argv[1:] if argv is None else argv), config_path))


def _parse_dataclasses(classes, argv: list[str] | None = None, prog: str | None = None,
                       description: str | None = None, config_path: str | None = None, exit_on_help: bool = True):
    """Builds one instance of each dataclass in ``classes`` from ``--config`` YAML and flags (module docstring).

    A field name shared by several classes (e.g. ``output_dir``) sets it in each. ``config_path`` is a YAML file
    read before ``--config`` (both below the flags). Returns a tuple of instances, in the order of ``classes``.

    Raises:
        ConfigCliError: unknown flag or key, malformed flag, unreadable config file.
        ValueError: a value the dataclass's ``__post_init__`` refuses (its message names the field).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        text = format_help(classes, prog, description)
        if exit_on_help:
            print(text)
            raise SystemExit(0)
        return text
    merged = _merged(classes, argv, config_path)
    out = []
    for cls in classes:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in merged.items() if k in names}
        out.append(cls.from_dict(kwargs) if hasattr(cls, "from_dict") else cls(**kwargs))
    return tuple(out)
