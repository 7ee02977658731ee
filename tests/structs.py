"""The C side of a struct contract, as gcc sees it: shared by the Service and policy eBPF tests."""

from __future__ import annotations

import ctypes as ct
import subprocess
from pathlib import Path


def fields(cls) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every field of a ctypes structure."""
    return [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, *_ in cls._fields_]


def assert_c_layouts(structs: dict[str, type], constants: dict[str, int], prelude: list[str], include_dir: Path,
                     tmp_path: Path, werror: bool = True) -> None:
    """Compile a program that prints sizeof/offsetof of every struct field and every constant as the
    C headers (``prelude`` lines, ``-I include_dir``) define them, and check each against Python."""
    lines = ["#include <linux/types.h>", "#include <stddef.h>", "#include <stdio.h>", *prelude, "int main(void) {"]
    for cname, cls in structs.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for name, _, _ in fields(cls):
            lines.append(f'printf("{cname}.{name} %zu %zu\\n", offsetof(struct {cname}, {name}), '
                         f'sizeof(((struct {cname} *)0)->{name}));')
    for macro in constants:
        lines.append(f'printf("{macro} %lld\\n", (long long)({macro}));')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    gcc = subprocess.run(["gcc", "-Wall", *(["-Werror"] if werror else []), f"-I{include_dir}", "-o", str(exe),
                          str(src)], capture_output=True, text=True)
    assert gcc.returncode == 0, gcc.stderr
    seen = dict(line.split(" ", 1) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                               check=True).stdout.splitlines())
    for cname, cls in structs.items():
        assert int(seen[cname]) == ct.sizeof(cls), cname
        for name, off, size in fields(cls):
            assert seen[f"{cname}.{name}"] == f"{off} {size}", f"{cname}.{name}"
    for macro, value in constants.items():
        assert int(seen[macro]) == value, macro
