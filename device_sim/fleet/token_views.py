"""SoftHSM token views: a fleet process loads the objects of a few tokens at a time, not
of the whole state directory (docs/fleet.md, "Memory").

SoftHSM's C_Initialize reads every object of every token under its token directory into
memory and keeps them there (measured: +56 MiB for 2,000 identities, ~28 KB each), so a
process that initialised it over 100,000 identities held ~2.8 GB whatever it did. A view
is a directory holding hard links to the files of some tokens, plus a configuration that
names it as the token directory: SoftHSM initialised with that configuration loads only
those tokens. Hard links share the files' inodes, so whatever SoftHSM writes or locks
through the view is the token itself. (Symbolic links do not work: SoftHSM skips them
when it lists its token directory; docs/token-quirks.md.)

SoftHSM names a token's directory after a UUID whose last 16 hex digits are the token's
serial number, which C_GetTokenInfo reports: so a view is made from the labels and
serials the slot child already asks for, without reading SoftHSM's own files.

Views live in `.device-sim-views/` beside the token directory (the same file system, as
hard links need) and are removed when their batch is done; ones an ended process left
behind are removed by the next run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Hashable, Iterable, Iterator, TypeVar

from device_sim.common.errors import UserError
from hsm_setup import module

T = TypeVar("T")
VIEWS_DIR = ".device-sim-views"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_TOKENDIR = re.compile(r"^\s*directories\.tokendir\s*=\s*(.*?)\s*$")


class ViewsUnavailable(UserError):
    """Why this module's tokens cannot be loaded a few at a time (before a run: all load at
    once; during one: the devices left cannot run)."""


@dataclasses.dataclass(frozen=True)
class TokenDirectory:
    """SoftHSM's token directory of one configuration file, indexed by token serial."""

    conf: Path
    path: Path
    by_serial: dict[str, Path]

    @classmethod
    def of(cls, conf: Path) -> "TokenDirectory":
        conf = Path(conf)
        try:
            text = conf.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ViewsUnavailable(f"cannot read {conf}: {exc}") from None
        found = [m.group(1) for line in text.splitlines() if (m := _TOKENDIR.match(line))]
        if not found:
            raise ViewsUnavailable(f"{conf} names no directories.tokendir")
        path = Path(found[-1])
        try:
            entries = [e for e in os.scandir(path) if e.is_dir(follow_symlinks=False) and _UUID.match(e.name)]
        except OSError as exc:
            raise ViewsUnavailable(f"cannot list {path}: {exc.strerror}") from None
        return cls(conf, path, {serial_of(e.name): Path(e.path) for e in entries})

    def directories(self, serials: dict[str, str]) -> list[Path]:
        """The token directories of `serials` (label -> serial); ViewsUnavailable naming a
        token whose directory is not where SoftHSM's layout puts it."""
        out = []
        for label, serial in serials.items():
            path = self.by_serial.get(serial.strip().lower())
            if path is None:
                raise ViewsUnavailable(f"token {label!r} (serial {serial}) has no directory in {self.path}")
            out.append(path)
        return out


def open_views(module_path: str, home: Path) -> "Views | None":
    """Views of the state directory's SoftHSM tokens; None for a module that is not SoftHSM
    (it loads once for the whole run); ViewsUnavailable when SoftHSM's files allow none."""
    if not module.is_softhsm(module_path):
        return None
    return Views(TokenDirectory.of(module.softhsm_conf(home)))


def objects_in(token_directory: Path) -> int:
    """How many objects SoftHSM keeps of this token (an .object file each, and the token's own)."""
    return sum(1 for entry in os.scandir(token_directory) if entry.name.endswith(".object"))


def batches(items: Iterable[T], *, key: Callable[[T], Hashable], weight: Callable[[Hashable], int],
            limit: int) -> Iterator[list[T]]:
    """Consecutive items in groups whose distinct keys weigh at most `limit` together; each
    key weighs once however many items share it (devices of one token), and a key heavier
    than `limit` is a group of its own. A group is held in memory."""
    group: list[T] = []
    keys: set = set()
    total = 0
    for item in items:
        k = key(item)
        if k not in keys:
            heavy = weight(k)
            if group and total + heavy > limit:
                yield group
                group, keys, total = [], set(), 0
            keys.add(k)
            total += heavy
        group.append(item)
    if group:
        yield group


def serial_of(directory_name: str) -> str:
    """The serial number SoftHSM reports for the token stored in this UUID-named directory."""
    name = directory_name.lower()
    return name[19:23] + name[24:]


class Views:
    """The views one run makes, each a numbered directory under `.device-sim-views/<pid>/`."""

    def __init__(self, tokens: TokenDirectory):
        self.tokens = tokens
        self.root = tokens.path.parent / VIEWS_DIR / str(os.getpid())
        self._made = 0
        try:
            (tokens.path.parent / VIEWS_DIR).mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise ViewsUnavailable(f"cannot make {tokens.path.parent / VIEWS_DIR}: {exc.strerror}") from None
        remove_stale(tokens.path.parent / VIEWS_DIR)

    def make(self, directories: list[Path]) -> Path:
        """A view of `directories` (token directories); returns its configuration file."""
        self._made += 1
        view = self.root / str(self._made)
        shutil.rmtree(view, ignore_errors=True)
        tokens = view / "tokens"
        try:
            self.root.mkdir(mode=0o700, exist_ok=True)
            tokens.mkdir(parents=True, mode=0o700)
            for source in directories:
                target = tokens / source.name
                target.mkdir(mode=0o700)
                for entry in os.scandir(source):
                    if entry.is_file(follow_symlinks=False):
                        os.link(entry.path, target / entry.name)
        except OSError as exc:
            shutil.rmtree(view, ignore_errors=True)
            raise ViewsUnavailable(f"cannot link token files into {view}: {exc.strerror}") from None
        conf = view / "softhsm2.conf"
        conf.write_text(_view_conf(self.tokens.conf, tokens), encoding="utf-8")
        return conf

    def remove(self, conf: Path) -> None:
        shutil.rmtree(Path(conf).parent, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _view_conf(conf: Path, tokens: Path) -> str:
    """The run's SoftHSM configuration with the view as its token directory."""
    lines = [line for line in conf.read_text(encoding="utf-8").splitlines() if not _TOKENDIR.match(line)]
    return "\n".join([f"directories.tokendir = {tokens}", *lines]) + "\n"


def remove_stale(views: Path) -> None:
    """Views of processes that are gone (killed runs)."""
    try:
        entries = list(os.scandir(views))
    except OSError:
        return
    for entry in entries:
        if entry.name.isdigit() and not _alive(int(entry.name)):
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
