"""English text from packages installed at set-up (never pasted into the repository).

* ``lee``: the Lee news corpus shipped in gensim's wheel (``gensim/test/test_data/lee_background.cor``, 300
  news articles, ~60k words), read as a file; gensim is never imported. Install with
  ``pip install --no-deps gensim==4.4.0``.
* ``lee-test``: the 50 held-out articles of the same corpus (``lee.cor``, ~4k words), disjoint from ``lee``.
* ``jargon``: the Jargon File from Debian's ``jargon-text`` package (public domain), if installed.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from ..errors import LMCompressError, ModelFileError

TEXT_SOURCES = ("lee", "lee-test", "jargon")


def _gensim_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "text source 'lee' needs gensim's wheel for its data files; "
            "install it with `pip install --no-deps gensim==4.4.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; reinstall gensim==4.4.0")
    return path


def documents(source: str = "lee") -> list[str]:
    """The documents of a text source, in file order."""
    if source == "lee":
        lines = _gensim_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
    elif source == "lee-test":
        lines = _gensim_file("lee.cor").read_text(encoding="latin-1").splitlines()
    elif source == "jargon":
        return [_jargon_text()]
    else:
        raise LMCompressError(f"text source {source!r} is unknown; allowed: {', '.join(TEXT_SOURCES)}")
    return [" ".join(line.split()) for line in lines if line.strip()]


def english_text(source: str = "lee") -> str:
    """All documents of ``source`` joined by blank lines."""
    return "\n\n".join(documents(source))


def _jargon_text() -> str:
    root = Path("/usr/share/jargon-text")
    candidates = sorted(root.glob("*.txt*")) if root.is_dir() else []
    candidates += sorted(Path("/usr/share/doc/jargon-text").glob("*.txt*"))
    for path in candidates:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="latin-1") as f:
                return f.read()
        return path.read_text(encoding="latin-1")
    raise ModelFileError("text source 'jargon' needs Debian's jargon-text package (`apt-get install jargon-text`)")
