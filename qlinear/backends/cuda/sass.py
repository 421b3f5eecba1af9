"""Machine code: what ptxas made of a kernel, read back as SASS.

A cubin is disassembled with ``nvdisasm`` (the ``nvidia-cuda-nvdisasm`` wheel, or a CUDA
toolkit's), which needs no GPU and no driver, so properties of the machine code (loads
issued before a wait, no local memory, the integer MMA instructions) are checked in CI.

The text ``nvdisasm -c`` prints, per kernel::

    .text.<mangled name>:
            /*0000*/                   LDC R1, c[0x0][0x28] ;
            /*0320*/              @!P4 LDG.E.128.CONSTANT R12, desc[UR8][R2.64] ;

is parsed into :class:`Instruction` rows: byte offset, guard predicate, opcode with its
modifiers, operands. Registers are read from the operands by name (``R12``; a ``.64``
or ``.128`` access covers the following registers too, see :attr:`Instruction.written`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from ...errors import BackendUnavailable

__all__ = ["Instruction", "find_nvdisasm", "disassemble", "first_use_index"]

_FUNCTION = re.compile(r"^\.text\.(\S+):\s*$")
# Opcodes are upper case but for a shape (``IGMMA.64x256x32.S8.S8``).
_LINE = re.compile(
    r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_GMMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_REG = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(?:\.(64|128))?")

#: Opcodes whose first operand is an address or value they read, not a register they write.
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "BAR", "EXIT", "CCTL", "RET", "CALL",
            "BSYNC", "BSSY", "WARPSYNC", "NOP", "ACQBULK", "MEMBAR", "ERRBAR", "DEPBAR",
            "YIELD", "SYNCS", "UCGABAR_ARV", "UCGABAR_WAIT", "ISETP", "FSETP", "DSETP",
            "HSETP2", "PLOP3", "UISETP")


@dataclass(frozen=True)
class Instruction:
    """One SASS instruction.

    Attributes:
        offset: byte offset in the kernel.
        guard: the predicate guard (``"@!P4"``), or ``""``.
        opcode: the opcode with its modifiers, e.g. ``"LDG.E.128.CONSTANT"``.
        operands: the operand text, comma-separated as printed.
    """

    offset: int
    guard: str
    opcode: str
    operands: tuple[str, ...]

    @property
    def op(self) -> str:
        """The opcode without modifiers: ``"LDG"``."""
        return self.opcode.split(".")[0]

    def _regs(self, operand: str) -> set[int]:
        regs: set[int] = set()
        for m in _REG.finditer(operand):
            first = int(m.group(1))
            if operand.lstrip().startswith("desc[") or "[" in operand:
                # An address: only the base pair is read (R2.64 -> R2, R3).
                count = 2 if m.group(2) else 1
            else:
                count = 1
            regs.update(range(first, first + count))
        return regs

    @property
    def written(self) -> set[int]:
        """Registers this instruction writes (its first operand, widened by the access
        size: ``LDG.E.128 R12`` writes R12..R15, ``LDG.E.64`` and ``IMAD.WIDE`` two,
        ``IMMA`` four, a warpgroup MMA ``IGMMA.64xNx32`` its N / 2 accumulators)."""
        if self.op in _NO_DEST or not self.operands:
            return set()
        m = _REG.match(self.operands[0].strip())
        if not m:
            return set()
        first = int(m.group(1))
        width = 1
        for mod in self.opcode.split(".")[1:]:
            if mod in ("64", "U64", "S64", "F64", "WIDE"):
                width = 2
            elif mod == "128":
                width = 4
        if self.op in ("IMMA", "HMMA"):
            width = 4
        shape = _GMMA_SHAPE.search(self.opcode) if self.op.endswith("GMMA") else None
        if shape:
            width = int(shape.group(1)) * int(shape.group(2)) // 128
        return set(range(first, first + width))

    @property
    def read(self) -> set[int]:
        """Registers this instruction reads (every operand but the one it writes)."""
        operands = self.operands if not self.written else self.operands[1:]
        regs: set[int] = set()
        for i, operand in enumerate(operands):
            found = self._regs(operand)
            if self.op in ("IMMA", "HMMA") and found:
                # Fragments: A in four registers, B in two, C in four.
                first = min(found)
                found = set(range(first, first + (2 if i == 1 else 4)))
            regs |= found
        return regs


def find_nvdisasm() -> str | None:
    """The ``nvdisasm`` executable: ``$QLINEAR_NVDISASM``, the ``nvidia-cuda-nvdisasm``
    wheel or a toolkit (found by cuda.pathfinder), else None."""
    explicit = os.environ.get("QLINEAR_NVDISASM")
    if explicit:
        return explicit
    try:
        import cuda.pathfinder as pf

        found = pf.find_nvidia_binary_utility("nvdisasm")
    except Exception:
        return None
    return str(found) if found else None


def disassemble(cubin: bytes) -> dict[str, list[Instruction]]:
    """``{mangled kernel name: instructions}`` of ``cubin``.

    Raises :class:`BackendUnavailable` without nvdisasm, and when it fails (its message
    included)."""
    tool = find_nvdisasm()
    if tool is None:
        raise BackendUnavailable("cuda", "nvdisasm was not found",
                                 "pip install nvidia-cuda-nvdisasm")
    with tempfile.TemporaryDirectory(prefix="qlinear-sass-") as tmp:
        path = os.path.join(tmp, "module.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        done = subprocess.run([tool, "-c", path], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BackendUnavailable("cuda", f"nvdisasm failed: {done.stderr.strip()}",
                                 "a nvdisasm as new as NVRTC (nvidia-cuda-nvdisasm)")
    kernels: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in done.stdout.splitlines():
        m = _FUNCTION.match(line.strip())
        if m:
            current = kernels.setdefault(m.group(1), [])
            continue
        m = _LINE.match(line)
        if m and current is not None:
            operands = tuple(o.strip() for o in m.group(4).split(",") if o.strip())
            current.append(Instruction(int(m.group(1), 16), (m.group(2) or "").strip(),
                                       m.group(3), operands))
    return kernels


def first_use_index(code: list[Instruction], start: int) -> int | None:
    """The index of the first instruction after ``code[start]`` that reads a register
    ``code[start]`` wrote, in program order (straight-line: branches are not followed);
    None if none does before one of them is written again."""
    live = set(code[start].written)
    for i in range(start + 1, len(code)):
        if code[i].read & live:
            return i
        live -= code[i].written
        if not live:
            return None
    return None
