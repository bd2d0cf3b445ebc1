"""The packaged configs (``abmll/configs/{profile}/{method}.yaml``): list, resolve, copy, build.

One place for the lookup that ``tune run abmll_recipe --config NAME``, the benchmark and the
sweep use, for building a config node with an error that names its key, and for the
``abmll ls`` / ``abmll cp`` command (torchtune's ``tune ls/cp`` only know torchtune's own fixed
registry):

    abmll ls                                   # every packaged config
    abmll cp llama3_8b/abmll ./mine.yaml       # a copy to edit, then
    tune run abmll_recipe --config ./mine.yaml
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = [
    "packaged_configs",
    "resolve_config",
    "resolve_config_arg",
    "RecipeConfigError",
    "instantiate",
    "fill_builder_default",
    "main",
]


class RecipeConfigError(ValueError):
    """A bad config value or path; reported as one line naming the key."""


def packaged_configs() -> List[str]:
    """Short names (``tiny/abmll``) of every packaged config, sorted."""
    root = files("abmll.configs")
    return sorted(
        f"{d.name}/{f.name[:-5]}"
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(("_", "."))
        for f in d.iterdir()
        if f.name.endswith(".yaml")
    )


def resolve_config(name: str) -> Path:
    """A config file path for ``name``: an existing file as is, else a packaged short name
    (``tiny/abmll`` or ``tiny/abmll.yaml``). Raises ``FileNotFoundError`` listing the names."""
    if Path(name).is_file():
        return Path(name)
    stem = name[:-5] if name.endswith(".yaml") else name
    packaged = files("abmll.configs").joinpath(f"{stem}.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"--config {name}: no such file, and not a packaged config ({', '.join(packaged_configs())})"
    )


def resolve_config_arg(argv: Sequence[str], prog: str = "abmll_recipe") -> List[str]:
    """``argv`` with ``--config NAME`` (or ``--config=NAME``) mapped to the packaged YAML,
    unless NAME is a path; exits 2 with one line when it is neither."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        value = None
        if arg == "--config" and i + 1 < len(argv):
            idx, value = i + 1, argv[i + 1]
        elif arg.startswith("--config="):
            idx, value = i, arg.split("=", 1)[1]
        if value is None:
            continue
        try:
            resolved = str(resolve_config(value))
        except FileNotFoundError as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            sys.exit(2)
        argv[idx] = resolved if arg == "--config" else f"--config={resolved}"
    return argv


def instantiate(node, key: str, hint: str = ""):
    """torchtune's ``config.instantiate`` with one-line errors that name the config ``key``."""
    from omegaconf import DictConfig
    from torchtune import config

    if not isinstance(node, DictConfig) or "_component_" not in node:
        raise RecipeConfigError(f"{key}: expected a mapping with a _component_, got {node!r}")
    component = node.get("_component_")
    try:
        return config.instantiate(node)
    except ValueError as err:
        # Our components name their own key ("learner.beta must be ..."); keep their words.
        raise RecipeConfigError(str(err).strip().splitlines()[-1]) from None
    except Exception as err:
        # torchtune wraps import errors in InstantiationError; the cause says what failed.
        cause = err.__cause__ or err.__context__ or err
        unknown = _unknown_argument(key, component, cause)
        if unknown is not None:
            raise RecipeConfigError(unknown) from None
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise RecipeConfigError(
            f"{key}._component_: cannot build {component!r} ({type(cause).__name__}: {first})"
            + (f"; {hint}" if hint else "")
        ) from None


_BUILDERS_OWN = object()


def fill_builder_default(node, name: str, value=_BUILDERS_OWN) -> bool:
    """Write ``node.name`` into a config node that leaves it to its ``_component_``'s default:
    ``value``, or the component's own default. Nothing happens when the node sets the key, or
    when its component has no such argument or cannot be imported (:func:`instantiate` then
    reports it, naming the key). Returns whether the node changed.

    So that a run's recorded config names a choice the builder made for it (``model.sampling``:
    its estimator), and still names it after the builder's default changes."""
    import inspect

    from omegaconf import DictConfig, open_dict

    if not isinstance(node, DictConfig) or name in node or "_component_" not in node:
        return False
    try:
        from torchtune.config._utils import _get_component_from_path

        param = inspect.signature(_get_component_from_path(node.get("_component_"))).parameters.get(name)
    except Exception:
        return False
    if param is None or (value is _BUILDERS_OWN and param.default is inspect.Parameter.empty):
        return False
    with open_dict(node):
        node[name] = param.default if value is _BUILDERS_OWN else value
    return True


def _unknown_argument(key: str, component: str, err: BaseException) -> Optional[str]:
    """For ``TypeError: f() got an unexpected keyword argument 'x'``: one line naming the config
    key and the component's closest argument (a typo'd key in a ``_component_`` section)."""
    import inspect
    import re

    from abmll.config_keys import unknown_key_message

    found = re.search(r"unexpected keyword argument '([^']+)'", str(err))
    if not isinstance(err, TypeError) or found is None:
        return None
    try:
        from torchtune.config._utils import _get_component_from_path

        params = inspect.signature(_get_component_from_path(component)).parameters
    except Exception:  # noqa: BLE001 - fall back to torchtune's own message
        return None
    known = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if found.group(1) in known:  # raised by something the component called, not by the key
        return None
    return unknown_key_message(f"{key}.{found.group(1)}", known, component)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="abmll", description="List and copy abmll's packaged configs; `abmll evaluate RUN_DIR --out DIR` "
        "tests a finished run again (abmll evaluate --help).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("ls", help="list the packaged configs (names for --config)")
    cp = sub.add_parser("cp", help="copy a packaged config to a file you can edit")
    cp.add_argument("name", help="e.g. llama3_8b/abmll")
    cp.add_argument("destination", type=Path, help="file (or directory) to write")
    cp.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = p.parse_args(argv)
    if args.cmd == "ls":
        print("\n".join(packaged_configs()))
        return 0
    try:
        src = resolve_config(args.name)
    except FileNotFoundError as err:
        print(f"abmll cp: error: {err}", file=sys.stderr)
        return 2
    dest = args.destination / src.name if args.destination.is_dir() else args.destination
    if dest.exists() and not args.overwrite:
        print(f"abmll cp: error: {dest} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    shutil.copyfile(src, dest)
    print(f"copied {args.name} to {dest}; run it with: tune run abmll_recipe --config {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
