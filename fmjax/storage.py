"""Workdir paths that may be local or remote (`gs://bucket/run`), via etils.epath.

Remote object stores cannot append to a file, so `append_line` rewrites the
object there; locally it appends. Remote paths need the store's fsspec driver
(`gcsfs` for gs://, in the [tpu] extra).
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(*parts: str) -> str:
    """Joins without touching the file system (and without abspath on URLs)."""
    head, *rest = (str(p) for p in parts)
    if not is_remote(head):
        head = os.path.abspath(head)
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in rest)])


def makedirs(path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def write_text(path: str, text: str) -> None:
    epath.Path(path).write_text(text)


def write_bytes(path: str, data: bytes) -> None:
    epath.Path(path).write_bytes(data)


def read_text(path: str) -> str:
    return epath.Path(path).read_text()


def append_line(path: str, line: str) -> None:
    if is_remote(path):
        old = read_text(path) if exists(path) else ""
        write_text(path, old + line + "\n")
    else:
        with open(path, "a") as f:
            f.write(line + "\n")
