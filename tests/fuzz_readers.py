"""Run by tests/test_reliability_fuzz.py in its own process: hypothesis mutates the bytes of the real DICOM and
NIfTI files pydicom and nibabel ship, and every mutant must either read or raise ``ImageReadError`` naming it.

Each case gets ``CASE_SECONDS`` (SIGALRM) before it counts as a hang; the test runs this script under an
address-space limit, so a header announcing a huge image can only fail with ``MemoryError`` (which the readers
must turn into ``ImageReadError``), never exhaust the machine. Prints one JSON line: cases, outcomes, escapes.

    python tests/fuzz_readers.py CASES
"""

from __future__ import annotations

import gzip
import json
import logging
import signal
import sys
import tempfile
import traceback
import warnings
from collections import Counter
from pathlib import Path

import nibabel
import pydicom.data
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scripts.data.readers import ImageReadError, read_header, read_image

CASE_SECONDS = 10
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"
SEEDS = {
    "CT_small.dcm": Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes(),
    "MR_small.dcm": Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes(),
    "anatomical.nii": (NIBABEL_DATA / "anatomical.nii").read_bytes(),
    # the compressed file is mutated before compression too, or nearly every mutant is only a bad gzip stream
    "example4d.nii.gz": gzip.decompress((NIBABEL_DATA / "example4d.nii.gz").read_bytes()),
}
HEADER_BYTES = {"dcm": 2048, "nii": 352, "gz": 352}


class CaseTimeout(Exception):
    """A case ran longer than CASE_SECONDS."""


def _alarm(signum, frame):
    raise CaseTimeout


@st.composite
def mutants(draw) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    header = HEADER_BYTES[name.rsplit(".", 1)[1]]
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        kind = draw(st.sampled_from(["byte", "word", "truncate", "insert", "delete"]))
        # most mutations hit the header, where a reader decides what to allocate and how to decode
        position = draw(st.one_of(st.integers(0, min(header, len(data)) - 1), st.integers(0, len(data) - 1)))
        if kind == "byte":
            data[position % len(data)] = draw(st.integers(0, 255))
        elif kind == "word" and len(data) >= 4:
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**31]))
            start = position % (len(data) - 3)
            data[start:start + 4] = value.to_bytes(4, "little")
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[position:position + draw(st.integers(1, 256))]
    content = bytes(data)
    if name.endswith(".gz"):
        content = gzip.compress(content, compresslevel=1)
        if draw(st.booleans()):  # and some compressed streams damaged as well
            cut = draw(st.integers(0, len(content) - 1))
            content = content[:cut] + bytes([draw(st.integers(0, 255))]) + content[cut + 1:]
    return name, content


def run(cases: int) -> dict:
    outcomes: Counter = Counter()
    escapes: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="fuzz_readers_"))
    signal.signal(signal.SIGALRM, _alarm)
    warnings.simplefilter("ignore")  # nibabel and pydicom warn about most mutants
    logging.disable(logging.WARNING)

    @settings(max_examples=cases, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(mutants())
    def case(mutant: tuple[str, bytes]) -> None:
        name, content = mutant
        outcomes["cases"] += 1
        path = folder / f"case{outcomes['cases']}_{name}"
        path.write_bytes(content)
        for reader in (read_header, read_image):
            signal.alarm(CASE_SECONDS)
            try:
                reader(path)
                outcomes[f"{reader.__name__} read"] += 1
            except ImageReadError as error:
                if error.path != path or str(path) not in str(error):
                    escapes.append(f"{name} ({reader.__name__}): ImageReadError not naming the file: {error}")
                outcomes[f"{reader.__name__} ImageReadError"] += 1
                break
            except CaseTimeout:
                escapes.append(f"{name} ({reader.__name__}): no answer within {CASE_SECONDS} s")
                break
            except Exception as error:  # noqa: BLE001 - the escapes this fuzzer looks for
                escapes.append(f"{name} ({reader.__name__}): {type(error).__name__}: {error}\n"
                               + "".join(traceback.format_exc(limit=-3)))
                break
            finally:
                signal.alarm(0)
        path.unlink()

    case()
    return {"cases": outcomes.pop("cases"), "outcomes": dict(outcomes), "escapes": escapes}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]))))
