"""The one directory walk of :mod:`floss.data.datasets`: image folders and dataset layouts are scanned by :func:`scan_tree`.

Symbolic links are followed, but never twice to the same place:

* every real directory (identified by ``(st_dev, st_ino)``) is listed at most once, so ``latest -> 2024``,
  ``self -> .`` or two links pointing at each other's parents neither duplicate files nor loop;
* every real file is listed at most once: a file link to a file that is already listed is skipped;
* paths without links win: the tree is first walked without following any link, then the directory links are
  followed (breadth first, in sorted order), then the file links are resolved; so a file reachable both directly
  and through a link keeps its direct path (its id), and a tree without links gives the same files as before;
* a broken link (its target is missing, or it loops on itself) whose name matches raises
  :class:`BrokenLinkError` naming the link and its target; any other broken link is skipped with a warning
  (it may have been a folder of matching files).

Unreadable folders are skipped with a warning, as ``os.walk`` skipped them (silently) before.
"""
from __future__ import annotations

import logging
import os
import stat
from collections import deque
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = ["BrokenLinkError", "scan_tree"]


class BrokenLinkError(FileNotFoundError):
    """A symbolic link named like an image (or label) points nowhere."""


def _dir_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Walk:
    def __init__(self, match: Callable[[str], bool], what: str):
        self.match, self.what = match, what
        self.dirs: set[tuple[int, int]] = set()
        self.files: dict[tuple[int, int, str], str] = {}    # (folder dev, folder inode, name) -> relative path
        self.dir_links: deque[tuple[str, str]] = deque()     # (relative path, path)
        self.file_links: list[tuple[str, str]] = []

    def broken(self, rel: str, path: str, err: OSError) -> None:
        message = f"{self.what}: broken symbolic link {path} -> {os.readlink(path)} ({err.strerror or err})"
        if self.match(os.path.basename(rel)):
            raise BrokenLinkError(f"{message}; remove it or point it at an existing file") from None
        logger.warning("%s; skipped (if it was meant to be a folder, its files are not included)", message)

    def plain(self, top: str, rel: str, key: tuple[int, int]) -> None:
        """Walk ``top`` (already in ``self.dirs`` as ``key``) without following links; queue the links found."""
        stack = [(top, rel, key)]
        while stack:
            folder, prefix, folder_key = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as err:
                logger.warning("%s: cannot list folder %s (%s); its files are not included", self.what, folder, err)
                continue
            subdirs = []
            for entry in entries:
                entry_rel = prefix + entry.name
                if entry.is_symlink():
                    self.dir_links.append((entry_rel, entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    sub_key = _dir_key(entry.stat(follow_symlinks=False))
                    if sub_key not in self.dirs:
                        self.dirs.add(sub_key)
                        subdirs.append((entry.path, entry_rel + "/", sub_key))
                elif self.match(entry.name):
                    self.files.setdefault((*folder_key, entry.name), entry_rel)
            stack.extend(reversed(subdirs))

    def links(self) -> None:
        """Follow the queued directory links (each new real folder once), then resolve the file links."""
        while self.dir_links:
            rel, path = self.dir_links.popleft()
            try:
                st = os.stat(path)
            except OSError as err:
                self.broken(rel, path, err)
                continue
            if stat.S_ISDIR(st.st_mode):
                key = _dir_key(st)
                if key in self.dirs:
                    logger.debug("%s: link %s leads to a folder already scanned; not followed", self.what, path)
                    continue
                self.dirs.add(key)
                self.plain(path, rel + "/", key)
            elif self.match(os.path.basename(rel)):
                self.file_links.append((rel, path))
        for rel, path in sorted(self.file_links):
            real = os.path.realpath(path)
            key = (*_dir_key(os.stat(os.path.dirname(real))), os.path.basename(real))
            if key in self.files:
                logger.debug("%s: link %s leads to %s, already listed; skipped", self.what, path, self.files[key])
                continue
            self.files[key] = rel


def scan_tree(root: str | os.PathLike, match: Callable[[str], bool], *, what: str = "scan") -> list[str]:
    """The files under ``root`` whose names satisfy ``match``, as sorted ``/``-separated paths relative to ``root``.

    Links are followed at most once per real folder and real file (see the module docstring). ``what`` names the
    caller in messages (e.g. ``"--images"``). Raises :class:`BrokenLinkError` for a broken link whose name
    matches, ``NotADirectoryError`` when ``root`` is not a folder.
    """
    root = Path(root)
    try:
        st = os.stat(root)
    except OSError as err:
        raise FileNotFoundError(f"{what}: folder {root} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{what}: {root} is not a folder")
    walk = _Walk(match, what)
    walk.dirs.add(_dir_key(st))
    walk.plain(os.fspath(root), "", _dir_key(st))
    walk.links()
    return sorted(walk.files.values())
