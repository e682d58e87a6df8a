"""The apply_patch format, parsed and applied in memory: pure functions, no I/O.

The format codex's models write::

    *** Begin Patch
    *** Add File: <path>            every following line is "+<line>" of the new file
    *** Delete File: <path>
    *** Update File: <path>
    *** Move to: <new path>         optional, right after Update File
    @@ <optional anchor line>       one or more hunks; the first may omit "@@"
     <context line>                 " ", "-" or "+" then the line; an empty line is context
    -<removed line>
    +<added line>
    *** End of File                 optional: the hunk's lines end the file
    *** End Patch

A hunk's ``@@`` anchor is found first (from where the previous hunk ended), then its old lines
(context and removed) at or after it: exactly, else ignoring trailing whitespace, else ignoring
surrounding whitespace, else also treating typographic dashes and quotes as ASCII ones. A hunk
with only added lines goes right after its anchor, or at the end of the file without one. The
result ends with a newline; a file with CRLF line ends keeps them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

BEGIN = "*** Begin Patch"
END = "*** End Patch"
ADD = "*** Add File: "
DELETE = "*** Delete File: "
UPDATE = "*** Update File: "
MOVE = "*** Move to: "
END_OF_FILE = "*** End of File"
MAX_OPERATIONS = 100


class PatchError(ValueError):
    """The patch is malformed or does not apply; ``str`` says where and why."""


@attrs.frozen
class Hunk:
    anchor: str | None
    old: tuple[str, ...]
    new: tuple[str, ...]
    at_end_of_file: bool = False


@attrs.frozen
class AddFile:
    path: str
    content: str


@attrs.frozen
class DeleteFile:
    path: str


@attrs.frozen
class UpdateFile:
    path: str
    move_to: str | None
    hunks: tuple[Hunk, ...]


Operation = AddFile | DeleteFile | UpdateFile


def parse_patch(text: str) -> tuple[Operation, ...]:
    """Parse a whole patch; :class:`PatchError` names the offending line."""
    lines = text.strip().split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    if not lines or lines[0].strip() != BEGIN:
        raise PatchError(f"the first line of the patch must be '{BEGIN}'")
    if lines[-1].strip() != END:
        raise PatchError(f"the last line of the patch must be '{END}'")
    body = lines[1:-1]
    operations: list[Operation] = []
    i = 0
    while i < len(body):
        line = body[i]
        number = i + 2
        if line.startswith(ADD):
            path = _path(line, ADD, number)
            i += 1
            content: list[str] = []
            while i < len(body) and body[i].startswith("+"):
                content.append(body[i][1:])
                i += 1
            operations.append(AddFile(path, "".join(f"{c}\n" for c in content)))
        elif line.startswith(DELETE):
            operations.append(DeleteFile(_path(line, DELETE, number)))
            i += 1
        elif line.startswith(UPDATE):
            path = _path(line, UPDATE, number)
            i += 1
            move_to = None
            if i < len(body) and body[i].startswith(MOVE):
                move_to = _path(body[i], MOVE, i + 2)
                i += 1
            hunks, i = _parse_hunks(body, i, path)
            if not hunks and move_to is None:
                raise PatchError(f"line {number}: Update File {path} has no changes")
            operations.append(UpdateFile(path, move_to, tuple(hunks)))
        elif not line.strip():
            i += 1
        else:
            raise PatchError(
                f"line {number}: expected '{ADD.strip()}', '{DELETE.strip()}' or "
                f"'{UPDATE.strip()}', got {line[:80]!r}"
            )
        if len(operations) > MAX_OPERATIONS:
            raise PatchError(f"the patch has more than {MAX_OPERATIONS} file operations")
    if not operations:
        raise PatchError("the patch changes no file")
    seen: set[str] = set()
    for op in operations:
        paths = [op.path]
        if isinstance(op, UpdateFile) and op.move_to is not None:
            paths.append(op.move_to)
        for path in paths:
            if path in seen:
                raise PatchError(f"{path} appears more than once in the patch")
            seen.add(path)
    return tuple(operations)


def _path(line: str, prefix: str, number: int) -> str:
    path = line[len(prefix) :].strip()
    if not path:
        raise PatchError(f"line {number}: '{prefix.strip()}' needs a path")
    return path


def _is_header(line: str) -> bool:
    return line.startswith(("*** Add File:", "*** Delete File:", "*** Update File:"))


def _parse_hunks(body: Sequence[str], i: int, path: str) -> tuple[list[Hunk], int]:
    hunks: list[Hunk] = []
    while i < len(body) and not _is_header(body[i]):
        line = body[i]
        anchor: str | None = None
        if line.startswith("@@"):
            anchor = line[2:].strip() or None
            i += 1
        elif not hunks and line[:1] in (" ", "-", "+"):
            pass  # the first hunk may leave out its "@@"
        elif not line.strip():
            i += 1
            continue
        else:
            raise PatchError(
                f"line {i + 2}: expected a hunk ('@@') in Update File {path}, got {line[:80]!r}"
            )
        old: list[str] = []
        new: list[str] = []
        at_end = False
        while i < len(body):
            line = body[i]
            if line == END_OF_FILE:
                at_end = True
                i += 1
                break
            if line.startswith("@@") or _is_header(line):
                break
            kind, rest = line[:1], line[1:]
            if kind in (" ", ""):
                old.append(rest)
                new.append(rest)
            elif kind == "-":
                old.append(rest)
            elif kind == "+":
                new.append(rest)
            else:
                raise PatchError(
                    f"line {i + 2}: a hunk line must start with ' ', '-' or '+', got {line[:80]!r}"
                )
            i += 1
        if not old and not new:
            raise PatchError(f"Update File {path} has an empty hunk")
        hunks.append(Hunk(anchor, tuple(old), tuple(new), at_end))
    return hunks, i


_PUNCTUATION = str.maketrans(
    {
        "\u2010": "-",
        "\u2011": "-",
        "\u2012": "-",
        "\u2013": "-",
        "\u2014": "-",
        "\u2212": "-",
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u00a0": " ",
    }
)
_COMPARISONS: tuple[Callable[[str], str], ...] = (
    lambda s: s,
    str.rstrip,
    str.strip,
    lambda s: s.strip().translate(_PUNCTUATION),
)


def find_lines(
    lines: Sequence[str], pattern: Sequence[str], start: int, *, at_end: bool = False
) -> int | None:
    """Where ``pattern`` first occurs in ``lines`` from ``start``, trying each comparison."""
    if not pattern:
        return start
    last = len(lines) - len(pattern)
    if last < start:
        return None
    candidates = [last] if at_end else []
    candidates += range(start, last + 1)
    for normalise in _COMPARISONS:
        wanted = [normalise(p) for p in pattern]
        for i in candidates:
            if all(normalise(lines[i + k]) == wanted[k] for k in range(len(pattern))):
                return i
    return None


def apply_hunks(original: str, hunks: Sequence[Hunk], path: str) -> str:
    """The new content of ``path`` after ``hunks``; :class:`PatchError` if one does not apply."""
    eol = "\r\n" if "\r\n" in original and original.count("\n") == original.count("\r\n") else "\n"
    lines = original.split(eol)
    if lines and lines[-1] == "":
        lines.pop()
    replacements: list[tuple[int, int, tuple[str, ...]]] = []
    index = 0
    for number, hunk in enumerate(hunks, 1):
        if hunk.anchor is not None:
            found = find_lines(lines, [hunk.anchor], index)
            if found is None:
                raise PatchError(f"{path}: hunk {number}: the line {hunk.anchor!r} was not found")
            index = found + 1
        if not hunk.old:
            at = index if hunk.anchor is not None else len(lines)
            replacements.append((at, 0, hunk.new))
            continue
        old, new = hunk.old, hunk.new
        found = find_lines(lines, old, index, at_end=hunk.at_end_of_file)
        if found is None and old[-1] == "":
            # A trailing empty context line stands for the end of the file.
            old, new = old[:-1], new[:-1] if new and new[-1] == "" else new
            found = find_lines(lines, old, index, at_end=hunk.at_end_of_file) if old else None
        if found is None:
            shown = "\n".join(old[:8]) + ("\n…" if len(old) > 8 else "")
            raise PatchError(
                f"{path}: hunk {number}: these lines were not found (read the file again and "
                f"give its exact current lines):\n{shown}"
            )
        replacements.append((found, len(old), new))
        index = found + len(old)
    for at, length, new_lines in sorted(replacements, key=lambda r: r[0], reverse=True):
        lines[at : at + length] = list(new_lines)
    return "".join(line + eol for line in lines)
