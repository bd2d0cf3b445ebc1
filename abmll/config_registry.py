"""The packaged configs (``abmll/configs/{profile}/{method}.yaml``): list, resolve, copy.

One place for the lookup that ``tune run abmll_recipe --config NAME``, the benchmark and the
sweep use, and for the ``abmll ls`` / ``abmll cp`` command (torchtune's ``tune ls/cp`` only know
torchtune's own fixed registry):

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

__all__ = ["packaged_configs", "resolve_config", "main"]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="abmll", description="List and copy abmll's packaged configs.")
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
