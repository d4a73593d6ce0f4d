"""Command help that reads the same under every typer the project allows (``typer>=0.26``).

Typer has drawn plain help (``rich_markup_mode=None``) differently from release to release:
0.12 wrote click's ``TEXT``/``INTEGER`` placeholders and ``[auto|cpu|cuda]``; 0.16 escaped the
marks as ``\\[required]``; 0.20 with a recent click dropped the arguments' help; 0.29 writes
``{CHECKPOINT}`` in the usage line, ``<str>`` and ``<list[str]>`` after every name, and no value
for a free-text option. :class:`HelpCommand` draws the usage line and the Arguments and Options
sections itself, from the parameter attributes every click (and typer's vendored click) has:

* an argument is shown by its metavar (``ADAPTER...`` when it takes several), bare in the usage
  line when required: parsed as optional so that a missing one gets this tool's one-line error,
  it says ``[required]`` in its help, and that counts as required here;
* an option that takes no value (a flag) is shown bare; one with a fixed set of values lists
  them (``--device <auto|cpu|cuda>``); any other shows its metavar or, without one, its name in
  capitals (``--seed SEED``);
* ``[default: …]`` and ``[required]`` follow the help text.
"""

from __future__ import annotations

import enum
from typing import Any

from typer.core import TyperCommand

REQUIRED = "[required]"


def choices_metavar(values: Any) -> str:
    """``<a|b|c>``: the values an option accepts (enum members give their values)."""
    return "<" + "|".join(str(v.value if isinstance(v, enum.Enum) else v) for v in values) + ">"


def _choices(param: Any) -> Any:
    """The fixed values of ``param``, or None: click's Choice type (typer < 0.22) or typer's own
    type descriptor (typer ≥ 0.22, which vendors click)."""
    for holder in (getattr(param, "type", None), getattr(param, "type_descriptor", None)):
        values = getattr(holder, "choices", None)
        if values:
            return values
    return None


def is_required(param: Any) -> bool:
    """Required to click, or required in use (parsed as optional for the one-line error; its help says so)."""
    return bool(param.required) or REQUIRED in (getattr(param, "help", None) or "")


def argument_name(param: Any) -> str:
    """``CHECKPOINT``, ``ADAPTER...``."""
    name = param.metavar or (param.name or "").upper()
    return name + ("..." if param.nargs != 1 else "")


def option_names(param: Any) -> str:
    """``-o, --output PATH``, ``--canonicalize / --no-canonicalize``, ``--device <auto|cpu|cuda>``, ``--force``."""
    names = ", ".join(param.opts)
    if param.secondary_opts:
        names += " / " + ", ".join(param.secondary_opts)
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return names
    values = _choices(param)
    metavar = param.metavar or (choices_metavar(values) if values else (param.name or "value").upper())
    return f"{names} {metavar}"


def _default(param: Any) -> str | None:
    """What ``[default: …]`` says, or None when nothing is worth showing."""
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return show
    default = param.default
    if not show or default is None or callable(default):
        return None
    if getattr(param, "is_flag", False):
        if not param.secondary_opts:
            return None  # a bare flag is off unless given
        opts = param.opts if default else param.secondary_opts
        return opts[0].lstrip("-")
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, (list, tuple)):
        return ", ".join(str(d) for d in default) or None
    return str(default)


def _help(param: Any) -> str:
    """The help text, then ``[default: …]`` and ``[required]`` (the mark the text carries moved last)."""
    text = " ".join((getattr(param, "help", None) or "").replace(REQUIRED, " ").split())
    extra = []
    default = _default(param) if param.param_type_name == "option" else None
    if default is not None:
        extra.append(f"[default: {default}]")
    if is_required(param):
        extra.append(REQUIRED)
    return "  ".join([text, *extra]) if text else "  ".join(extra)


class HelpCommand(TyperCommand):
    """A typer command whose usage line and parameter sections are drawn as described above."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument" and not getattr(param, "hidden", False):
                name = argument_name(param)
                pieces.append(name if is_required(param) else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            if param.param_type_name == "argument":
                arguments.append((argument_name(param), _help(param)))
            elif param.param_type_name == "option":
                options.append((option_names(param), _help(param)))
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)
